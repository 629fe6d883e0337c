"""`prepare --nodes 2` against `prepare --nodes 1` on the same JPEG folder, in one run.

    .venv/bin/python benchmarks/prepare_nodes.py [--images 24000] [--side 500] [--max-resolution 256] [--cpu]

Starts its own 2-node local cluster with 1 CPU a node (the project's .cluster/ is left alone),
writes a folder of real JPEGs (varied sizes around --side px, two classes), and runs
`densenet-pipe prepare imagefolder --write-mode jpg` through the real CLI and Ray job: once
with `--nodes 1 --workers 1` (the driver writes with one process on one node's CPU) and once
with `--nodes 2` (a shard on each node, then the merge). Images/s count train + val images
over the whole command, from submission to the published store, so job start-up and the
merge are inside. Target: --nodes 2 at least 1.7x the images/s of --nodes 1.

Why 24,000 images: every process that writes imports FFCV (about 8 s here, most of it numba
compiling at import), and a shard task also starts a Ray worker, so --nodes 2 carries ~6 s
more fixed cost than --nodes 1. The ratio reaches 1.7x once writing takes a couple of minutes
on one CPU; ImageNet's 1.28M images are far past that.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline import local_cluster  # noqa: E402

CLI = [str(Path(sys.executable).parent / "densenet-pipe")]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def make_folder(root: Path, images: int, side: int, seed: int = 0) -> None:
    """train/ and val/ of class folders holding smooth, photo-like JPEGs (quality 90)."""
    import cv2

    rng = np.random.default_rng(seed)
    for split, n in (("train", images), ("val", max(2, images // 8))):
        for i in range(n):
            cls = f"class{i % 2}"
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            h, w = (int(v) for v in rng.integers(int(side * 0.75), int(side * 1.25), 2))
            small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
            img = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
            img = np.clip(img.astype(np.int16) + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
            ok, data = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
            assert ok
            (root / split / cls / f"{i:06d}.jpg").write_bytes(data.tobytes())


def stored_images(path: Path) -> list[bytes]:
    """Every sample's label and encoded image, in file order (the files' page layouts differ)."""
    from ffcv.reader import Reader

    r = Reader(str(path))
    size = dict(zip(r.alloc_table["ptr"].tolist(), r.alloc_table["size"].tolist()))
    data = path.read_bytes()
    return [bytes(data[p:p + size[p]]) + int(y).to_bytes(8, "little")
            for p, y in zip(r.metadata["f0"]["data_ptr"].tolist(), r.metadata["f1"].tolist())]


class CpuSampler:
    """CPU seconds (user + system) each process of the cluster used while a command ran,
    sampled every 0.25 s: a process that lives less than that is missed."""

    def __init__(self, cluster: local_cluster.LocalCluster):
        import psutil

        self.roots = [psutil.Process(n.pid) for n in cluster.nodes]
        self.before = self._read()
        self.seen: dict[int, tuple[str, float]] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _read(self) -> dict[int, tuple[str, float]]:
        import psutil

        out = {}
        for root in self.roots:
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                continue
            for p in procs:
                try:
                    t = p.cpu_times()
                    out[p.pid] = (p.name()[:28], t.user + t.system)
                except psutil.Error:
                    pass
        return out

    def _run(self) -> None:
        while not self.stop.is_set():
            self.seen.update(self._read())
            time.sleep(0.25)

    def finish(self) -> list[tuple[int, str, float]]:
        self.stop.set()
        self.thread.join()
        used = [(pid, name, cpu - self.before.get(pid, ("", 0.0))[1]) for pid, (name, cpu) in self.seen.items()]
        return sorted((u for u in used if u[2] > 0.05), key=lambda u: -u[2])


def timed(cmd: list[str], env: dict[str, str], cpu: list | None = None) -> float:
    sampler = CpuSampler(local_cluster.running(Path(env[local_cluster.CLUSTER_DIR_ENV]))) if cpu is not None else None
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    took = time.perf_counter() - start
    if sampler is not None:
        cpu.append((took, sampler.finish()))
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return took


def print_cpu(label: str, took: float, used: list[tuple[int, str, float]]) -> None:
    total = sum(u[2] for u in used)
    print(f"{label}: {took:.1f} s, the cluster's processes used {total:.1f} CPU s ({total / took:.2f} of a CPU on "
          f"average); the largest:")
    for pid, name, cpu in used[:8]:
        print(f"    {pid:>8}  {name:<28}{cpu:>8.1f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=24000, help="train images (val: an eighth)")
    ap.add_argument("--side", type=int, default=500, help="typical image side in pixels (ImageNet's)")
    ap.add_argument("--max-resolution", type=int, default=256, help="prepare's --max-resolution")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--cpu", action="store_true",
                    help="also print the CPU seconds of every cluster process during the last pair")
    args = ap.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="dp-bench-", dir="/tmp"))
    env = {**os.environ, local_cluster.CLUSTER_DIR_ENV: str(folder / "cluster")}
    env.pop("RAY_ADDRESS", None)
    load_before = os.getloadavg()[0]
    try:
        source = folder / "jpegs"
        make_folder(source, args.images, args.side)
        total = sum(1 for _ in source.rglob("*.jpg"))
        subprocess.run(CLI + ["cluster", "up", "--nodes", "2", "--cpus-per-node", "1"], env=env,
                       check=True, capture_output=True)
        base = CLI + ["prepare", "imagefolder", "--source", str(source), "--write-mode", "jpg",
                      "--max-resolution", str(args.max_resolution), "--force"]
        one, two, cpu = [], [], []
        for r in range(args.repeats):
            sample = cpu if args.cpu and r == args.repeats - 1 else None
            one.append(timed(base + ["--out", str(folder / "one"), "--nodes", "1", "--workers", "1"], env, sample))
            two.append(timed(base + ["--out", str(folder / "two"), "--nodes", "2"], env, sample))
        same = all(stored_images(folder / "one" / f) == stored_images(folder / "two" / f)
                   for f in ("train.beton", "val.beton"))
    finally:
        subprocess.run(CLI + ["cluster", "down"], env=env, capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)

    t1, t2 = statistics.median(one), statistics.median(two)
    print(f"prepare imagefolder, {total:,} JPEGs (~{args.side} px, --write-mode jpg "
          f"--max-resolution {args.max_resolution}), "
          f"2-node local cluster, 1 CPU a node, on {cpu_name()} ({os.cpu_count()} CPUs)")
    print(f"{'variant':<34}{'s':>8}{'images/s':>10}{'vs --nodes 1':>14}")
    print(f"{'--nodes 1 --workers 1':<34}{t1:>8.1f}{total / t1:>10.1f}{1.0:>13.2f}x")
    verdict = "ok" if t1 / t2 >= 1.7 else "MISSED"
    print(f"{'--nodes 2 (shards + merge)':<34}{t2:>8.1f}{total / t2:>10.1f}{t1 / t2:>13.2f}x"
          f"  target >= 1.7x {verdict}")
    print(f"(median of {args.repeats}; whole command wall time; the two stores' images "
          f"{'are' if same else 'are NOT'} byte-identical, in the same order; 1-min load average {load_before:.1f} "
          f"before, {os.getloadavg()[0]:.1f} after)")
    for label, (took, used) in zip(("--nodes 1", "--nodes 2"), cpu):
        print_cpu(label, took, used)
    if len(cpu) == 2:
        # Both nodes share this machine's CPUs: --nodes 2 can take no less than its CPU
        # seconds over the CPUs there are, however well it overlaps its phases.
        (took1, used1), (took2, used2) = cpu
        floor = sum(u[2] for u in used2) / min(2, os.cpu_count() or 2)
        print(f"--nodes 2 with every CPU busy throughout would take {floor:.1f} s: "
              f"{took1 / floor:.2f}x the --nodes 1 run above at best on this machine "
              f"({took2 / floor:.2f}x that floor measured)")


if __name__ == "__main__":
    main()
