"""Fine-tuning: starting weights from torchvision's files (either key style), our checkpoints
or `torchvision`'s hub cache; the classifier replaced when the classes differ; a backbone
lr multiplier; features frozen for the first epochs (the loop in-process, no Ray)."""

from __future__ import annotations

import re

import pytest
import torch
import torchvision

from fixtures_data import make_synthetic_store
from pipeline import config as C
from pipeline.errors import UserError
from pipeline.models import init
from pipeline.models.densenet import build
from pipeline.models.spec import resolve
from pipeline.train import checkpoint, optim
from pipeline.train.loop import LocalSession, train_loop
from pipeline.wandb_records import RunView


def _old_style(state: dict) -> dict:
    """As torchvision's published files are: a dense layer's parts named norm.1, conv.2, ...,
    and no BatchNorm step counters (they came later)."""
    return {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v for k, v in state.items()
            if not k.endswith("num_batches_tracked")}


@pytest.fixture(scope="module")
def tv121(tmp_path_factory):
    torch.manual_seed(1)
    net = torchvision.models.densenet121(weights=None)
    file = tmp_path_factory.mktemp("weights") / "densenet121-a639ec97.pth"
    old = _old_style(net.state_dict())
    assert "features.denseblock1.denselayer1.norm.1.weight" in old
    torch.save(old, file)
    return net.eval(), file


def test_torchvision_file_with_old_keys_loads_and_the_classifier_is_replaced(tv121):
    tv, file = tv121
    said = []
    same = build(resolve("densenet121")).eval()
    record = init.load_into(same, str(file), say=said.append)
    assert record["classifier"] == "loaded" and len(record["sha256"]) == 64
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(same(x), tv(x))

    five = build(resolve("densenet121", num_classes=5))
    fresh = five.classifier.weight.detach().clone()
    record = init.load_into(five, str(file), say=said.append)
    assert record["classifier"] == "replaced" and "classifier replaced (1000 -> 5 classes" in said[-1]
    assert torch.equal(five.classifier.weight, fresh)
    assert torch.equal(five.features.conv0.weight, tv.features.conv0.weight)


def test_the_torchvision_source_reads_the_hub_cache_and_never_downloads(tv121, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(UserError, match=r"needs densenet121-a639ec97.pth in .*/torch/hub/checkpoints \(no download"):
        init.resolve("torchvision", "densenet121")
    with pytest.raises(UserError, match="torchvision publishes no weights for densenet264"):
        init.resolve("torchvision", "densenet264")
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "torch" / "hub" / "checkpoints" / tv121[1].name).write_bytes(tv121[1].read_bytes())
    assert init.resolve("torchvision", "densenet121").endswith("hub/checkpoints/densenet121-a639ec97.pth")


def test_weights_of_another_net_or_no_weights_are_one_line(tv121, tmp_path):
    _, file = tv121
    with pytest.raises(UserError, match=r"has no features.denseblock3.denselayer25.conv1.weight \(240 layer\(s\) missing\)"):
        init.load_into(build(resolve("densenet169")), str(file))
    gray = torch.load(file, weights_only=True)
    gray["features.conv0.weight"] = gray["features.conv0.weight"][:, :1]
    torch.save(gray, tmp_path / "gray.pth")
    with pytest.raises(UserError, match=r"layer features.conv0.weight is \(64, 1, 7, 7\) there and \(64, 3, 7, 7\)"):
        init.load_into(build(resolve("densenet121")), str(tmp_path / "gray.pth"))
    (tmp_path / "junk.pth").write_bytes(b"\x00junk")
    with pytest.raises(UserError, match="not a state dict torch can load safely"):
        init.load_into(build(resolve("densenet121")), str(tmp_path / "junk.pth"))
    with pytest.raises(UserError, match="does not exist"):
        init.resolve(str(tmp_path / "missing.pth"), "densenet121")


def test_backbone_lr_multiplier_groups():
    model = build(resolve("densenet_simple"))
    groups = optim.param_groups(model, 1e-4, lr=0.1, backbone_lr_mult=0.1)
    head = {id(p) for g in groups if not g["backbone"] for p in g["params"]}
    assert head == {id(model.classifier.weight), id(model.classifier.bias)}
    assert [g["lr"] for g in groups if g["backbone"]] == pytest.approx([0.01, 0.01])
    assert {g["lr"] for g in groups if not g["backbone"]} == {0.1}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


@pytest.mark.ffcv
@pytest.mark.timeout(300)
def test_frozen_epochs_keep_the_features_and_the_run_records_its_init(tmp_path, capsys):
    from ffcv.pipeline.compiler import Compiler

    store = make_synthetic_store(tmp_path / "syn", 128, 32)
    Compiler.set_enabled(False)
    try:
        def run(name: str, **overrides) -> None:
            cfg = C.validate(C.apply_overrides(C.load_recipe("smoke"), {
                "data.store": str(store), "data.augment": False, "data.loader_workers": 1,
                "optim.batch_size": 32, "tracking.wandb": "off", "cluster.run_name": name,
                "cluster.storage": str(tmp_path), **overrides}))
            (tmp_path / name).mkdir(exist_ok=cfg.train.resume)
            train_loop({"config": cfg.to_dict(), "run_dir": str(tmp_path / name), "run_name": name,
                        "manifest_sha256": "x" * 64}, LocalSession(tmp_path / name))

        run("source", **{"train.epochs": 1})
        source = checkpoint.load(tmp_path / "source")
        tuning = {"train.freeze_epochs": 1, "model.init_from": str(tmp_path / "source"),
                  "optim.backbone_lr_mult": 0.1, "tracking.wandb": "offline"}
        run("tuned", **{"train.epochs": 2, **tuning})
        capsys.readouterr()
        # Resumed, the run goes on from its own checkpoint: the source is not loaded again,
        # and the record of where the weights came from goes on with it.
        run("tuned", **{"train.epochs": 3, "train.resume": True, **tuning})
        resumed = capsys.readouterr().out
    finally:
        Compiler.set_enabled(True)
    frozen = checkpoint.load(tmp_path / "tuned" / "epoch-0001")["model"]
    after = checkpoint.load(tmp_path / "tuned" / "epoch-0002")
    for key, value in source["model"].items():
        if key.startswith("classifier."):
            assert not torch.equal(value, frozen[key]), key  # the classifier learned
        else:
            assert torch.equal(value, frozen[key]), key       # weights and BN statistics held
    assert not torch.equal(after["model"]["features.conv0.weight"], source["model"]["features.conv0.weight"])
    assert after["init"]["source"].endswith("source/epoch-0001/checkpoint.pt")
    assert after["init"]["sha256"] == checkpoint._sha256((tmp_path / "source" / "epoch-0001" / "checkpoint.pt"))
    assert after["init"]["classifier"] == "loaded"
    assert after["config"]["model"]["init_from"] == str(tmp_path / "source")
    assert "resumed from epoch 2" in resumed and "init:" not in resumed, resumed
    assert checkpoint.load(tmp_path / "tuned" / "epoch-0003")["init"] == after["init"]
    # W&B has the source by its sha256, as an artifact of the run (offline: logged as `used`);
    # the resumed part of the run (offline: a record of its own) names it too.
    first, then = sorted((tmp_path / "tuned").rglob("offline-run-*/*.wandb"), key=lambda p: p.stat().st_mtime)
    for data in (first, then):
        view = RunView.read(data)
        assert f"init-{after['init']['sha256'][:16]}" in view.artifacts
        assert view.summary["init_sha256"] == after["init"]["sha256"]
    assert RunView.read(then).epochs() == [3]
