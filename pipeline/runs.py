"""Rules about a run that the CLI (fast local checks), the job (the final word), the worker
and the sweep all apply: torch- and Ray-free, one place each.

    check_name("run", "densenet121-20261202")       # names that become folders
    workers_per_node(None, use_gpu=True, gpus=[8, 8])  # -> 8
    per_worker_batch(64, nodes=2, per_node=2)        # -> 16; 64 over 3 is an error, not 63
    check_private_folder(Path("runs/sweep-1"))       # before unpickling Tune's state from it
    await_placement(alive, nodes=2, demand=lambda shapes: (4, 0))  # or one line naming the fix
"""

from __future__ import annotations

import json
import os
import re
import stat
import time
from pathlib import Path
from typing import Callable

from .errors import UserError

NAME = re.compile(r"[A-Za-z0-9._-]+")


def check_name(kind: str, name: str) -> str:
    """A run, sweep or store name becomes a folder: letters, digits, `.`, `_`, `-` only."""
    if not NAME.fullmatch(name or "") or name in (".", ".."):
        raise UserError(f"{kind} name {name!r} is not allowed: use letters, digits, '.', '_' and '-' "
                        "(no '/', not '.' or '..')")
    return name


def default_storage(local_cluster: bool) -> str:
    """Where runs go without --storage: ./runs on the embedded local cluster (the user's own
    folder), ~/densenet-pipe/runs on a cluster's nodes (resolved by the job there)."""
    return str(Path("runs").resolve()) if local_cluster else str(Path.home() / "densenet-pipe" / "runs")


def check_classes(model_classes: int | None, store_classes: int, store: str) -> None:
    """A net asked for with a class count must match its store's."""
    if model_classes not in (None, store_classes):
        raise UserError(f"model.num_classes is {model_classes} but store {store} has {store_classes} "
                        "classes: drop model.num_classes or use the matching store")


def check_resizing(min_res: int, family: str, store: str) -> None:
    """Progressive resizing changes a crop's output size: imagenet-family stores only."""
    if min_res and family != "imagenet":
        raise UserError(f"progressive resizing (data.min_res) needs an imagenet-family store; {store} "
                        f"is {family}-family (read at its stored size): drop data.min_res/max_res")


def check_checkpoint_classes(predicts: int, trained: list[str] | None, store_classes: list[str],
                             store: str) -> None:
    """A checkpoint is evaluated only on a store with its classes, in its order, by name."""
    if predicts != len(store_classes):
        raise UserError(f"checkpoint predicts {predicts} classes but store {store} has "
                        f"{len(store_classes)}: evaluate on the store it was trained for")
    if trained and list(trained) != list(store_classes):
        differ = next(i for i, (a, b) in enumerate(zip(trained, store_classes)) if a != b)
        raise UserError(f"checkpoint's class {differ} is {trained[differ]!r} but store {store} calls it "
                        f"{store_classes[differ]!r}: evaluate on the store it was trained for")


def local_cluster_shape(resources: dict | None, cpus: int, gpus: int) -> tuple[int, float | None, int | None]:
    """(nodes, CPUs a node, GPUs a node) of an embedded cluster started for a job that needs
    `resources`: as many nodes as it asks for, this machine's CPUs shared among them (never
    fewer than the job needs a node), and, for a GPU job, the GPUs sliced per node. None
    keeps `local_cluster.up`'s default (every CPU; the GPUs on the head)."""
    resources = resources or {}
    nodes = int(resources.get("max_nodes") or resources.get("nodes") or 1)
    if nodes <= 1:
        return 1, None, None
    need_cpus = float(resources.get("cpus_per_node") or 1)
    per_node = max(need_cpus, float(max(1, cpus // nodes)))
    gpu_slice = gpus // nodes if resources.get("gpus_per_node") else None
    return nodes, per_node, gpu_slice


def workers_per_node(requested: int | None, use_gpu: bool, gpus: list[int]) -> int:
    """Workers on each node: as asked, else one per GPU of the smallest GPU node, else 1."""
    if requested is not None:
        return requested
    have = [g for g in gpus if g >= 1]
    return min(have) if use_gpu and have else 1


# (CPUs, GPUs) of one alive node, whoever listed it: the job server before submitting, Ray
# inside the job.
Shape = tuple[float, float]


def trial_in_process(nodes: int, workers_per_node: int | None, use_gpu: bool, min_nodes: int | None) -> bool:
    """Whether a sweep trial is one worker, run in the Tune trial's own process: one node,
    one worker on it (a GPU trial only when asked for one worker: auto means one per GPU),
    not elastic. Every other trial is a Ray Train run of its own."""
    one = workers_per_node == 1 or (workers_per_node is None and not use_gpu)
    return nodes == 1 and one and min_nodes is None


def number(value: float) -> str:
    """`2` for 2.0, `1.5` for 1.5: resource counts as a user writes them."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def shapes_text(shapes: list[Shape]) -> str:
    """`3 x (1 CPU, 0 GPU), 1 x (8 CPU, 1 GPU)`, largest first."""
    counts: dict[Shape, int] = {}
    for shape in shapes:
        counts[shape] = counts.get(shape, 0) + 1
    return ", ".join(f"{count} x ({number(cpu)} CPU, {number(gpu)} GPU)"
                     for (cpu, gpu), count in sorted(counts.items(), reverse=True)) or "nothing"


def await_placement(alive: Callable[[], list[Shape]], nodes: int,
                    demand: Callable[[list[Shape]], Shape], wait_s: float = 0.0, *,
                    cluster: str = "the cluster", local: bool = False,
                    note: Callable[[str], None] | None = None,
                    sleep: Callable[[float], None] = time.sleep,
                    clock: Callable[[], float] = time.monotonic) -> list[Shape]:
    """The alive nodes' shapes once `nodes` of them each hold `demand(shapes)` (CPUs, GPUs a
    node; it may depend on the nodes, as one worker per GPU does), polling up to `wait_s`
    seconds for an autoscaler; else UserError naming what is missing and the fix (`local`:
    the embedded cluster, which `cluster up` grows)."""
    deadline = clock() + max(0.0, wait_s)
    waited = False
    while True:
        shapes = alive()
        cpus, gpus = demand(shapes)
        fit = sum(1 for cpu, gpu in shapes if cpu >= cpus and gpu >= gpus)
        if fit >= nodes:
            return shapes
        if clock() >= deadline:
            break
        if not waited and note is not None:
            note(f"waiting up to {wait_s:g} s for {nodes} node(s) with {number(cpus)} CPU "
                 f"and {number(gpus)} GPU each ({cluster} has {fit}) ...")
        waited = True
        sleep(min(2.0, max(0.1, deadline - clock())))
    wants = f"{nodes} node(s) with {number(cpus)} CPU and {number(gpus)} GPU each"
    if gpus > 0 and not any(gpu for _, gpu in shapes):
        fix = "run on CPUs (without --gpu) or point --address at a cluster with GPUs"
    elif local:
        fix = (f"ask for fewer (--nodes), or grow it: `densenet-pipe cluster up --nodes {nodes}"
               + (f" --cpus-per-node {number(cpus)}`" if cpus else "`"))
    else:
        fix = "ask for fewer (--nodes), or give --wait-for-nodes SECONDS to let it scale up"
    waited_text = f" after waiting {wait_s:g} s" if wait_s > 0 else ""
    raise UserError(f"the job needs {wants} but {cluster} has {len(shapes)} node(s): "
                    f"{shapes_text(shapes)}{waited_text}: {fix}")


def parse_nodes(text: str) -> tuple[int | None, int]:
    """`--nodes`: "N" -> (None, N); "MIN-MAX" -> (MIN, MAX), an elastic run."""
    lo, sep, hi = text.strip().partition("-")
    try:
        low, high = int(lo), int(hi if sep else lo)
    except ValueError:
        raise UserError(f"--nodes {text!r} is not a count: give N (e.g. 4) or MIN-MAX (e.g. 2-4)") from None
    if not sep and low < 1:
        raise UserError(f"--nodes must be >= 1, got {low}")
    if not 1 <= low <= high:
        raise UserError(f"--nodes {text!r}: need 1 <= MIN <= MAX (e.g. 2-4)")
    return (low if sep else None), high


def elastic_lr_scale(workers: int, max_workers: int) -> float:
    """An elastic run keeps each worker's batch and scales the lr with the global batch:
    `optim.batch_size` and `optim.lr` hold at the full size (MAX nodes), and with fewer
    workers both shrink in proportion (the linear scaling rule, Goyal et al. 2017)."""
    return workers / max_workers


def per_worker_batch(global_batch: int, nodes: int, per_node: int = 1, accumulate: int = 1) -> int:
    """The images one worker puts through one forward pass: the global batch split across
    the workers and the `accumulate` passes of each optimizer step. It must divide evenly:
    a silent floor would train on fewer images a step than the recipe says."""
    workers = nodes * per_node
    parts = workers * max(1, accumulate)
    if workers < 1 or global_batch % parts:
        split = f"{workers} workers" + (f" x {accumulate} accumulated passes" if accumulate > 1 else "")
        raise UserError(f"global batch {global_batch} does not divide across {split} "
                        f"({nodes} nodes x {per_node}): pick a multiple of {parts} (--batch-size) "
                        "or set --workers-per-node")
    return global_batch // parts


def check_new_or_resumed(kind: str, name: str, where: str, resume: bool, exists: bool) -> None:
    """A new run or sweep must not be there yet (nothing of an earlier one is overwritten);
    a resumed one must."""
    from .storage import display

    where = display(where)
    if resume and not exists:
        raise UserError(f"no {kind} {name!r} under {where} to resume: check --resume NAME and --storage")
    if not resume and exists:
        raise UserError(f"{kind} {name!r} already exists in {where}: pass --resume NAME to continue "
                        f"it, or --name for a new {kind}")


# The job that trains a run (or runs a sweep) now: set in its environment by `submit`, and
# written into the folder it works in, so a second job for the same folder can tell.
JOB_ID_ENV = "DENSENET_PIPE_JOB_ID"
JOB_FILE = "job.json"
_LIVE = ("PENDING", "RUNNING")


def live_jobs() -> set[str] | None:
    """Submission ids of this cluster's pending and running jobs (the caller is connected to
    Ray); None when Ray's state API does not answer."""
    try:
        from ray.util.state import list_jobs

        return {j.submission_id for j in list_jobs(limit=10_000, raise_on_missing_output=False)
                if j.submission_id and str(getattr(j.status, "value", j.status)) in _LIVE}
    except Exception:  # noqa: BLE001 - no answer is not a reason to refuse the user's job
        return None


def hold_folder(folder: str, kind: str, name: str, live: Callable[[], set[str] | None] = live_jobs) -> None:
    """Record this job as the one working in `folder`, refusing when the job recorded there is
    another that is still pending or running on this cluster: two jobs training one run
    prune, set aside and overwrite each other's checkpoints. Called before anything in the
    folder is touched. A job on another cluster sharing the storage cannot be seen here."""
    from . import storage as store_io

    me = os.environ.get(JOB_ID_ENV)
    at = store_io.join(folder, JOB_FILE)
    try:
        other = json.loads(store_io.read_text(at)).get("job")
    except (FileNotFoundError, ValueError, AttributeError):
        other = None
    if other and other != me and other in (live() or ()):
        verb = "trained" if kind == "run" else "run"
        raise UserError(f"{kind} {name!r} is being {verb} by job {other}, still running on this cluster: "
                        f"wait for it to end, or stop it with `densenet-pipe jobs stop {other}`")
    if me:
        store_io.write_text(at, json.dumps({"job": me, "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")


def check_private_folder(path: Path, what: str) -> None:
    """A local folder we are about to unpickle from must be ours and writable by us alone."""
    st = os.stat(path)
    if st.st_uid != os.getuid():
        raise UserError(f"{what} {path} belongs to another user (uid {st.st_uid}): its state is "
                        "unpickled on resume, so only its owner may resume it")
    if stat.S_IMODE(st.st_mode) & 0o022:
        raise UserError(f"{what} {path} is writable by others (mode {stat.S_IMODE(st.st_mode):o}): "
                        f"its state is unpickled on resume; run `chmod go-w {path}` first")


# What a resumed run may change: how long it trains, where it runs and how it reports, never
# what it learns; everything else comes from the run's own config.json. The global batch is
# fixed, so a run resumed on other nodes takes the same optimizer steps with a new split
# (a checkpoint holds no per-worker state); an elastic run's node range sets its lr
# scaling, so it keeps its own (`_ELASTIC_FIXED`).
RESUME_MAY_CHANGE = ("train.epochs", "cluster.nodes", "cluster.workers_per_node",
                     "cluster.cpus_per_worker", "cluster.wait_for_nodes", "cluster.max_failures",
                     "cluster.resize_interval_s", "data.loader_workers", "data.stage",
                     "data.cache_dir", "data.cache_max_gb", "data.os_cache", "tracking.wandb",
                     "train.log_every_steps", "train.keep_checkpoints", "train.hold_file")
_ELASTIC_FIXED = ("cluster.nodes", "cluster.workers_per_node")
# What names the run and how to reach it, not how it trains.
_RESUME_IDENTITY = ("cluster.storage", "cluster.run_name", "cluster.address", "train.resume",
                    "train.resume_changes", "train.resume_from_epoch", "data.store")


def _get(d: dict, key: str):
    for part in key.split("."):
        d = d.get(part, {}) if isinstance(d, dict) else {}
    return d if d != {} else None


def _set(d: dict, key: str, value) -> None:
    *path, last = key.split(".")
    for part in path:
        d = d.setdefault(part, {})
    d[last] = value


def resumed(cfg, storage: str):
    """The config a resumed run trains with: its saved config.json under `storage`, with the
    changes a resume may make (`resume_config`). The CLI calls it for an early answer when it
    sees the run's storage; the job as the final word."""
    from . import storage as store_io
    from .config import Config, validate

    name = cfg.cluster.run_name
    saved_at = store_io.join(storage, name, "config.json")
    try:
        saved = json.loads(store_io.read_text(saved_at))
    except FileNotFoundError:
        raise UserError(f"no run {name!r} under {store_io.display(storage)} to resume: check --resume NAME "
                        "and --storage") from None
    except ValueError as e:
        raise UserError(f"{saved_at} is not valid JSON ({e}): the run's config is damaged") from None
    asked = Config.from_dict(resume_config(saved, cfg.to_dict(), cfg.train.resume_changes, name))
    c, o = asked.cluster, asked.optim
    workers = c.nodes * (c.workers_per_node or 1)
    if workers >= 1 and o.batch_size % (workers * max(1, o.accumulate)):
        passes = f" x {o.accumulate} accumulated passes" if o.accumulate > 1 else ""
        raise UserError(f"--resume {name}: the run's global batch {o.batch_size} does not divide across "
                        f"{workers} worker(s){passes} ({c.nodes} nodes x {c.workers_per_node or 1}); a "
                        "resumed run keeps its batch: pick --nodes and --workers-per-node whose "
                        "workers divide it")
    merged = validate(asked)
    done = merged.train.resume_from_epoch or trained_epochs(store_io.join(storage, name))
    if done >= merged.train.epochs:
        raise UserError(f"--resume {name}: the run has trained {done} of its {merged.train.epochs} epochs, "
                        f"nothing is left to train: pass --epochs {done + 1} or more to train on")
    return merged


def check_same_store(kind: str, name: str, trained_on: str | None, store: str, digest: str) -> None:
    """A resumed run (or sweep) goes on only on the store it trained on: the same manifest hash."""
    if trained_on and digest and trained_on != digest:
        who = "the run trained" if kind == "run" else "the sweep's trials trained"
        raise UserError(f"--resume {name}: {who} on a store whose manifest sha256 is {trained_on[:12]}, and "
                        f"{store} has {digest[:12]}: pass the {kind}'s own store with --data (or none), or "
                        f"start a new {kind}")


def trained_epochs(run_dir: str) -> int:
    """The epoch of a run folder's newest complete checkpoint (0 without one)."""
    from .train import checkpoint

    newest = checkpoint.newest(run_dir, say=lambda _line: None)
    match = re.search(r"epoch-(\d+)", newest or "")
    return int(match[1]) if match else 0


def resume_config(saved: dict, asked: dict, changed: list[str], run: str, kind: str = "run") -> dict:
    """The config a resumed run (or sweep) goes on with: its saved config, plus the few changes
    allowed (`RESUME_MAY_CHANGE`, `SWEEP_RESUME_MAY_CHANGE`) among the keys the user gave
    (`changed`). Any other key the user gave with a new value is refused, naming both values."""
    may_change, identity = ((RESUME_MAY_CHANGE, _RESUME_IDENTITY) if kind == "run"
                            else (SWEEP_RESUME_MAY_CHANGE, _SWEEP_IDENTITY))
    out = json.loads(json.dumps(saved))
    for key in identity:
        if _get(asked, key) not in (None, ""):
            _set(out, key, _get(asked, key))
    for key in changed:
        if key in identity:
            continue
        new, old = _get(asked, key), _get(saved, key)
        if new == old:
            continue
        if kind == "sweep" and key not in may_change:
            raise UserError(f"--resume {run} goes on with the sweep's own config: {key} was {old!r}, "
                            f"now {new!r}; a resumed sweep may change where and how verbosely its "
                            f"trials run ({', '.join(may_change)}), not what they learn: start a new "
                            "sweep with --name for that")
        if key == "cluster.min_nodes" and old is None:
            raise UserError(f"--resume {run} trained on a fixed {_get(saved, 'cluster.nodes')} node(s), and "
                            "an elastic range sets a run's lr scaling from its start: resume with "
                            "--nodes N, or start a new run with --name for --nodes MIN-MAX")
        if key in _ELASTIC_FIXED and _get(saved, "cluster.min_nodes") is not None:
            raise UserError(f"--resume {run} is an elastic run of {_get(saved, 'cluster.min_nodes')}-"
                            f"{_get(saved, 'cluster.nodes')} nodes: its node range sets its lr "
                            f"scaling, so {key} stays {old!r}, not {new!r} (start a new run with "
                            "--name for another range)")
        if key not in may_change:
            raise UserError(f"--resume {run} trains with the run's own config: {key} was {old!r}, "
                            f"now {new!r}; a resume may change how long, where and how verbosely "
                            f"the run trains ({', '.join(may_change)}), not what it learns: "
                            "start a new run with --name for that")
        _set(out, key, new)
    return out


# A sweep keeps what its trials learn and how many run at once (Tune restores its own
# scheduler, search and limits from its saved state), and its epochs: ASHA compares trials
# at the same epochs, and the finished ones are not trained on.
SWEEP_RESUME_MAY_CHANGE = ("cluster.wait_for_nodes", "data.loader_workers", "data.stage", "data.cache_dir",
                           "data.cache_max_gb", "data.os_cache", "tracking.wandb", "train.log_every_steps",
                           "train.keep_checkpoints", "train.hold_file")
_SWEEP_IDENTITY = ("cluster.storage", "cluster.address", "sweep.name", "sweep.resume",
                   "sweep.resume_changes", "data.store")
SWEEP_FILE = "sweep.json"


def save_sweep(folder: str, cfg, manifest_sha256: str) -> None:
    """What a resumed sweep goes on with: its config and the store its trials train on."""
    from . import storage as store_io

    store_io.write_text(store_io.join(folder, SWEEP_FILE), json.dumps(
        {"config": cfg.to_dict(), "manifest_sha256": manifest_sha256}, indent=2) + "\n")


def saved_sweep(folder: str) -> dict | None:
    """A sweep folder's sweep.json; None for a sweep started before sweeps saved one."""
    from . import storage as store_io

    at = store_io.join(folder, SWEEP_FILE)
    try:
        saved = json.loads(store_io.read_text(at))
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise UserError(f"{store_io.display(at)} is not valid JSON ({e}): the sweep's config is damaged") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict):
        raise UserError(f"{store_io.display(at)} holds no sweep config: the sweep's config is damaged")
    return saved


def resumed_sweep(cfg, storage: str):
    """The config a resumed sweep goes on with: its saved sweep.json under `storage`, with the
    changes a resume may make, so `sweep densenet_bc --resume NAME` needs no other flag. The
    CLI calls it for an early answer when it sees the storage; the job as the final word. A
    sweep saved before sweep.json existed goes on with the flags as given."""
    from . import storage as store_io
    from .config import Config, validate

    name = cfg.sweep.name
    folder = store_io.join(storage, name)
    check_new_or_resumed("sweep", name, storage, True, store_io.exists(folder))
    saved = saved_sweep(folder)
    if saved is None:
        return validate(cfg)
    merged = resume_config(saved["config"], cfg.to_dict(), cfg.sweep.resume_changes, name, kind="sweep")
    return validate(Config.from_dict(merged))
