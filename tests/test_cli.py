"""The CLI surface that needs no cluster: help, models, config resolution and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.models import spec

runner = CliRunner()


def test_help_does_not_import_heavy_modules():
    code = ("import sys; from typer.testing import CliRunner; from pipeline.cli import app; "
            "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
            "print(' '.join(m for m in ('torch', 'ffcv', 'ray.train', 'ray', 'wandb', 'numba') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


@pytest.mark.parametrize("words,expect", [
    ("densenet-pipe train densenet16", ["densenet161", "densenet169"]),
    ("densenet-pipe prepare cif", ["cifar10", "cifar100"]),
    ("densenet-pipe train densenet121 --recipe sm", ["smoke"]),
    ("densenet-pipe config set sources.im", ["sources.imagenet", "sources.imagefolder"]),
])
def test_shell_completion_of_models_datasets_recipes_and_settings(words, expect, tmp_path):
    import os

    env = {**os.environ, "_DENSENET_PIPE_COMPLETE": "complete_bash", "COMP_WORDS": words,
           "COMP_CWORD": str(len(words.split()) - 1)}
    cli = str(Path(sys.executable).with_name("densenet-pipe"))
    out = subprocess.run([cli], env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert sorted(out.stdout.split()) == sorted(expect), out.stdout + out.stderr
    assert "--install-completion" in runner.invoke(app, ["--help"]).output


def test_models_json_lists_the_whole_zoo():
    r = runner.invoke(app, ["models", "--format", "json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert [row["name"] for row in rows] == spec.names()
    for row in rows:
        assert {"name", "depth", "growth_rate", "bottleneck", "compression", "num_classes",
                "input_size", "params", "macs"} <= set(row)
    by_name = {row["name"]: row for row in rows}
    assert round(by_name["densenet_bc190_k40"]["params"] / 1e6, 1) == 25.6
    assert by_name["densenet161"]["growth_rate"] == 48
    assert round(by_name["densenet121"]["macs"] / 1e9, 2) == 2.83


def test_models_table_and_overrides():
    r = runner.invoke(app, ["models"])
    assert r.exit_code == 0
    assert "densenet_bc250_k24" in r.stdout and "15.32M" in r.stdout
    r = runner.invoke(app, ["models", "densenet_bc100_k12", "--growth-rate", "24", "--format", "json"])
    (row,) = json.loads(r.stdout)
    assert row["growth_rate"] == 24 and row["depth"] == 100


@pytest.mark.parametrize("args,needle", [
    (["models", "densenet99"], "unknown model 'densenet99'; known models: densenet121"),
    (["models", "densenet_bc100_k12", "--depth", "101"], "(depth - 4) must be a positive multiple of 6"),
    (["models", "--format", "xml"], "'xml' is not one of 'table', 'json'"),
    (["export", "runs/x"], "Missing option '--format'. Choose from: safetensors, torchscript, onnx (see"),
    (["train", "densenet_bc100_k12", "--depth", "102", "--dry-run"], "multiple of 6"),
    (["train", "densenet_bc100_k12", "--batch-size", "63", "--nodes", "2", "--dry-run"], "does not divide"),
    (["train", "densenet_bc100_k12", "--set", "optim.lrr=1", "--dry-run"], "unknown key optim.lrr"),
    (["train", "resnet50", "--dry-run"], "unknown model 'resnet50'"),
    (["train", "densenet121", "--epochs", "3", "--dry-run"], "milestones [30.0, 60.0] must be epochs in (0, 3]"),
    (["prepare", "synthetic", "--noise", "-1", "--dry-run"], "synthetic noise must be >= 0"),
    (["train", "densenet_bc100_k12", "--from-epoch", "2", "--dry-run"], "give it with --resume NAME"),
    (["train", "densenet_bc100_k12", "--set", "train.resume=true", "--set", "train.resume_from_epoch=0",
      "--dry-run"], "--from-epoch must be in [1, 300)"),
    # A trailing slash names a folder, as for cp: never a file called "nowhere-1".
    (["export", "runs/x", "--format", "onnx", "--out", "nowhere-1/"], "--out nowhere-1/ names a folder, and there is none"),
    (["evaluate", "runs/x", "--data", "s", "--out", "nowhere-1/"], "--out nowhere-1/ names a folder, and there is none"),
    (["predict", "runs/x", "a.jpg", "--out", "nowhere-1/"], "--out nowhere-1/ names a folder: name the file to write"),
    (["predict", "runs/x", "stores/x", "--split", "test"], "unknown --split 'test': a store has train and val"),
    (["train", "densenet121", "--init-from", "w.pth", "--epochs", "1", "--dry-run"],
     "train.freeze_epochs (1) must be fewer than train.epochs (1), or nothing but the classifier would "
     "learn: pass --freeze-epochs 0 or --epochs 2"),
])
def test_bad_input_is_one_line_and_exit_2(args, needle):
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0]
    assert "Traceback" not in r.output


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    from pipeline.data.prepare import prepare
    from pipeline.data.prepare_config import PrepareConfig

    out = tmp_path_factory.mktemp("stores") / "tiny"
    prepare(PrepareConfig.from_dict({"dataset": "synthetic", "out": str(out), "workers": 1,
                                     "synthetic": {"train_size": 32, "val_size": 8}}), log=lambda _: None)
    return out


@pytest.mark.ffcv
def test_train_dry_run_resolves_recipe_flags_and_sets(tmp_path, tiny_store, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "cfg.json"
    r = runner.invoke(app, ["train", "densenet169", "--data", str(tiny_store), "--nodes", "4", "--epochs", "60",
                            "--lr", "0.4", "--set", "optim.label_smoothing=0.1", "--set", "model.num_classes=10",
                            "--dry-run", "--save-config", str(out)])
    assert r.exit_code == 0, r.output
    cfg = json.loads(r.stdout)
    assert cfg == json.loads(out.read_text())
    # ImageNet nets default to the imagenet recipe; flags and --set go on top.
    assert cfg["optim"]["batch_size"] == 256 and cfg["schedule"]["milestones"] == [30, 60]
    assert (cfg["cluster"]["nodes"], cfg["train"]["epochs"], cfg["optim"]["lr"]) == (4, 60, 0.4)
    assert cfg["optim"]["label_smoothing"] == 0.1 and cfg["model"]["name"] == "densenet169"
    # Paths are made absolute and a run name chosen before anything is submitted.
    assert cfg["data"]["store"] == str(tiny_store) and cfg["cluster"]["storage"] == str(tmp_path / "runs")
    assert cfg["cluster"]["run_name"].startswith("densenet169-")
    # --save-config replaces a config it wrote before, never another file.
    r = runner.invoke(app, ["train", "densenet169", "--data", str(tiny_store), "--epochs", "90",
                            "--dry-run", "--save-config", str(out)])
    assert r.exit_code == 0 and json.loads(out.read_text())["train"]["epochs"] == 90, r.output
    (tmp_path / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    (tmp_path / "list.json").write_text("[1, 2]")
    for target, needle in ((tmp_path / "photo.png", "exists and holds no config"),
                           (tmp_path / "list.json", "exists and holds no config"),
                           (tmp_path, "is a folder: name the file"),
                           (tmp_path / "no" / "cfg.json", "does not exist: create it")):
        kept = target.read_bytes() if target.is_file() else None
        r = runner.invoke(app, ["train", "densenet169", "--data", str(tiny_store), "--dry-run",
                                "--save-config", str(target)])
        assert r.exit_code == 2 and needle in r.stderr, (target, r.output)
        assert kept is None or target.read_bytes() == kept
    # A file as --storage is refused here, not by a job on the cluster.
    r = runner.invoke(app, ["train", "densenet169", "--data", str(tiny_store), "--storage",
                            str(tmp_path / "photo.png"), "--dry-run"])
    assert r.exit_code == 2 and "photo.png is a file: runs go into a folder" in r.stderr, r.output
    # Weights to start from, without a recipe: the fine-tuning recipe, not the paper's 90
    # epochs from lr 0.1 that would wash them out; a recipe given is kept.
    torch_file = tmp_path / "start.pth"
    torch_file.write_bytes(b"checked by the job")
    r = runner.invoke(app, ["train", "densenet121", "--data", str(tiny_store), "--init-from", str(torch_file),
                            "--set", "model.num_classes=10", "--dry-run"])
    assert r.exit_code == 0, r.output
    tuned = json.loads(r.stdout)
    assert "recipe: finetune, the default with --init-from" in r.stderr
    assert (tuned["train"]["epochs"], tuned["optim"]["lr"], tuned["schedule"]["kind"]) == (15, 0.01, "cosine")
    assert tuned["model"]["init_from"] == str(torch_file) and tuned["model"]["name"] == "densenet121"
    r = runner.invoke(app, ["train", "densenet121", "--data", str(tiny_store), "--init-from", str(torch_file),
                            "--recipe", "imagenet", "--set", "model.num_classes=10", "--dry-run"])
    assert json.loads(r.stdout)["train"]["epochs"] == 90 and "recipe: finetune" not in r.output
    r = runner.invoke(app, ["train", "densenet_bc100_k12", "--data", str(tiny_store), "--dry-run"])
    assert json.loads(r.stdout)["train"]["epochs"] == 300
    assert json.loads(r.stdout)["train"]["compile"] == "auto"
    for flag, mode in (("--compile", "on"), ("--no-compile", "off")):
        r = runner.invoke(app, ["train", "densenet_bc100_k12", "--data", str(tiny_store), flag, "--dry-run"])
        assert json.loads(r.stdout)["train"]["compile"] == mode
    r = runner.invoke(app, ["train", "densenet_bc100_k12", "--dry-run"])
    assert r.exit_code == 2 and "pass --data STORE" in r.stderr
    r = runner.invoke(app, ["train", "densenet_bc100_k12", "--data", str(tiny_store), "--set",
                            "model.num_classes=100", "--dry-run"])
    assert r.exit_code == 2 and "has 10 classes" in r.stderr


def test_storage_uri_with_credentials_is_refused_before_submitting(tiny_store):
    r = runner.invoke(app, ["train", "densenet_simple", "--data", str(tiny_store), "--storage",
                            "s3://AKIAEXAMPLE:secret@bucket/runs", "--dry-run"])
    assert r.exit_code == 2 and "carries credentials" in r.stderr
    assert "secret" not in r.output


@pytest.mark.parametrize("dataset,layout,needle", [
    ("imagefolder", ["train/cat/"], "has no val/ folder: lay it out as train/<class>/*.jpg"),
    ("imagefolder", ["val/cat/", "cat/"], "train is missing: lay it out"),
    ("svhn", ["test_32x32.mat"], "train_32x32.mat is missing"),
    ("imagenet", ["val/"], "no ImageNet train data in"),
    ("cifar100", ["cifar-100-python/train", "cifar-100-python/meta"], "cifar-100-python has no test"),
])
def test_a_source_laid_out_wrong_is_refused_before_any_cluster_or_job(dataset, layout, needle, tmp_path,
                                                                       monkeypatch):
    """On the local cluster the job would read this machine's files: their layout is checked
    here, so a wrong one is one line at once, with no cluster started and no job submitted."""
    from pipeline import local_cluster

    monkeypatch.setenv(local_cluster.CLUSTER_DIR_ENV, str(tmp_path / "cluster"))
    source = tmp_path / "source"
    for item in layout:
        (source / item).parent.mkdir(parents=True, exist_ok=True)
        (source / item).mkdir() if item.endswith("/") else (source / item).write_bytes(b"x")
    r = runner.invoke(app, ["prepare", dataset, "--source", str(source), "--out", str(tmp_path / "store")])
    assert r.exit_code == 2, r.output
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("error: ") and needle in line, line
    assert local_cluster.running(tmp_path / "cluster") is None and not (tmp_path / "store").exists()


def test_prepare_takes_its_source_as_an_argument_too(tmp_path, monkeypatch):
    """`prepare imagefolder PATH` is what a new user types first: the same as --source."""
    monkeypatch.chdir(tmp_path)
    for split in ("train", "val"):
        (tmp_path / "pics" / split / "cat").mkdir(parents=True)
    as_argument = runner.invoke(app, ["prepare", "imagefolder", "pics", "--dry-run"])
    as_option = runner.invoke(app, ["prepare", "imagefolder", "--source", "pics", "--dry-run"])
    assert as_argument.exit_code == 0, as_argument.output
    assert json.loads(as_argument.stdout)["source"] == str(tmp_path / "pics")
    assert json.loads(as_argument.stdout) == json.loads(as_option.stdout)
    both = runner.invoke(app, ["prepare", "imagefolder", "pics", "--source", "pics", "--dry-run"])
    assert both.exit_code == 0, both.output
    for args, needle in ((["imagefolder", "pics", "--source", "other"], "two sources, 'pics' and --source 'other'"),
                         (["synthetic", "pics"], "synthetic makes its images and takes no source")):
        r = runner.invoke(app, ["prepare", *args, "--dry-run"])
        assert r.exit_code == 2 and r.stderr.startswith("error: ") and needle in r.stderr, r.output


def test_a_resume_sizes_the_local_cluster_by_the_runs_own_nodes(tiny_store, tmp_path, monkeypatch):
    """The job trains a resumed run with its saved config, so the local cluster must have the
    run's nodes, not the recipe's default; `--nodes` on the resume moves it."""
    from pipeline import config as C, submit
    from pipeline.train import checkpoint

    saved = C.apply_overrides(C.load_recipe("smoke"), {
        "model.name": "densenet_simple", "data.store": str(tiny_store), "cluster.nodes": 3,
        "optim.batch_size": 48,
        "cluster.storage": str(tmp_path), "cluster.run_name": "r", "train.epochs": 2})
    (tmp_path / "r").mkdir(mode=0o700)
    saved.save(tmp_path / "r" / "config.json")
    checkpoint.save(tmp_path / "r" / "epoch-0001", {"epoch": 1})
    asked: list[dict] = []
    monkeypatch.setattr(submit, "run_job", lambda job, cfg, **kw: asked.append(kw["resources"]) or 0)
    # --nodes 6 splits the run's batch of 48, not the recipe's 64 that it never trained with.
    for more, nodes in (([], 3), (["--nodes", "2"], 2), (["--nodes", "6"], 6)):
        r = runner.invoke(app, ["train", "densenet_simple", "--storage", str(tmp_path), "--resume", "r",
                                "--epochs", "3", *more])
        assert r.exit_code == 0, r.output
        assert asked[-1]["nodes"] == asked[-1]["max_nodes"] == nodes
    # --dry-run shows what the job will train with: the run's batch and nodes, the new epochs.
    r = runner.invoke(app, ["train", "densenet_simple", "--storage", str(tmp_path), "--resume", "r",
                            "--epochs", "3", "--dry-run"])
    shown = json.loads(r.stdout)
    assert (shown["optim"]["batch_size"], shown["cluster"]["nodes"], shown["train"]["epochs"]) == (48, 3, 3)
    assert shown["model"]["name"] == "densenet_simple" and shown["train"]["resume"] is True


def test_w_and_b_s_environment_sets_tracking_under_the_flags(tiny_store, tmp_path, monkeypatch):
    """WANDB_MODE, WANDB_PROJECT, WANDB_ENTITY and WANDB_RUN_GROUP, as wandb.init reads them,
    set the run's tracking over the recipe; the flags and --set still win."""
    monkeypatch.chdir(tmp_path)
    base = ["train", "densenet_simple", "--recipe", "smoke", "--data", str(tiny_store), "--dry-run"]

    def tracking(*args: str) -> dict:
        r = runner.invoke(app, [*base, *args])
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout)["tracking"]

    assert tracking()["wandb"] == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_PROJECT", "pets")
    monkeypatch.setenv("WANDB_ENTITY", "lab")
    monkeypatch.setenv("WANDB_RUN_GROUP", "week-49")
    assert tracking() | {"tags": []} == {"wandb": "off", "project": "pets", "entity": "lab",
                                        "group": "week-49", "tags": [], "run_id": None}
    flagged = tracking("--wandb", "offline", "--wandb-project", "other", "--set", "tracking.entity=me")
    assert (flagged["wandb"], flagged["project"], flagged["entity"]) == ("offline", "other", "me")
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert tracking()["wandb"] == "offline"
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    r = runner.invoke(app, base)
    assert r.exit_code == 2 and "WANDB_MODE='sometimes' is not a W&B mode" in r.stderr, r.output
