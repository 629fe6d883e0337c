"""The Ray Train worker loop: one process per DDP rank.

`train_worker` is what `TorchTrainer` runs on every worker; `train_loop` is the loop itself,
given a session (Ray Train's; `TuneSession` for a sweep trial of one worker; or
`LocalSession` for a plain one-process baseline).
Distributed code lives here and nowhere else: one unwrapped-model handle, one `primary`
gate for side effects (printing, W&B, writing checkpoints), and every rank reports once
per epoch (it is a barrier). Determinism: each epoch re-seeds torch from (seed, epoch, rank) and the loader
order from (seed, epoch), so a run resumed from epoch e continues exactly as an
uninterrupted one would (with data augmentation off; FFCV's augmentations draw from
numba's unseeded generator).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
import math
import random
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from .. import runs, storage
from ..config import Config, DataSection
from ..models.densenet import build
from ..tracking import RemoteTracker, Tracker
from . import amp, checkpoint, compiling, mix, optim
from .ema import WeightEMA
from .metrics import Tally


def _say(line: str) -> None:
    # Straight to stdout, flushed: the job log is a file, and W&B may wrap `print`.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _seed(seed: int, epoch: int, rank: int) -> None:
    s = (seed * 1_000_003 + epoch * 1009 + rank) % 2**31
    torch.manual_seed(s)
    random.seed(s)


def _sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def _peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _progress(epoch: int, epochs: int, step: int, steps: int, loss: float, lr: float,
              img_s: float, elapsed: float) -> str:
    remaining_steps = steps - step + (epochs - epoch - 1) * steps
    eta = remaining_steps * (elapsed / max(step, 1))
    return (f"epoch {epoch + 1}/{epochs} step {step}/{steps} loss {loss:.4f} lr {lr:.4g} "
            f"img/s {img_s:,.0f} eta {time.strftime('%H:%M:%S', time.gmtime(eta))}")


def shard_size(total: int, rank: int, world: int) -> int:
    """How many samples rank `rank` owns before FFCV's sampler pads the shards to equal size."""
    return len(range(rank, total, world))


class RaySession:
    """What the loop needs from Ray Train: rank, device, placement, restore and report."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    @contextlib.contextmanager
    def restored(self) -> Iterator[Path | None]:
        import ray.train

        found = ray.train.get_checkpoint()
        if found is None:
            yield None
            return
        with found.as_directory() as folder:
            yield Path(folder)

    def report(self, row: dict[str, Any], folder: Path | None, name: str | None) -> None:
        import ray.train
        from ray.train import Checkpoint

        ckpt = Checkpoint.from_directory(str(folder)) if folder is not None else None
        ray.train.report(row, checkpoint=ckpt, checkpoint_dir_name=name)


class LocalSession:
    """One process, no Ray: the baseline `benchmarks/ray_overhead.py` holds Ray Train to, and
    the seam tests use to run the loop in-process.

    Checkpoints are copied into the run folder as Ray Train's storage does. `stop_after`
    ends the run after that epoch's report, as `jobs stop` would (raises `Stopped`).
    """

    rank, world = 0, 1

    class Stopped(Exception):
        pass

    def __init__(self, run_dir: Path, stop_after: int | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.device = torch.device("cpu")
        self.stop_after = stop_after

    def node_id(self) -> str:
        return "local"

    @contextlib.contextmanager
    def restored(self) -> Iterator[Path | None]:
        yield None

    def report(self, row: dict[str, Any], folder: Path | None, name: str | None) -> None:
        if folder is not None and name is not None:
            shutil.copytree(folder, self.run_dir / name, dirs_exist_ok=True)
        if self.stop_after is not None and row["epoch"] >= self.stop_after:
            raise self.Stopped(f"stopped after epoch {row['epoch']}")


class TuneSession:
    """A sweep trial of one worker (`runs.trial_in_process`), run in the Tune trial's own
    process: a Ray Train run there would start a controller and a worker process, each
    importing torch, to train on one worker.

    What Ray Train's storage does for a run, done here: each checkpoint is copied into the
    run folder (a path or URI), and the best `keep` by val error and the newest are kept.
    A trial started again resumes from its folder's newest whole checkpoint (the sweep sets
    `train.resume`); the history it resumes with scores the checkpoints written before.
    """

    rank, world = 0, 1

    def __init__(self, run_dir: str, keep: int, use_gpu: bool) -> None:
        self.run_dir, self.keep = run_dir, keep
        self.device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
        if use_gpu:
            torch.cuda.set_device(self.device)
        self.scores: dict[str, float] = {}

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    @contextlib.contextmanager
    def restored(self) -> Iterator[Path | None]:
        yield None

    def resumed(self, history: list[dict[str, Any]]) -> None:
        self.scores.update({f"epoch-{h['epoch']:04d}": h["val_top1_error"] for h in history})

    def report(self, row: dict[str, Any], folder: Path | None, name: str | None) -> None:
        import ray.tune

        if folder is not None and name is not None:
            checkpoint.publish(folder, storage.join(self.run_dir, name))
            self.scores[name] = row["val_top1_error"]
            checkpoint.prune(self.run_dir, self.keep, self.scores, newest=name)
        ray.tune.report(row)


# What `train_loop` is given: rank, world, device, node_id, restored and report.
Session = RaySession | LocalSession | TuneSession


class TrainingDiverged(RuntimeError):
    pass


def _open_tracker(cfg: Config, loop_config: dict[str, Any], primary: bool, manifest) -> Tracker | RemoteTracker:
    """Rank 0's W&B handle: the job driver's Recorder when it started one, else a run here."""
    if not primary:
        return Tracker()
    if loop_config.get("tracker"):
        return RemoteTracker.connect(loop_config["tracker"])
    tracker = Tracker.start(cfg, run_id=cfg.tracking.run_id or loop_config["run_name"],
                            name=loop_config["run_name"], run_dir=loop_config["run_dir"],
                            group=cfg.tracking.group)
    if tracker.active:
        tracker.use_dataset(*dataset_artifact(manifest))
    return tracker


def dataset_artifact(manifest) -> tuple[str, str, dict[str, Any]]:
    """(manifest text, artifact name, metadata) of a store, for `Tracker.use_dataset`."""
    return (storage.read_text(storage.join(manifest.path, "manifest.json")), f"{manifest.dataset}-store",
            {"dataset": manifest.dataset, "path": manifest.path,
             "splits": {k: v.count for k, v in manifest.splits.items()}})


def train_worker(loop_config: dict[str, Any]) -> None:
    """What `TorchTrainer` runs on every worker."""
    train_loop(loop_config, RaySession())


@dataclass
class Parts:
    """What one rank trains with: the unwrapped model and what steps it."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    dtype: torch.dtype | None
    steps: int
    # What `model.init_from` loaded (`pipeline.models.init.load_into`), or None.
    init: dict[str, Any] | None = None
    # The weights' moving average (`train.ema`), or None.
    ema: WeightEMA | None = None
    # Optimizer steps taken before this epoch, the x axis of W&B's charts: it goes on
    # counting when an elastic run's steps an epoch change.
    global_step: int = 0


def check_placement(session: Session, nodes: int, elastic: bool = False) -> list[str]:
    """Every rank's node id; the run must span exactly `nodes` nodes (an elastic run spans
    what Ray gave it)."""
    node_ids = [session.node_id()]
    if session.world > 1:
        node_ids = [None] * session.world
        dist.all_gather_object(node_ids, session.node_id())
    if not elastic and len(set(node_ids)) != nodes:
        raise RuntimeError(f"{session.world} workers landed on {len(set(node_ids))} nodes, not the "
                           f"{nodes} asked for")
    return node_ids


def build_parts(cfg: Config, spec, device: torch.device, batches: int, lr_scale: float = 1.0) -> Parts:
    _seed(cfg.train.seed, 0, 0)
    model = build(spec, memory_efficient=cfg.model.memory_efficient)
    model = model.to(device)
    if cfg.data.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = optim.build_optimizer(model, cfg)
    for group in optimizer.param_groups:
        group["lr"] *= lr_scale
    # Optimizer steps an epoch: `optim.accumulate` loader batches make one.
    steps = batches // cfg.optim.accumulate
    steps = min(steps, cfg.data.max_steps_per_epoch) if cfg.data.max_steps_per_epoch else steps
    dtype = amp.resolve_dtype(cfg.train.amp, device)
    ema = WeightEMA(model, cfg.train.ema, cfg.train.ema_warmup) if cfg.train.ema else None
    return Parts(model, optimizer, optim.build_scheduler(optimizer, steps, cfg),
                 amp.grad_scaler(device, dtype), dtype, steps, None, ema)


def take_init(parts: Parts, cfg: Config, say) -> None:
    """--init-from's weights into a run that starts from scratch (a restored run has its own,
    and the checkpoint's record of where they came from); the moving average starts from them."""
    from ..models.init import load_into

    parts.init = load_into(parts.model, cfg.model.init_from, say=say)
    if parts.ema is not None:
        parts.ema = WeightEMA(parts.model, cfg.train.ema, cfg.train.ema_warmup)


def restore(parts: Parts, session: Session, cfg: Config, run_dir: str,
            device: torch.device, say, max_workers: int | None = None) -> tuple[int, list[dict[str, Any]]]:
    """Load the checkpoint to continue from (Ray's, else with --resume the run folder's newest
    whole one) into `parts`; returns (epochs done, history). An elastic run that comes back
    with another world size (`max_workers` given) keeps its per-worker batch: the lr
    follows the global batch and the schedule its new steps an epoch (`_resize`)."""
    state, folder = None, None
    with session.restored() as restored:
        if restored is not None:
            state, folder = checkpoint.load(restored, map_location=device), restored
    newest = checkpoint.newest(run_dir, say=say) if state is None and cfg.train.resume else None
    if newest is not None:
        # A job stopped right after a checkpoint was written can leave Ray's own record
        # of it behind; the run folder's newest whole checkpoint is the truth.
        folder = storage.parent(newest)
        state = checkpoint.load(newest, map_location=device)
    if state is None:
        return 0, []
    parts.model.load_state_dict(state["model"])
    parts.optimizer.load_state_dict(state["optimizer"])
    parts.scheduler.load_state_dict(state["scheduler"])
    parts.scaler.load_state_dict(state["scaler"])
    parts.global_step = state.get("global_step", state["epoch"] * parts.steps)
    parts.init = state.get("init")
    workers_before = len(state.get("placement") or []) or session.world
    if max_workers is not None and workers_before != session.world:
        _resize(parts, state["epoch"], workers_before, session.world, max_workers, cfg, say)
    elif workers_before != session.world:
        say(f"the run trained on {workers_before} worker(s) and resumes on {session.world}: the "
            f"global batch stays {cfg.optim.batch_size}, {parts.steps} steps an epoch")
    if parts.ema is not None:
        if "model_ema" in state:
            parts.ema.load_state_dict(state["model_ema"])
        else:  # a run that had none: the average starts from the weights it resumes with
            parts.ema = WeightEMA(parts.model, cfg.train.ema, cfg.train.ema_warmup)
    say(f"resumed from epoch {state['epoch']} ({folder})")
    return state["epoch"], list(state["history"])


def _resize(parts: Parts, epoch: int, before: int, now: int, max_workers: int, cfg: Config, say) -> None:
    """After a resize the run continues from a checkpoint made by `before` workers: the base
    lrs it holds are scaled to `now` workers, and the schedule, a function of optimizer steps,
    is put where `epoch` whole epochs of the new size would have left it."""
    ratio = runs.elastic_lr_scale(now, max_workers) / runs.elastic_lr_scale(before, max_workers)
    scheduler = parts.scheduler
    scheduler.base_lrs = [base * ratio for base in scheduler.base_lrs]
    scheduler.last_epoch = epoch * parts.steps
    for group, base, lr_lambda in zip(parts.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["initial_lr"] = base
        group["lr"] = base * lr_lambda(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in parts.optimizer.param_groups]
    per_worker = cfg.optim.batch_size // max_workers  # a step's images on one worker
    say(f"resized: {before} -> {now} workers after epoch {epoch}: global batch "
        f"{before * per_worker} -> {now * per_worker}, lr x{ratio:.3g}, {parts.steps} steps an epoch")


def hold(path: str, epoch: int, device: torch.device, say, poll_s: float = 1.0) -> None:
    """Wait here, every rank, while `path` exists: rank 0 looks, the others follow its word."""
    distributed = dist.is_available() and dist.is_initialized()
    said = False
    while True:
        held = storage.exists(path) if not distributed or dist.get_rank() == 0 else False
        if distributed:
            flag = torch.tensor([int(held)], device=device)
            dist.broadcast(flag, src=0)
            held = bool(flag.item())
        if not held:
            if said:
                say(f"{path} is gone: going on")
            return
        if not said:
            say(f"holding after epoch {epoch}: {path} exists (remove it to go on)")
            said = True
        time.sleep(poll_s)


def train_one_epoch(net: nn.Module, parts: Parts, loader, cfg: Config, epoch: int, device: torch.device,
                    world: int, say, tracker, on_first_step=None) -> tuple[Tally, float]:
    """One pass over this rank's shard; returns its tally (this rank only) and the seconds.

    Each optimizer step takes `optim.accumulate` loader batches (gradients summed, DDP
    reducing on the last); targets are soft (label smoothing, Mixup/CutMix), and the train
    error counts the argmax of the mixed target."""
    epochs, log_every = cfg.train.epochs, cfg.train.log_every_steps
    net.train()
    frozen = optim.backbone_params(parts.model) if epoch < cfg.train.freeze_epochs else []
    if frozen:
        # Only the classifier learns: the features keep their weights and BN statistics.
        parts.model.features.eval()
    tally = Tally()
    t0 = time.perf_counter()
    steps, accumulate = parts.steps, cfg.optim.accumulate
    criterion = nn.CrossEntropyLoss()  # targets come soft: smoothing and mixing are in them
    num_classes = parts.model.classifier.out_features
    for micro, (images, labels) in enumerate(loader):
        step, last = micro // accumulate + 1, (micro + 1) % accumulate == 0
        if step > steps:
            break
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        images, targets = mix.mix(images, labels, num_classes, cfg.data, cfg.optim.label_smoothing)
        with amp.autocast(device, parts.dtype):
            logits = net(images)
            loss = criterion(logits.float(), targets)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise TrainingDiverged(f"the loss is {loss_value} at epoch {epoch + 1} step {step}: "
                                   "training diverged; lower optim.lr or turn on warm-up")
        if micro % accumulate == 0:
            parts.optimizer.zero_grad(set_to_none=True)
        # DDP reduces gradients on the last pass of a step only.
        sync = contextlib.nullcontext() if last or not hasattr(net, "no_sync") else net.no_sync()
        with sync:
            parts.scaler.scale(loss / accumulate).backward()
        tally.add(logits.detach(), targets.argmax(1) if mix.active(cfg.data) else labels,
                  loss_value * labels.shape[0])
        if micro == 0 and on_first_step is not None:
            on_first_step(time.perf_counter() - t0)
        if not last:
            continue
        for p in frozen:
            p.grad = None  # the optimizer skips them: no step, no momentum, no decay
        if cfg.optim.clip_grad_norm:
            parts.scaler.unscale_(parts.optimizer)
            nn.utils.clip_grad_norm_(parts.model.parameters(), cfg.optim.clip_grad_norm)
        parts.scaler.step(parts.optimizer)
        parts.scaler.update()
        parts.scheduler.step()
        if parts.ema is not None:
            parts.ema.update(parts.model)
        if step % log_every == 0 or step == steps:
            elapsed = time.perf_counter() - t0
            lr = parts.optimizer.param_groups[0]["lr"]
            img_s = tally.n * world / elapsed
            if step < steps:
                # The epoch's line follows the last step at once and says more.
                say(_progress(epoch, epochs, step, steps, tally.loss, lr, img_s, elapsed))
            tracker.log({"step/loss": loss_value, "step/lr": lr, "step/images_per_s": img_s,
                         "epoch": epoch + step / steps}, step=parts.global_step + step)
    return tally, time.perf_counter() - t0


def validate(net: nn.Module, loader, mine: int, device: torch.device, dtype) -> Tally:
    """This rank's own `mine` val samples (FFCV pads the last shard with repeats)."""
    net.eval()
    tally, seen = Tally(), 0
    with torch.no_grad(), amp.autocast(device, dtype):
        for images, labels in loader:
            keep = min(labels.shape[0], mine - seen)
            if keep <= 0:
                break
            seen += labels.shape[0]
            images, labels = images[:keep].to(device), labels[:keep].to(device)
            logits = net(images).float()
            tally.add(logits, labels, nn.functional.cross_entropy(logits, labels, reduction="sum").item())
    return tally


def checkpoint_state(parts: Parts, epoch: int, history: list, cfg: Config, spec, manifest,
                     loop_config: dict[str, Any], node_ids: list[str]) -> dict[str, Any]:
    """Everything needed to resume or evaluate: the unwrapped model and what steps it."""
    return {
        "model": parts.model.state_dict(),
        "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.scheduler.state_dict(),
        "scaler": parts.scaler.state_dict(),
        **({"model_ema": parts.ema.state_dict()} if parts.ema is not None else {}),
        "epoch": epoch,
        "global_step": parts.global_step,
        "history": history,
        "config": cfg.to_dict(),
        "spec": spec.to_dict(),
        "store": {"path": cfg.data.store, "dataset": manifest.dataset,
                  "manifest_sha256": loop_config.get("manifest_sha256", ""),
                  "classes": list(manifest.classes),
                  # What predict and export need to see an image as the net was trained to.
                  "mean": list(manifest.mean), "std": list(manifest.std),
                  "resolution": manifest.resolution, "eval_resolution": manifest.eval_resolution,
                  "family": manifest.family},
        "placement": node_ids,
        "init": parts.init,
        "rng": {"torch": torch.get_rng_state()},
    }


def worker_cpus(cfg: Config) -> int:
    return max(1, round(cfg.cluster.cpus_per_worker))


def worker_data(cfg: Config, device: torch.device) -> DataSection:
    """The data section a worker loads with. FFCV decodes on numba threads that spin while
    they wait for work: on a CPU worker, more of them than the CPUs Ray gave it starve its
    compute (2 on a 1-CPU node made every step 3.5x slower, benchmarks/end_to_end.py), so a
    CPU worker decodes on at most its own CPUs. A GPU worker computes elsewhere and keeps
    the threads it was given (FFCV's ImageNet recipes decode on 8-12 a GPU)."""
    if device.type != "cpu":
        return cfg.data
    return dataclasses.replace(cfg.data, loader_workers=min(cfg.data.loader_workers, worker_cpus(cfg)))


@dataclass
class WorkerData:
    """What one rank reads: its two loaders, the store's manifest, its share of a batch and
    of the validation split."""

    train: Any
    val: Any
    manifest: Any
    per_worker: int
    val_mine: int


def open_data(cfg: Config, loop_config: dict[str, Any], device: torch.device, rank: int, world: int,
              per_node: int, say) -> WorkerData:
    from ..data.loaders import make_loader
    from ..data.staging import local_copy

    data_cfg = worker_data(cfg, device)
    per_worker = runs.per_worker_batch(cfg.optim.batch_size, cfg.cluster.nodes, per_node, cfg.optim.accumulate)
    threads_before = torch.get_num_threads()
    # The driver checked the store (or each node its staged copy): no rank hashes it again.
    store = local_copy(cfg.data.store, loop_config.get("manifest_sha256", ""), cfg.data, say)
    loaders = [make_loader(store, split, per_worker, data_cfg, distributed=world > 1, seed=cfg.train.seed,
                           channels_last=cfg.data.channels_last, verify=False) for split in ("train", "val")]
    (train, manifest), (val, _) = loaders
    if data_cfg.loader_workers < cfg.data.loader_workers:
        say(f"data.loader_workers {cfg.data.loader_workers} -> {data_cfg.loader_workers}: "
            f"a CPU worker decodes on at most its {worker_cpus(cfg)} CPU(s) (cluster.cpus_per_worker)")
    # Building an FFCV Loader sets torch's thread count to its worker count.
    torch.set_num_threads(threads_before)
    val_total = manifest.splits["val"].count
    val_mine = shard_size(val_total, rank, world) if world > 1 else val_total
    return WorkerData(train, val, manifest, per_worker, val_mine)


def wrap(parts: Parts, cfg: Config, device: torch.device, world: int, say) -> tuple[nn.Module, nn.Module, bool]:
    """(the net that trains, the net that validates, whether the first is compiled): SyncBatchNorm,
    DDP and torch.compile around the one unwrapped model that `parts` holds."""
    if cfg.train.sync_bn and world > 1:
        # New modules around the same Parameter objects: the optimizer still holds them, and
        # the keys stay those of BatchNorm2d (checkpoints load into a plain net).
        parts.model = nn.SyncBatchNorm.convert_sync_batchnorm(parts.model)
        say("BatchNorm statistics synchronised across the workers (--sync-bn)")
    net: nn.Module = parts.model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(
            parts.model, device_ids=[device.index] if device.type == "cuda" else None)
    compiled = compiling.decide(cfg.train.compile, device, parts.dtype, parts.steps * cfg.train.epochs)
    say(compiled.line())
    if not compiled.compile:
        return net, net, False
    # Validation stays eager: eval mode and the short last batch would each be a graph of
    # their own to compile, for a few seconds of work an epoch.
    return torch.compile(net), net, True


def start_tracking(cfg: Config, loop_config: dict[str, Any], primary: bool, parts: Parts, spec,
                   manifest, world: int, node_ids: list[str]) -> Tracker | RemoteTracker:
    tracker = _open_tracker(cfg, loop_config, primary, manifest)
    if primary and tracker.active:
        if parts.init:
            tracker.summary({"init_source": parts.init["source"], "init_sha256": parts.init["sha256"],
                             "init_classifier": parts.init["classifier"]})
            tracker.use_init(parts.init["source"], parts.init["sha256"],
                             {"classifier": parts.init["classifier"], "init_from": cfg.model.init_from})
        tracker.summary({"params": sum(p.numel() for p in parts.model.parameters()),
                         "macs": spec.complexity()["macs"], "workers": world,
                         "nodes": len(set(node_ids))})
    return tracker


def epoch_resolution(cfg: Config, loader, epoch: int, before: int | None, say) -> int | None:
    """The training resolution of 0-based `epoch` under progressive resizing, set on the
    loader (None without it); said when it changes."""
    from ..data.loaders import ramp_resolution, set_train_resolution

    res = ramp_resolution(cfg.data, epoch + 1)
    if res is None:
        return None
    set_train_resolution(loader, res)
    if res != before:
        say(f"epoch {epoch + 1}/{cfg.train.epochs}: training at {res} px (progressive resizing, "
            f"{cfg.data.min_res} -> {cfg.data.max_res} px over epochs "
            f"{cfg.data.start_ramp + 1}-{cfg.data.end_ramp})")
    return res


def epoch_row(epoch: int, trained: Tally, val: Tally, ema_val: Tally | None, res: int | None,
              train_time: float, started: float, parts: Parts, world: int, device: torch.device) -> dict[str, Any]:
    """One epoch's line of the history: what every rank reports and W&B charts."""
    averaged = {} if ema_val is None else {"val_ema_loss": ema_val.loss, "val_ema_top1_error": ema_val.top1_error,
                                           "val_ema_top5_error": ema_val.top5_error}
    return {
        "epoch": epoch + 1,
        "train_loss": trained.loss,
        "train_top1_error": trained.top1_error,
        "train_top5_error": trained.top5_error,
        "val_loss": val.loss,
        "val_top1_error": val.top1_error,
        "val_top5_error": val.top5_error,
        **averaged,
        **({"train_resolution": res} if res is not None else {}),
        "images_per_s": trained.n / train_time,
        "epoch_time_s": time.perf_counter() - started,
        "lr": parts.optimizer.param_groups[0]["lr"],
        "workers": world,
        "peak_memory_mib": max(_sum([_peak_memory_mib(device)], device)[0] / world, 0.0),
        # Wall clock as the row is made: the gaps between rows are whole epochs, the
        # previous report and checkpoint included.
        "wall_time": time.time(),
    }


def epoch_line(row: dict[str, Any], epochs: int, classes: int) -> str:
    """The epoch's console line; with 5 classes or fewer top-5 error is 0 by definition, so
    the line leaves it out (the metrics keep it)."""
    ema = f" (EMA {row['val_ema_top1_error']:.4f})" if "val_ema_top1_error" in row else ""
    top5 = f" top-5 err {row['val_top5_error']:.4f}" if classes > 5 else ""
    return ("epoch {epoch}/{0}: train loss {train_loss:.4f} top-1 err {train_top1_error:.4f}"
            " | val loss {val_loss:.4f} top-1 err {val_top1_error:.4f}{top5}{ema}"
            " | {images_per_s:,.0f} img/s, {epoch_time_s:.1f} s").format(epochs, **row, ema=ema, top5=top5)


def report_epoch(session: Session, row: dict[str, Any], state, save: bool,
                 primary: bool) -> None:
    """Every rank reports the row (a barrier); with `save`, the primary's report carries the
    checkpoint that `state()` makes."""
    name = f"epoch-{row['epoch']:04d}"
    with checkpoint.scratch_dir() as tmp:
        written = None
        if save and primary:
            checkpoint.save(Path(tmp), state())
            written = Path(tmp)
        session.report(row, written, name if save else None)


def train_loop(loop_config: dict[str, Any], session: Session) -> None:
    cfg = Config.from_dict(loop_config["config"])
    run_dir = loop_config["run_dir"]  # a path or a storage URI
    rank, world = session.rank, session.world
    primary = rank == 0
    say = _say if primary else (lambda _line: None)
    # A sweep's trials train side by side into one console: each line names its trial, as
    # the sweep's table does, and goes through the sweep's driver, in order.
    if loop_config.get("trial") and primary:
        from ..tune.lines import trial_say

        say = trial_say(cfg.cluster.run_name)
    device = session.device
    if device.type == "cpu":
        torch.set_num_threads(worker_cpus(cfg))
    checkpoint.remove_dead_scratch()
    elastic = cfg.cluster.min_nodes is not None
    node_ids = check_placement(session, cfg.cluster.nodes, elastic)
    # The batch and lr hold for the full size; an elastic run with fewer workers keeps each
    # worker's batch, so the global batch and the lr shrink with it (runs.elastic_lr_scale).
    per_node = loop_config.get("workers_per_node") or world // cfg.cluster.nodes
    max_workers = cfg.cluster.nodes * per_node
    data = open_data(cfg, loop_config, device, rank, world, per_node, say)
    manifest = data.manifest

    spec = dataclasses.replace(cfg.model_spec(), num_classes=manifest.num_classes)
    parts = build_parts(cfg, spec, device, len(data.train),
                        lr_scale=runs.elastic_lr_scale(world, max_workers) if elastic else 1.0)
    precision = {None: "fp32", torch.bfloat16: "bf16 autocast",
                 torch.float16: "fp16 autocast + grad scaler"}[parts.dtype]
    if parts.dtype is None and cfg.train.amp == "auto" and device.type == "cpu":
        precision += " (this CPU has no native bf16 kernels; --amp bf16 forces it)"
    say(f"{world} worker(s) on {len(set(node_ids))} node(s) "
        f"[{', '.join(f'rank {r}: {n[:8]}' for r, n in enumerate(node_ids))}], {device.type}, "
        f"{precision}, {parts.steps} steps of {data.per_worker} per worker an epoch"
        + (f"; elastic over {cfg.cluster.min_nodes}-{cfg.cluster.nodes} nodes: global batch "
           f"{world * cfg.optim.batch_size // max_workers}, lr x{runs.elastic_lr_scale(world, max_workers):.3g}"
           if elastic else ""))

    start_epoch, history = restore(parts, session, cfg, run_dir, device, say,
                                   max_workers=max_workers if elastic else None)
    if start_epoch == 0 and cfg.model.init_from:
        take_init(parts, cfg, say)
    if isinstance(session, TuneSession):
        session.resumed(history)
    best = min((h["val_top1_error"] for h in history), default=math.inf)
    net, val_net, compiled = wrap(parts, cfg, device, world, say)

    def compile_time(seconds: float) -> None:
        say(f"torch.compile: the first step took {seconds:.1f} s (compiling, or loading "
            "the graphs from Inductor's cache on this node)")

    tracker = start_tracking(cfg, loop_config, primary, parts, spec, manifest, world, node_ids)
    epochs = cfg.train.epochs
    res = None
    for epoch in range(start_epoch, epochs):
        _seed(cfg.train.seed, epoch, rank)
        data.train.next_epoch = epoch
        res = epoch_resolution(cfg, data.train, epoch, res, say)
        started = time.perf_counter()
        mine, train_time = train_one_epoch(
            net, parts, data.train, cfg, epoch, device, world, say, tracker,
            on_first_step=compile_time if compiled and epoch == start_epoch else None)
        val = validate(val_net, data.val, data.val_mine, device, parts.dtype).reduced(device)
        ema_val = None if parts.ema is None else validate(
            parts.ema.module, data.val, data.val_mine, device, parts.dtype).reduced(device)
        row = epoch_row(epoch, mine.reduced(device), val, ema_val, res, train_time, started, parts, world, device)
        history.append(row)
        is_best = row["val_top1_error"] < best
        best = min(best, row["val_top1_error"])
        say(epoch_line(row, epochs, manifest.num_classes))
        parts.global_step += parts.steps
        tracker.log({f"epoch/{k}": v for k, v in row.items()}, step=parts.global_step)

        save = (epoch + 1) % cfg.train.checkpoint_every == 0 or epoch + 1 == epochs
        report_epoch(session, row, lambda: checkpoint_state(parts, epoch + 1, history, cfg, spec, manifest,
                                                            loop_config, node_ids), save, primary)
        if primary and save and tracker.active:
            name = f"epoch-{epoch + 1:04d}"
            tracker.log_checkpoint(storage.join(run_dir, name), name=f"{loop_config['run_name']}-model",
                                   aliases=["latest"] + (["best"] if is_best else []), metadata=row)
        if epoch + 1 < epochs:
            hold(cfg.train.hold_file or storage.join(run_dir, "HOLD"), epoch + 1, device, say)
    tracker.finish(summary={"best_val_top1_error": best,
                            "final_val_top1_error": history[-1]["val_top1_error"] if history else None})
