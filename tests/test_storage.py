"""Run folders in an object store: `--storage s3://...` for train, resume and evaluate.

The store is a real S3 server on this machine (moto's, over HTTP); Ray Train writes the
checkpoints through pyarrow, the job writes config, history, curves and W&B files beside
them, and `evaluate` and `--resume` read them back from there.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import storage
from pipeline.data.prepare import prepare
from pipeline.data.prepare_config import PrepareConfig
from pipeline.errors import UserError
from pipeline.train import checkpoint

TRAIN = ["--recipe", "smoke", "--nodes", "2", "--batch-size", "64", "--wandb", "offline",
         "--set", "data.augment=false"]


def test_join_parent_and_name_keep_the_query():
    uri = "s3://bucket/runs?endpoint_override=host:9000&scheme=http"
    run = storage.join(uri, "r1", "epoch-0001")
    assert run == "s3://bucket/runs/r1/epoch-0001?endpoint_override=host:9000&scheme=http"
    assert storage.parent(run) == "s3://bucket/runs/r1?endpoint_override=host:9000&scheme=http"
    assert storage.name(run) == "epoch-0001"
    assert storage.join("/data/runs", "r1") == "/data/runs/r1"
    assert storage.parent("/data/runs/r1") == "/data/runs"


def test_credentials_in_a_location_are_refused():
    with pytest.raises(UserError, match="carries credentials"):
        storage.check("s3://AKIAEXAMPLE:secret@bucket/runs")
    with pytest.raises(UserError, match="storage nope://"):
        storage.check("nope://bucket/runs")
    assert storage.check("/any/local/folder") == "/any/local/folder"


def test_local_write_is_atomic_and_listdir_sorted(tmp_path):
    target = tmp_path / "a" / "history.json"
    storage.write_text(target, "[1]")
    storage.write_text(target, "[1, 2]")
    assert target.read_text() == "[1, 2]" and storage.listdir(tmp_path / "a") == ["history.json"]
    assert storage.listdir(tmp_path / "missing") == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    """A real S3 server (moto) on a free local port, with an empty bucket; stopped after."""
    import pyarrow.fs

    port = _free_port()
    log = tmp_path_factory.mktemp("s3") / "server.log"
    with open(log, "w") as out:
        server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1",
                                   "-p", str(port)], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
        query = f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
        fs, _ = pyarrow.fs.FileSystem.from_uri(f"s3://runs?{query}&allow_bucket_creation=true")
        fs.create_dir("runs")
        yield f"s3://runs/densenet-pipe?{query}"
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stores") / "synthetic"
    prepare(PrepareConfig.from_dict({"dataset": "synthetic", "out": str(out), "workers": 1,
                                     "synthetic": {"train_size": 256, "val_size": 64, "num_classes": 10}}),
            log=lambda _: None)
    return out


@pytest.mark.ray
@pytest.mark.ffcv
@pytest.mark.timeout(900)
def test_train_resume_and_evaluate_with_runs_in_s3(ray_cluster, cli, store, bucket, tmp_path):
    run = storage.join(bucket, "s3run")
    r = cli("train", "densenet_simple", "--data", store, "--storage", bucket, "--name", "s3run",
            "--epochs", "2", *TRAIN)
    assert r.exit_code == 0, r.output
    names = storage.listdir(run)
    assert {"epoch-0001", "epoch-0002", "config.json", "history.json", "curves.png", "wandb"} <= set(names)
    assert [h["epoch"] for h in json.loads(storage.read_text(storage.join(run, "history.json")))] == [1, 2]
    assert checkpoint.load(run)["epoch"] == 2
    wandb_files = storage.listdir(storage.join(run, "wandb"))
    assert any(n.startswith("offline-run-") for n in wandb_files), wandb_files
    assert not (Path.cwd() / "runs" / "s3run").exists()

    r = cli("train", "densenet_simple", "--data", store, "--storage", bucket, "--name", "s3run",
            "--epochs", "2", *TRAIN)
    assert r.exit_code == 2 and "already exists" in r.output

    r = cli("train", "densenet_simple", "--data", store, "--storage", bucket, "--resume", "s3run",
            "--epochs", "3", *TRAIN)
    assert r.exit_code == 0, r.output
    assert "resuming s3run after epoch 2" in r.output
    history = json.loads(storage.read_text(storage.join(run, "history.json")))
    assert [h["epoch"] for h in history] == [1, 2, 3]

    r = cli("evaluate", run, "--data", store)
    assert r.exit_code == 0, r.output
    result = json.loads(storage.read_text(storage.join(run, "epoch-0003", "evaluation-synthetic-none.json")))
    assert result["epoch"] == 3 and result["images"] == 64
    assert result["top1_error"] == pytest.approx(history[-1]["val_top1_error"], abs=1e-9)
