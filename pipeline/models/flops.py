"""Parameter and multiply-accumulate counts.

Convention: MACs are counted for convolutions and fully connected layers only, one MAC per
multiply-add of a weight with an input, for one image at the net's input size. BatchNorm,
ReLU, pooling, concatenation and bias additions are not counted (they are memory-bound and
below 1% of the total). The counting runs on torch's meta device: no memory, no compute.
"""

from __future__ import annotations

import torch
from torch import nn

from .densenet import build
from .spec import DenseNetSpec


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_size: int, device: str | torch.device = "meta") -> int:
    total = 0

    def conv_hook(m: nn.Conv2d, _inp, out: torch.Tensor) -> None:
        nonlocal total
        kh, kw = m.kernel_size
        total += out.numel() // out.shape[0] * (m.in_channels // m.groups) * kh * kw

    def linear_hook(m: nn.Linear, _inp, out: torch.Tensor) -> None:
        nonlocal total
        total += out.numel() // out.shape[0] * m.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.empty(1, 3, input_size, input_size, device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total


def profile(spec: DenseNetSpec) -> dict[str, int]:
    """Params and MACs of a spec at its input size, without allocating its weights."""
    with torch.device("meta"):
        model = build(spec)
    return {"params": count_params(model), "macs": count_macs(model, spec.input_size)}
