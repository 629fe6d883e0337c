"""The GPU check, for the day a machine with one NVIDIA GPU is lent: one command, one table.

    bash benchmarks/gpu_check.sh                 # sets up .venv, then runs this
    .venv/bin/python benchmarks/gpu_check.py --steps 40 --batch 128

Through the real CLI on a 1-node local cluster of its own (its own folder, stopped at the
end): `doctor`; a synthetic 224 px store; DenseNet-121 trained for a fixed number of steps
with `--gpu` in bf16 + channels_last, in fp32 and in fp16 with its grad scaler; `evaluate`
and `predict` on the GPU. In this process: torchvision's DenseNet-121 in fp32 (the baseline,
same batch, same run) and the memory-efficient mode of DenseNet-BC-190-k40 at batch 64
against the plain mode (peak GPU memory and step time).

Published anchor: timm's DenseNet-121 trains at about 914 img/s on an RTX 3090 with AMP and
channels_last. Targets on one H100/H200-class GPU: bf16 at least 3x that, and at least 2x
our own fp32.

Without a GPU it runs what is safe on a CPU (doctor, the store, a 2-step CPU run of the same
train/evaluate/predict commands at a small batch) and prints, row by row, what it did not run
and why. Exit 1 when a row that ran failed or a GPU target was missed, else 0.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from prepare_nodes import cpu_name  # noqa: E402

ANCHOR_3090 = 914.0  # timm DenseNet-121, AMP + channels_last, RTX 3090 (img/s)


class Table:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str]] = []
        self.failed = False

    def add(self, check: str, result: str, ratio: str = "", note: str = "") -> None:
        self.rows.append((check, result, ratio, note))
        print(f"  {check}: {result} {ratio} {note}".rstrip(), flush=True)

    def fail(self, check: str, why: str) -> None:
        self.failed = True
        self.add(check, "FAILED", "", why)

    def skip(self, check: str, why: str) -> None:
        self.add(check, "NOT RUN", "", why)

    def print(self, title: str) -> None:
        head = ("check", "result", "vs baseline", "note")
        widths = [max(len(r[i]) for r in [head, *self.rows]) for i in range(4)]
        print(f"\n{title}\n")
        for row in [head, tuple("-" * w for w in widths), *self.rows]:
            print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")


def cli(work: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "DENSENET_PIPE_CLUSTER_DIR": str(work / "cluster"), "WANDB_MODE": "disabled"}
    exe = str(Path(sys.executable).with_name("densenet-pipe"))
    return subprocess.run([exe, *args], cwd=work, env=env, capture_output=True, text=True, timeout=timeout)


def last_line(p: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in (p.stderr + p.stdout).splitlines() if ln.strip()]
    return lines[-1][:160] if lines else f"exit {p.returncode}"


def best_step_s(net, x, y, steps: int, warmup: int) -> float:
    """Fastest forward + backward + SGD step of `steps` after `warmup`, synchronised on CUDA."""
    import torch

    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    best = float("inf")
    for i in range(warmup + steps):
        sync()
        t = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
        if i >= warmup:
            best = min(best, time.perf_counter() - t)
    return best


def torchvision_fp32(batch: int, steps: int, device: str) -> float:
    """img/s of torchvision's DenseNet-121, fp32, a fixed batch."""
    import torch
    import torchvision

    net = torchvision.models.densenet121(num_classes=1000).to(device)
    x = torch.randn(batch, 3, 224, 224, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    return batch / best_step_s(net, x, y, steps, warmup=3)


def memory_efficient_cuda(model: str, batch: int, steps: int) -> dict[str, tuple[float, float]]:
    """Peak GPU memory (MiB above the model and batch; SGD's momentum buffers count in it) and
    step time (s) per mode."""
    import torch

    from pipeline.models.densenet import build
    from pipeline.models.spec import resolve

    out = {}
    for efficient in (False, True):
        torch.cuda.empty_cache()
        spec = resolve(model)
        net = build(spec, memory_efficient=efficient).cuda()
        x = torch.randn(batch, 3, 32, 32, device="cuda")
        y = torch.randint(0, spec.num_classes, (batch,), device="cuda")
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        best = best_step_s(net, x, y, steps, warmup=1)
        out["efficient" if efficient else "plain"] = (
            (torch.cuda.max_memory_allocated() - base) / 2**20, best)
        del net, x, y
    return out


def train(work: Path, table: Table, label: str, name: str, store: Path, gpu: bool, batch: int,
          steps: int, extra: list[str]) -> float | None:
    args = ["train", "densenet121", "--data", str(store), "--nodes", "1", "--workers-per-node", "1",
            "--gpu" if gpu else "--cpu", "--epochs", "1", "--batch-size", str(batch),
            "--storage", str(work / "runs"), "--name", name, "--wandb", "off",
            "--set", f"data.max_steps_per_epoch={steps}", "--set", "data.augment=false",
            # One short epoch: the recipe's decay milestones (epochs 30 and 60) as fractions of it.
            "--set", "schedule.milestone_unit=fraction", "--set", "schedule.milestones=[0.5,0.75]", *extra]
    t = time.perf_counter()
    p = cli(work, *args)
    took = time.perf_counter() - t
    if p.returncode != 0:
        table.fail(label, last_line(p))
        return None
    row = json.loads((work / "runs" / name / "history.json").read_text())[-1]
    table.add(label, f"{row['images_per_s']:,.0f} img/s", "",
              f"{steps} steps of {batch}; job {took:.0f} s; peak {row['peak_memory_mib']:,.0f} MiB")
    return row["images_per_s"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40, help="training steps per variant")
    ap.add_argument("--batch", type=int, default=128, help="DenseNet-121 batch at 224 px")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args()

    import torch

    gpu = torch.cuda.is_available()
    name = torch.cuda.get_device_name(0) if gpu else "none"
    cpu = cpu_name()
    print(f"GPU: {name}; CPU: {cpu}; torch {torch.__version__}", flush=True)
    no_gpu = "no CUDA GPU here (torch.cuda.is_available() is False)"
    if not gpu:
        print(f"warning: {no_gpu}: running the CPU-safe parts only; every GPU row says NOT RUN", flush=True)
    steps, batch = (args.steps, args.batch) if gpu else (2, 8)

    work = Path(tempfile.mkdtemp(prefix="gpu-check-", dir="/tmp"))
    table = Table()
    try:
        up = cli(work, "cluster", "up", "--nodes", "1", *(["--gpus-per-node", "1"] if gpu else []))
        if up.returncode != 0:
            table.fail("local cluster", last_line(up))
            return 1
        p = cli(work, "doctor")
        (table.add if p.returncode == 0 else table.fail)("doctor", "ok" if p.returncode == 0 else last_line(p))

        store = work / "stores" / "synthetic224"
        n = max(steps * batch, 256)
        p = cli(work, "prepare", "synthetic", "--out", str(store), "--size", str(n),
                "--val-size", str(min(n // 4, 1024)), "--resolution", "224")
        if p.returncode != 0:
            table.fail("synthetic 224 px store", last_line(p))
            return 1
        table.add("synthetic 224 px store", f"{n} train images")

        if gpu:
            base = torchvision_fp32(batch, min(steps, 20), "cuda")
            table.add("torchvision DenseNet-121 fp32 (baseline)", f"{base:,.0f} img/s", "1.00x",
                      f"batch {batch}, in-process")
        else:
            base = None
            table.skip("torchvision DenseNet-121 fp32 (baseline)", no_gpu)
        variants = [("ours bf16 + channels_last", "bf16", ["--amp", "bf16", "--set", "data.channels_last=true"]),
                    ("ours fp32", "fp32", ["--amp", "off", "--set", "data.channels_last=false"]),
                    ("ours fp16 + grad scaler", "fp16", ["--amp", "fp16", "--set", "data.channels_last=true"])]
        speed: dict[str, float | None] = {}
        for label, short, extra in variants:
            if not gpu and short != "fp32":
                table.skip(label, no_gpu if short == "fp16" else f"{no_gpu}; bf16 on CPUs is benchmarks/train_step.py")
                continue
            speed[short] = train(work, table, label + ("" if gpu else " (CPU smoke, 2 steps)"), short,
                                 store, gpu, batch, steps, extra)
        if gpu and speed.get("bf16"):
            bf16 = speed["bf16"]
            for label, ref, target in (("bf16 vs 3090 anchor (914 img/s)", ANCHOR_3090, 3.0),
                                       ("bf16 vs our fp32", speed.get("fp32"), 2.0),
                                       ("bf16 vs torchvision fp32", base, None)):
                if ref:
                    ratio = bf16 / ref
                    verdict = "" if target is None else ("met" if ratio >= target else "NOT MET")
                    table.add(label, verdict or "-", f"{ratio:.2f}x",
                              f"target {target:g}x" if target else "")
                    if verdict == "NOT MET":
                        table.failed = True

        if gpu:
            mem = memory_efficient_cuda("densenet_bc190_k40", 64, 3)
            (pm, pt), (em, et) = mem["plain"], mem["efficient"]
            table.add("DenseNet-BC-190-k40 b64 plain", f"{pm:,.0f} MiB, {pt * 1000:.0f} ms/step", "1.00x")
            table.add("DenseNet-BC-190-k40 b64 memory-efficient", f"{em:,.0f} MiB, {et * 1000:.0f} ms/step",
                      f"{em / pm:.2f}x mem, {et / pt:.2f}x time")
        else:
            table.skip("memory-efficient mode on the GPU", f"{no_gpu}; on CPUs: benchmarks/memory_efficient.py")

        run = work / "runs" / ("bf16" if gpu else "fp32")
        if not (run / "history.json").exists():
            table.skip("evaluate", "no trained run to evaluate")
            table.skip("predict", "no trained run to predict with")
        else:
            where = ["--gpu"] if gpu else []
            t = time.perf_counter()
            p = cli(work, "evaluate", str(run), "--data", str(store), *where)
            ok = p.returncode == 0
            (table.add if ok else table.fail)("evaluate" + ("" if gpu else " (CPU)"),
                                               f"ok in {time.perf_counter() - t:.0f} s" if ok else last_line(p))
            t = time.perf_counter()
            p = cli(work, "predict", str(run), str(store), "--actors", "1", "--format", "json",
                    "--out", str(work / "predictions.json"), *(["--gpu"] if gpu else ["--cpu"]))
            ok = p.returncode == 0
            rows = len(json.loads((work / "predictions.json").read_text())) if ok else 0
            (table.add if ok else table.fail)("predict" + ("" if gpu else " (CPU)"),
                                               f"{rows} rows in {time.perf_counter() - t:.0f} s" if ok else last_line(p))
            if not gpu:
                table.skip("evaluate and predict on the GPU", no_gpu)
    finally:
        cli(work, "cluster", "down", timeout=120)
        table.print(f"GPU check: {name} (CPU: {cpu})")
        if args.keep:
            print(f"\nwork folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if table.failed else 0


if __name__ == "__main__":
    sys.exit(main())
