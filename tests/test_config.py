"""The one config: recipes, overrides, validation, JSON round-trip."""

from __future__ import annotations

import json

import pytest

from pipeline import config as C


def test_recipes_carry_the_papers_settings():
    cifar = C.load_recipe("cifar")
    assert (cifar.optim.name, cifar.optim.lr, cifar.optim.momentum, cifar.optim.nesterov) == ("sgd", 0.1, 0.9, True)
    assert (cifar.optim.batch_size, cifar.train.epochs, cifar.optim.weight_decay) == (64, 300, 1e-4)
    assert cifar.epochs_milestones() == [150, 225]
    svhn = C.load_recipe("svhn")
    assert svhn.train.epochs == 40 and svhn.epochs_milestones() == [20, 30] and not svhn.data.augment
    assert svhn.model_spec().drop_rate == 0.2
    imagenet = C.load_recipe("imagenet")
    assert imagenet.optim.batch_size == 256 and imagenet.train.epochs == 90
    assert imagenet.epochs_milestones() == [30, 60] and imagenet.model.name == "densenet121"
    smoke = C.load_recipe("smoke")
    assert smoke.model.name == "densenet_simple" and smoke.train.epochs <= 5
    assert set(C.recipe_names()) >= {"cifar", "svhn", "imagenet", "smoke"}
    for name in C.recipe_names():
        C.validate(C.load_recipe(name))


def test_cifar_nets_without_augmentation_get_the_papers_dropout():
    cfg = C.apply_overrides(C.load_recipe("cifar"), ["data.augment=false"])
    assert cfg.model_spec().drop_rate == 0.2
    assert C.load_recipe("cifar").model_spec().drop_rate == 0.0
    explicit = C.apply_overrides(cfg, ["model.drop_rate=0.0"])
    assert explicit.model_spec().drop_rate == 0.0
    # ImageNet nets never get it.
    inet = C.apply_overrides(C.load_recipe("imagenet"), ["data.augment=false"])
    assert inet.model_spec().drop_rate == 0.0


def test_json_round_trip_is_exact(tmp_path):
    cfg = C.apply_overrides(C.load_recipe("imagenet"), [
        "optim.lr=0.2", "tracking.tags=[a, b]", "model.growth_rate=48", "cluster.storage=s3://b/x"])
    assert C.Config.from_json(cfg.to_json()) == cfg
    path = cfg.save(tmp_path / "out" / "config.json")
    assert C.Config.load(path) == cfg
    assert json.loads(path.read_text())["optim"]["lr"] == 0.2
    assert cfg.digest() == C.Config.load(path).digest() != C.load_recipe("imagenet").digest()


@pytest.mark.parametrize("override,message", [
    ("optim.lrr=0.1", "unknown key optim.lrr"),
    ("foo.lr=0.1", "unknown section 'foo'"),
    ("optim.lr=fast", "optim.lr: expected float"),
    ("train.amp=fp8", "train.amp: expected one of"),
    ("train.epochs=1.5", "train.epochs: expected int"),
    ("lr=0.1", "section.key"),
    ("optim.lr", "KEY=VALUE"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(C.ConfigError, match=message):
        C.apply_overrides(C.load_recipe("cifar"), [override])


def test_unknown_keys_in_files_are_errors():
    data = C.load_recipe("cifar").to_dict()
    data["optim"]["momentun"] = 0.9
    with pytest.raises(C.ConfigError, match="unknown key optim.momentun"):
        C.Config.from_dict(data)
    with pytest.raises(C.ConfigError, match="not valid JSON"):
        C.Config.from_json("{")


@pytest.mark.parametrize("overrides,message", [
    (["optim.lr=0"], "optim.lr must be > 0"),
    (["optim.batch_size=63", "cluster.nodes=2"], "does not divide across 2 workers"),
    (["model.depth=101"], "multiple of 6"),
    (["model.name=densenet_bc99"], "unknown model"),
    (["schedule.milestones=[0.75, 0.5]"], "must increase"),
    (["schedule.milestones=[150]"], "fractions in"),
    (["train.amp=fp16"], "fp16 needs GPUs"),
    (["cluster.nodes=0"], "cluster.nodes must be >= 1"),
])
def test_validation_refuses_impossible_configs(overrides, message):
    with pytest.raises(C.ConfigError, match=message):
        C.validate(C.apply_overrides(C.load_recipe("cifar"), overrides))


def test_milestones_bind_only_the_step_schedule():
    # The imagenet recipe's milestones are epochs 30 and 60: a 3-epoch step run cannot use
    # them, a 3-epoch cosine or constant run does not read them.
    short = ["train.epochs=3", "model.num_classes=10"]
    with pytest.raises(C.ConfigError, match="must be epochs in"):
        C.validate(C.apply_overrides(C.load_recipe("imagenet"), short))
    for kind in ("cosine", "constant", "linear"):
        C.validate(C.apply_overrides(C.load_recipe("imagenet"), short + [f"schedule.kind={kind}"]))


def test_recipe_files_and_errors(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("model:\n  name: densenet40_k12\ntrain:\n  epochs: 7\n")
    cfg = C.load_recipe(str(path))
    assert cfg.model.name == "densenet40_k12" and cfg.train.epochs == 7
    assert cfg.optim == C.OptimSection()
    with pytest.raises(C.ConfigError, match="unknown recipe 'cifarr'"):
        C.load_recipe("cifarr")
    (tmp_path / "bad.yaml").write_text("model: [1\n  bad: :")
    # One line: where and what, not the parser's multi-line report.
    with pytest.raises(C.ConfigError) as e:
        C.load_recipe(str(tmp_path / "bad.yaml"))
    assert str(e.value) == f"recipe {tmp_path / 'bad.yaml'} is not valid YAML at line 2 (expected ',' or ']', but got ':')"
    # A file that is YAML but not a mapping is named as no recipe, its text not echoed.
    (tmp_path / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1::/:/bin/false\n")
    with pytest.raises(C.ConfigError, match=r"passwd is not a recipe: a recipe is a YAML mapping") as e:
        C.load_recipe(str(tmp_path / "passwd"))
    assert "root:x" not in str(e.value)


def test_yaml_words_for_choices_and_bools():
    cfg = C.apply_overrides(C.load_recipe("cifar"), ["tracking.wandb=off", "data.augment=no"])
    assert cfg.tracking.wandb == "off" and cfg.data.augment is False
    cfg = C.Config.from_dict({"tracking": {"wandb": False}, "data": {"augment": "yes"}})
    assert cfg.tracking.wandb == "off" and cfg.data.augment is True


def test_job_configs_name_the_key_that_is_wrong_missing_or_unknown():
    from jobs.doctor import DoctorConfig
    from jobs.evaluate import EvaluateConfig
    from jobs.predict import PredictConfig
    from pipeline.parsing import ConfigError, parse_dataclass

    conf = parse_dataclass(EvaluateConfig, {"checkpoint": "runs/a", "store": "s3://b/c", "gpu": "yes"})
    assert (conf.checkpoint, conf.store, conf.gpu, conf.tta, conf.out) == ("runs/a", "s3://b/c", True, "none", None)
    cases = [
        (EvaluateConfig, {"store": "x"}, "config needs checkpoint"),
        (EvaluateConfig, {"checkpoint": "a", "store": "x", "tta2": "flip"}, "unknown key tta2: config takes"),
        (EvaluateConfig, {"checkpoint": "a", "store": "x", "batch_size": "big"}, "batch_size: expected int, got 'big'"),
        (PredictConfig, {"checkpoint": "a"}, "config needs inputs, out"),
        (PredictConfig, {"checkpoint": "a", "inputs": "img.png", "out": "o"}, "inputs: expected a list, got 'img.png'"),
        (DoctorConfig, {"bogus": 1}, "unknown key bogus: config takes burn_in_s, quick, timeout_s"),
    ]
    for cls, data, message in cases:
        with pytest.raises(ConfigError) as e:
            parse_dataclass(cls, data)
        assert str(e.value).startswith(message), (cls.__name__, str(e.value))
