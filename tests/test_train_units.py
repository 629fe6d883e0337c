"""Training parts that need no cluster: optimizer groups, schedules, AMP, checkpoints, W&B offline."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline import config as C
from pipeline.errors import UserError
from pipeline.models.densenet import build
from pipeline.models.spec import resolve
from pipeline.train import amp, checkpoint, optim


def test_no_weight_decay_on_any_norm_or_bias_chosen_by_module_type():
    model = build(resolve("densenet121", num_classes=10))
    decay, no_decay = optim.param_groups(model, 1e-4)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    # norm0, norm1/norm2 in every layer, transition norms, norm5: names with no "bn" in them.
    assert len(norms) == 1 + 2 * 58 + 3 + 1
    no_decay_ids = {id(p) for p in no_decay["params"]}
    for m in norms:
        assert id(m.weight) in no_decay_ids and id(m.bias) in no_decay_ids
    assert id(model.classifier.bias) in no_decay_ids
    decay_ids = {id(p) for p in decay["params"]}
    convs = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(id(w) in decay_ids for w in convs) and id(model.classifier.weight) in decay_ids
    assert len(decay_ids) + len(no_decay_ids) == len(list(model.parameters()))


def test_step_schedule_divides_by_10_at_half_and_three_quarters():
    cfg = C.load_recipe("cifar")
    steps = 10
    f = [optim.lr_factor(s, steps, cfg) for s in range(300 * steps)]
    assert f[0] == 1 and f[150 * steps - 1] == 1
    assert f[150 * steps] == pytest.approx(0.1) and f[225 * steps - 1] == pytest.approx(0.1)
    assert f[225 * steps] == pytest.approx(0.01) and f[-1] == pytest.approx(0.01)
    imagenet = C.load_recipe("imagenet")
    assert optim.lr_factor(30 * steps, steps, imagenet) == pytest.approx(0.1)
    assert optim.lr_factor(60 * steps, steps, imagenet) == pytest.approx(0.01)


def test_cosine_with_warmup_is_stepped_per_iteration():
    cfg = C.apply_overrides(C.load_recipe("cifar"), [
        "schedule.kind=cosine", "schedule.milestones=[]", "schedule.warmup_epochs=2", "train.epochs=10"])
    steps = 4
    f = [optim.lr_factor(s, steps, cfg) for s in range(10 * steps)]
    assert f[:8] == pytest.approx([(i + 1) / 8 for i in range(8)])
    assert f[8] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[8:], f[9:]))
    assert f[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 31 / 32)))


def test_linear_lr_scaling_and_scheduler_state_round_trip():
    cfg = C.apply_overrides(C.load_recipe("imagenet"), ["optim.batch_size=1024", "optim.lr_reference_batch=256"])
    assert optim.base_lr(cfg) == pytest.approx(0.4)
    model = build(resolve("densenet_simple"))
    opt = optim.build_optimizer(model, cfg)
    assert opt.param_groups[0]["nesterov"] and opt.param_groups[0]["momentum"] == 0.9
    sched = optim.build_scheduler(opt, 5, cfg)
    for _ in range(30 * 5):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.04)
    again = optim.build_scheduler(optim.build_optimizer(model, cfg), 5, cfg)
    again.load_state_dict(sched.state_dict())
    assert again.last_epoch == 150


def test_amp_auto_on_cpu_follows_native_bf16_support_and_scales_only_fp16():
    cpu = torch.device("cpu")
    expected = torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None
    assert amp.resolve_dtype("auto", cpu) is expected
    assert amp.resolve_dtype("bf16", cpu) is torch.bfloat16
    assert amp.resolve_dtype("off", cpu) is None
    assert not amp.grad_scaler(cpu, torch.bfloat16).is_enabled()
    with amp.autocast(cpu, torch.bfloat16):
        y = nn.Linear(4, 4)(torch.randn(2, 4))
    assert y.dtype is torch.bfloat16


def _state(model):
    return {"model": model.state_dict(), "epoch": 3, "history": [{"epoch": 3, "val_top1_error": 0.5}],
            "config": C.load_recipe("smoke").to_dict(), "rng": {"torch": torch.get_rng_state()}}


def test_checkpoint_round_trip_and_newest(tmp_path):
    model = build(resolve("densenet_simple"))
    for epoch in (1, 2, 10):
        checkpoint.save(tmp_path / f"epoch-{epoch:04d}", {**_state(model), "epoch": epoch})
    assert Path(checkpoint.find(tmp_path)).parent.name == "epoch-0010"
    state = checkpoint.load(tmp_path / "epoch-0002")
    assert state["epoch"] == 2 and (tmp_path / "epoch-0002" / "config.json").is_file()
    fresh = build(resolve("densenet_simple"))
    fresh.load_state_dict(state["model"])
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    assert not list(tmp_path.rglob("*.tmp"))


def test_corrupt_or_foreign_checkpoints_are_user_errors(tmp_path):
    good = checkpoint.save(tmp_path / "epoch-0001", _state(build(resolve("densenet_simple"))))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(UserError, match="corrupt"):
        checkpoint.load(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save([1, 2, 3], foreign)
    with pytest.raises(UserError, match="not a densenet-pipe checkpoint"):
        checkpoint.load(foreign)
    with pytest.raises(UserError, match="does not exist"):
        checkpoint.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no checkpoint in"):
        checkpoint.load(tmp_path / "empty")


def test_a_checkpoint_cut_short_is_skipped_for_the_newest_whole_one(tmp_path, cli):
    model = build(resolve("densenet_simple"))
    for epoch in (1, 2, 3):
        checkpoint.save(tmp_path / f"epoch-{epoch:04d}", {**_state(model), "epoch": epoch})
    # A job stopped while Ray copied epoch 3 (no marker yet) and a .pt cut in half in epoch 2.
    (tmp_path / "epoch-0003" / checkpoint.DONE).unlink()
    pt = tmp_path / "epoch-0002" / checkpoint.FILE
    pt.write_bytes(pt.read_bytes()[: pt.stat().st_size // 2])
    said: list[str] = []
    found = checkpoint.newest(tmp_path, say=said.append)
    assert Path(found).parent.name == "epoch-0001"
    assert [s.split()[1] for s in said] == [str(tmp_path / "epoch-0003") + ":", str(tmp_path / "epoch-0002") + ":"]
    assert checkpoint.load(tmp_path)["epoch"] == 1
    # Same size, other bytes: only the hash tells.
    good = tmp_path / "epoch-0001" / checkpoint.FILE
    data = bytearray(good.read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "flipped").mkdir()
    (tmp_path / "flipped" / checkpoint.FILE).write_bytes(bytes(data))
    (tmp_path / "flipped" / checkpoint.DONE).write_bytes((tmp_path / "epoch-0001" / checkpoint.DONE).read_bytes())
    with pytest.raises(UserError, match="does not match its checkpoint.done"):
        checkpoint.load(tmp_path / "flipped")
    assert checkpoint.epoch_folder(tmp_path, 1) == str(tmp_path / "epoch-0001")
    with pytest.raises(UserError, match="no complete checkpoint of epoch 2 .* it has epoch-0001"):
        checkpoint.epoch_folder(tmp_path, 2)
    r = cli("evaluate", tmp_path, "--epoch", "3", "--data", tmp_path)
    assert r.exit_code == 2 and "no complete checkpoint of epoch 3" in r.stderr


def test_a_published_checkpoint_is_whole_and_retention_keeps_the_best_and_the_newest(tmp_path):
    run = tmp_path / "run"
    scores = {}
    for epoch, err in enumerate([0.5, 0.2, 0.4, 0.3], start=1):
        name = f"epoch-{epoch:04d}"
        local = tmp_path / "tmp" / name
        checkpoint.save(local, {"epoch": epoch, "history": []})
        checkpoint.publish(local, str(run / name))
        assert checkpoint.complete(run / name)
        scores[name] = err
        checkpoint.prune(str(run), 2, scores, newest=name)
    # Ray Train's rule: the 2 best by val error (epochs 2 and 4), and the newest always.
    assert sorted(p.name for p in run.iterdir()) == ["epoch-0002", "epoch-0004"]
    # A folder the session has no score for (written before a restart) is kept.
    (run / "epoch-0001").mkdir()
    del scores["epoch-0001"]
    scores["epoch-0004"] = 0.1
    assert checkpoint.prune(str(run), 1, scores, newest="epoch-0004") == ["epoch-0002"]
    assert sorted(p.name for p in run.iterdir()) == ["epoch-0001", "epoch-0004"]


def test_checkpoint_scratch_of_a_dead_worker_is_removed_and_a_live_ones_kept(tmp_path):
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = tmp_path / f"{checkpoint.SCRATCH_PREFIX}{gone.pid}-abc"
    mine = tmp_path / f"{checkpoint.SCRATCH_PREFIX}{os.getpid()}-def"
    unknown = tmp_path / f"{checkpoint.SCRATCH_PREFIX}xyz"
    for folder in (dead, mine, unknown):
        folder.mkdir()
        (folder / "checkpoint.pt").write_bytes(b"x")
    assert checkpoint.remove_dead_scratch(tmp_path) == [dead.name]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, unknown.name])
    with checkpoint.scratch_dir() as scratch:
        assert Path(scratch).name.startswith(f"{checkpoint.SCRATCH_PREFIX}{os.getpid()}-")


def test_a_restarted_in_process_trial_scores_the_checkpoints_it_resumes_with(tmp_path):
    from pipeline.train.loop import TuneSession

    run = tmp_path / "trial"
    for epoch in (1, 2, 3):
        checkpoint.save(run / f"epoch-{epoch:04d}", {"epoch": epoch, "history": []})
    session = TuneSession(str(run), keep=1, use_gpu=False)
    session.resumed([{"epoch": 1, "val_top1_error": 0.5}, {"epoch": 2, "val_top1_error": 0.2},
                     {"epoch": 3, "val_top1_error": 0.4}])
    # Epoch 1 is neither the best nor the newest: retention removes it, as it would have
    # before the restart.
    assert checkpoint.prune(str(run), 1, session.scores, newest="epoch-0003") == ["epoch-0001"]
    assert sorted(p.name for p in run.iterdir()) == ["epoch-0002", "epoch-0003"]


def test_a_failure_from_inside_ray_is_told_by_its_cause_not_the_actor():
    import traceback

    from ray.exceptions import RayTaskError

    from pipeline.errors import last_line
    from pipeline.train.loop import TrainingDiverged

    try:
        raise TrainingDiverged("the loss is nan at epoch 1 step 1: training diverged; lower optim.lr")
    except TrainingDiverged as cause:
        error = RayTaskError("ImplicitFunc.train", traceback.format_exc(), cause)
    assert str(error).splitlines()[0].startswith("\x1b[36m") or "pid=" in str(error).splitlines()[0]
    assert last_line(error) == ("pipeline.train.loop.TrainingDiverged: the loss is nan at epoch 1 "
                                "step 1: training diverged; lower optim.lr")
    assert last_line(RuntimeError()) == "RuntimeError"


def test_a_worker_group_left_unplaced_says_what_it_waits_for(monkeypatch):
    """A run whose workers wait for CPUs that other jobs hold says so (Ray Train is silent
    until its start timeout); placement groups that were there before the run are not its."""
    import time

    from pipeline.train import trainer

    monkeypatch.setattr(trainer, "PLACEMENT_NOTE_S", 0.2)
    groups = {"another-jobs": {"state": "PENDING", "strategy": "SPREAD", "bundles": {0: {"CPU": 4.0}}}}
    said: list[str] = []
    with trainer.PlacementWatch(say=said.append, table=lambda: dict(groups), free=lambda: {"CPU": 1.0},
                                total=lambda: {"CPU": 2.0}, every=0.05):
        groups["ours"] = {"state": "PENDING", "strategy": "PACK", "bundles": {0: {"CPU": 1.0}, 1: {"CPU": 1.0}}}
        deadline = time.monotonic() + 10
        while not said and time.monotonic() < deadline:
            time.sleep(0.05)
        groups["ours"]["state"] = "CREATED"
    assert len(said) == 1, said
    assert said[0].startswith("waited ") and said[0].endswith("the run starts when they free up")
    assert "the run's 2 worker(s) of 1 CPU each (pack): 1 of 2 CPUs free now" in said[0]


def test_the_epoch_line_leaves_out_top5_where_it_is_zero_by_definition():
    from pipeline.train.loop import epoch_line

    row = {"epoch": 2, "train_loss": 0.5, "train_top1_error": 0.25, "val_loss": 0.6,
           "val_top1_error": 0.3, "val_top5_error": 0.0, "images_per_s": 1234.0, "epoch_time_s": 3.0}
    assert epoch_line(row, 5, classes=10) == (
        "epoch 2/5: train loss 0.5000 top-1 err 0.2500 | val loss 0.6000 top-1 err 0.3000 "
        "top-5 err 0.0000 | 1,234 img/s, 3.0 s")
    three = epoch_line(row, 5, classes=3)
    assert "top-5" not in three and three.startswith("epoch 2/5: ") and "top-1 err 0.3000 | 1,234" in three
