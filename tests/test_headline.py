"""The project's two headline commands, typed exactly as README shows them:

    densenet-pipe prepare imagenet
    densenet-pipe train --nodes 4 densenet169

with only the user's settings naming where ImageNet's files are (a tiny ILSVRC2012-layout
tree) and where stores go, and no cluster running: `prepare` starts the embedded cluster
for its job, `train --nodes 4` grows that cluster to 4 nodes, picks the imagenet store
under the store root and trains DenseNet-169 with 4 workers on 4 nodes, until its first
epoch is reported; then it is stopped with `jobs stop`. A cluster of its own, in its own
folder, stopped at the end by that folder.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import nodes_env
from fixtures_data import make_ilsvrc
from pipeline import local_cluster

pytestmark = [pytest.mark.ray, pytest.mark.ffcv]

CLI = str(Path(sys.executable).with_name("densenet-pipe"))


def _wait_for_line(log: Path, pattern: str, proc: subprocess.Popen, timeout: float) -> re.Match:
    deadline = time.monotonic() + timeout
    while True:
        text = log.read_text(errors="replace") if log.exists() else ""
        found = re.search(pattern, text)
        if found:
            return found
        assert proc.poll() is None, f"train ended (exit {proc.returncode}) before {pattern!r}:\n{text[-3000:]}"
        assert time.monotonic() < deadline, f"no {pattern!r} within {timeout:.0f} s:\n{text[-3000:]}"
        time.sleep(1.0)


@pytest.mark.timeout(900)
def test_the_headline_commands_work_as_written(tmp_path):
    # 3 classes x 90 images of 32-39 px: more than one global batch of the imagenet recipe
    # (256), and as small as DenseNet-169's four 2x poolings after a stride-4 stem allow.
    make_ilsvrc(tmp_path / "ilsvrc", per_class=90, messy=False, sides=(32, 40))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "DENSENET_PIPE_SOURCES"))}
    env.pop("DENSENET_PIPE_STORE_ROOT", None)
    # The nodes run without numba compiling, as the shared test cluster's do (conftest's
    # nodes_env): 4 workers compiling on 2 cores is most of this test's time otherwise, and
    # it tests nothing the loader tests do not.
    env.update({**nodes_env(), "XDG_CONFIG_HOME": str(tmp_path / "config"),
                local_cluster.CLUSTER_DIR_ENV: str(Path(env[local_cluster.CLUSTER_DIR_ENV]) / "headline")})
    cluster_dir = Path(env[local_cluster.CLUSTER_DIR_ENV])

    def cli(*args: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run([CLI, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600, **kw)

    train = None
    try:
        for key, value in (("sources.imagenet", tmp_path / "ilsvrc"), ("store_root", tmp_path / "stores")):
            assert cli("config", "set", key, str(value)).returncode == 0
        prepared = cli("prepare", "imagenet")
        assert prepared.returncode == 0, prepared.stderr[-3000:]
        assert (tmp_path / "stores" / "imagenet" / "manifest.json").is_file()
        assert "sources.imagenet from" in prepared.stderr

        log = tmp_path / "train.log"
        with open(log, "w") as out:
            train = subprocess.Popen([CLI, "train", "--nodes", "4", "densenet169"], cwd=tmp_path, env=env,
                                     stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        job = _wait_for_line(log, r"submitted job (\S+)", train, 300).group(1)
        _wait_for_line(log, r"epoch 1/90: train loss", train, 600)
        text = log.read_text()
        assert f"data: {tmp_path / 'stores' / 'imagenet'}" in text
        assert "growing the local cluster (started by an earlier command) to 4 nodes" in text
        assert re.search(r"4 worker\(s\) on 4 node\(s\), global batch 256", text), text[-3000:]
        cluster = local_cluster.running(cluster_dir)
        assert cluster is not None and len(cluster.alive()) == 4

        stopped = cli("jobs", "stop", job)
        assert stopped.returncode == 0, stopped.stderr
        assert train.wait(timeout=120) == 1  # a stopped job: exit 1, as README says
        run = next((tmp_path / "runs").glob("densenet169-*"))
        assert (run / "epoch-0001" / "checkpoint.done").is_file()
    finally:
        if train is not None and train.poll() is None:
            train.kill()
            train.wait()
        if local_cluster.load(cluster_dir) is not None:
            local_cluster.down(cluster_dir)
