"""Ray Train's per-epoch cost against a plain one-process loop doing the same work.

    .venv/bin/python benchmarks/ray_overhead.py [--model densenet_simple] [--epochs 5] [--train-size 2048]

Both run `pipeline.train.loop.train_loop` on the same synthetic store, model, batch, seed and
thread count (2), with W&B off: once with `LocalSession` (no Ray: checkpoints are copied into
the run folder) and once as a real Ray Train run (`pipeline.train.trainer.run`, one worker
with 2 CPUs, on a local Ray node this script starts and stops). Per-epoch time is the gap
between consecutive epochs' rows, so it holds the training, the validation, the previous
epoch's report and its checkpoint; the first epoch (FFCV and numba compiling) is left out.
Start-up is reported apart. Target: Ray Train within 10% of the plain loop once started.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
os.environ.setdefault("WANDB_MODE", "disabled")

from pipeline.train.trainer import latest_history  # noqa: E402


def make_store(folder: Path, train: int, val: int) -> str:
    from pipeline.data.prepare import prepare
    from pipeline.data.prepare_config import PrepareConfig

    out = folder / "store"
    prepare(PrepareConfig.from_dict({"dataset": "synthetic", "out": str(out), "workers": 2,
                                     "synthetic": {"train_size": train, "val_size": val}}),
            log=lambda _line: None)
    return str(out)


def make_config(args, store: str, storage: Path, name: str):
    from pipeline.config import apply_overrides, load_recipe, validate
    from pipeline.data.store import open_store

    manifest = open_store(store)
    cfg = apply_overrides(load_recipe("smoke"), {
        "model.name": args.model, "model.num_classes": manifest.num_classes,
        "data.store": manifest.path, "data.augment": False,
        "optim.batch_size": args.batch, "train.epochs": args.epochs, "train.amp": "off",
        "train.log_every_steps": 10_000, "tracking.wandb": "off",
        "cluster.nodes": 1, "cluster.cpus_per_worker": 2.0,
        "cluster.storage": str(storage), "cluster.run_name": name,
    })
    return validate(cfg)


def epoch_times(history: list[dict]) -> list[float]:
    stamps = [row["wall_time"] for row in history]
    return [b - a for a, b in zip(stamps, stamps[1:])]


def plain(args, store: str, storage: Path) -> tuple[list[float], float, list[dict]]:
    from pipeline.train.loop import LocalSession, train_loop

    cfg = make_config(args, store, storage, "plain")
    folder = storage / "plain"
    folder.mkdir(parents=True)
    start = time.perf_counter()
    train_loop({"config": cfg.to_dict(), "run_dir": str(folder), "run_name": "plain"},
               LocalSession(folder))
    total = time.perf_counter() - start
    history = latest_history(folder)
    return epoch_times(history), total, history


def with_ray(args, store: str, storage: Path) -> tuple[list[float], float, list[dict]]:
    import ray

    from pipeline.data.store import open_store
    from pipeline.train import trainer

    cfg = make_config(args, store, storage, "ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             _temp_dir=str(storage.parent / "ray"))
    try:
        start = time.perf_counter()
        folder = trainer.run(cfg, open_store(store))
        total = time.perf_counter() - start
    finally:
        ray.shutdown()
    history = latest_history(folder)
    return epoch_times(history), total, history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="densenet_simple")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--train-size", type=int, default=2048)
    parser.add_argument("--val-size", type=int, default=512)
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    folder = Path(tempfile.mkdtemp(prefix="dp-overhead-", dir="/tmp"))
    try:
        store = make_store(folder, args.train_size, args.val_size)
        p_epochs, p_total, p_hist = plain(args, store, folder / "runs")
        r_epochs, r_total, r_hist = with_ray(args, store, folder / "runs")
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    p_med, r_med = statistics.median(p_epochs), statistics.median(r_epochs)
    same = all(abs(a["train_loss"] - b["train_loss"]) < 1e-6 for a, b in zip(p_hist, r_hist))
    print(f"{args.model}, {args.train_size}+{args.val_size} images 32x32, batch {args.batch}, "
          f"2 threads, {args.epochs} epochs (first left out), checkpoint every epoch")
    print(f"{'path':<34}{'epoch s (median)':>17}{'min':>7}{'max':>7}{'img/s':>8}"
          f"{'run s':>8}{'ratio':>8}")
    for label, times, total, hist, ratio in (
            ("plain loop, 1 process", p_epochs, p_total, p_hist, 1.0),
            ("Ray Train, 1 worker x 2 CPU", r_epochs, r_total, r_hist, r_med / p_med)):
        img_s = statistics.median(h["images_per_s"] for h in hist[1:])
        print(f"{label:<34}{statistics.median(times):>17.2f}{min(times):>7.2f}{max(times):>7.2f}"
              f"{img_s:>8.0f}{total:>8.1f}{ratio:>7.2f}x")
    verdict = "ok" if r_med <= 1.10 * p_med else "MISSED"
    print(f"Ray Train per-epoch time / plain loop: {r_med / p_med:.3f} (target <= 1.10: {verdict}); "
          f"start-up (run s minus epochs): plain {p_total - sum(p_epochs):.1f} s, "
          f"Ray {r_total - sum(r_epochs):.1f} s; same train losses: {'yes' if same else 'no'}")
    print(f"(1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after, "
          f"on {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
