"""Mixed precision: one autocast factory, and a grad scaler only for fp16."""

from __future__ import annotations

import contextlib

import torch


def resolve_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """`auto` is bf16 on CPUs and on GPUs that support it, fp16 on older GPUs."""
    if mode == "off":
        return None
    if mode == "bf16":
        return torch.bfloat16
    if mode == "fp16":
        return torch.float16
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    # bf16 has fp32's exponent range: loss scaling would only cost time.
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
