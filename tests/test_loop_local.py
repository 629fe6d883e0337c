"""The worker loop in one process (`LocalSession`, no Ray): learning, checkpoint contents,
and a resumed run ending with the same weights as an uninterrupted one."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from fixtures_data import make_synthetic_store
from pipeline import config as C
from pipeline.train import checkpoint
from pipeline.train.loop import LocalSession, train_loop

pytestmark = pytest.mark.ffcv


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_synthetic_store(tmp_path_factory.mktemp("stores") / "syn", 256, 64)


@pytest.fixture(autouse=True)
def no_compile():
    # FFCV compiles each new Loader's pipeline (seconds each); decoding is the same without.
    from ffcv.pipeline.compiler import Compiler

    Compiler.set_enabled(False)
    yield
    Compiler.set_enabled(True)


def _run(store, run_dir, stop_after: int | None = None, resume: bool = False, **extra) -> None:
    cfg = C.validate(C.apply_overrides(C.load_recipe("smoke"), {
        "data.store": str(store), "data.augment": False, "data.loader_workers": 1,
        "train.epochs": 3, "train.resume": resume, "optim.batch_size": 32,
        "tracking.wandb": "off", "cluster.run_name": run_dir.name, "cluster.storage": str(run_dir.parent),
        **extra}))
    run_dir.mkdir(parents=True, exist_ok=True)
    loop_config = {"config": cfg.to_dict(), "run_dir": str(run_dir), "run_name": run_dir.name,
                   "manifest_sha256": hashlib.sha256((Path(store) / "manifest.json").read_bytes()).hexdigest()}
    try:
        train_loop(loop_config, LocalSession(run_dir, stop_after=stop_after))
    except LocalSession.Stopped:
        assert stop_after is not None


@pytest.mark.timeout(300)
def test_local_loop_learns_and_a_resumed_run_ends_with_the_same_weights(store, tmp_path, capsys):
    _run(store, tmp_path / "straight", **{"train.log_every_steps": 3})
    out = capsys.readouterr().out
    # A progress line every 3 of the epoch's 8 steps; the epoch's own line stands for the last.
    assert [line.split(" loss")[0] for line in out.splitlines() if " step " in line] == [
        f"epoch {e}/3 step {s}/8" for e in (1, 2, 3) for s in (3, 6)]
    assert [line.split(":")[0] for line in out.splitlines() if ": train loss" in line] == [
        "epoch 1/3", "epoch 2/3", "epoch 3/3"]
    straight = checkpoint.load(tmp_path / "straight")
    assert [h["epoch"] for h in straight["history"]] == [1, 2, 3]
    assert straight["history"][-1]["val_top1_error"] < 0.5  # chance is 0.9
    assert len(straight["store"]["classes"]) == 10
    assert {"model", "optimizer", "scheduler", "scaler", "config", "spec", "placement"} <= set(straight)

    _run(store, tmp_path / "broken", stop_after=1)
    assert checkpoint.load(tmp_path / "broken")["epoch"] == 1
    _run(store, tmp_path / "broken", resume=True)
    assert "resumed from epoch 1" in capsys.readouterr().out
    resumed = checkpoint.load(tmp_path / "broken")
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    for key, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][key]), key
    assert json.dumps(resumed["history"][0]) == json.dumps(
        checkpoint.load(tmp_path / "broken" / "epoch-0001")["history"][0])


@pytest.mark.timeout(300)
def test_a_run_taken_back_to_an_older_epoch_retrains_from_there(store, tmp_path, capsys):
    """`train --resume R --from-epoch 1`: newer checkpoints and Ray's record of them are set
    aside (kept), and the run retrains epochs 2-3 from epoch 1 to the same weights."""
    run = tmp_path / "run"
    _run(store, run)
    first = checkpoint.load(run)
    (run / checkpoint.RAY_RECORD).write_text("{}")
    with pytest.raises(Exception, match="no complete checkpoint of epoch 7"):
        checkpoint.set_aside_after(run, 7)
    aside = checkpoint.set_aside_after(run, 1)
    assert sorted(p.name for p in run.glob("epoch-*")) == ["epoch-0001"]
    assert sorted(p.name for p in (run / aside.rsplit("/", 1)[1]).iterdir()) == [
        checkpoint.RAY_RECORD, "epoch-0002", "epoch-0003"]
    assert checkpoint.set_aside_after(run, 1) is None
    _run(store, run, resume=True)
    assert "resumed from epoch 1" in capsys.readouterr().out
    again = checkpoint.load(run)
    assert [h["epoch"] for h in again["history"]] == [1, 2, 3]
    for key, tensor in first["model"].items():
        assert torch.equal(tensor, again["model"][key]), key


@pytest.mark.timeout(300)
def test_ema_weights_are_validated_checkpointed_and_what_evaluate_reads(store, tmp_path, capsys):
    from pipeline.infer import load
    from pipeline.train.evaluate import evaluate

    _run(store, tmp_path / "ema", **{"train.ema": 0.9})
    state = checkpoint.load(tmp_path / "ema")
    history = state["history"]
    assert all({"val_top1_error", "val_ema_top1_error", "val_ema_loss"} <= set(h) for h in history)
    ema = state["model_ema"]
    assert ema["updates"] == 3 * (256 // 32) and ema["decay"] == 0.9
    conv = "features.conv0.weight"
    assert not torch.equal(ema["weights"][conv], state["model"][conv])
    assert "(EMA " in capsys.readouterr().out
    # evaluate and predict read the average unless told otherwise; each matches its own
    # column of the last epoch's validation (the same val set, in one process).
    by_default = evaluate(tmp_path / "ema", store, loader_workers=1, say=lambda _l: None)
    raw = evaluate(tmp_path / "ema", store, loader_workers=1, weights="raw", say=lambda _l: None)
    assert by_default["weights"] == "ema" and raw["weights"] == "raw"
    assert by_default["top1_error"] == pytest.approx(history[-1]["val_ema_top1_error"], abs=1e-9)
    assert raw["top1_error"] == pytest.approx(history[-1]["val_top1_error"], abs=1e-9)
    assert torch.equal(load(tmp_path / "ema").model.state_dict()[conv], ema["weights"][conv])
    assert load(tmp_path / "ema", "raw").weights == "raw"
    # Another store with the same classes is evaluated, and said to be another one.
    said: list[str] = []
    assert by_default["store_trained_on"] is True
    other = make_synthetic_store(tmp_path / "other", 32, 64, seed=7)
    elsewhere = evaluate(tmp_path / "ema", other, loader_workers=1, say=said.append)
    assert elsewhere["store_trained_on"] is False and elsewhere["images"] == 64
    (note,) = [line for line in said if line.startswith("note: ")]
    assert f"the net trained on {store}" in note and f"{other} is another store" in note


@pytest.mark.timeout(300)
def test_progressive_resizing_follows_the_ramp_epoch_by_epoch(tmp_path, capsys):
    """An imagenet-family store, min_res 32 -> max_res 64 over epochs 1-3 in 16 px steps: the
    batches the net is fed have the ramp's size in each epoch, and the history says so."""
    from pipeline.data.loaders import make_loader, ramp_resolution, set_train_resolution
    from pipeline.data.store import open_store

    store = make_synthetic_store(tmp_path / "photos", 48, 16, resolution=72, min_size=40)
    assert open_store(store).family == "imagenet"
    ramp = {"data.min_res": 32, "data.max_res": 64, "data.start_ramp": 1, "data.end_ramp": 3,
            "data.res_step": 16}
    cfg = C.validate(C.apply_overrides(C.load_recipe("smoke"), {"data.store": str(store), **ramp}))
    assert [ramp_resolution(cfg.data, e) for e in (1, 2, 3, 4)] == [32, 48, 64, 64]

    # The loader itself: FFCV sizes its buffers from the decoder every epoch.
    loader, _ = make_loader(store, "train", 8, cfg.data, verify=False)
    for res in (32, 48, 64):
        set_train_resolution(loader, res)
        x, _ = next(iter(loader))
        assert tuple(x.shape[-2:]) == (res, res)

    # What the net is fed while training, seen by a global forward hook.
    from pipeline.models.densenet import DenseNet

    seen: list[int] = []

    def record(module, args):
        if isinstance(module, DenseNet) and module.training:
            seen.append(args[0].shape[-1])

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        _run(store, tmp_path / "ramp", **{**ramp, "optim.batch_size": 16, "data.augment": True})
    finally:
        handle.remove()
    history = checkpoint.load(tmp_path / "ramp")["history"]
    assert [h["train_resolution"] for h in history] == [32, 48, 64]
    steps = len(seen) // 3
    assert seen == [32] * steps + [48] * steps + [64] * steps
    out = capsys.readouterr().out
    assert "epoch 2/3: training at 48 px (progressive resizing" in out


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_compiled_run_learns_and_checkpoints_a_plain_state_dict(store, tmp_path, capsys):
    """`--compile`: Inductor's graphs train the net (minutes of compiling on 2 cores, hence
    slow), and the checkpoint holds the net's own keys, not the compiled wrapper's."""
    _run(store, tmp_path / "compiled", **{"train.compile": "on", "train.epochs": 2})
    out = capsys.readouterr().out
    assert "torch.compile on (--compile)" in out
    assert "torch.compile: the first step took" in out
    state = checkpoint.load(tmp_path / "compiled")
    assert state["history"][-1]["val_top1_error"] < 0.5  # chance is 0.9
    assert not [k for k in state["model"] if "_orig_mod" in k or k.startswith("module.")]


@pytest.mark.parametrize("cpus, asked, decoding", [(1.0, 2, 1), (2.0, 2, 2), (2.0, 8, 2), (8.0, 4, 4), (0.5, 2, 1)])
def test_a_cpu_worker_decodes_on_at_most_its_own_cpus(cpus, asked, decoding):
    from pipeline.train.loop import worker_data

    cfg = C.apply_overrides(C.Config(), {"cluster.cpus_per_worker": cpus, "data.loader_workers": asked})
    assert worker_data(cfg, torch.device("cpu")).loader_workers == decoding
    assert worker_data(cfg, torch.device("cpu")).store == cfg.data.store  # the rest is the user's
    # A GPU worker's compute is on the GPU: it decodes on the threads it was given.
    assert worker_data(cfg, torch.device("cuda", 0)).loader_workers == asked
