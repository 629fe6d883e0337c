"""Optimizer with decay-free norms and biases, and per-iteration learning-rate schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import Config

# Chosen by module type, never by parameter name: DenseNet names its norms norm0, norm1, ...
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def param_groups(model: nn.Module, weight_decay: float, lr: float = 0.0,
                 backbone_lr_mult: float = 1.0) -> list[dict]:
    """Conv/linear weights decay; norm parameters and every bias do not. With a backbone lr
    multiplier other than 1, the classifier's parameters get groups of their own at `lr`
    and the rest learn at lr x multiplier (a group's `backbone` key says which it is)."""
    groups: dict[tuple[bool, bool], list] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        head = backbone_lr_mult != 1.0 and module_name.split(".", 1)[0] == "classifier"
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            no_decay = isinstance(module, _NORMS) or name == "bias"
            groups.setdefault((head, no_decay), []).append(p)
    return [{"params": params, "weight_decay": 0.0 if no_decay else weight_decay,
             "lr": lr if head else lr * backbone_lr_mult, "backbone": not head}
            for (head, no_decay), params in sorted(groups.items())]


def backbone_params(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter outside the classifier: what `train.freeze_epochs` holds still."""
    return [p for name, p in model.named_parameters() if name.split(".", 1)[0] != "classifier"]


def base_lr(cfg: Config) -> float:
    """The configured lr, linearly scaled to the global batch when a reference batch is set."""
    o = cfg.optim
    return o.lr * o.batch_size / o.lr_reference_batch if o.lr_reference_batch else o.lr


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    o = cfg.optim
    groups = param_groups(model, o.weight_decay, base_lr(cfg), o.backbone_lr_mult)
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=base_lr(cfg), momentum=o.momentum, nesterov=o.nesterov)
    return torch.optim.AdamW(groups, lr=base_lr(cfg))


def lr_factor(step: int, steps_per_epoch: int, cfg: Config) -> float:
    """Multiplier of the base lr at iteration `step` (0-based), warm-up included."""
    s = cfg.schedule
    epoch = step / steps_per_epoch
    warmup = s.warmup_epochs
    if warmup and epoch < warmup:
        return (step + 1) / (warmup * steps_per_epoch)
    if s.kind == "constant":
        return 1.0
    if s.kind == "step":
        return s.gamma ** sum(epoch >= m for m in cfg.epochs_milestones())
    total = cfg.train.epochs - warmup
    progress = min(1.0, (epoch - warmup) / total) if total > 0 else 1.0
    if s.kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, steps_per_epoch: int, cfg: Config):
    """A LambdaLR stepped once per iteration; its state_dict is its iteration count."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, steps_per_epoch, cfg))
