"""W&B on a real offline run: config, metrics, dataset and model artifacts; trouble is not fatal."""

from __future__ import annotations

import json

import pytest

from pipeline import config as C
from pipeline.tracking import ENDED, STEP_KEY, Tracker, resolve_mode
from pipeline.wandb_records import NotAWandbFile, RunView, read_records


@pytest.fixture
def no_key(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_ARTIFACT_DIR", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))


def test_modes_without_a_key(no_key):
    assert resolve_mode("online") == "offline"
    assert resolve_mode("offline") == "offline"
    assert resolve_mode("off") == "disabled"


@pytest.mark.timeout(120)
def test_offline_run_records_config_metrics_and_artifacts(no_key, tmp_path, capsys):
    cfg = C.apply_overrides(C.load_recipe("smoke"), ["tracking.wandb=online", "tracking.tags=[test]"])
    run_dir = tmp_path / "run"
    ckpt = tmp_path / "run" / "epoch-0001"
    ckpt.mkdir(parents=True)
    (ckpt / "checkpoint.pt").write_bytes(b"weights")
    tracker = Tracker.start(cfg, run_id="smoke-1", run_dir=run_dir)
    assert tracker.active and tracker.mode == "offline"
    assert "wandb sync" in capsys.readouterr().out
    tracker.use_dataset(json.dumps({"dataset": "synthetic"}), name="synthetic-store",
                        metadata={"splits": {"train": 10}})
    for step in range(1, 4):
        tracker.log({"step/loss": 1.0 / step}, step=step)
    tracker.log({"epoch/epoch": 1, "epoch/val_top1_error": 0.25}, step=3)
    # A restarted worker logs an earlier step again: kept, on our own step axis.
    tracker.log({"step/loss": 0.9}, step=2)
    tracker.log({"epoch/epoch": 2, "epoch/val_top1_error": 0.5}, step=6)
    tracker.log_checkpoint(ckpt, name="smoke-1-model", aliases=["latest", "best"], metadata={"epoch": 1})
    tracker.finish(ended="stopped_early")
    assert not tracker.active
    (offline,) = (run_dir / "wandb").glob("offline-run-*smoke-1")
    (data,) = offline.glob("*.wandb")
    assert "warning" not in capsys.readouterr().err
    view = RunView.read(data)
    assert view.run_id == "smoke-1"
    assert view.config["model"]["name"] == "densenet_simple"
    assert [row[STEP_KEY] for row in view.history if "step/loss" in row] == [1, 2, 3, 2]
    assert view.epochs() == [1, 2]
    assert view.summary["best_val_top1_error"] == 0.25 and view.summary["epochs_done"] == 2
    assert view.summary["ended"] == "stopped_early" and view.exit_code == 0
    assert {"synthetic-store", "smoke-1-model"} <= set(view.artifacts)
    # Nothing was staged under the home folder: the run keeps its own artifact dirs.
    assert (run_dir / "wandb" / "data").exists() or (run_dir / "wandb" / "cache").exists()


@pytest.mark.timeout(120)
def test_a_run_in_object_storage_reaches_it_without_waiting_for_a_checkpoint(no_key, s3_bucket, tmp_path,
                                                                            monkeypatch):
    """A run held after its first epoch, or killed there, has that epoch in the bucket: the
    W&B files are copied as they change, not only at checkpoints and at the end."""
    import time

    from pipeline import storage, tracking

    monkeypatch.setattr(tracking, "MIRROR_EVERY_S", 0.5)

    cfg = C.load_recipe("smoke")
    run = storage.join(s3_bucket, "tracked")
    tracker = Tracker.start(cfg, run_id="tracked", run_dir=run, announce=False)
    assert tracker.active and tracker.where.startswith("s3://")
    tracker.log({"epoch/epoch": 1, "epoch/val_top1_error": 0.5}, step=8)

    def in_bucket() -> RunView | None:
        for folder in storage.listdir(storage.join(run, "wandb")) if storage.exists(storage.join(run, "wandb")) else []:
            for name in storage.listdir(storage.join(run, "wandb", folder)):
                if name.endswith(".wandb"):
                    local = tmp_path / name
                    local.write_bytes(storage.read_bytes(storage.join(run, "wandb", folder, name)))
                    try:
                        return RunView.read(local)
                    except NotAWandbFile:
                        return None
        return None

    try:
        # A guard, not a timing: the copy comes within seconds.
        deadline = time.monotonic() + 90
        while (view := in_bucket()) is None or view.epochs() != [1]:
            assert time.monotonic() < deadline, "epoch 1 never reached the bucket while the run went on"
            time.sleep(0.5)
        assert view.exit_code is None and view.config["model"]["name"] == "densenet_simple"
    finally:
        scratch = tracker.local_dir
        tracker.finish(ended="stopped_by_user")
    assert in_bucket().exit_code == ENDED["stopped_by_user"]
    # The local stand-in folder goes once its files are in the bucket, and the next run of
    # this location gets a new one: nothing of this run is copied into another's.
    assert scratch is not None and not scratch.exists()
    first, second = storage.local_scratch(run, "wandb"), storage.local_scratch(run, "wandb")
    first.rmdir(), second.rmdir()
    assert first != second
    # `wandb sync` reads local folders only: the line says to copy the run down first, and
    # shows the URI without its endpoint query.
    line = tracking.offline_line(tracker.where)
    plain, folder = tracker.where.split("?")[0], tracker.where.split("?")[0].rsplit("/", 1)[-1]
    assert line == (f"W&B offline run: {plain}; upload it later: copy it to a disk (aws s3 cp --recursive "
                    f"{plain} ./{folder}), then `wandb sync ./{folder}`")
    assert tracking.offline_line("/runs/r/wandb/offline-run-1") == (
        "W&B offline run: /runs/r/wandb/offline-run-1; upload it later with `wandb sync /runs/r/wandb/offline-run-1`")


def test_a_torn_or_empty_file_reads_as_what_was_written(no_key, tmp_path):
    tracker = Tracker.start(C.load_recipe("smoke"), run_id="torn", run_dir=tmp_path)
    for step in range(1, 200):
        tracker.log({"step/loss": float(step)}, step=step)
    tracker.finish(ended="failed")
    (data,) = (tmp_path / "wandb").glob("offline-run-*/*.wandb")
    whole = data.read_bytes()
    full = RunView.read(data)
    assert full.exit_code == ENDED["failed"] == 1 and len(full.history) == 199
    torn = tmp_path / "torn.wandb"
    torn.write_bytes(whole[: len(whole) // 2])
    assert 0 < len(read_records(torn)) < len(read_records(data))
    torn.write_bytes(whole[:7])
    assert read_records(torn) == []
    torn.write_bytes(b"not a wandb file")
    with pytest.raises(NotAWandbFile):
        read_records(torn)


def test_other_ranks_and_off_do_nothing(no_key, tmp_path):
    cfg = C.load_recipe("smoke")
    assert not Tracker.start(cfg, run_id="x", run_dir=tmp_path, primary=False).active
    off = C.apply_overrides(cfg, ["tracking.wandb=off"])
    t = Tracker.start(off, run_id="x", run_dir=tmp_path)
    assert not t.active
    t.log({"a": 1})
    t.finish()
    assert not (tmp_path / "wandb").exists()


@pytest.mark.timeout(120)
def test_wandb_trouble_warns_and_training_goes_on(no_key, tmp_path, capsys):
    tracker = Tracker.start(C.load_recipe("smoke"), run_id="broken", run_dir=tmp_path / "run")
    assert tracker.active

    def refuse(*_a, **_k):
        raise ConnectionError("W&B is unreachable")

    tracker.run.log = refuse
    tracker.log({"loss": 1.0}, step=1)
    err = capsys.readouterr().err
    assert "warning: W&B log failed, training goes on" in err and "unreachable" in err
    assert not tracker.active
    tracker.log({"loss": 0.5}, step=2)
    tracker.finish()
    # The run is ended all the same: this process holds no unfinished run, and says nothing more.
    import wandb

    assert wandb.run is None
    assert "warning" not in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_an_unwritable_wandb_folder_is_one_warning(no_key, tmp_path, capsys):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the run folder should be")
    tracker = Tracker.start(C.load_recipe("smoke"), run_id="blocked", run_dir=blocker / "run")
    assert not tracker.active
    err = capsys.readouterr().err
    assert err.count("warning: W&B init failed, training goes on") == 1
    tracker.log({"epoch/epoch": 1}, step=1)
    tracker.finish(ended="finished")
    assert blocker.read_text().startswith("a file")



def test_every_call_rank_0_sends_the_driver_s_recorder_is_one_it_takes():
    """RemoteTracker's calls go to `Recorder.call`, which runs only the Tracker methods in
    FORWARDED: a method missing there failed each fine-tune's first call, and the run's W&B
    record lost every epoch after it."""
    from pipeline.tracking import FORWARDED, RemoteTracker, Tracker

    sent = {name for name, value in vars(RemoteTracker).items()
            if callable(value) and not name.startswith("_")} - {"connect", "finish"}
    assert sent == FORWARDED
    assert all(callable(getattr(Tracker, name, None)) for name in FORWARDED)


def test_a_runs_wandb_id_is_its_name_and_a_suffix_and_an_old_run_keeps_its_name():
    from pipeline.tracking import new_run_id, run_id_of

    a, b = new_run_id("baseline"), new_run_id("baseline")
    assert a != b and a.startswith("baseline-") and len(a) == len("baseline-") + 8
    assert new_run_id("a/b c").startswith("a-b-c-") and len(new_run_id("x" * 300)) <= 128
    cfg = C.apply_overrides(C.load_recipe("smoke"), {"cluster.run_name": "old"})
    assert run_id_of(cfg) == "old"
    assert run_id_of(C.apply_overrides(cfg, {"tracking.run_id": a})) == a
