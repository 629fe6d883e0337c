"""The whole pipeline against a plain PyTorch loop: same data, same net, same recipe, one run.

    .venv/bin/python benchmarks/end_to_end.py [--epochs 4] [--train 1437] [--val 360]

Data: a synthetic store of --train 32x32 train images (and --val val images), made once.
Net: DenseNet-BC, depth 22, k 12. Recipe: SGD with Nesterov momentum 0.9, weight decay
1e-4, lr 0.1, batch 64, fp32, no augmentation, no dropout.

- plain loop: one process, 2 threads, the store's train split decoded once into tensors in
  memory, torchvision's DenseNet built to the same architecture (its ImageNet stem swapped for
  the CIFAR 3x3 conv), shuffled batches of 64; no validation, no checkpoints.
- `densenet-pipe train` through the real CLI and Ray job, on a local cluster of its own:
  1 node with both CPUs (one worker holding 2), then 2 nodes with 1 CPU each (DDP over gloo).
  W&B off; validation and a checkpoint every epoch, as a user's run has.

Training images/s: the plain loop's epochs, and the train job's `images_per_s` (the training
phase of each epoch, global), both the median over epochs 2..E (epoch 1 carries warm-up).
Whole job: from the command to its exit. Targets: 1 node at least 0.9x the plain loop's
training images/s, 2 nodes on the same 2 CPUs at least 0.8x.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from prepare_nodes import cpu_name  # noqa: E402
from ray_overhead import make_store  # noqa: E402

CLI = [str(Path(sys.executable).with_name("densenet-pipe"))]
BATCH = 64


def preload(store: Path):
    """The train split as the pipeline's loader gives it (normalised, no augmentation)."""
    import torch

    from pipeline.config import DataSection
    from pipeline.data.loaders import make_loader

    threads = torch.get_num_threads()
    loader, manifest = make_loader(store, "train", 256, DataSection(augment=False, channels_last=False,
                                                                     loader_workers=2),
                                   order="sequential", drop_last=False)
    xs, ys = zip(*[(x.clone(), y.clone()) for x, y in loader])
    torch.set_num_threads(threads)
    return torch.cat(xs), torch.cat(ys), manifest.num_classes


def plain_loop(store: Path, epochs: int, threads: int) -> list[float]:
    """Training images/s of each epoch of the plain loop."""
    import torch
    from torch import nn

    from train_step import torchvision_same_arch

    x, y, classes = preload(store)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = torchvision_same_arch(classes, block_config=(3, 3, 3))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    rates = []
    for _ in range(epochs):
        order = torch.randperm(len(x))
        steps = len(x) // BATCH
        start = time.perf_counter()
        for s in range(steps):
            idx = order[s * BATCH:(s + 1) * BATCH]
            loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        rates.append(steps * BATCH / (time.perf_counter() - start))
    return rates


def pipeline_run(folder: Path, store: Path, nodes: int, cpus: int, epochs: int) -> tuple[list[float], float]:
    """(training images/s of each epoch, whole-job seconds) of `densenet-pipe train`."""
    env = {**os.environ, "DENSENET_PIPE_CLUSTER_DIR": str(folder / f"cluster{nodes}")}
    env.pop("RAY_ADDRESS", None)
    subprocess.run(CLI + ["cluster", "up", "--nodes", str(nodes), "--cpus-per-node", str(cpus)],
                   env=env, check=True, capture_output=True)
    try:
        name = f"nodes{nodes}"
        start = time.perf_counter()
        p = subprocess.run(CLI + [
            "train", "densenet_bc100_k12", "--depth", "22", "--growth-rate", "12", "--recipe", "cifar",
            "--data", str(store), "--nodes", str(nodes), "--batch-size", str(BATCH), "--epochs", str(epochs),
            "--amp", "off", "--drop-rate", "0", "--wandb", "off", "--storage", str(folder / "runs"),
            "--name", name, "--set", "data.augment=false", "--set", f"cluster.cpus_per_worker={cpus}"],
            env=env, capture_output=True, text=True, cwd=folder)
        took = time.perf_counter() - start
        if p.returncode != 0:
            sys.exit(f"error: the {nodes}-node train job failed: {(p.stderr or p.stdout).strip().splitlines()[-1:]}")
    finally:
        subprocess.run(CLI + ["cluster", "down"], env=env, capture_output=True)
    history = json.loads((folder / "runs" / name / "history.json").read_text())
    return [row["images_per_s"] for row in history], took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--train", type=int, default=1437, help="train images")
    ap.add_argument("--val", type=int, default=360, help="val images")
    args = ap.parse_args()
    if args.epochs < 2:
        sys.exit("error: --epochs must be at least 2 (epoch 1 is warm-up): pass --epochs 4")

    folder = Path(tempfile.mkdtemp(prefix="dp-e2e-", dir="/tmp"))
    load_before = os.getloadavg()[0]
    try:
        store = Path(make_store(folder, args.train, args.val))
        start = time.perf_counter()
        plain = plain_loop(store, args.epochs, threads=2)
        plain_total = time.perf_counter() - start
        one, one_s = pipeline_run(folder, store, nodes=1, cpus=2, epochs=args.epochs)
        two, two_s = pipeline_run(folder, store, nodes=2, cpus=1, epochs=args.epochs)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    base = statistics.median(plain[1:])
    print(f"DenseNet-BC-22 k12, {args.train:,} 32x32 train images, batch {BATCH}, fp32, {args.epochs} epochs, "
          f"on {cpu_name()} ({os.cpu_count()} CPUs)")
    print(f"{'variant':<42}{'train img/s':>12}{'vs plain':>10}{'whole (s)':>11}  target")
    print(f"{'plain loop, tensors in memory, 2 threads':<42}{base:>12.1f}{1.0:>9.2f}x{plain_total:>11.1f}")
    for label, rates, took, target in (("densenet-pipe train, 1 node x 2 CPUs", one, one_s, 0.9),
                                       ("densenet-pipe train, 2 nodes x 1 CPU", two, two_s, 0.8)):
        rate = statistics.median(rates[1:])
        verdict = "met" if rate / base >= target else "MISSED"
        print(f"{label:<42}{rate:>12.1f}{rate / base:>9.2f}x{took:>11.1f}  >= {target}x {verdict}")
    print(f"(img/s: median of epochs 2..{args.epochs}; the plain loop's whole time excludes decoding the "
          f"store into memory; 1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after)")


if __name__ == "__main__":
    main()
