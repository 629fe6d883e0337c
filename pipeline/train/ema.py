"""An exponential moving average of the weights, kept beside the raw ones.

    ema = WeightEMA(model, decay=0.9998)     # a copy of the unwrapped model, in eval mode
    ...optimizer.step(); ema.update(model)    # after every optimizer step
    ema.module                                # validate, checkpoint, export this

The decay warms up as timm's ModelEmaV2 and torchvision's references do: step t uses
min(decay, (1 + t) / (10 + t)), so the first steps do not average in the random init.
BatchNorm's running statistics are averaged like the weights; integer buffers
(num_batches_tracked) are copied. Every DDP rank holds the same weights after a step, so each
updates its own copy and all stay equal without communication.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class WeightEMA:
    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.warmup, self.updates = decay, warmup, 0

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        self.updates += 1
        ours = self.module.state_dict()
        for name, value in model.state_dict().items():
            mine = ours[name]
            if mine.dtype.is_floating_point:
                mine.lerp_(value.detach().to(mine.dtype), 1.0 - d)
            else:
                mine.copy_(value)

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.module.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["weights"])
        self.updates = int(state["updates"])
