"""When a training run compiles its net with torch.compile: one rule, `decide`.

On a CPU with native bf16 kernels (AVX512-BF16 or AMX) a DenseNet step is bound by what the
convolutions leave: BatchNorm, ReLU, the growing concatenations and their gradients' sums.
Inductor fuses those into a few loops; eager bf16 runs each as its own pass over memory.
Measured on a 2-core Xeon with AMX (`benchmarks/train_step.py --compile`), DenseNet-BC-100
at batch 64: eager bf16 1.46x torchvision's fp32 step, compiled bf16 about 2x. Compiling
costs minutes the first time on such a machine and seconds once Inductor's on-disk cache
(per node, shared by later runs) holds the graphs, so `auto` compiles only runs long enough
to pay that back even when cold.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

import torch

from .amp import cpu_has_fast_bf16

# Cold compile of DenseNet-BC-100 on 2 cores is about 140 s and a bf16 step at batch 64
# saves about 0.3 s: paid back after some 500 steps. A run with fewer steps than this
# (per worker, over all its epochs) stays eager under `auto`.
MIN_STEPS = 1000


@dataclass(frozen=True)
class Decision:
    compile: bool
    why: str

    def line(self) -> str:
        return f"torch.compile {'on' if self.compile else 'off'} ({self.why})"


def cxx_compiler() -> str | None:
    """The C++ compiler Inductor would call for CPU kernels, if there is one."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def decide(mode: str, device: torch.device, dtype: torch.dtype | None, total_steps: int) -> Decision:
    """`on` and `off` as told; `auto` compiles bf16 training on a CPU with native bf16
    kernels when the run has at least MIN_STEPS steps and a C++ compiler is at hand.

    GPUs stay eager under `auto`: no GPU measurement backs a default there yet."""
    if mode == "on":
        return Decision(True, "--compile")
    if mode == "off":
        return Decision(False, "--no-compile")
    if device.type != "cpu":
        return Decision(False, "auto: only bf16 CPU runs compile by default; --compile to force")
    if dtype != torch.bfloat16 or not cpu_has_fast_bf16():
        return Decision(False, "auto: pays only for bf16 on a CPU with native bf16 kernels")
    if total_steps < MIN_STEPS:
        return Decision(False, f"auto: {total_steps} steps are too few to pay back compiling "
                               f"(needs {MIN_STEPS}); --compile to force")
    if cxx_compiler() is None:
        return Decision(False, "auto: no C++ compiler (g++ or $CXX) for Inductor's CPU kernels")
    return Decision(True, f"auto: bf16 on a CPU with native bf16 kernels, {total_steps} steps; "
                          "the first steps compile, later runs on this node reuse the cache")
