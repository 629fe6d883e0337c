"""Builds and runs the Ray Train `TorchTrainer` for one training run (inside the train job).

    result = run(cfg)     # cfg validated; cfg.data.store, cluster.storage, cluster.run_name set

`--nodes N` means N Ray nodes: with one worker a node the workers are placed STRICT_SPREAD,
with several they are packed node by node, and the worker loop checks the node ids it got.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .. import runs, storage
from ..config import Config, apply_overrides
from ..errors import JobFailed, UserError, last_line


@dataclass
class Placement:
    nodes: int
    workers_per_node: int
    cpus_per_worker: float
    use_gpu: bool
    # An elastic run's MIN nodes (None: exactly `nodes`).
    min_nodes: int | None = None

    @property
    def num_workers(self) -> int | tuple[int, int]:
        """Ray Train's num_workers: a count, or (min, max) for an elastic run."""
        if self.min_nodes is None:
            return self.nodes * self.workers_per_node
        return self.min_nodes * self.workers_per_node, self.nodes * self.workers_per_node

    def describe(self) -> str:
        if self.min_nodes is None:
            return f"{self.num_workers} worker(s) on {self.nodes} node(s)"
        low, high = self.num_workers
        return (f"{low}-{high} workers on {self.min_nodes}-{self.nodes} nodes (elastic: grows as "
                "nodes join, goes on with fewer when one is lost)")


def connect() -> None:
    """Join the cluster the job runs on (Ray jobs set RAY_ADDRESS for their driver)."""
    import ray

    if not ray.is_initialized():
        ray.init(log_to_driver=True)


def plan_placement(cfg: Config) -> Placement:
    """Workers per node, once the cluster can hold them (waiting if allowed): the rule
    `submit` checked before submitting (`runs.await_placement`), now with Ray's own node list."""
    import ray

    c = cfg.cluster
    connect()

    def alive() -> list[runs.Shape]:
        return [(n["Resources"].get("CPU", 0.0), n["Resources"].get("GPU", 0.0))
                for n in ray.nodes() if n.get("Alive")]

    def per_node(shapes: list[runs.Shape]) -> runs.Shape:
        wpn = runs.workers_per_node(c.workers_per_node, c.use_gpu, [int(gpu) for _, gpu in shapes])
        runs.per_worker_batch(cfg.optim.batch_size, c.nodes, wpn, cfg.optim.accumulate)
        return wpn * c.cpus_per_worker, wpn if c.use_gpu else 0

    shapes = runs.await_placement(alive, c.min_nodes or c.nodes, per_node, c.wait_for_nodes,
                                  note=lambda line: print(line, flush=True))
    wpn = runs.workers_per_node(c.workers_per_node, c.use_gpu, [int(gpu) for _, gpu in shapes])
    return Placement(c.nodes, wpn, c.cpus_per_worker, c.use_gpu, c.min_nodes)


def check_nodes(cfg: Config, manifest_sha256: str, min_cpus: float) -> None:
    """Before any worker starts, on every node that can hold workers: the run's storage can be
    written (object storage: with the nodes' own credentials), and the store is staged to local
    disk where it needs to be. Either fails the job with one line."""
    from ..data.staging import prestage
    from ..node_tasks import on_each_node

    connect()
    # A folder must be one every node mounts and may write, as a bucket must take every
    # node's credentials; either fails here, not as a traceback from the first checkpoint.
    on_each_node(storage.check_writable, cfg.cluster.storage, min_cpus=min_cpus)
    prestage(cfg.data.store, manifest_sha256, cfg.data, say=lambda line: print(line, flush=True),
             min_cpus=min_cpus)


def run_dir(cfg: Config) -> str:
    """storage/run_name: a path or a storage URI (`pipeline.storage`)."""
    return storage.join(cfg.cluster.storage, cfg.cluster.run_name)


def check_run_dir(cfg: Config, resume: bool) -> str:
    folder = run_dir(cfg)
    # Resuming needs the run's folder; a new run must not meet anything at its path.
    there = storage.is_dir(folder) if resume else storage.exists(folder)
    runs.check_new_or_resumed("run", cfg.cluster.run_name, cfg.cluster.storage, resume, there)
    return folder


def latest_history(folder: str | Path) -> list[dict[str, Any]]:
    from . import checkpoint

    try:
        return list(checkpoint.load(folder)["history"])
    except UserError:
        return []


def strategy(placement: Placement) -> str:
    """One worker a node: STRICT_SPREAD. Several: packed node by node. An elastic run's worker
    count is Ray's (as many as the alive nodes' resources hold, between MIN and MAX), so its
    workers are spread across the nodes there are."""
    if placement.min_nodes is not None:
        return "SPREAD"
    return "STRICT_SPREAD" if placement.workers_per_node == 1 else "PACK"


def loop_config(cfg: Config, folder: str, manifest_sha256: str, tracker: str | None,
                workers_per_node: int, trial: bool = False) -> dict[str, Any]:
    """What `train_loop` is given, however it runs. `trial`: a sweep trial, whose lines name
    it and whose epochs the sweep's driver tells (`pipeline.tune.sweep`)."""
    return {"config": cfg.to_dict(), "run_dir": str(folder), "run_name": cfg.cluster.run_name,
            "manifest_sha256": manifest_sha256, "tracker": tracker, "workers_per_node": workers_per_node,
            "trial": trial}


def build_trainer(cfg: Config, placement: Placement, folder: str, manifest_sha256: str = "",
                  callbacks: list | None = None, tracker: str | None = None, trial: bool = False):
    """The TorchTrainer for one run; `folder` is storage/run_name."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .loop import train_worker

    return TorchTrainer(
        train_worker,
        train_loop_config=loop_config(cfg, folder, manifest_sha256, tracker, placement.workers_per_node, trial),
        torch_config=TorchConfig(backend="nccl" if placement.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=placement.num_workers, use_gpu=placement.use_gpu,
            resources_per_worker={"CPU": placement.cpus_per_worker, **({"GPU": 1} if placement.use_gpu else {})},
            placement_strategy=strategy(placement),
            **({"elastic_resize_monitor_interval_s": cfg.cluster.resize_interval_s}
               if placement.min_nodes is not None else {}),
        ),
        run_config=RunConfig(
            name=cfg.cluster.run_name, storage_path=cfg.cluster.storage,
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.train.keep_checkpoints,
                checkpoint_score_attribute="val_top1_error", checkpoint_score_order="min"),
            # Bounded: a worker group that cannot be placed retries forever otherwise.
            # An elastic run meets one start that times out per node lost (see
            # submit.worker_start_timeout): it may meet many on a spot cluster.
            failure_config=FailureConfig(max_failures=cfg.cluster.max_failures,
                                         controller_failure_limit=3 if placement.min_nodes is None else 20),
            callbacks=callbacks or None,
        ),
    )


# A worker group Ray has not placed after this long (on a shared cluster, other jobs hold the
# CPUs) gets a line saying what it waits for, and again every PLACEMENT_REPEAT_S: Ray Train
# itself says nothing until its start timeout.
PLACEMENT_NOTE_S = 15.0
PLACEMENT_REPEAT_S = 60.0


def placement_wait_line(group: dict[str, Any], free: dict[str, float], total: dict[str, float],
                        waited: float) -> str:
    """What a pending placement group (Ray's `placement_group_table` entry) waits for."""
    bundles = list(group.get("bundles", {}).values())
    each = bundles[0] if bundles else {}
    shape = " and ".join(f"{each[k]:g} {k}" for k in ("CPU", "GPU") if each.get(k)) or "resources"
    have = ", ".join(f"{free.get(k, 0):g} of {total[k]:g} {k}s" for k in ("CPU", "GPU") if total.get(k))
    return (f"waited {waited:.0f} s for Ray to place the run's {len(bundles)} worker(s) of {shape} each "
            f"({group.get('strategy', '').lower().replace('_', ' ')}): {have} free now, the rest held by "
            "other work (`densenet-pipe jobs list`); the run starts when they free up")


class PlacementWatch:
    """While a run's `fit()` waits: a placement group that appeared after the watch began and
    stays PENDING is this run's worker group waiting for resources; say so now and then.
    `table`, `free` and `total` default to Ray's (placement_group_table, available and
    cluster resources)."""

    def __init__(self, say: Callable[[str], None] = print, table: Callable[[], dict] | None = None,
                 free: Callable[[], dict] | None = None, total: Callable[[], dict] | None = None,
                 every: float = 2.0):
        import ray

        self.say, self.every = say, every
        self.table = table or ray.util.placement_group_table
        self.free = free or ray.available_resources
        self.total = total or ray.cluster_resources
        self.before = set(self.table())
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="placement-watch", daemon=True)

    def __enter__(self) -> "PlacementWatch":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join(timeout=10)

    def _watch(self) -> None:
        seen: dict[str, float] = {}
        tell = 0.0
        while not self.done.wait(self.every):
            try:
                pending = {gid: g for gid, g in self.table().items()
                           if gid not in self.before and g.get("state") == "PENDING"}
                now = time.monotonic()
                for gid in pending:
                    seen.setdefault(gid, now)
                waiting = [gid for gid in pending if now - seen[gid] >= PLACEMENT_NOTE_S]
                if waiting and now >= tell:
                    self.say(placement_wait_line(pending[waiting[0]], self.free(), self.total(),
                                                 now - seen[waiting[0]]))
                    tell = now + PLACEMENT_REPEAT_S
            except Exception:  # noqa: BLE001  (a note, never a reason for the run to fail)
                continue


def finish_run(cfg: Config, folder: str) -> list[dict[str, Any]]:
    """history.json and curves.png beside the checkpoints; returns the per-epoch history."""
    from .plots import training_curves

    history = latest_history(folder)
    storage.write_text(storage.join(folder, "history.json"), json.dumps(history, indent=2) + "\n")
    if history:
        training_curves(history, storage.join(folder, "curves.png"),
                        f"{cfg.cluster.run_name} ({cfg.model_spec().name})")
    return history


def run(cfg: Config, manifest, manifest_sha256: str = "") -> str:
    """Train; returns the run folder (checkpoints, config.json, history.json, curves.png)."""
    import ray.train

    from .. import tracking
    from .loop import dataset_artifact

    folder = check_run_dir(cfg, cfg.train.resume)
    if cfg.train.resume:
        from . import checkpoint

        runs.hold_folder(folder, "run", cfg.cluster.run_name)
        if cfg.train.resume_from_epoch is not None:
            checkpoint.set_aside_after(folder, cfg.train.resume_from_epoch)
        # A corrupt latest checkpoint would otherwise fail every worker restart in turn.
        state = checkpoint.load(folder)
        runs.check_same_store("run", cfg.cluster.run_name, state.get("store", {}).get("manifest_sha256"),
                              cfg.data.store, manifest_sha256)
        print(f"resuming {cfg.cluster.run_name} after epoch {state['epoch']}", flush=True)
    placement = plan_placement(cfg)
    check_nodes(cfg, manifest_sha256, placement.workers_per_node * placement.cpus_per_worker)
    if cfg.train.resume:
        storage.makedirs(folder)
    elif not storage.claim_dir(folder):
        # Another job took the name since the check above (two submitted at once).
        runs.check_new_or_resumed("run", cfg.cluster.run_name, cfg.cluster.storage, False, True)
    else:
        runs.hold_folder(folder, "run", cfg.cluster.run_name)
        if not cfg.tracking.run_id:
            cfg = apply_overrides(cfg, {"tracking.run_id": tracking.new_run_id(cfg.cluster.run_name)})
    cfg.save(storage.join(folder, "config.json"))
    at_max = f" at {placement.nodes} nodes" if placement.min_nodes is not None else ""
    print(f"run {cfg.cluster.run_name}: {placement.describe()}, global batch {cfg.optim.batch_size}"
          f"{at_max}, folder {storage.display(folder)}", flush=True)
    recorder = tracking.start_recorder(cfg, run_id=tracking.run_id_of(cfg), name=cfg.cluster.run_name,
                                       run_dir=folder, group=cfg.tracking.group,
                                       dataset=dataset_artifact(manifest))
    ended = "failed"
    try:
        with PlacementWatch(say=lambda line: print(line, flush=True)):
            build_trainer(cfg, placement, folder, manifest_sha256, tracker=recorder).fit()
        ended = "finished"
    except ray.train.TrainingFailedError as e:
        raise JobFailed(f"training failed: {last_line(e)}") from e
    except (SystemExit, KeyboardInterrupt):
        # `jobs stop`: Ray's driver turns SIGTERM into SystemExit.
        ended = "stopped_by_user"
        raise
    finally:
        tracking.finish_recorder(recorder, ended)
    history = finish_run(cfg, folder)
    if history:
        best = min(history, key=lambda h: h["val_top1_error"])
        print(f"done: best val top-1 error {best['val_top1_error']:.4f} at epoch {best['epoch']}; "
              f"curves {storage.display(storage.join(folder, 'curves.png'))}", flush=True)
    return folder
