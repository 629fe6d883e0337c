"""Training-step throughput of DenseNet-BC-100-k12 at 32x32 on this CPU, against torchvision.

    .venv/bin/python benchmarks/train_step.py                 # batch 64, 2 threads
    .venv/bin/python benchmarks/train_step.py --compile       # adds torch.compile (minutes cold)
    .venv/bin/python benchmarks/train_step.py --profile       # where a step's time goes, per dtype

Baseline, measured in the same run: torchvision's DenseNet built to the same architecture
(its ImageNet stem swapped for the CIFAR 3x3 conv, so the parameter counts are equal), fp32.
Each variant: forward + backward + SGD step on a fixed batch, best of --steps after warm-up.
With --compile, the step a long `--amp auto` run takes (`pipeline.train.compiling.decide`:
compiled bf16 + channels_last on CPUs with native bf16 kernels), its compile time, and its
gradients against fp32's on the same weights and batch.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402


def torchvision_same_arch(num_classes: int = 10, block_config: tuple[int, ...] = (16, 16, 16)) -> nn.Module:
    """torchvision's DenseNet as a CIFAR DenseNet-BC with k 12 (BC-100 by default)."""
    import torchvision

    net = torchvision.models.DenseNet(growth_rate=12, block_config=block_config, num_init_features=24,
                                      bn_size=4, drop_rate=0.0, num_classes=num_classes)
    net.features.conv0 = nn.Conv2d(3, 24, kernel_size=3, padding=1, bias=False)
    net.features.norm0 = nn.Identity()
    net.features.relu0 = nn.Identity()
    net.features.pool0 = nn.Identity()
    return net


def ours() -> nn.Module:
    from pipeline.models.densenet import build
    from pipeline.models.spec import resolve

    return build(resolve("densenet_bc100_k12"))


def time_steps(model: nn.Module, batch: int, steps: int, dtype, channels_last: bool) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    ctx = (lambda: torch.autocast("cpu", dtype=dtype)) if dtype else contextlib.nullcontext
    best = float("inf")
    for i in range(steps + 2):
        t = time.perf_counter()
        with ctx():
            loss = nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= 2:
            best = min(best, time.perf_counter() - t)
    return batch / best


def gradient_agreement(model: nn.Module, dtype, channels_last: bool, batch: int) -> tuple[float, float]:
    """Cosine similarity and relative L2 error of `model`'s whole gradient under `dtype`
    against an fp32 eager copy's, same weights, same batch (BatchNorm in train mode)."""
    import copy

    reference = copy.deepcopy(getattr(model, "_orig_mod", model)).float()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(batch, 3, 32, 32, generator=gen), torch.randint(0, 10, (batch,), generator=gen)

    def flat_grad(net, ctx, inputs):
        net.zero_grad(set_to_none=True)
        with ctx:
            loss = nn.functional.cross_entropy(net(inputs).float(), y)
        loss.backward()
        return torch.cat([p.grad.flatten().float() for p in getattr(net, "_orig_mod", net).parameters()])

    ref = flat_grad(reference, contextlib.nullcontext(), x)
    inputs = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    got = flat_grad(model, torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext(), inputs)
    cos = torch.nn.functional.cosine_similarity(ref, got, dim=0).item()
    return cos, ((got - ref).norm() / ref.norm()).item()


def matmul_gflops(dtype, n: int = 1024, repeats: int = 10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def profile_step(batch: int, dtype, channels_last: bool, top: int = 6) -> str:
    """The ops that take a training step's time, by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    model = ours()
    time_steps(model, batch, 1, dtype, channels_last)  # warm-up outside the profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        time_steps(model, batch, 1, dtype, channels_last)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return ", ".join(f"{e.key} {100 * e.self_cpu_time_total / total:.0f}%" for e in events[:top])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--no-bf16", action="store_true", help="skip the bf16 variants (slow without native kernels)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    from pipeline.train.amp import cpu_has_fast_bf16

    tv = torchvision_same_arch()
    assert sum(p.numel() for p in tv.parameters()) == sum(p.numel() for p in ours().parameters())
    rows = [("torchvision, fp32 (baseline)", time_steps(tv, a.batch, a.steps, None, False))]
    variants = [("ours, fp32", None, False), ("ours, fp32 + channels_last", None, True)]
    if not a.no_bf16:
        variants += [("ours, bf16 autocast", torch.bfloat16, False),
                     ("ours, bf16 autocast + channels_last", torch.bfloat16, True)]
    for name, dtype, cl in variants:
        rows.append((name, time_steps(ours(), a.batch, a.steps, dtype, cl)))
    compile_s, agreement = None, None
    if a.compile:
        from pipeline.train import amp, compiling

        dtype = amp.resolve_dtype("auto", torch.device("cpu"))
        decision = compiling.decide("auto", torch.device("cpu"), dtype, compiling.MIN_STEPS)
        name = f"ours, {'bf16 autocast' if dtype else 'fp32'} + channels_last, compiled"
        compiled = torch.compile(ours()).to(memory_format=torch.channels_last)
        start = time.perf_counter()
        time_steps(compiled, a.batch, 0, dtype, True)  # compiles on the first calls
        compile_s = time.perf_counter() - start
        rows.append((name, time_steps(compiled, a.batch, a.steps, dtype, True)))
        # bf16's own yardstick: the same weights run eagerly under the same autocast.
        eager = getattr(compiled, "_orig_mod", compiled)
        agreement = (name, *gradient_agreement(compiled, dtype, True, a.batch),
                     *gradient_agreement(eager, dtype, True, a.batch))
    base = rows[0][1]
    print(f"DenseNet-BC-100-k12, 32x32, batch {a.batch}, {a.threads} threads, best of {a.steps} steps; "
          f"native bf16 kernels: {cpu_has_fast_bf16()}")
    print(f"{'variant':<50}{'img/s':>9}{'vs baseline':>13}")
    for name, ips in rows:
        print(f"{name:<50}{ips:>9.1f}{ips / base:>12.2f}x")
    if compile_s is not None:
        print(f"a long --amp auto run here: {decision.line()}")
        print(f"torch.compile: {compile_s:.0f} s for the first steps (compiling, or loading "
              "Inductor's on-disk cache of an earlier run)")
    if agreement is not None:
        print(f"whole gradient vs fp32 eager, same weights and batch: compiled cosine "
              f"{agreement[1]:.4f}, relative L2 error {agreement[2]:.3f}; the same autocast run "
              f"eagerly: cosine {agreement[3]:.4f}, relative L2 error {agreement[4]:.3f}")
    print("1024x1024 matmul GFLOP/s: " + ", ".join(
        f"{name} {matmul_gflops(dt):.1f}" for name, dt in
        (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16))))
    if a.profile:
        print("top ops by self CPU time, one step:")
        print(f"  fp32:                      {profile_step(a.batch, None, False)}")
        if not a.no_bf16:
            print(f"  bf16 autocast + chl-last:  {profile_step(a.batch, torch.bfloat16, True)}")


if __name__ == "__main__":
    main()
