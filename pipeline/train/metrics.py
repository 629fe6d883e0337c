"""One metrics type for training, validation and evaluation: sums over a pass, summed
across ranks, turned into errors once.

    tally = Tally()
    tally.add(logits, labels, loss_sum=loss.item() * n)
    tally = tally.reduced(device)          # all-reduce across DDP ranks (a no-op alone)
    tally.loss, tally.top1_error, tally.top5_error, tally.n
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Tally:
    loss_sum: float = 0.0
    top1: float = 0.0
    top5: float = 0.0
    n: float = 0.0

    def add(self, scores: torch.Tensor, labels: torch.Tensor, loss_sum: float = 0.0) -> None:
        """Count top-1/top-5 hits of `scores` (logits or probabilities) against `labels`."""
        k = min(5, scores.shape[1])
        hit = scores.topk(k, dim=1).indices.eq(labels[:, None])
        self.top1 += int(hit[:, 0].sum())
        self.top5 += int(hit.any(dim=1).sum())
        self.n += labels.shape[0]
        self.loss_sum += loss_sum

    def reduced(self, device: torch.device) -> "Tally":
        """The sums over every rank of the process group (this rank's alone without one)."""
        t = torch.tensor([self.loss_sum, self.top1, self.top5, self.n], dtype=torch.float64, device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(t)
        return Tally(*t.tolist())

    @property
    def loss(self) -> float:
        return self.loss_sum / self.n

    @property
    def top1_error(self) -> float:
        return 1 - self.top1 / self.n

    @property
    def top5_error(self) -> float:
        return 1 - self.top5 / self.n
