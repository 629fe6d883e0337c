"""The embedded local Ray cluster: one head and N-1 worker nodes on this machine.

    >>> cluster, added = up(nodes=3, cpus_per_node=1)   # or ensure() for "one head, reuse it"
    >>> cluster.dashboard_url                          # the job server, bound to 127.0.0.1
    'http://127.0.0.1:8265'
    >>> down()                                          # stops exactly what up() started

Each node is one `ray start --block` process that this module starts in its own session;
the cluster's state (`cluster.json`), auth token, node logs and Ray's session folder live
under `cluster_dir()`: `<project>/.cluster/` unless `DENSENET_PIPE_CLUSTER_DIR` says
otherwise. Token auth is on (`RAY_AUTH_MODE=token`, the token in `<cluster dir>/auth_token`),
so other users of a shared machine cannot submit jobs to it. Nothing here imports ray.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import secrets
import stat
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from . import runs
from .errors import UserError

CLUSTER_DIR_ENV = "DENSENET_PIPE_CLUSTER_DIR"
DEFAULT_DASHBOARD_PORT = 8265
# Ray's Unix sockets live in <temp dir>/session_<date>_<pid>/sockets/<name> and a socket
# path may not exceed 107 bytes; a longer temp dir moves to a short folder under /tmp.
# Worker nodes add their index to the head's.
_MAX_TEMP_DIR_LEN = 38
# Ray reserves 10002-19999 for worker processes by default; ports we pick stay outside.
_WORKER_PORTS = range(10002, 20000)


def project_root() -> Path:
    """The folder that holds `pipeline/` and `jobs/`: the working dir every job gets."""
    return Path(__file__).resolve().parent.parent


def cluster_dir() -> Path:
    override = os.environ.get(CLUSTER_DIR_ENV)
    return Path(override).resolve() if override else project_root() / ".cluster"


@dataclass
class Node:
    """One `ray start --block` process: its pid and start time identify it for `down`."""

    role: str
    pid: int
    started: float
    log: str
    cpus: float | None = None
    gpus: int | None = None
    # Its start in clock ticks since boot (Linux): unlike `started`, which is derived from the
    # wall clock, it does not move when this machine's clock is stepped.
    ticks: int | None = None
    # Its slot (0: the head), which picks its GPUs, and the serial number that names its
    # temp dir and log, never given twice in a cluster: a node started in place of a lost one
    # takes the free slot and a new folder (a node sharing a live node's temp dir has its
    # workers' lines forwarded twice and deletes job code from under the other's workers).
    slot: int | None = None
    serial: int | None = None


@dataclass
class LocalCluster:
    dir: str
    dashboard_url: str
    gcs_address: str
    python: str
    token_path: str
    temp_dir: str
    nodes: list[Node] = field(default_factory=list)
    # Started by a job's command, not shaped by `cluster up`: a later job may grow it.
    auto: bool = False
    # The serial of the newest node started (`Node.serial`; the head's is 0).
    last_serial: int = 0

    def headers(self) -> dict[str, str]:
        """HTTP headers the job server wants from clients (its bearer token)."""
        token = Path(self.token_path).read_text().strip()
        return {"Authorization": f"Bearer {token}"}

    def alive(self) -> list[Node]:
        return [n for n in self.nodes if node_alive(n)]

    def is_up(self) -> bool:
        return bool(self.nodes) and node_alive(self.nodes[0])

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "LocalCluster":
        data = json.loads(text)
        data["nodes"] = [Node(**n) for n in data.get("nodes", [])]
        return cls(**data)


def load(directory: Path | None = None) -> LocalCluster | None:
    """The recorded cluster, up or not; None when none was ever started here."""
    path = (directory or cluster_dir()) / "cluster.json"
    try:
        return LocalCluster.from_json(path.read_text())
    except FileNotFoundError:
        return None
    except (ValueError, TypeError, KeyError):
        raise UserError(f"{path} is corrupt: stop any leftover Ray processes you started "
                        "and delete it") from None


def running(directory: Path | None = None) -> LocalCluster | None:
    """The local cluster if its head is up, else None."""
    cluster = load(directory)
    return cluster if cluster is not None and cluster.is_up() else None


def ensure(directory: Path | None = None, note: Callable[[str], None] | None = None,
           timeout: float = 180.0, nodes: int = 1, cpus_per_node: float | None = None,
           gpus_per_node: int | None = None) -> LocalCluster:
    """A local cluster for a job that needs `nodes` nodes: a fresh one of that shape when
    none is up (default: one node with all of this machine's CPUs); the running one as it
    is when `cluster up` shaped it; one that an earlier job's command started, grown to
    `nodes` (CPU jobs only: a GPU slice cannot be added beside a head holding every GPU)."""
    cluster = running(directory)
    if cluster is not None:
        if not cluster.auto or len(cluster.alive()) >= nodes or gpus_per_node:
            return cluster
        if note is not None:
            note(f"growing the local cluster (started by an earlier command) to {nodes} nodes")
    elif note is not None and nodes > 1:
        note(f"no local cluster is up: starting one of {nodes} nodes"
             + (f", {runs.number(cpus_per_node)} CPU(s) each" if cpus_per_node else ""))
    cluster, _ = up(nodes=nodes, cpus_per_node=cpus_per_node, gpus_per_node=gpus_per_node,
                    directory=directory, note=note, timeout=timeout, auto=True)
    return cluster


# What a local node holds before any work (Ray 2.60, measured with `free` around
# `cluster up`): the head (GCS, dashboard, job server, raylet) about 660 MiB, each further
# node (raylet, agents) about 250 MiB; rounded up.
HEAD_MIB, NODE_MIB = 700, 300


def available_mib() -> int | None:
    """This machine's MemAvailable in MiB (None where /proc/meminfo has no such line)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_memory(to_start: int, head: bool, nodes: int, available: int | None) -> None:
    """Nodes that would take more than half the memory available before doing any work are
    refused: on one machine every node is its own raylet and agents, and `--nodes 100`
    would start them one by one until the machine ran out."""
    if available is None or to_start <= 0:
        return
    need = to_start * NODE_MIB + (HEAD_MIB - NODE_MIB if head else 0)
    if need > available // 2:
        most = max(1, (available // 2 - (HEAD_MIB - NODE_MIB if head else 0)) // NODE_MIB)
        raise UserError(f"--nodes {nodes}: a local node takes about {NODE_MIB} MiB before any work, so "
                        f"{to_start} {'more ' if not head else ''}would take {need / 1024:.1f} GiB of the {available / 1024:.1f} GiB "
                        f"this machine has free; ask for at most {most + (nodes - to_start)} here, and "
                        "use a real cluster (cluster/README.md) for more")


def up(nodes: int = 1, cpus_per_node: float | None = None, gpus_per_node: int | None = None,
       *, directory: Path | None = None, object_store_memory: int | None = None,
       note: Callable[[str], None] | None = None,
       timeout: float = 180.0, auto: bool = False) -> tuple[LocalCluster, int]:
    """Start a cluster of `nodes` nodes, or grow the running one to `nodes`.

    Returns the cluster and how many nodes this call started. A running cluster with as many
    nodes or more is left as it is (shrinking is `down` then `up`). `auto` marks a cluster
    started on a job's behalf (`ensure`); an `up` that is not auto makes it the user's.
    `cpus_per_node` None lets
    Ray count this machine's CPUs on every node; `gpus_per_node` None gives the head Ray's
    GPU count and worker nodes none, a number G gives node i the devices i*G..(i+1)*G-1.
    """
    if nodes < 1:
        raise UserError(f"--nodes must be >= 1, got {nodes}")
    if cpus_per_node is not None and cpus_per_node <= 0:
        raise UserError(f"--cpus-per-node must be > 0, got {cpus_per_node}")
    if gpus_per_node is not None and gpus_per_node < 0:
        raise UserError(f"--gpus-per-node must be >= 0, got {gpus_per_node}")
    if gpus_per_node:
        physical = gpu_count()
        if nodes * gpus_per_node > physical:
            raise UserError(f"{nodes} node(s) x {gpus_per_node} GPU(s) need {nodes * gpus_per_node} "
                            f"GPUs but this machine has {physical}: ask for fewer --nodes or "
                            "--gpus-per-node")
    directory = directory or cluster_dir()
    note = note or (lambda _msg: None)
    with _locked(directory):
        cluster = running(directory)
        have = 0 if cluster is None else len(cluster.alive())
        check_memory(nodes - have, cluster is None, nodes, available_mib())
        if cluster is None:
            _stop_leftovers(load(directory))
            with _starting():
                cluster = _start_head(directory, cpus_per_node, gpus_per_node,
                                      object_store_memory, note, timeout)
                _wait_for_nodes(cluster, 1, timeout)
            started = 1
        else:
            cluster.nodes = cluster.alive()
            started = 0
        cluster.auto = auto and (started == 1 or cluster.auto)
        _save(cluster)
        # One node at a time, each seen alive before the next: a node that fails to start
        # is named, not lost among several.
        for index in range(len(cluster.nodes), nodes):
            note(f"starting node {index + 1} of {nodes} ...")
            with _starting():
                since_ms = int(time.time() * 1000)
                cluster.nodes.append(_start_worker(cluster, _free_slot(cluster), cpus_per_node,
                                                   gpus_per_node, object_store_memory))
                _save(cluster)
                _wait_for_nodes(cluster, index + 1, timeout, since_ms)
            started += 1
        return cluster, started


def down(directory: Path | None = None, timeout: float = 45.0) -> list[int]:
    """Stop every process the recorded cluster started, and only those; returns their pids.

    Each node's `ray start` gets SIGTERM and drains; whatever it started that is still alive
    after `timeout` seconds (raylet, workers, job drivers) is killed.
    """
    directory = directory or cluster_dir()
    with _locked(directory):
        cluster = load(directory)
        if cluster is None:
            return []
        stopped = _stop_leftovers(cluster, timeout)
        (directory / "cluster.json").unlink(missing_ok=True)
        return stopped


def gpu_count() -> int:
    """Physical GPUs on this machine, from nvidia-smi (0 when it is absent)."""
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start ticks since boot) of a process from /proc, or None where there is none."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: fields resume after its last ')'.
    rest = text[text.rindex(")") + 2:].split()
    return rest[0], int(rest[19])


def node_alive(node: Node) -> bool:
    """Whether the node's process still runs (the same process: pid and start time match)."""
    import psutil

    if node.ticks is not None and Path("/proc/self/stat").exists():
        stat = _proc_stat(node.pid)
        return stat is not None and stat[1] == node.ticks and stat[0] not in ("Z", "X")
    try:
        proc = psutil.Process(node.pid)
        # A node that exited stays a zombie while the process that started it lives on.
        return (abs(proc.create_time() - node.started) < 1.0
                and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def _open_lock(path: Path) -> int:
    """A read-only descriptor of the lock file `path`, made readable by all if absent: flock
    needs no more, and opening a file another user made needs no O_CREAT, which a sticky
    /tmp may refuse (fs.protected_regular). A link is refused (OSError)."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
    try:
        return os.open(path, flags)
    except FileNotFoundError:
        pass
    try:
        handle = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return os.open(path, flags)
    os.fchmod(handle, 0o644)
    return handle


@contextlib.contextmanager
def _flocked(handle: int, wait: float, busy: str) -> Iterator[None]:
    """Holds an exclusive lock on the open file `handle`, waiting up to `wait` seconds, and
    closes it after."""
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise UserError(busy) from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
    finally:
        os.close(handle)


def _locked(directory: Path, wait: float = 180.0) -> contextlib.AbstractContextManager[None]:
    directory.mkdir(parents=True, exist_ok=True)
    return _flocked(_open_lock(directory / ".lock"), wait,
                    f"another densenet-pipe command has held {directory} for {wait:.0f} s: "
                    "wait for it or end it")


def _starting(wait: float = 300.0) -> contextlib.AbstractContextManager[None]:
    """One node start at a time on this machine, whatever its cluster. A node's ports are
    found free here and bound by Ray seconds later: two clusters starting at once (two users,
    two terminals) both found the dashboard's 8265 free, and one of them never came up."""
    temp = Path(tempfile.gettempdir())
    try:
        handle = _open_lock(temp / "densenet-pipe-node-start.lock")
    except OSError:
        # A link, or another user's file we may not read: this user's starts still take turns.
        handle = _open_lock(private_dir(temp / f"dp-{os.getuid()}") / "node-start.lock")
    return _flocked(handle, wait, f"another local Ray node on this machine has been starting for "
                                  f"{wait:.0f} s: wait for it or stop it")


def _save(cluster: LocalCluster) -> None:
    path = Path(cluster.dir) / "cluster.json"
    tmp = path.with_name(".cluster.json.tmp")
    tmp.write_text(cluster.to_json() + "\n")
    tmp.replace(path)


def _token(directory: Path) -> Path:
    path = directory / "auth_token"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path


def private_dir(path: Path) -> Path:
    """Make `path` a folder only we can enter, or refuse one that another user could have
    planted: its name under /tmp is predictable."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise UserError(f"{path} is a link or a file, not our folder: someone else may have made it; "
                        "remove it, or set TMPDIR to a folder of your own")
    if st.st_uid != os.getuid():
        raise UserError(f"{path} belongs to another user (uid {st.st_uid}): remove it, or set "
                        "TMPDIR to a folder of your own")
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(path, 0o700)
    return path


def _temp_dir(directory: Path) -> Path:
    preferred = directory / "ray"
    if len(str(preferred)) <= _MAX_TEMP_DIR_LEN:
        return preferred
    digest = hashlib.sha1(str(directory).encode()).hexdigest()[:10]
    base = Path(tempfile.gettempdir()) / f"dp-{os.getuid()}"
    private_dir(base)
    short = base / digest
    private_dir(short)
    if not preferred.is_symlink():
        if preferred.exists():
            raise UserError(f"{preferred} is in the way: delete it (Ray's logs go to {short})")
        preferred.symlink_to(short)
    return short


def _free_port(preferred: int | None = None) -> int:
    candidates = [preferred] if preferred else []
    for port in candidates + [0] * 20:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            chosen = s.getsockname()[1]
        if chosen not in _WORKER_PORTS:
            return chosen
    raise UserError("found no free TCP port for the local Ray cluster")


def _ray_command() -> list[str]:
    script = Path(sys.executable).parent / "ray"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "ray.scripts.scripts"]


def _node_env(token: Path, gpu_slice: list[int] | None) -> dict[str, str]:
    env = dict(os.environ)
    # A stale RAY_ADDRESS makes `ray start --head` look for that cluster instead.
    # WANDB_SERVICE points at the wandb-core process of whoever ran W&B in this shell
    # before: every W&B run on the cluster would share (and stall with) that one process.
    for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "WANDB_SERVICE"):
        env.pop(key, None)
    env.update({
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "RAY_USAGE_STATS_ENABLED": "0",
        # Job entrypoints that say plain `python` get this venv's interpreter too.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    })
    for key, value in NODE_DEFAULTS.items():
        env.setdefault(key, value)
    if gpu_slice is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpu_slice))
    return env


def _gpu_args(index: int, gpus_per_node: int | None) -> tuple[list[str], list[int] | None]:
    if gpus_per_node is None:
        return ([], None) if index == 0 else (["--num-gpus", "0"], [])
    if gpus_per_node == 0:
        return ["--num-gpus", "0"], []
    devices = list(range(index * gpus_per_node, (index + 1) * gpus_per_node))
    return ["--num-gpus", str(gpus_per_node)], devices


def _spawn(directory: Path, role: str, slot: int, serial: int, args: list[str], env: dict[str, str],
           cpus: float | None, gpus: int | None) -> Node:
    logs = directory / "logs"
    logs.mkdir(exist_ok=True)
    log = logs / f"node-{serial}.log"
    import psutil

    with open(log, "ab") as out:
        # A session of its own: the node outlives this command, and Ctrl-C here spares it.
        proc = subprocess.Popen(_ray_command() + ["start", "--block", *args], env=env,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=directory)
    stat = _proc_stat(proc.pid)
    return Node(role=role, pid=proc.pid, started=psutil.Process(proc.pid).create_time(),
                log=str(log), cpus=cpus, gpus=gpus, ticks=stat[1] if stat else None,
                slot=slot, serial=serial)


def _start_head(directory: Path, cpus: float | None, gpus: int | None,
                object_store_memory: int | None, note: Callable[[str], None],
                timeout: float) -> LocalCluster:
    token = _token(directory)
    temp = _temp_dir(directory)
    gcs_port = _free_port()
    dashboard_port = _free_port(DEFAULT_DASHBOARD_PORT)
    gpu_args, gpu_slice = _gpu_args(0, gpus)
    args = ["--head", "--port", str(gcs_port), "--dashboard-host", "127.0.0.1",
            "--dashboard-port", str(dashboard_port),
            "--ray-client-server-port", str(_free_port()),
            "--dashboard-agent-listen-port", str(_free_port()),
            "--temp-dir", str(temp), "--disable-usage-stats", *gpu_args]
    if cpus is not None:
        args += ["--num-cpus", runs.number(cpus)]
    if object_store_memory:
        args += ["--object-store-memory", str(object_store_memory)]
    note(f"starting a local Ray cluster (state and logs in {directory}) ...")
    node = _spawn(directory, "head", 0, 0, args, _node_env(token, gpu_slice), cpus, gpus)
    cluster = LocalCluster(dir=str(directory), dashboard_url=f"http://127.0.0.1:{dashboard_port}",
                           gcs_address="", python=sys.executable, token_path=str(token),
                           temp_dir=str(temp), nodes=[node])
    _save(cluster)
    _wait_for_head(cluster, timeout)
    address_file = temp / "ray_current_cluster"
    host = address_file.read_text().strip().rsplit(":", 1)[0] if address_file.exists() else "127.0.0.1"
    cluster.gcs_address = f"{host}:{gcs_port}"
    _save(cluster)
    return cluster


def _slot(node: Node, position: int) -> int:
    return node.slot if node.slot is not None else position  # recorded before slots were


def _free_slot(cluster: LocalCluster) -> int:
    taken = {_slot(n, i) for i, n in enumerate(cluster.nodes)}
    return min(set(range(len(taken) + 1)) - taken)


def _start_worker(cluster: LocalCluster, slot: int, cpus: float | None, gpus: int | None,
                  object_store_memory: int | None) -> Node:
    gpu_args, gpu_slice = _gpu_args(slot, gpus)
    # Every node this cluster started counts, lost ones included (a cluster recorded before
    # serials were kept counts the nodes it has).
    serial = cluster.last_serial = max(cluster.last_serial, len(cluster.nodes) - 1) + 1
    # A temp dir of its own, as a node on its own machine has: Ray unpacks each job's code
    # into <temp>/<session>/runtime_resources, and a node that meets a job's package for the
    # first time deletes and re-unpacks that folder; shared, it pulled files from under
    # drivers and workers already running from it on the other nodes.
    temp = private_dir(Path(f"{cluster.temp_dir}{serial}"))
    args = ["--address", cluster.gcs_address,
            "--dashboard-agent-listen-port", str(_free_port()),
            "--temp-dir", str(temp), "--disable-usage-stats", *gpu_args]
    if cpus is not None:
        args += ["--num-cpus", runs.number(cpus)]
    if object_store_memory:
        args += ["--object-store-memory", str(object_store_memory)]
    env = _node_env(Path(cluster.token_path), gpu_slice)
    return _spawn(Path(cluster.dir), "worker", slot, serial, args, env, cpus, gpus)


def _get_json(cluster: LocalCluster, path: str) -> dict | list:
    request = urllib.request.Request(cluster.dashboard_url + path, headers=cluster.headers())
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


def _fail_start(cluster: LocalCluster, node: Node, what: str) -> None:
    tail = ""
    with contextlib.suppress(OSError):
        lines = [ln for ln in Path(node.log).read_text(errors="replace").splitlines() if ln.strip()]
        tail = lines[-1] if lines else ""
    _stop_leftovers(cluster, timeout=10)
    (Path(cluster.dir) / "cluster.json").unlink(missing_ok=True)
    raise UserError(f"the local Ray cluster {what} (see {node.log}): {tail}")


def _wait_for_head(cluster: LocalCluster, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    head = cluster.nodes[0]
    while time.monotonic() < deadline:
        if not node_alive(head):
            _fail_start(cluster, head, "did not start")
        try:
            _get_json(cluster, "/api/version")
            return
        except (urllib.error.URLError, OSError, ValueError):
            time.sleep(0.25)
    _fail_start(cluster, head, f"did not answer within {timeout:.0f} s")


def _alive_nodes(cluster: LocalCluster) -> list[dict]:
    data = _get_json(cluster, "/api/v0/nodes?limit=1000&detail=1")
    return [n for n in data["data"]["result"]["result"] if n.get("state") == "ALIVE"]


def _wait_for_nodes(cluster: LocalCluster, count: int, timeout: float, since_ms: int | None = None) -> None:
    """Until Ray counts `count` alive nodes and, with `since_ms`, one of them started since
    then: a node killed a moment ago stays ALIVE in Ray's list until its health checks fail,
    and must not stand in for the node just started."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for node in cluster.nodes:
            if not node_alive(node):
                _fail_start(cluster, node, f"lost its {node.role} node {node.pid}")
        try:
            alive = _alive_nodes(cluster)
            fresh = since_ms is None or any((n.get("start_time_ms") or 0) >= since_ms for n in alive)
            if len(alive) >= count and fresh:
                return
        except (urllib.error.URLError, OSError, ValueError, KeyError):
            pass
        time.sleep(0.25)
    _fail_start(cluster, cluster.nodes[-1], f"did not reach {count} nodes within {timeout:.0f} s")


def _exited(proc) -> bool:
    import psutil

    try:
        return proc.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False


# Ray settings every local node runs with unless the user set them (a value set is kept):
NODE_DEFAULTS = {
    # On SIGTERM, `ray start` asks the GCS to drain its node and waits up to this long (30 s
    # by default, for Ray Serve's proxies) for the node to go idle; an idle node's raylet
    # then stops itself and its agents. A node holding a detached actor (the autoscaling
    # coordinator that Ray Train leaves after every job) never goes idle, so every `cluster
    # down` after a training job waited out the whole 30 s. 2 s is ample for an idle node;
    # the raylet of a busy one is then stopped by `ray start`.
    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "2",
    # Ray Train's controller handles its workers' reports, and sees them finish, only when it
    # polls them: every 2 s by default, sized for clusters of many workers. A run on this
    # machine then ended 3-4 s after its last epoch (two polls: the last report, the end),
    # and each Tune trial too. Polling a few local workers 4 times a second costs nothing.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    # Ray Train starts an actor per run (a process of its own: 1.4-1.7 s of CPU to start
    # here) that watches for nodes a cloud provider is about to reclaim. Nothing reclaims a
    # node of this cluster; a node that dies is met by Ray Train's restarts as before.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}
# How long what a node leaves behind after its `ray start` exited gets to exit on its own.
ORPHAN_GRACE_S = 3.0


def _stop_leftovers(cluster: LocalCluster | None, timeout: float = 45.0) -> list[int]:
    """SIGTERM each recorded node, worker nodes before the head, then SIGKILL what they
    started that outlives `timeout` (or ORPHAN_GRACE_S after the last `ray start` exited)."""
    import psutil

    if cluster is None:
        return []
    procs: list[psutil.Process] = []
    roles: dict[int, str] = {}
    for node in cluster.nodes:
        if not node_alive(node):
            continue
        root = psutil.Process(node.pid)
        roles[root.pid] = node.role
        with contextlib.suppress(psutil.Error):
            procs += [root, *root.children(recursive=True)]
    deadline = time.monotonic() + timeout

    def wait(group: list[psutil.Process], until: float) -> list[psutil.Process]:
        # A process that exited stays a zombie until its parent reaps it: our own children
        # are reaped here (wait_procs), the raylets' orphaned workers by init whenever it
        # gets to them. psutil counts a zombie as running, so waiting for zombies to go
        # waited out the whole timeout on every `cluster down`; exited is what counts.
        group = [p for p in group if not _exited(p)]
        while group and time.monotonic() < until:
            psutil.wait_procs(group, timeout=0.2)
            group = [p for p in group if not _exited(p)]
        return group

    # A worker node's `ray start` drains its node through the head's GCS on SIGTERM; with
    # the head already gone it waits ~30 s for a GCS that will not come back.
    for heads in (False, True):
        group = [p for p in procs if p.pid in roles and (roles[p.pid] == "head") == heads]
        for proc in group:
            with contextlib.suppress(psutil.Error):
                proc.terminate()
        wait(group, deadline)
    # Once every `ray start` has exited, nothing is left to stop what they leave behind: a
    # raylet that `ray start` had to kill never stopped its agents, which outlive it. Those
    # get a SIGTERM and ORPHAN_GRACE_S, not the whole timeout.
    alive = [p for p in procs if not _exited(p)]
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    alive = wait(alive, min(deadline, time.monotonic() + ORPHAN_GRACE_S))
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)
    return [p.pid for p in procs]
