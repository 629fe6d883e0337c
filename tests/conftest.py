"""Fixtures shared by every test module.

- Every session gets its own short cluster folder (`DENSENET_PIPE_CLUSTER_DIR`) and no
  `RAY_ADDRESS` nor W&B settings (`WANDB_MODE`, ...): tests never touch a developer's
  `.cluster/` or cluster.
- `ray_cluster`: one real local Ray cluster for the whole session, started the way users
  start it (`densenet-pipe cluster up --nodes 3 --cpus-per-node 1`) and stopped with
  `cluster down`; anything submitted without `--address` lands on it. Mark the tests that
  start Ray `@pytest.mark.ray`.
- The suite runs on two pytest-xdist workers (pyproject's `-n 2 --dist loadgroup`): the
  tests on the session's cluster all go to one of them, one after another in file order as
  they would run alone, so that cluster is started once; the other worker runs the
  in-process tests beside them, then the two tests that start clusters of their own. On 2
  cores the Ray tests alone leave a quarter to half of the CPU idle (they wait on Ray's
  starts and their jobs' logs), which the other worker uses.
- `cli`: runs `densenet-pipe ARGS...` in-process and returns click's Result.
- `s3_bucket`: a real S3 server on localhost (moto's) with an empty bucket; the URI of a
  folder in it, for `--storage s3://...`.
- Tests marked `slow` are deselected by default (pyproject's `-m "not slow"`); `make test-all`
  runs them too.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
from typer.testing import CliRunner, Result


def _cluster(item: pytest.Item) -> str | None:
    """Which Ray cluster a test runs on: "shared" (the session's `ray_cluster`), "own" (a
    `ray` test that starts a cluster of its own), None (in-process)."""
    if "ray_cluster" in getattr(item, "fixturenames", ()):
        return "shared"
    return "own" if item.get_closest_marker("ray") is not None else None


def pytest_itemcollected(item: pytest.Item) -> None:
    """The Ray tests in xdist groups (marked as collected: xdist reads the groups in its own
    `pytest_collection_modifyitems`)."""
    if (cluster := _cluster(item)) is not None:
        item.add_marker(pytest.mark.xdist_group(f"ray-{cluster}"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The shared cluster's tests first, so the worker that takes them starts at once (those
    that kill one of its nodes last among them); the in-process tests next, for the other
    worker; the tests with clusters of their own last, for whichever worker is free by then
    (pyproject keeps this order: --no-loadscope-reorder)."""
    # Tests that kill a node of the shared cluster run after its other tests, so that no
    # other test meets a cluster just grown back. The doubled worker lines a test once saw
    # after a kill had their cause in the node started in its place, which took a live node's
    # temp dir; it now takes one of its own (`test_cluster_cli::test_grow_then_down_...`).
    items.sort(key=lambda item: ({"shared": 0, None: 1, "own": 2}[_cluster(item)],
                                 item.get_closest_marker("kills_node") is not None))


_ray_worker: tuple[Path, object] | None = None


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Under xdist, the first shared-cluster test a worker runs takes this run's lock; such a
    test on another worker means the group was not kept (a pytest that xdist cannot group,
    see pyproject.toml) and fails saying so, before two session clusters compete."""
    global _ray_worker
    if _cluster(item) != "shared" or _ray_worker is not None or not hasattr(item.config, "workerinput"):
        return
    import fcntl

    path = Path(tempfile.gettempdir()) / f"densenet-pipe-tests-{item.config.workerinput['testrunuid']}.ray"
    lock = open(path, "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        pytest.fail("another xdist worker runs the shared cluster's tests: the `ray-shared` group "
                    "was not kept (pytest-dev/pytest-xdist#1386); use the pinned pytest, or -n 0",
                    pytrace=False)
    _ray_worker = (path, lock)


def pytest_unconfigure(config: pytest.Config) -> None:
    if _ray_worker is not None:
        path, lock = _ray_worker
        path.unlink(missing_ok=True)
        lock.close()


@pytest.fixture(scope="session", autouse=True)
def cluster_dir() -> Iterator[Path]:
    """This session's local-cluster folder, kept short: Ray's socket paths must fit 107 bytes."""
    from pipeline import local_cluster

    base = "/tmp" if os.path.isdir("/tmp") else None
    path = Path(tempfile.mkdtemp(prefix="dp-test-", dir=base))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(local_cluster.CLUSTER_DIR_ENV, str(path))
        mp.delenv("RAY_ADDRESS", raising=False)
        # W&B's own settings in a developer's environment would change what runs record.
        for name in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_GROUP"):
            mp.delenv(name, raising=False)
        # The S3 storage tests talk to a local S3 server; the cluster's nodes inherit these
        # from here, as real nodes get theirs from their own environment. No instance
        # metadata lookups: this machine has no cloud behind it.
        for name, value in (("AWS_ACCESS_KEY_ID", "densenet-pipe-test"),
                            ("AWS_SECRET_ACCESS_KEY", "densenet-pipe-test"),
                            ("AWS_DEFAULT_REGION", "us-east-1"), ("AWS_EC2_METADATA_DISABLED", "true")):
            mp.setenv(name, value)
        yield path
        if local_cluster.load(path) is not None:
            local_cluster.down(path)
    shutil.rmtree(path, ignore_errors=True)


def nodes_env() -> dict[str, str]:
    """What the tests' Ray nodes run with: no numba compiling. FFCV's pipeline runs as plain
    Python (the same images), and `import ffcv` skips the typed-dict compile it does at import
    (~6 s of one core per process here). Every job's driver and workers import ffcv, on 2
    cores, so this is most of a job's start; the in-process loader tests keep the compiled
    path, so both are tested."""
    from pipeline.data.loaders import JIT_ENV

    return {JIT_ENV: "0", "NUMBA_DISABLE_JIT": "1"}


@pytest.fixture(scope="session")
def cli() -> Callable[..., Result]:
    runner = CliRunner()

    def invoke(*args: str, input: str | None = None) -> Result:
        from pipeline.cli import app

        args = [str(a) for a in args]
        with pytest.MonkeyPatch.context() as mp:
            if args[:2] == ["cluster", "up"]:
                # The nodes it starts inherit this process's environment.
                for name, value in nodes_env().items():
                    mp.setenv(name, value)
            return runner.invoke(app, args, input=input)

    return invoke


@pytest.fixture(scope="session")
def ray_cluster(cluster_dir: Path, cli: Callable[..., Result]):
    """A running 3-node local cluster (1 CPU per node) shared by the session."""
    from pipeline import local_cluster

    result = cli("cluster", "up", "--nodes", "3", "--cpus-per-node", "1")  # nodes_env()
    assert result.exit_code == 0, result.output
    cluster = local_cluster.running(cluster_dir)
    assert cluster is not None and len(cluster.alive()) == 3
    yield cluster
    result = cli("cluster", "down")
    assert result.exit_code == 0, result.output
    assert not [n.pid for n in cluster.nodes if local_cluster.node_alive(n)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _moto(log: Path, **env: str) -> Iterator[str]:
    """A real S3 server (moto) on a free local port with a bucket `runs`; its URI query."""
    import pyarrow.fs

    port = _free_port()
    with open(log, "w") as out:
        server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1",
                                   "-p", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                  env={**os.environ, **env})
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
        if not env:
            fs, _ = pyarrow.fs.FileSystem.from_uri(f"s3://runs?{query}&allow_bucket_creation=true")
            fs.create_dir("runs")
        yield query
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture(scope="session")
def s3_bucket(tmp_path_factory):
    """A real S3 server (moto) on a free local port, with an empty bucket; stopped after."""
    with _moto(tmp_path_factory.mktemp("s3") / "server.log") as query:
        yield f"s3://runs/densenet-pipe?{query}"


@pytest.fixture(scope="session")
def s3_refusing(tmp_path_factory):
    """An S3 server that checks credentials and knows none: every request is refused, as a
    real bucket refuses nodes that have no credentials for it."""
    with _moto(tmp_path_factory.mktemp("s3-refusing") / "server.log",
               INITIAL_NO_AUTH_ACTION_COUNT="0") as query:
        yield f"s3://runs/densenet-pipe?{query}"
