"""Peak memory and step time of a DenseNet training step: plain vs memory-efficient mode.

    .venv/bin/python benchmarks/memory_efficient.py                       # BC-190-k40, 32x32, batch 64
    .venv/bin/python benchmarks/memory_efficient.py --model densenet_bc100_k12 --steps 3

Each mode runs in its own fresh process, so the peak resident memory it reports (ru_maxrss
minus the resident size once the model, optimizer and batch exist) belongs to the step alone.
The baseline is the plain mode, measured in the same run.

Step time: with `--rounds R`, a third process holds both nets (the same weights) and times
them in alternation, plain then memory-efficient, R times after a warm-up of each; the time
ratio is the median of the R paired ratios. On a shared VM the speed of a core drifts by a
third over a minute; steps taken side by side drift together, where two processes run one
after the other do not.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from prepare_nodes import cpu_name  # noqa: E402


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def measure(model_name: str, batch: int, size: int, steps: int, memory_efficient: bool, threads: int) -> dict:
    import torch

    from pipeline.models.densenet import build
    from pipeline.models.spec import resolve

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build(resolve(model_name, input_size=size), memory_efficient=memory_efficient)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, model.spec.num_classes, (batch,))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # allocate momentum buffers so they count in the baseline, not the step
    base = _rss_mib()
    times = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=False)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"peak_mib": peak - base, "step_s": min(times[1:]), "base_mib": base}


def paired(model_name: str, batch: int, size: int, rounds: int, threads: int) -> dict:
    """Both modes in one process, stepped in alternation: per-round times and their ratios."""
    import statistics

    import torch

    from pipeline.models.densenet import build
    from pipeline.models.spec import resolve

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    nets = {mode: build(resolve(model_name, input_size=size), memory_efficient=mode == "efficient")
            for mode in ("plain", "efficient")}
    nets["efficient"].load_state_dict(nets["plain"].state_dict())
    opts = {mode: torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9) for mode, net in nets.items()}
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, nets["plain"].spec.num_classes, (batch,))

    def step(mode: str) -> float:
        t = time.perf_counter()
        opts[mode].zero_grad(set_to_none=False)
        torch.nn.functional.cross_entropy(nets[mode](x), y).backward()
        opts[mode].step()
        return time.perf_counter() - t

    step("plain"), step("efficient")
    times = {"plain": [], "efficient": []}
    for _ in range(rounds):
        for mode in ("plain", "efficient"):
            times[mode].append(step(mode))
    ratios = [e / p for p, e in zip(times["plain"], times["efficient"])]
    return {"plain_s": statistics.median(times["plain"]), "efficient_s": statistics.median(times["efficient"]),
            "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="densenet_bc190_k40")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=0,
                    help="also time the modes in alternation in one process, this many rounds")
    ap.add_argument("--child", choices=["plain", "efficient", "paired"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child == "paired":
        print(json.dumps(paired(a.model, a.batch, a.size, a.rounds, a.threads)))
        return
    if a.child:
        print(json.dumps(measure(a.model, a.batch, a.size, a.steps, a.child == "efficient", a.threads)))
        return
    results = {}
    for mode in ("plain", "efficient") + (("paired",) if a.rounds else ()):
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--model", a.model,
                              "--batch", str(a.batch), "--size", str(a.size), "--steps", str(a.steps),
                              "--rounds", str(a.rounds), "--threads", str(a.threads)],
                             check=True, capture_output=True, text=True)
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    p, e = results["plain"], results["efficient"]
    print(f"{a.model}, {a.size}x{a.size}, batch {a.batch}, {a.threads} threads, fp32, best of {a.steps} steps; "
          f"{cpu_name()}")
    print(f"{'mode':<18}{'peak MiB':>10}{'step s':>9}{'mem ratio':>11}{'time ratio':>12}")
    for name, r in (("plain (baseline)", p), ("memory-efficient", e)):
        print(f"{name:<18}{r['peak_mib']:>10.0f}{r['step_s']:>9.2f}"
              f"{r['peak_mib'] / p['peak_mib']:>11.2f}{r['step_s'] / p['step_s']:>12.2f}")
    if a.rounds:
        r = results["paired"]
        print(f"in alternation, {a.rounds} rounds in one process: plain {r['plain_s']:.2f} s, memory-efficient "
              f"{r['efficient_s']:.2f} s a step (medians); time ratio {r['ratio']:.2f} "
              f"(median of the rounds' ratios; {r['ratio_min']:.2f}-{r['ratio_max']:.2f}; target 1.25)")


if __name__ == "__main__":
    main()
