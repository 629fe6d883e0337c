"""Mixup and CutMix on a batch after the loader, with label smoothing, as soft targets.

    images, targets = mix(images, labels, num_classes, cfg.data)   # targets: N x C, rows sum to 1

Mixup (Zhang et al. 2018) blends each image with another of the batch by a weight
lam ~ Beta(alpha, alpha); CutMix (Yun et al. 2019) pastes a box of another image covering
1 - lam of the area, and lam becomes the share actually kept. With both on, each batch is
CutMix with probability `mix_switch_prob`, else Mixup. The partner of image i is image
perm[i] for a random permutation. Randomness comes from torch's generator, which the loop
seeds from (seed, epoch, rank): a resumed run mixes the same way.
"""

from __future__ import annotations

import torch


def soft_targets(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    off = smoothing / num_classes
    targets = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return targets.scatter_(1, labels.view(-1, 1), 1.0 - smoothing + off)


def active(data_cfg) -> bool:
    return data_cfg.mixup > 0 or data_cfg.cutmix > 0


def mix(images: torch.Tensor, labels: torch.Tensor, num_classes: int, data_cfg,
        smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(mixed images, soft targets); the images are changed in place when CutMix is drawn."""
    targets = soft_targets(labels, num_classes, smoothing)
    if not active(data_cfg) or images.shape[0] < 2:
        return images, targets
    use_cutmix = data_cfg.cutmix > 0 and (
        data_cfg.mixup <= 0 or torch.rand(()).item() < data_cfg.mix_switch_prob)
    alpha = data_cfg.cutmix if use_cutmix else data_cfg.mixup
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(images.shape[0], device=images.device)
    if use_cutmix:
        h, w = images.shape[-2:]
        cut = (1.0 - lam) ** 0.5
        ch, cw = int(h * cut), int(w * cut)
        cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
        top, bottom = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        left, right = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        images[..., top:bottom, left:right] = images[perm][..., top:bottom, left:right]
        lam = 1.0 - (bottom - top) * (right - left) / (h * w)
    else:
        images = lam * images + (1.0 - lam) * images[perm]
    return images, lam * targets + (1.0 - lam) * targets[perm]
