"""Elastic runs (`--nodes MIN-MAX`): the rules in-process, then a real run on the session's
local cluster that grows when a node joins and shrinks when one is killed."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from fixtures_data import make_synthetic_store
from pipeline import config as C, runs, submit
from pipeline.train import checkpoint
from pipeline.train.loop import _resize, build_parts, hold
from pipeline.train.trainer import Placement, strategy
from pipeline.wandb_records import RunView


@pytest.mark.parametrize("text, parsed", [("3", (None, 3)), ("2-4", (2, 4)), (" 1-1 ", (1, 1))])
def test_nodes_is_a_count_or_a_range(text, parsed):
    assert runs.parse_nodes(text) == parsed


@pytest.mark.parametrize("text, message", [("4-2", "need 1 <= MIN <= MAX"), ("0-2", "need 1 <= MIN <= MAX"),
                                           ("two", "is not a count"), ("2-", "is not a count"),
                                           ("0", "--nodes must be >= 1, got 0")])
def test_a_bad_nodes_range_is_one_line_exit_2(cli, text, message):
    r = cli("train", "densenet_simple", "--nodes", text, "--data", "/srv/stores/cifar10", "--address", "http://127.0.0.1:9", "--dry-run")
    assert r.exit_code == 2 and message in r.stderr and "Traceback" not in r.output


def test_an_elastic_config_and_its_placement(cli):
    r = cli("train", "densenet_simple", "--recipe", "smoke", "--nodes", "2-3", "--batch-size", "96",
            "--data", "/srv/stores/cifar10", "--address", "http://127.0.0.1:9", "--dry-run")
    assert r.exit_code == 0, r.output
    cluster = json.loads(r.stdout)["cluster"]
    assert (cluster["min_nodes"], cluster["nodes"]) == (2, 3)
    elastic = Placement(3, 1, 1.0, False, min_nodes=2)
    assert elastic.num_workers == (2, 3) and strategy(elastic) == "SPREAD"
    assert Placement(3, 2, 1.0, False, min_nodes=1).num_workers == (2, 6)
    fixed = Placement(3, 1, 1.0, False)
    assert fixed.num_workers == 3 and strategy(fixed) == "STRICT_SPREAD"
    # The batch is stated for MAX nodes and must split across them.
    r = cli("train", "densenet_simple", "--recipe", "smoke", "--nodes", "2-3", "--batch-size", "64",
            "--data", "/srv/stores/cifar10", "--address", "http://127.0.0.1:9", "--dry-run")
    assert r.exit_code == 2 and "global batch 64 does not divide across 3 workers" in r.stderr
    with pytest.raises(C.ConfigError, match="fixed number of nodes"):
        C.validate(C.apply_overrides(C.load_recipe("smoke"), {"cluster.min_nodes": 1, "sweep.name": "s"}))
    with pytest.raises(C.ConfigError, match="cluster.min_nodes must be in"):
        C.validate(C.apply_overrides(C.load_recipe("smoke"), {"cluster.min_nodes": 3, "cluster.nodes": 2}))


def test_a_resized_run_keeps_each_workers_batch_and_continues_the_schedule():
    """2 of 3 workers: the lr is 2/3 of the full run's. Grown to 3 after two epochs, the
    optimizer and schedule are where a 3-worker run would be after two epochs."""
    cfg = C.validate(C.apply_overrides(C.load_recipe("smoke"), {
        "optim.batch_size": 96, "cluster.nodes": 3, "cluster.min_nodes": 2, "train.epochs": 6,
        "schedule.kind": "cosine", "schedule.warmup_epochs": 1.0}))
    spec = dataclasses.replace(cfg.model_spec(), num_classes=10)
    cpu = torch.device("cpu")

    def stepped(parts, steps):
        for _ in range(steps):
            parts.optimizer.step()
            parts.scheduler.step()
        return parts

    # 768 training images at 32 a worker: 12 steps an epoch on 2 workers, 8 on 3.
    two = stepped(build_parts(cfg, spec, cpu, 12, lr_scale=runs.elastic_lr_scale(2, 3)), 2 * 12)
    three = stepped(build_parts(cfg, spec, cpu, 8, lr_scale=1.0), 2 * 8)
    assert two.optimizer.param_groups[0]["lr"] == pytest.approx(three.optimizer.param_groups[0]["lr"] * 2 / 3)

    grown = build_parts(cfg, spec, cpu, 8, lr_scale=1.0)
    grown.optimizer.load_state_dict(two.optimizer.state_dict())
    grown.scheduler.load_state_dict(two.scheduler.state_dict())
    said = []
    _resize(grown, 2, 2, 3, 3, cfg, said.append)
    assert said == ["resized: 2 -> 3 workers after epoch 2: global batch 64 -> 96, lr x1.5, 8 steps an epoch"]
    for _ in range(10):  # into the third epoch and beyond: the two stay in step
        assert [g["lr"] for g in grown.optimizer.param_groups] == pytest.approx(
            [g["lr"] for g in three.optimizer.param_groups])
        stepped(grown, 1)
        stepped(three, 1)


def test_a_run_holds_at_an_epoch_end_while_its_hold_file_exists(tmp_path):
    said: list[str] = []
    hold(str(tmp_path / "HOLD"), 1, torch.device("cpu"), said.append)
    assert said == []  # no file: no wait, nothing said
    path = tmp_path / "HOLD"
    path.touch()
    waiter = threading.Thread(target=hold, args=(str(path), 4, torch.device("cpu"), said.append, 0.01))
    waiter.start()
    try:
        deadline = time.monotonic() + 60
        while not said and time.monotonic() < deadline:
            time.sleep(0.01)
        assert said == [f"holding after epoch 4: {path} exists (remove it to go on)"]
        assert waiter.is_alive()
    finally:
        path.unlink()
        waiter.join(60)
    assert not waiter.is_alive() and said[-1] == f"{path} is gone: going on"


# -- a real elastic run ------------------------------------------------------------------

@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_synthetic_store(tmp_path_factory.mktemp("stores") / "synthetic", 384, 96)


def _logs(cli, job_id: str) -> str:
    r = cli("jobs", "logs", job_id)
    assert r.exit_code == 0, r.output
    return r.output


def _wait_for_log(cli, job_id: str, text: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        out = _logs(cli, job_id)
        if text in out:
            return out
        assert time.monotonic() < deadline, f"job never logged {text!r}:\n{out[-3000:]}"
        time.sleep(1.0)


def _wait_for_checkpoint(folder: Path, epoch: int, timeout: float) -> None:
    # Ray Train's controller must have recorded the checkpoint before a node goes, or the
    # restart begins from the one before.
    snapshot = folder / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + timeout
    while f"epoch-{epoch:04d}" not in (snapshot.read_text() if snapshot.exists() else ""):
        assert time.monotonic() < deadline, f"Ray Train never recorded epoch {epoch}"
        time.sleep(0.2)


def _alive_ray_nodes(server) -> int:
    return sum(1 for n in server.nodes() if n.get("state") == "ALIVE")


def _wait_for_ray_nodes(server, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _alive_ray_nodes(server) != count:
        assert time.monotonic() < deadline, f"Ray never saw {count} alive nodes"
        time.sleep(0.5)


def _kill_node(node) -> None:
    """SIGKILL one node we started: its `ray start` and everything under it."""
    import psutil

    root = psutil.Process(node.pid)
    procs = [root, *root.children(recursive=True)]
    for proc in procs:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


@pytest.mark.ray
@pytest.mark.ffcv
@pytest.mark.slow  # about 3 minutes here: `make test-all`
@pytest.mark.timeout(900)
def test_an_elastic_run_grows_when_a_node_joins_and_shrinks_when_one_is_killed(
        ray_cluster, cli, store, tmp_path, monkeypatch):
    """`--nodes 2-3` on 2 nodes: epoch 1 on 2 workers; a third node joins and epoch 2 runs on 3;
    that node is killed and the run finishes on 2. The run holds at each epoch end (its hold
    file) so that each change lands between two known epochs, whatever the machine's speed."""
    from pipeline import local_cluster

    server = submit.connect(None, start=False)
    cluster = local_cluster.running()
    spare = cluster.nodes[-1]
    assert spare.role == "worker"
    os.kill(spare.pid, signal.SIGTERM)  # a graceful leave: the cluster is down to 2 nodes
    _wait_for_ray_nodes(server, 2, 120)

    # Killed, the node is still counted until Ray has missed its heartbeats, and the first
    # restart asks for 3 workers: it waits this long before coming back on 2.
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "20")
    runs_dir, hold_file = tmp_path / "runs", tmp_path / "hold"
    hold_file.touch()
    folder = runs_dir / "elastic"
    try:
        r = cli("train", "densenet_simple", "--recipe", "smoke", "--data", store, "--storage", runs_dir,
                "--name", "elastic", "--nodes", "2-3", "--batch-size", "48", "--epochs", "4",
                "--wandb", "offline", "--set", "data.augment=false",
                "--set", f"train.hold_file={hold_file}", "--set", "cluster.resize_interval_s=2",
                "--detach")
        assert r.exit_code == 0, r.output
        job_id = r.stdout.strip().splitlines()[-1]
        _wait_for_log(cli, job_id, "holding after epoch 1", 300)
        _wait_for_checkpoint(folder, 1, 120)

        assert cli("cluster", "up", "--nodes", "3", "--cpus-per-node", "1").exit_code == 0
        joined = local_cluster.running().nodes[-1]
        out = _wait_for_log(cli, job_id, "holding after epoch 2", 300)
        assert "resized: 2 -> 3 workers after epoch 1: global batch 32 -> 48, lr x1.5" in out
        _wait_for_checkpoint(folder, 2, 120)

        _kill_node(joined)
        out = _wait_for_log(cli, job_id, "holding after epoch 3", 300)
        assert "resized: 3 -> 2 workers after epoch 2: global batch 48 -> 32, lr x0.667" in out
        hold_file.unlink()
        r = cli("jobs", "logs", job_id, "--follow")
        assert r.exit_code == 0, r.output
    finally:
        hold_file.unlink(missing_ok=True)
        assert cli("cluster", "up", "--nodes", "3", "--cpus-per-node", "1").exit_code == 0
    assert len(local_cluster.running().alive()) == 3

    history = json.loads((folder / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert [h["workers"] for h in history] == [2, 3, 2, 2]
    state = checkpoint.load(folder)
    assert state["epoch"] == 4 and len(set(state["placement"])) == 2
    (data,) = folder.glob("wandb/offline-run-*/*.wandb")
    view = RunView.read(data)
    assert view.run_id == json.loads((folder / "config.json").read_text())["tracking"]["run_id"]
    assert view.run_id.startswith("elastic-") and view.name == "elastic" and view.epochs() == [1, 2, 3, 4]
    assert view.summary["ended"] == "finished"
