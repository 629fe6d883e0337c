"""Submit a job in `jobs/` to a Ray cluster and follow it: the one call every command makes.

    >>> code = run_job("train", cfg.to_dict(), address=None,
    ...                resources={"nodes": 2, "cpus_per_node": 1, "gpus_per_node": 0})

`address` is a Ray job server (`http://head:8265`, or `RAY_ADDRESS`); None means the
embedded local cluster (`pipeline.local_cluster`), started on demand and reused. The job
runs `python -m jobs.<job> --config .densenet-pipe/<job>-<digest>.json` in a copy of this
project: the working dir is zipped here (what git would commit, minus data, runs and
environments) with the resolved config inside it, so code and config travel together as
one content-addressed package, and nothing is written into the project tree.

This talks to the job server's REST API with the standard library (the SDK's import alone
costs ~1.7 s of the 3 s it may take to see a job's first line); aiohttp is imported only to
follow logs over the server's websocket. `run_job` streams the job's lines to `on_line`
(default: stdout) and reports its own progress on stderr.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import secrets
import shlex
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from . import local_cluster, runs
from .errors import JobFailed, UserError

# The job server refuses request bodies of 100 MiB (aiohttp's client_max_size); counted on
# uncompressed bytes so the check is instant and never depends on how well files compress.
MAX_WORKING_DIR_BYTES = 100 * 1024**2
CONFIG_DIR = ".densenet-pipe"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
# How often a followed job's status is checked while its log streams (JobServer.tail).
TAIL_STATUS_POLL_S = 0.25
# A followed job still PENDING after this long gets a line saying what it waits for, and
# again every PENDING_REPEAT_S: on a shared cluster a job waits silently for others' CPUs.
PENDING_NOTE_S = 5.0
PENDING_REPEAT_S = 60.0
# Folders that never belong in a job's code package, wherever they sit.
_SKIP_DIRS = {".git", ".venv", "venv", "__pycache__", ".pytest_cache", ".mypy_cache",
              ".ruff_cache", ".ipynb_checkpoints", "node_modules"}
# Top-level folders that hold data, outputs or local state, not code.
_SKIP_TOP = {".build", ".cluster", CONFIG_DIR, "runs", "stores", "wandb", "checkpoints",
             "outputs"}
_SKIP_SUFFIXES = (".beton", ".pyc", ".ckpt", ".pt", ".pth", ".egg-info")
# Secrets never go into a package, whatever git says of them: anyone who reaches the job
# server can download it. cluster/Dockerfile.dockerignore lists the same patterns.
SECRET_PATTERNS = (".env", ".env.*", "*.pem", "*.key", "*key*.json", "auth_token", "ray-token",
                   ".netrc", "id_rsa*", "id_ed25519*", "credentials", "*.p12")
_SECRET_DIRS = {".ssh", ".aws", ".gnupg", ".config"}
# Untracked files ship only from the project's own code folders (new modules not yet
# committed); anything else untracked stays on this machine.
_CODE_DIRS = ("pipeline", "jobs", "datasets")
_CONNECT_TIMEOUT = 5.0


def _note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _print_line(line: str) -> None:
    print(line, flush=True)


def config_digest(cfg: dict[str, Any]) -> str:
    """Short hash of a config dict; equal to `Config.digest()` for a Config's dict."""
    from .config import digest

    return digest(cfg)


def available_jobs(root: Path | None = None) -> list[str]:
    """Job modules in `jobs/` that `run_job` accepts."""
    jobs = (root or local_cluster.project_root()) / "jobs"
    return sorted(p.stem for p in jobs.glob("*.py") if not p.stem.startswith("_")
                  and p.stem != "common")


class JobNotFound(UserError):
    """No job with that id on this cluster."""


class ServerError(JobFailed):
    """The job server answered an HTTP error we cannot blame on the input."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class JobServer:
    """A Ray job server (the dashboard's REST API): jobs, logs, packages and nodes.

    Build one with `connect(address)`; every method raises UserError with one line when the
    server cannot be reached, refuses our credentials or knows no such job.
    """

    def __init__(self, address: str, headers: dict[str, str] | None = None,
                 local: local_cluster.LocalCluster | None = None):
        self.address = address.rstrip("/")
        self.headers = dict(headers or {})
        self.local = local

    @property
    def python(self) -> str:
        """The interpreter entrypoints name: the local cluster's venv, else `python`."""
        return shlex.quote(self.local.python) if self.local else "python"

    def _request(self, method: str, path: str, body: bytes | None = None, *,
                 content_type: str = "application/json", timeout: float = 30.0,
                 job_id: str | None = None) -> bytes:
        headers = dict(self.headers)
        if body is not None:
            headers["Content-Type"] = content_type
        request = urllib.request.Request(self.address + path, data=body, method=method,
                                         headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.read()
        except urllib.error.HTTPError as e:
            text = e.read().decode(errors="replace").strip()
            if e.code in (401, 403):
                raise UserError(
                    f"the Ray job server at {self.address} refused our credentials (HTTP "
                    f"{e.code}): set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or "
                    "RAY_AUTH_TOKEN_PATH) to the cluster's token") from None
            if e.code == 404 and job_id is not None:
                raise JobNotFound(f"no job {job_id!r} on {self.address}: see "
                                  "`densenet-pipe jobs list`") from None
            if e.code == 413:
                raise UserError(f"the Ray job server at {self.address} refused the upload as "
                                "too large (HTTP 413): make the working dir smaller") from None
            last = text.splitlines()[-1] if text else e.reason
            raise ServerError(f"the Ray job server at {self.address} answered {method} {path} "
                              f"with HTTP {e.code}: {last}", e.code) from None
        except (urllib.error.URLError, socket.timeout, ConnectionError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise UserError(
                f"cannot reach Ray job server at {self.address}: {reason}; start one with "
                "`densenet-pipe cluster up` or fix --address") from None

    def _json(self, method: str, path: str, payload: Any = None, **kw: Any) -> Any:
        body = None if payload is None else json.dumps(payload).encode()
        raw = self._request(method, path, body, **kw)
        return json.loads(raw) if raw else None

    def version(self) -> dict[str, Any]:
        """The server's Ray version; also the reachability check (fails in seconds)."""
        try:
            reply = self._json("GET", "/api/version", timeout=_CONNECT_TIMEOUT)
        except (ServerError, ValueError) as e:
            detail = f"HTTP {e.status}" if isinstance(e, ServerError) else "no JSON"
            raise UserError(f"cannot reach Ray job server at {self.address}: /api/version "
                            f"answered {detail}, so this is no Ray dashboard; start one with "
                            "`densenet-pipe cluster up` or fix --address") from None
        if not isinstance(reply, dict) or "ray_version" not in reply:
            raise UserError(f"cannot reach Ray job server at {self.address}: /api/version "
                            "does not name a Ray version; fix --address")
        return reply

    def nodes(self) -> list[dict[str, Any]]:
        """Every node the cluster knows (alive and dead) with `state` and `resources_total`."""
        data = self._json("GET", "/api/v0/nodes?limit=10000&detail=1")
        return data["data"]["result"]["result"]

    def list_jobs(self) -> list[dict[str, Any]]:
        """Submitted jobs, newest first."""
        jobs = [j for j in self._json("GET", "/api/jobs/") if j.get("type") == "SUBMISSION"]
        return sorted(jobs, key=lambda j: j.get("start_time") or 0, reverse=True)

    def job(self, job_id: str) -> dict[str, Any]:
        return self._json("GET", f"/api/jobs/{_quote(job_id)}", job_id=job_id)

    def logs(self, job_id: str) -> str:
        return self._json("GET", f"/api/jobs/{_quote(job_id)}/logs", job_id=job_id)["logs"]

    def actors(self, job_id: str) -> list[dict[str, Any]]:
        """The live actors of submitted job `job_id` (class_name, pid, node_id, ...)."""
        ray_job = self.job(job_id).get("job_id")
        if not ray_job:
            return []
        query = urllib.parse.urlencode([("limit", 10000), ("detail", 1),
                                        ("filter_keys", "job_id"), ("filter_predicates", "="),
                                        ("filter_values", ray_job),
                                        ("filter_keys", "state"), ("filter_predicates", "="),
                                        ("filter_values", "ALIVE")])
        return self._json("GET", f"/api/v0/actors?{query}")["data"]["result"]["result"]

    def stop(self, job_id: str) -> bool:
        """Ask the job to stop; False when it had already ended."""
        reply = self._json("POST", f"/api/jobs/{_quote(job_id)}/stop", job_id=job_id)
        return bool(reply and reply.get("stopped"))

    def upload(self, package: bytes) -> str:
        """Store a zip in the cluster (once per content) and return its `gcs://` URI."""
        name = f"_ray_pkg_{hashlib.sha1(package).hexdigest()}.zip"
        path = f"/api/packages/gcs/{name}"
        try:
            self._request("GET", path, timeout=10)
        except ServerError:
            self._request("PUT", path, package, content_type="application/octet-stream",
                          timeout=300)
        return f"gcs://{name}"

    def submit(self, entrypoint: str, runtime_env: dict[str, Any], metadata: dict[str, str],
               submission_id: str, driver: dict[str, float] | None = None) -> str:
        """`driver`: what the entrypoint itself needs (num_cpus, num_gpus, memory in bytes);
        Ray then starts it on a node that has them, not wherever the job server is."""
        body = {"entrypoint": entrypoint, "runtime_env": runtime_env, "metadata": metadata,
                "submission_id": submission_id}
        for key, value in (driver or {}).items():
            if value:
                body[f"entrypoint_{key}"] = value
        reply = self._json("POST", "/api/jobs/", body)
        return reply["submission_id"]

    def tail(self, job_id: str, on_text: Callable[[str], None]) -> int:
        """Stream the job's log text over the websocket until the server closes it.

        Returns the characters received. Ctrl-C propagates as KeyboardInterrupt.
        """
        import asyncio
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return asyncio.run(self._tail(job_id, on_text))

        # asyncio.run turns Ctrl-C into cancelling its task, and aiohttp ends a cancelled
        # websocket read as a closed socket: the interrupt was lost and the follow went on.
        # With a handler of our own, asyncio leaves SIGINT alone and it raises here. A
        # process started with SIGINT ignored (in the background) keeps ignoring it, as it
        # does while polling.
        def interrupt(signum, frame):
            raise KeyboardInterrupt

        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            return asyncio.run(self._tail(job_id, on_text))
        previous = signal.signal(signal.SIGINT, interrupt)
        try:
            return asyncio.run(self._tail(job_id, on_text))
        finally:
            signal.signal(signal.SIGINT, previous)

    async def _tail(self, job_id: str, on_text: Callable[[str], None]) -> int:
        import asyncio

        import aiohttp

        url = self.address.replace("http", "ws", 1) + f"/api/jobs/{_quote(job_id)}/logs/tail"
        received = 0

        async def read(ws) -> None:
            nonlocal received
            async for message in ws:
                if message.type == aiohttp.WSMsgType.TEXT:
                    on_text(message.data)
                    received += len(message.data)
                elif message.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                    break

        async def ended(session) -> None:
            # The server closes the websocket 3-4 s after the job has ended (each hop between
            # the head and the driver's node sleeps a second between reads of the log file);
            # the job's status says so at once. Once it is terminal the log file is whole, and
            # the caller reads its rest in one request.
            status = f"{self.address}/api/jobs/{_quote(job_id)}"
            while True:
                await asyncio.sleep(TAIL_STATUS_POLL_S)
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                    async with session.get(status, timeout=aiohttp.ClientTimeout(total=10)) as reply:
                        if reply.status == 200 and (await reply.json()).get("status") in TERMINAL:
                            return

        try:
            async with aiohttp.ClientSession(headers=self.headers) as session:
                async with session.ws_connect(url, heartbeat=30) as ws:
                    tasks = [asyncio.ensure_future(read(ws)), asyncio.ensure_future(ended(session))]
                    try:
                        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        for task in tasks:
                            task.cancel()
                        await asyncio.gather(*tasks, return_exceptions=True)
        except (aiohttp.ClientConnectionError, aiohttp.WSServerHandshakeError):
            # The caller checks the job and reconnects; Ctrl-C (cancellation) still propagates.
            pass
        return received


def _quote(job_id: str) -> str:
    return urllib.parse.quote(job_id, safe="")


def normalize_address(address: str) -> str:
    """`http(s)://host:port` for a job server; refuses GCS and Ray Client addresses."""
    text = address.strip().rstrip("/")
    if text.startswith("ray://") or (text.rsplit(":", 1)[-1] == "6379" and "://" not in text):
        raise UserError(f"--address wants the Ray job server (dashboard) URL, e.g. "
                        f"http://head:8265, not {address!r}")
    if "://" not in text:
        text = "http://" + text
    if not text.startswith(("http://", "https://")):
        raise UserError(f"--address {address!r} is not an http(s) URL: use e.g. http://head:8265")
    return text


def user_token_file() -> Path:
    """The token the cluster configs in cluster/ ship to every node (`cluster token` makes it)."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "densenet-pipe" / "ray-token"


def _remote_headers(url: str) -> dict[str, str]:
    """The bearer token for a remote job server: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, our
    token file, or (with RAY_AUTH_MODE=token) Ray's own ~/.ray/auth_token."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    token_mode = os.environ.get("RAY_AUTH_MODE", "").lower() == "token"
    if not token:
        candidates = [os.environ.get("RAY_AUTH_TOKEN_PATH"), user_token_file()]
        if token_mode:
            candidates.append(Path.home() / ".ray" / "auth_token")
        for path in filter(None, candidates):
            try:
                token = Path(path).read_text().strip()
            except OSError:
                continue
            if token:
                break
    if not token:
        if token_mode:
            raise UserError("RAY_AUTH_MODE=token but no token: set RAY_AUTH_TOKEN, or put it in "
                            f"{user_token_file()} (`densenet-pipe cluster token` makes one)")
        return {}
    check_token_transport(url)
    return {"Authorization": f"Bearer {token}"}


PLAIN_HTTP_ENV = "DENSENET_PIPE_ALLOW_PLAIN_HTTP"


def check_token_transport(url: str) -> None:
    """A token crosses the network only over https, or plain http to this machine (an SSH or
    `kubectl port-forward` tunnel). Anything else is refused unless the user opts in."""
    parsed = urllib.parse.urlsplit(url)
    host = (parsed.hostname or "").lower()
    loopback = host in ("localhost", "::1") or host.startswith("127.")
    if parsed.scheme == "https" or loopback or os.environ.get(PLAIN_HTTP_ENV) == "1":
        return
    raise UserError(f"refusing to send the cluster's token over plain http to {host}: anyone on "
                    f"the way could read it; use https, forward the port (`ray dashboard "
                    f"cluster/aws.yaml`, `kubectl port-forward`) and pass --address "
                    f"http://127.0.0.1:{parsed.port or 8265}, or set {PLAIN_HTTP_ENV}=1 on a "
                    "network you trust")


def connect(address: str | None, *, start: bool = True,
            note: Callable[[str], None] = _note, resources: dict | None = None) -> JobServer:
    """The job server at `address`, or the local cluster's (started when `start`, shaped for
    a job needing `resources`: `runs.local_cluster_shape`).

    Checks that it answers within a few seconds: an unreachable address is a UserError.
    """
    if address:
        url = normalize_address(address)
        local = local_cluster.running()
        if local is not None and local.dashboard_url == url:
            server = JobServer(url, local.headers(), local)
        else:
            server = JobServer(url, _remote_headers(url))
    else:
        if start:
            from .runs import local_cluster_shape

            nodes, cpus, gpus = local_cluster_shape(resources, os.cpu_count() or 1,
                                                    local_cluster.gpu_count() if (resources or {}).get("gpus_per_node") else 0)
            local = local_cluster.ensure(note=note, nodes=nodes, cpus_per_node=cpus, gpus_per_node=gpus)
        else:
            local = local_cluster.running()
        if local is None:
            raise UserError("no local Ray cluster is up: start one with `densenet-pipe cluster "
                            "up` or pass --address (or RAY_ADDRESS)")
        server = JobServer(local.dashboard_url, local.headers(), local)
    server.version()
    return server


@dataclass
class Package:
    data: bytes
    files: int
    size: int
    config_path: str


def _git_ls(root: Path, *args: str) -> list[str] | None:
    try:
        out = subprocess.run(["git", "-C", str(root), "ls-files", "-z", *args],
                             capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return [p for p in out.stdout.decode().split("\0") if p] if out.returncode == 0 else None


def _candidate_files(root: Path) -> Iterable[str]:
    tracked = _git_ls(root, "--cached")
    if tracked:
        untracked = _git_ls(root, "--others", "--exclude-standard") or []
        return sorted(set(tracked) | {p for p in untracked if p.split("/", 1)[0] in _CODE_DIRS})
    found = []
    for folder, dirs, files in os.walk(root):
        rel = Path(folder).relative_to(root)
        dirs[:] = [d for d in dirs if not _skipped(rel / d)]
        found += [str(rel / f) for f in files]
    return sorted(found)


def is_secret(rel: Path) -> bool:
    import fnmatch

    return any(p in _SECRET_DIRS for p in rel.parts[:-1]) or any(
        fnmatch.fnmatch(rel.name.lower(), pattern) for pattern in SECRET_PATTERNS)


def _skipped(rel: Path) -> bool:
    parts = rel.parts
    return (bool(parts) and parts[0] in _SKIP_TOP) or any(
        p in _SKIP_DIRS or p.endswith(_SKIP_SUFFIXES) for p in parts) or is_secret(rel)


def package_working_dir(root: Path, job: str, cfg: dict[str, Any]) -> Package:
    """Zip the project's code (plus the config) as the job's working dir.

    Files are what git tracks plus untracked code under `_CODE_DIRS` (a plain walk outside
    git), minus `_SKIP_*` and anything that looks like a secret (`SECRET_PATTERNS`), even
    when tracked; symlinks are left out. The zip is byte-for-byte stable for
    the same files, so an unchanged project is uploaded once.
    """
    entries: list[tuple[str, Path, os.stat_result]] = []
    for rel in _candidate_files(root):
        if _skipped(Path(rel)):
            continue
        path = root / rel
        try:
            st = path.lstat()
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            entries.append((rel, path, st))
    total = sum(st.st_size for _, _, st in entries)
    if total >= MAX_WORKING_DIR_BYTES:
        largest = sorted(entries, key=lambda e: e[2].st_size, reverse=True)[:3]
        names = ", ".join(f"{rel} ({st.st_size / 1024**2:.0f} MiB)" for rel, _, st in largest)
        raise UserError(
            f"the job's working dir {root} holds {total / 1024**2:.0f} MiB of files, over Ray's "
            f"100 MiB upload cap (largest: {names}): move data out of the project or add it "
            "to .gitignore")
    config_text = json.dumps(cfg, indent=2, sort_keys=True) + "\n"
    config_path = f"{CONFIG_DIR}/{job}-{config_digest(cfg)}.json"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for rel, path, st in entries:
            info = zipfile.ZipInfo(rel, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = (stat.S_IMODE(st.st_mode) | stat.S_IFREG) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, path.read_bytes())
        info = zipfile.ZipInfo(config_path, date_time=(1980, 1, 1, 0, 0, 0))
        info.external_attr = (0o644 | stat.S_IFREG) << 16
        info.compress_type = zipfile.ZIP_DEFLATED
        zf.writestr(info, config_text)
    return Package(buffer.getvalue(), len(entries) + 1, total, config_path)


def check_resources(server: JobServer, resources: dict[str, Any],
                    wait_for_nodes: float = 0.0, note: Callable[[str], None] = _note) -> None:
    """Refuse (UserError) unless `nodes` alive nodes each have `cpus_per_node` CPUs and
    `gpus_per_node` GPUs; with `wait_for_nodes` > 0, poll that long for an autoscaler first
    (`runs.await_placement`, the rule the job applies again with Ray's node list).
    (`max_nodes`, an elastic run's MAX, only shapes an embedded cluster.)
    """
    unknown = set(resources) - {"nodes", "max_nodes", "cpus_per_node", "gpus_per_node"}
    if unknown:
        raise ValueError(f"unknown resource keys {sorted(unknown)}")
    per_node = (float(resources.get("cpus_per_node", 0) or 0), float(resources.get("gpus_per_node", 0) or 0))

    def alive() -> list[runs.Shape]:
        return [((n.get("resources_total") or {}).get("CPU", 0.0), (n.get("resources_total") or {}).get("GPU", 0.0))
                for n in server.nodes() if n.get("state") == "ALIVE"]

    runs.await_placement(alive, int(resources.get("nodes", 1)), lambda _: per_node, wait_for_nodes,
                         cluster=f"the cluster at {server.address}", local=server.local is not None,
                         note=note)


WORKER_START_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


def worker_start_timeout(cfg: dict[str, Any]) -> int:
    """Seconds Ray Train waits for a worker group to start. An elastic run asks only for
    workers the nodes it sees can hold, so a start that takes long is a group sized for a
    node just lost and not yet marked dead (Ray marks it after missed heartbeats): Ray's own
    60 s, and the run comes back on the nodes left."""
    cluster = cfg.get("cluster") if isinstance(cfg.get("cluster"), dict) else {}
    return 60 if cluster.get("min_nodes") is not None else 300


# `jobs stop` sends SIGTERM, then SIGKILL after STOP_GRACE_S (Ray's default is 3): time for
# the driver to end its W&B runs and say how they ended. A stop is awaited a little longer.
STOP_GRACE_S = 30
STOP_WAIT_S = STOP_GRACE_S + 15


def job_env(cfg: dict[str, Any], server: JobServer, job: str = "train") -> dict[str, str]:
    """Environment every job gets (see docs/orchestration.md for why each is set)."""
    # Worker prints go straight to the job log, not through Ray Train V2's logger.
    env = {"PYTHONUNBUFFERED": "1", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
           "RAY_JOB_STOP_WAIT_TIME_S": str(STOP_GRACE_S),
           # Ray Train gives up on a worker group that has not started in 60 s and counts it
           # as a failure. Workers start slower than that on a busy shared cluster, while an
           # autoscaler adds nodes, or while a sweep's stopped trial still holds its CPUs; a
           # request that can never fit is refused before submitting (check_resources).
           WORKER_START_ENV: os.environ.get(WORKER_START_ENV, str(worker_start_timeout(cfg)))}
    if job == "prepare":
        # Writing and merging stores runs no numba code, but `import ffcv` compiles a typed
        # dict (seconds of one core) in the driver and in every shard task: not needed.
        env["NUMBA_DISABLE_JIT"] = "1"
        from .data.prepare_config import HOLD_ENV, HOLD_STREAMS_ENV, PIECES_ENV

        for key in (PIECES_ENV, HOLD_ENV, HOLD_STREAMS_ENV):
            if os.environ.get(key):
                env[key] = os.environ[key]
    if server.local is not None:
        env["DENSENET_PIPE_WORKDIR"] = os.getcwd()
    tracking = cfg.get("tracking")
    mode = tracking.get("wandb") if isinstance(tracking, dict) else None
    # WANDB_API_KEY is never sent: a runtime env is written to Ray's logs and shown by its
    # job API. Online runs use the nodes' own key (their environment or `wandb login`).
    if mode == "off":
        env["WANDB_MODE"] = "disabled"
    elif mode != "online":
        env["WANDB_MODE"] = "offline"
    return env


def submit_job(server: JobServer, job: str, cfg: dict[str, Any], *,
               root: Path | None = None) -> str:
    """Package, upload and submit; returns the job id. Nothing is submitted on any error."""
    root = root or local_cluster.project_root()
    package = package_working_dir(root, job, cfg)
    return _submit_package(server, job, cfg, package)


def driver_fit(server: JobServer, driver: dict[str, float] | None) -> dict[str, float] | None:
    """`driver` cut down to what the best-fitting alive node has, so that it runs somewhere: a
    prepare asking for 8 writers on 4-CPU nodes runs with 4 CPUs held, not never. The node
    that can give the most CPUs, then the most memory, sets both caps."""
    if not driver or not (driver.get("num_cpus") or driver.get("memory")):
        return driver
    want_cpu, want_mem = driver.get("num_cpus") or 0, driver.get("memory") or 0
    fits = [(min(want_cpu, r.get("CPU", 0)), min(want_mem, r.get("memory", 0)))
            for r in ((n.get("resources_total") or {}) for n in server.nodes() if n.get("state") == "ALIVE")]
    cpu, mem = max(fits, default=(0, 0))
    out = {**driver}
    if "num_cpus" in driver:
        out["num_cpus"] = cpu
    if "memory" in driver:
        out["memory"] = int(mem)
    return out


def submitter() -> str:
    """user@host: who submitted a job, recorded in its metadata. A shared cluster's jobs are
    everyone's (Ray's token lets anyone stop any job); `jobs list` shows whose each is."""
    import getpass

    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in this environment
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def job_name(job: str, cfg: dict[str, Any]) -> str:
    """The run a train job trains or the sweep a sweep job runs, for `jobs list`: on a shared
    cluster, which job is whose work."""
    section, key = {"train": ("cluster", "run_name"), "sweep": ("sweep", "name")}.get(job, ("", ""))
    value = (cfg.get(section) or {}).get(key) if section else None
    return str(value) if value else ""


def _submit_package(server: JobServer, job: str, cfg: dict[str, Any], package: Package,
                    driver: dict[str, float] | None = None) -> str:
    uri = server.upload(package.data)
    job_id = f"{job}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    entrypoint = f"{server.python} -m jobs.{job} --config {package.config_path}"
    metadata = {"densenet_pipe_job": job, "config_digest": config_digest(cfg),
                "command": f"densenet-pipe {job}", "user": submitter()}
    name = job_name(job, cfg)
    if name:
        metadata["name"] = name
    env = {**job_env(cfg, server, job), runs.JOB_ID_ENV: job_id}
    return server.submit(entrypoint, {"working_dir": uri, "env_vars": env}, metadata, job_id, driver)


# Set by `densenet-pipe --verbose`: follow jobs with Ray's, Tune's and W&B's own lines.
VERBOSE_ENV = "DENSENET_PIPE_VERBOSE"


def run_job(job: str, cfg: dict, *, address: str | None, detach: bool = False,
            stop_on_interrupt: bool = False, resources: dict | None = None,
            wait_for_nodes: float = 0.0, driver: dict[str, float] | None = None,
            on_line: Callable[[str], None] | None = None) -> int:
    """Submit `python -m jobs.<job>` with `cfg` and follow it; returns the exit code.

    Lines go through `console.ConsoleFilter` unless VERBOSE_ENV is "1".
    0: the job succeeded (or was submitted, with `detach`); 1: it failed or was stopped;
    2: it failed on bad input (the job exited 2); 130: Ctrl-C left it running. `driver`: the
    resources the job's entrypoint holds (`JobServer.submit`). Bad input
    here (unknown job, unreachable address, missing resources, oversized working dir)
    raises UserError before anything is submitted.
    """
    root = local_cluster.project_root()
    if job not in available_jobs(root):
        raise UserError(f"unknown job {job!r}: jobs are {', '.join(available_jobs(root))}")
    package = package_working_dir(root, job, cfg)
    server = connect(address, resources=resources)
    if resources:
        check_resources(server, resources, wait_for_nodes)
    driver = driver_fit(server, driver)
    job_id = _submit_package(server, job, cfg, package, driver)
    if detach:
        _print_line(job_id)
        _note(f"submitted job {job_id} to {server.address}; follow it with: "
              f"{follow_command(job_id, address)}")
        return 0
    _note(f"submitted job {job_id} to {server.address} (Ctrl-C to stop or detach)")
    show = on_line or _print_line
    if os.environ.get(VERBOSE_ENV) != "1":
        from .console import ConsoleFilter

        keep, raw = ConsoleFilter(), show

        def show(line: str) -> None:
            for shown in keep(line):
                raw(shown)
    return follow(server, job_id, show, stop_on_interrupt=stop_on_interrupt, address=address, driver=driver)


def follow_command(job_id: str, address: str | None) -> str:
    extra = ""
    if address and address != os.environ.get("RAY_ADDRESS"):
        extra = f" --address {shlex.quote(address)}"
    return f"densenet-pipe jobs logs {job_id} --follow{extra}"


_CONTROL = {c: None for c in range(32) if c not in (9,)} | {127: None}


def clean_line(line: str) -> str:
    """A job's output line as safe to print: control characters (escape sequences that could
    rewrite the terminal, from tar member names or anything a job prints) are dropped; tab
    stays."""
    from .console import strip_ansi

    return strip_ansi(line).translate(_CONTROL)


class _Lines:
    """Turns streamed text into whole lines for `on_line`, without control characters."""

    def __init__(self, on_line: Callable[[str], None]):
        self.on_line = on_line
        self.pending = ""
        self.seen = 0

    def feed(self, text: str) -> None:
        self.seen += len(text)
        *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            self.on_line(clean_line(line))

    def flush(self) -> None:
        if self.pending:
            self.on_line(clean_line(self.pending))
            self.pending = ""


def wait_terminal(server: JobServer, job_id: str, timeout: float = 60.0) -> dict[str, Any]:
    """The job's info once it has ended (or as it is after `timeout` seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        info = server.job(job_id)
        if info.get("status") in TERMINAL or time.monotonic() >= deadline:
            return info
        time.sleep(0.3)


def follow(server: JobServer, job_id: str, on_line: Callable[[str], None], *,
           stop_on_interrupt: bool = False, address: str | None = None,
           poll_seconds: float = 10.0, driver: dict[str, float] | None = None) -> int:
    """Stream a job's logs until it ends; the exit code as in `run_job`.

    The first `poll_seconds` poll the logs endpoint every 0.1 s: the websocket's server side
    sleeps a second between reads, and a job's first lines are what a user waits for. Then
    the websocket takes over (resuming where polling stopped) so long logs are not re-read.
    """
    lines = _Lines(on_line)
    try:
        info = _poll(server, job_id, lines, poll_seconds, driver=driver)
        while info.get("status") not in TERMINAL:
            server.tail(job_id, _skip(lines.seen, lines.feed))
            info = server.job(job_id)
            if info.get("status") not in TERMINAL:
                time.sleep(1.0)
        rest = server.logs(job_id)[lines.seen:]
        if rest:
            lines.feed(rest)
        lines.flush()
    except KeyboardInterrupt:
        lines.flush()
        return _interrupted(server, job_id, stop_on_interrupt, address)
    return outcome(info)


def _poll(server: JobServer, job_id: str, lines: _Lines, seconds: float,
          note: Callable[[str], None] = _note, driver: dict[str, float] | None = None) -> dict[str, Any]:
    """Polls for `seconds`, and for as long as the job is PENDING (the websocket would wait
    in silence), saying what it waits for now and then (`driver`: what its entrypoint asked
    for, when this process submitted it; Ray's job API does not tell)."""
    began = time.monotonic()
    deadline, tell = began + seconds, began + PENDING_NOTE_S
    while True:
        info = server.job(job_id)
        text = server.logs(job_id)
        if len(text) > lines.seen:
            lines.feed(text[lines.seen:])
        now = time.monotonic()
        status = info.get("status")
        if status in TERMINAL or (now >= deadline and status != "PENDING"):
            return info
        if status == "PENDING" and now >= tell:
            note(pending_line(server, job_id, driver or {}, now - began))
            tell = now + PENDING_REPEAT_S
        time.sleep(0.1 if now < deadline else 1.0)


def pending_line(server: JobServer, job_id: str, driver: dict[str, float], waited: float) -> str:
    """Why a submitted job has not started, as far as this process can tell: what its driver
    asked of one node (`JobServer.submit`'s `driver`), and which jobs hold the cluster now."""
    asks = []
    if driver.get("num_cpus"):
        asks.append(f"{driver['num_cpus']:g} CPU(s)")
    if driver.get("num_gpus"):
        asks.append(f"{driver['num_gpus']:g} GPU(s)")
    if driver.get("memory"):
        asks.append(f"{driver['memory'] / 2**30:.1f} GiB of memory")
    running = [j.get("submission_id") for j in server.list_jobs()
               if j.get("status") == "RUNNING" and j.get("submission_id") != job_id]
    why = (f"its driver needs {' and '.join(asks)} free on one node" if asks else
           "Ray has not started its driver (its runtime environment is being set up, or no node is free)")
    held = (f"; running now: {', '.join(running[:3])}{' and more' if len(running) > 3 else ''} "
            "(`densenet-pipe jobs stop ID` frees what one holds)") if running else ""
    return f"job {job_id} has waited {waited:.0f} s to start: {why}{held}"


def _skip(count: int, feed: Callable[[str], None]) -> Callable[[str], None]:
    """`feed` minus the first `count` characters: the websocket replays logs from the start."""
    left = count

    def skipping(text: str) -> None:
        nonlocal left
        if left >= len(text):
            left -= len(text)
            return
        feed(text[left:])
        left = 0

    return skipping


def outcome(info: dict[str, Any], note: Callable[[str], None] = _note) -> int:
    """Report how a finished job ended and map it to an exit code."""
    job_id = info.get("submission_id")
    status = info.get("status")
    took = ""
    if info.get("start_time") and info.get("end_time"):
        took = f" in {(info['end_time'] - info['start_time']) / 1000:.1f} s"
    if status == "SUCCEEDED":
        note(f"job {job_id} succeeded{took}")
        return 0
    code = info.get("driver_exit_code")
    if status == "STOPPED":
        note(f"job {job_id} was stopped{took}")
        return 1
    reason = (info.get("message") or "").split(", last available logs")[0].strip()
    note(f"job {job_id} {str(status).lower()}{took}: {reason or 'no reason given'}")
    return 2 if code == 2 else 1


def _interrupted(server: JobServer, job_id: str, stop: bool, address: str | None) -> int:
    if not stop and sys.stdin is not None and sys.stdin.isatty():
        print(f"\nstop job {job_id}? [y/N] ", end="", file=sys.stderr, flush=True)
        try:
            stop = sys.stdin.readline().strip().lower() in ("y", "yes")
        except KeyboardInterrupt:
            stop = False
    if stop:
        server.stop(job_id)
        info = wait_terminal(server, job_id, timeout=STOP_WAIT_S)
        _note(f"job {job_id} {str(info.get('status')).lower()}")
        return 1
    _note(f"job {job_id} is still running: follow it with `{follow_command(job_id, address)}`, "
          f"stop it with `densenet-pipe jobs stop {job_id}`")
    return 130
