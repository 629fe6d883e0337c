"""The Ray Train worker loop: one process per DDP rank.

`train_worker` is what `TorchTrainer` runs on every worker; `train_loop` is the loop itself,
given a session (Ray Train's, or `LocalSession` for a plain one-process baseline).
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
import math
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from .. import runs, storage
from ..config import Config
from ..models.densenet import build
from ..tracking import RemoteTracker, Tracker
from . import amp, checkpoint, optim


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


def _topk_correct(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    hit = top.eq(labels[:, None])
    return int(hit[:, 0].sum()), int(hit.any(dim=1).sum())


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
    """One process, no Ray: the baseline `benchmarks/ray_overhead.py` holds Ray Train to.

    Checkpoints are copied into the run folder as Ray Train's storage does.
    """

    rank, world = 0, 1

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.device = torch.device("cpu")

    def node_id(self) -> str:
        return "local"

    @contextlib.contextmanager
    def restored(self) -> Iterator[Path | None]:
        yield None

    def report(self, row: dict[str, Any], folder: Path | None, name: str | None) -> None:
        if folder is not None and name is not None:
            shutil.copytree(folder, self.run_dir / name, dirs_exist_ok=True)


class TrainingDiverged(RuntimeError):
    pass


def _open_tracker(cfg: Config, loop_config: dict[str, Any], primary: bool, manifest) -> Tracker | RemoteTracker:
    """Rank 0's W&B handle: the job driver's Recorder when it started one, else a run here."""
    if not primary:
        return Tracker()
    if loop_config.get("tracker"):
        return RemoteTracker.connect(loop_config["tracker"])
    tracker = Tracker.start(cfg, run_id=loop_config["run_name"], run_dir=loop_config["run_dir"],
                            group=cfg.tracking.group)
    if tracker.active:
        tracker.use_dataset(*dataset_artifact(manifest))
    return tracker


def dataset_artifact(manifest) -> tuple[str, str, dict[str, Any]]:
    """(manifest text, artifact name, metadata) of a store, for `Tracker.use_dataset`."""
    return ((Path(manifest.path) / "manifest.json").read_text(), f"{manifest.dataset}-store",
            {"dataset": manifest.dataset, "path": manifest.path,
             "splits": {k: v.count for k, v in manifest.splits.items()}})


def train_worker(loop_config: dict[str, Any]) -> None:
    """What `TorchTrainer` runs on every worker."""
    train_loop(loop_config, RaySession())


def train_loop(loop_config: dict[str, Any], session: RaySession | LocalSession) -> None:
    from ..data.loaders import make_loader

    cfg = Config.from_dict(loop_config["config"])
    run_dir = loop_config["run_dir"]  # a path or a storage URI
    rank, world = session.rank, session.world
    primary = rank == 0
    device = session.device
    if device.type == "cpu":
        torch.set_num_threads(max(1, round(cfg.cluster.cpus_per_worker)))

    node_ids = [session.node_id()]
    if world > 1:
        node_ids = [None] * world
        dist.all_gather_object(node_ids, session.node_id())
    if len(set(node_ids)) != cfg.cluster.nodes:
        raise RuntimeError(f"{world} workers landed on {len(set(node_ids))} nodes, not the "
                           f"{cfg.cluster.nodes} asked for")

    per_worker = runs.per_worker_batch(cfg.optim.batch_size, cfg.cluster.nodes, world // cfg.cluster.nodes)
    threads_before = torch.get_num_threads()
    train_loader, manifest = make_loader(
        cfg.data.store, "train", per_worker, cfg.data, distributed=world > 1,
        seed=cfg.train.seed, channels_last=cfg.data.channels_last)
    val_loader, _ = make_loader(
        cfg.data.store, "val", per_worker, cfg.data, distributed=world > 1,
        seed=cfg.train.seed, channels_last=cfg.data.channels_last)
    # Building an FFCV Loader sets torch's thread count to its worker count.
    torch.set_num_threads(threads_before)
    val_total = manifest.splits["val"].count
    val_mine = shard_size(val_total, rank, world) if world > 1 else val_total

    spec = cfg.model_spec()
    spec = dataclasses.replace(spec, num_classes=manifest.num_classes)
    _seed(cfg.train.seed, 0, 0)
    model = build(spec, memory_efficient=cfg.model.memory_efficient).to(device)
    if cfg.data.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = optim.build_optimizer(model, cfg)
    steps = len(train_loader)
    if cfg.data.max_steps_per_epoch:
        steps = min(steps, cfg.data.max_steps_per_epoch)
    scheduler = optim.build_scheduler(optimizer, steps, cfg)
    dtype = amp.resolve_dtype(cfg.train.amp, device)
    scaler = amp.grad_scaler(device, dtype)
    if primary:
        precision = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + grad scaler"}[dtype]
        if dtype is None and cfg.train.amp == "auto" and device.type == "cpu":
            precision += " (this CPU has no native bf16 kernels; --amp bf16 forces it)"
        _say(f"{world} worker(s) on {len(set(node_ids))} node(s) "
              f"[{', '.join(f'rank {r}: {n[:8]}' for r, n in enumerate(node_ids))}], {device.type}, "
              f"{precision}, {steps} steps of {per_worker} per worker an epoch")

    start_epoch, history, best = 0, [], math.inf
    state = None
    with session.restored() as folder:
        if folder is not None:
            state = checkpoint.load(folder, map_location=device)
    newest = (checkpoint.newest(run_dir, say=_say if primary else (lambda _: None))
              if state is None and cfg.train.resume else None)
    if newest is not None:
        # A job stopped right after a checkpoint was written can leave Ray's own record
        # of it behind; the run folder's newest checkpoint is the truth.
        folder = storage.parent(newest)
        state = checkpoint.load(newest, map_location=device)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, history = state["epoch"], list(state["history"])
        best = min((h["val_top1_error"] for h in history), default=math.inf)
        if primary:
            _say(f"resumed from epoch {start_epoch} ({folder})")

    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.train.compile:
        net = torch.compile(net)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)

    tracker = _open_tracker(cfg, loop_config, primary, manifest)
    if primary and tracker.active:
        tracker.summary({"params": sum(p.numel() for p in model.parameters()),
                         "macs": spec.complexity()["macs"], "workers": world,
                         "nodes": len(set(node_ids))})

    epochs = cfg.train.epochs
    for epoch in range(start_epoch, epochs):
        _seed(cfg.train.seed, epoch, rank)
        train_loader.next_epoch = epoch
        net.train()
        t0 = time.perf_counter()
        sums = [0.0, 0.0, 0.0, 0.0]  # loss * n, top-1 hits, top-5 hits, n
        for step, (images, labels) in enumerate(train_loader, start=1):
            if step > steps:
                break
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with amp.autocast(device, dtype):
                logits = net(images)
                loss = criterion(logits.float(), labels)
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise TrainingDiverged(f"the loss is {loss_value} at epoch {epoch + 1} step {step}: "
                                       "training diverged; lower optim.lr or turn on warm-up")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            n = labels.shape[0]
            c1, c5 = _topk_correct(logits.detach(), labels)
            sums = [sums[0] + loss_value * n, sums[1] + c1, sums[2] + c5, sums[3] + n]
            if primary and (step % cfg.train.log_every_steps == 0 or step == steps):
                elapsed = time.perf_counter() - t0
                lr = optimizer.param_groups[0]["lr"]
                img_s = sums[3] * world / elapsed
                _say(_progress(epoch, epochs, step, steps, sums[0] / sums[3], lr, img_s, elapsed))
                tracker.log({"step/loss": loss_value, "step/lr": lr, "step/images_per_s": img_s,
                             "epoch": epoch + step / steps}, step=epoch * steps + step)
        train_time = time.perf_counter() - t0
        loss_sum, c1, c5, n = _sum(sums, device)

        net.eval()
        vsums = [0.0, 0.0, 0.0, 0.0]
        seen = 0
        with torch.no_grad(), amp.autocast(device, dtype):
            for images, labels in val_loader:
                keep = min(labels.shape[0], val_mine - seen)
                if keep <= 0:
                    break
                seen += labels.shape[0]
                images, labels = images[:keep].to(device), labels[:keep].to(device)
                logits = net(images).float()
                vl = nn.functional.cross_entropy(logits, labels, reduction="sum").item()
                v1, v5 = _topk_correct(logits, labels)
                vsums = [vsums[0] + vl, vsums[1] + v1, vsums[2] + v5, vsums[3] + keep]
        vloss, v1, v5, vn = _sum(vsums, device)
        epoch_time = time.perf_counter() - t0

        row = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / n,
            "train_top1_error": 1 - c1 / n,
            "train_top5_error": 1 - c5 / n,
            "val_loss": vloss / vn,
            "val_top1_error": 1 - v1 / vn,
            "val_top5_error": 1 - v5 / vn,
            "images_per_s": n / train_time,
            "epoch_time_s": epoch_time,
            "lr": optimizer.param_groups[0]["lr"],
            "peak_memory_mib": max(_sum([_peak_memory_mib(device)], device)[0] / world, 0.0),
            # Wall clock as the row is made: the gaps between rows are whole epochs, the
            # previous report and checkpoint included.
            "wall_time": time.time(),
        }
        history.append(row)
        is_best = row["val_top1_error"] < best
        best = min(best, row["val_top1_error"])
        if primary:
            _say("epoch {epoch}/{0}: train loss {train_loss:.4f} top-1 err {train_top1_error:.4f}"
                  " | val loss {val_loss:.4f} top-1 err {val_top1_error:.4f} top-5 err "
                  "{val_top5_error:.4f} | {images_per_s:,.0f} img/s, {epoch_time_s:.1f} s".format(
                epochs, **row))
            tracker.log({f"epoch/{k}": v for k, v in row.items()}, step=(epoch + 1) * steps)

        save_now = (epoch + 1) % cfg.train.checkpoint_every == 0 or epoch + 1 == epochs
        with tempfile.TemporaryDirectory(prefix="densenet-ckpt-") as tmp:
            written = None
            name = f"epoch-{epoch + 1:04d}"
            if save_now and primary:
                checkpoint.save(Path(tmp), {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "epoch": epoch + 1,
                    "history": history,
                    "config": cfg.to_dict(),
                    "spec": spec.to_dict(),
                    "store": {"path": manifest.path, "dataset": manifest.dataset,
                              "manifest_sha256": loop_config.get("manifest_sha256", ""),
                              "classes": list(manifest.classes)},
                    "placement": node_ids,
                    "rng": {"torch": torch.get_rng_state()},
                })
                written = Path(tmp)
            session.report(row, written, name if save_now else None)
        if primary and save_now and tracker.active:
            aliases = ["latest"] + (["best"] if is_best else [])
            tracker.log_checkpoint(storage.join(run_dir, name), name=f"{loop_config['run_name']}-model",
                                   aliases=aliases, metadata=row)
    if primary:
        tracker.finish(summary={"best_val_top1_error": best,
                                "final_val_top1_error": history[-1]["val_top1_error"] if history else None})
