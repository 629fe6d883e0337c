"""`densenet-pipe cluster up | status | down` with real local Ray clusters."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest

from pipeline import local_cluster
from pipeline.errors import UserError


def _descendants(cluster: local_cluster.LocalCluster) -> set[int]:
    pids = set()
    for node in cluster.alive():
        root = psutil.Process(node.pid)
        pids |= {root.pid, *(p.pid for p in root.children(recursive=True))}
    return pids


def _temp_dir_of(pid: int) -> str:
    """The --temp-dir a node's `ray start` was given."""
    args = psutil.Process(pid).cmdline()
    return args[args.index("--temp-dir") + 1]


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_status_shows_three_nodes_and_running_jobs(ray_cluster, cli):
    result = cli("cluster", "status", "--format", "json")
    assert result.exit_code == 0, result.output
    status = json.loads(result.stdout)
    alive = [n for n in status["nodes"] if n["state"] == "ALIVE"]
    assert len(alive) == 3
    assert [n["resources_total"]["CPU"] for n in alive] == [1.0, 1.0, 1.0]
    assert sum(n["is_head_node"] for n in alive) == 1
    assert sorted(status["local"]["pids"]) == sorted(n.pid for n in ray_cluster.nodes)

    job = cli("doctor", "--quick", "--burn-in", "600", "--detach").stdout.strip()
    try:
        deadline = time.monotonic() + 60
        while json.loads(cli("jobs", "status", job, "--format", "json").stdout)["status"] != "RUNNING":
            assert time.monotonic() < deadline
            time.sleep(0.5)
        table = cli("cluster", "status")
        assert table.exit_code == 0, table.output
        lines = table.stdout.splitlines()
        assert lines[0] == f"cluster {ray_cluster.dashboard_url}: 3 node(s) alive"
        node_rows = [line for line in lines if line.split()[2:3] in (["head"], ["worker"])]
        assert len(node_rows) == 3 and all(row.split()[3] == "1" for row in node_rows)
        assert any(line.startswith(job) and "RUNNING" in line for line in lines)
    finally:
        assert cli("jobs", "stop", job).exit_code == 0


@pytest.mark.ray
@pytest.mark.timeout(60)
def test_up_again_leaves_the_running_cluster_alone(ray_cluster, cli):
    before = [n.pid for n in ray_cluster.nodes]
    same = cli("cluster", "up", "--nodes", "3", "--cpus-per-node", "1")
    assert same.exit_code == 0, same.output
    assert "already up with 3 node(s)" in same.stderr
    assert "shape the nodes this call starts; the 3 running keep theirs" in same.stderr
    assert same.stdout.strip() == ray_cluster.dashboard_url
    fewer = cli("cluster", "up", "--nodes", "2")
    assert fewer.exit_code == 0 and "`densenet-pipe cluster down` first to shrink it" in fewer.stderr
    assert [n.pid for n in local_cluster.running().nodes] == before


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_grow_then_down_stops_exactly_what_up_started(cli, tmp_path, monkeypatch):
    monkeypatch.setenv(local_cluster.CLUSTER_DIR_ENV, str(tmp_path))
    bystander = subprocess.Popen(["sleep", "300"])
    try:
        first = cli("cluster", "up", "--nodes", "1", "--cpus-per-node", "1")
        assert first.exit_code == 0, first.output
        assert "this call started 1" in first.stderr
        grown = cli("cluster", "up", "--nodes", "2", "--cpus-per-node", "1")
        assert grown.exit_code == 0, grown.output
        assert "up: 2 node(s), this call started 1" in grown.stderr
        assert "the 1 running keep theirs" in grown.stderr
        cluster = local_cluster.running(tmp_path)
        assert len(cluster.alive()) == 2
        # A long cluster folder moves Ray's sockets under /tmp (107-byte limit) via a link.
        if len(str(tmp_path / "ray")) > 40:
            assert (tmp_path / "ray").is_symlink()
        assert (tmp_path / "logs" / "node-0.log").exists()
        status = json.loads(cli("cluster", "status", "--format", "json").stdout)
        assert len([n for n in status["nodes"] if n["state"] == "ALIVE"]) == 2

        # A node lost, then the cluster grown back: the new node takes the lost one's slot
        # (its GPUs) with a temp dir and log of its own, never a live node's; before, it took
        # the temp dir of the node in the next slot, and every line of that folder's workers
        # was forwarded twice.
        assert cli("cluster", "up", "--nodes", "3", "--cpus-per-node", "1").exit_code == 0
        lost = local_cluster.running(tmp_path).nodes[1]
        lost_temp = _temp_dir_of(lost.pid)
        for pid in [lost.pid, *(p.pid for p in psutil.Process(lost.pid).children(recursive=True))]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        regrown = cli("cluster", "up", "--nodes", "3", "--cpus-per-node", "1")
        assert regrown.exit_code == 0 and "this call started 1" in regrown.stderr, regrown.output
        cluster = local_cluster.running(tmp_path)
        assert [(n.slot, n.serial) for n in cluster.alive()] == [(0, 0), (2, 2), (1, 3)]
        temps = [_temp_dir_of(n.pid) for n in cluster.alive()]
        assert len({*temps, lost_temp}) == 4, temps
        assert Path(cluster.alive()[-1].log).name == "node-3.log"
        started = _descendants(cluster)
        # The nodes go down without waiting out Ray's 30 s drain on SIGTERM (which a detached
        # actor, as Ray Train's autoscaling coordinator is after any job, never ends), and Ray
        # Train polls its workers often enough that a run ends when its workers do.
        for node in cluster.nodes:
            environ = (Path("/proc") / str(node.pid) / "environ").read_bytes().split(b"\0")
            assert b"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=2" in environ
            assert b"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.5" in environ

        down = cli("cluster", "down")
        assert down.exit_code == 0, down.output
        assert "stopped the local cluster" in down.stderr
        assert not [pid for pid in started if psutil.pid_exists(pid)
                    and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
        assert bystander.poll() is None, "down must not touch processes it did not start"
        assert local_cluster.load(tmp_path) is None
        after = cli("cluster", "status")
        assert after.exit_code == 2 and "no local Ray cluster is up" in after.stderr
        again = cli("cluster", "down")
        assert again.exit_code == 0 and "no local cluster is up" in again.stderr
    finally:
        bystander.kill()
        if local_cluster.load(tmp_path) is not None:
            local_cluster.down(tmp_path)
        if (tmp_path / "ray").is_symlink():
            shutil.rmtree((tmp_path / "ray").resolve(), ignore_errors=True)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_two_clusters_started_at_once_on_one_machine_both_come_up(tmp_path, monkeypatch):
    # Two users starting clusters at the same moment: each finds the dashboard's preferred
    # port free (here a free one, as 8265 may be taken), and before one start at a time,
    # the second never came up.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        monkeypatch.setattr(local_cluster, "DEFAULT_DASHBOARD_PORT", s.getsockname()[1])
    folders = [tmp_path / "a", tmp_path / "b"]
    got: dict[Path, object] = {}

    def start(folder: Path) -> None:
        try:
            got[folder] = local_cluster.up(1, 1, directory=folder)[0]
        except Exception as e:  # noqa: BLE001 - asserted below, with its message
            got[folder] = e

    threads = [threading.Thread(target=start, args=(folder,)) for folder in folders]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(240)
        assert all(isinstance(got.get(f), local_cluster.LocalCluster) for f in folders), got
        assert len({got[f].dashboard_url for f in folders}) == 2
        assert all(len(local_cluster.running(f).alive()) == 1 for f in folders)
    finally:
        for thread in threads:
            thread.join(240)
        for folder in folders:
            if local_cluster.load(folder) is not None:
                local_cluster.down(folder)
            if (folder / "ray").is_symlink():
                shutil.rmtree((folder / "ray").resolve(), ignore_errors=True)


@pytest.mark.timeout(30)
def test_bad_cluster_input_is_one_line_exit_2(cli, tmp_path, monkeypatch):
    monkeypatch.setenv(local_cluster.CLUSTER_DIR_ENV, str(tmp_path))
    gpus = local_cluster.gpu_count()
    for args, needle in ((["--nodes", "0"], "--nodes must be >= 1"),
                         (["--cpus-per-node", "0"], "--cpus-per-node must be > 0"),
                         (["--nodes", "2", "--gpus-per-node", str(gpus + 1)],
                          f"this machine has {gpus}"),
                         # More nodes than half this machine's free memory holds idle.
                         (["--nodes", str((local_cluster.available_mib() // 2) // local_cluster.NODE_MIB + 2)],
                          "MiB before any work")):
        result = cli("cluster", "up", *args)
        assert result.exit_code == 2, result.output
        assert result.stderr == f"error: {result.stderr[7:]}" and needle in result.stderr
        assert len(result.stderr.splitlines()) == 1
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = cli("cluster", "status", "--address", f"127.0.0.1:{port}")
    assert result.exit_code == 2 and "cannot reach Ray job server" in result.stderr
    assert local_cluster.load(tmp_path) is None


def test_nodes_that_would_fill_half_the_free_memory_idle_are_refused():
    local_cluster.check_memory(10, True, 10, 8000)  # 3.3 GiB of 7.8: started
    with pytest.raises(UserError, match=r"--nodes 14: .* 14 would take 4.5 GiB of the 7.8 GiB this machine "
                                        r"has free; ask for at most 12 here"):
        local_cluster.check_memory(14, True, 14, 8000)
    # Growing a running cluster of 3: the 2 more are what count, the 3 already hold theirs.
    with pytest.raises(UserError, match=r"--nodes 5: .* 2 more would take 0.6 GiB .* ask for at most 4 here"):
        local_cluster.check_memory(2, False, 5, 1000)
    local_cluster.check_memory(0, False, 3, 100)  # nothing to start
    local_cluster.check_memory(50, True, 50, None)  # no /proc/meminfo: not guessed


def test_a_node_is_known_by_its_start_ticks_not_the_wall_clock():
    """A node is the same process while its pid and start (ticks since boot) match, however
    far this machine's wall clock is stepped; another process on a reused pid is not it."""
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        state, ticks = local_cluster._proc_stat(proc.pid)
        started = psutil.Process(proc.pid).create_time()
        node = local_cluster.Node(role="worker", pid=proc.pid, started=started - 30.0, log="", ticks=ticks)
        assert local_cluster.node_alive(node)
        assert not local_cluster.node_alive(local_cluster.Node(
            role="worker", pid=proc.pid, started=started, log="", ticks=ticks + 1))
        # A record written before ticks were kept falls back to the start time.
        assert local_cluster.node_alive(local_cluster.Node(role="worker", pid=proc.pid, started=started, log=""))
    finally:
        proc.kill()
        proc.wait()
    assert not local_cluster.node_alive(node)


@pytest.mark.parametrize("key, default", [("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "2"),
                                          ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")])
def test_a_ray_setting_the_user_set_is_kept(monkeypatch, tmp_path, key, default):
    monkeypatch.setenv(key, "12")
    assert local_cluster._node_env(tmp_path / "token", None)[key] == "12"
    monkeypatch.delenv(key)
    assert local_cluster._node_env(tmp_path / "token", None)[key] == default


@pytest.mark.timeout(60)
def test_what_a_stopped_node_leaves_behind_is_stopped_after_it(tmp_path):
    """A node's `ray start` exits on SIGTERM; a process it started that outlives it and
    ignores SIGTERM (as a raylet's agents do once the raylet was killed) is killed soon
    after, not at the end of the timeout (600 s here: the test's own timeout would end first)."""
    import sys

    child = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(flush=True); time.sleep(300)"
    root = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys, time; "
                             f"p = subprocess.Popen([sys.executable, '-c', {child!r}], stdout=sys.stdout); "
                             f"print(p.pid, flush=True); time.sleep(300)"],
                            stdout=subprocess.PIPE, text=True)
    orphan = None
    try:
        orphan = int(root.stdout.readline())
        root.stdout.readline()  # the orphan-to-be has set its SIGTERM handler
        _, ticks = local_cluster._proc_stat(root.pid)
        node = local_cluster.Node(role="head", pid=root.pid, started=psutil.Process(root.pid).create_time(),
                                  log="", ticks=ticks)
        cluster = local_cluster.LocalCluster(dir=str(tmp_path), dashboard_url="", gcs_address="", python="",
                                             token_path="", temp_dir="", nodes=[node])
        stopped = local_cluster._stop_leftovers(cluster, timeout=600)
        assert sorted(stopped) == sorted([root.pid, orphan])
        with contextlib.suppress(psutil.NoSuchProcess):
            assert local_cluster._exited(psutil.Process(orphan))
    finally:
        root.kill()
        root.wait()
        if orphan is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(orphan, signal.SIGKILL)


def test_an_exited_process_counts_as_stopped_while_it_waits_to_be_reaped():
    """`cluster down` waits for the processes it stopped to exit: an exited one that its
    parent has not reaped yet (a zombie) has, and one still running has not."""
    import sys

    done = subprocess.Popen([sys.executable, "-c", "pass"])
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        zombie = psutil.Process(done.pid)
        deadline = time.monotonic() + 30
        while zombie.status() != psutil.STATUS_ZOMBIE:  # exited, not reaped: it is our child
            assert time.monotonic() < deadline, "the child never exited"
            time.sleep(0.05)
        assert local_cluster._exited(zombie)
        assert not local_cluster._exited(psutil.Process(running.pid))
    finally:
        running.kill()
        running.wait()
        done.wait()
    assert local_cluster._exited(zombie)  # reaped: no such process
