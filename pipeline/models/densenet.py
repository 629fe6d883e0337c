"""The DenseNet family of Huang et al. (CVPR 2017), in plain torch.

    >>> from pipeline.models.spec import resolve
    >>> net = build(resolve("densenet_bc100_k12"))
    >>> net(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])

Module names follow torchvision's layout (`features.denseblock1.denselayer1.conv1`, ...),
so ImageNet weights trained with either load into the other.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from torch import Tensor, nn

from .spec import DenseNetSpec


class _DenseLayer(nn.Module):
    """BN-ReLU-Conv(3x3), or with a bottleneck BN-ReLU-Conv(1x1, bn_size*k)-BN-ReLU-Conv(3x3).

    Takes the list of all earlier feature maps of its block. In memory-efficient mode the
    concat-BN-ReLU-first-conv part is recomputed in backward instead of stored: that part
    grows quadratically with depth, the rest does not.
    """

    def __init__(self, in_features: int, growth_rate: int, bottleneck: bool, bn_size: int,
                 drop_rate: float, memory_efficient: bool) -> None:
        super().__init__()
        self.bottleneck = bottleneck
        self.drop_rate = drop_rate
        self.memory_efficient = memory_efficient
        self.norm1 = nn.BatchNorm2d(in_features)
        self.relu1 = nn.ReLU(inplace=True)
        if bottleneck:
            inner = bn_size * growth_rate
            self.conv1 = nn.Conv2d(in_features, inner, kernel_size=1, bias=False)
            self.norm2 = nn.BatchNorm2d(inner)
            self.relu2 = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(inner, growth_rate, kernel_size=3, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_features, growth_rate, kernel_size=3, padding=1, bias=False)

    def _first(self, *features: Tensor, state: dict | None = None) -> Tensor:
        x = torch.cat(features, 1)
        if state is not None and not state.setdefault("first_pass", True):
            # Recomputation in backward: same batch statistics, but the running statistics
            # were already updated once in the forward pass and must not move twice.
            n = self.norm1
            x = F.batch_norm(x, n.running_mean.clone(), n.running_var.clone(), n.weight, n.bias,
                             True, n.momentum or 0.0, n.eps)
        else:
            x = self.norm1(x)
        if state is not None:
            state["first_pass"] = False
        out = self.conv1(self.relu1(x))
        # The paper (and its reference code) drops out after every conv but the stem.
        return F.dropout(out, p=self.drop_rate, training=self.training) if self.drop_rate else out

    def forward(self, features: list[Tensor]) -> Tensor:
        if self.memory_efficient and self.training and any(f.requires_grad for f in features):
            out = cp.checkpoint(self._first, *features, state={}, use_reentrant=False)
        else:
            out = self._first(*features)
        if self.bottleneck:
            out = self.conv2(self.relu2(self.norm2(out)))
            if self.drop_rate:
                out = F.dropout(out, p=self.drop_rate, training=self.training)
        return out


class _DenseBlock(nn.ModuleDict):
    def __init__(self, num_layers: int, in_features: int, growth_rate: int, bottleneck: bool,
                 bn_size: int, drop_rate: float, memory_efficient: bool) -> None:
        super().__init__()
        for i in range(num_layers):
            self.add_module(
                f"denselayer{i + 1}",
                _DenseLayer(in_features + i * growth_rate, growth_rate, bottleneck, bn_size,
                            drop_rate, memory_efficient),
            )

    def forward(self, x: Tensor) -> Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    """BN-ReLU-Conv(1x1, compression)-AvgPool(2x2) between two dense blocks."""

    def __init__(self, in_features: int, out_features: int, drop_rate: float) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(in_features, out_features, kernel_size=1, bias=False)
        if drop_rate:
            self.drop = nn.Dropout(drop_rate)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class DenseNet(nn.Module):
    """A DenseNet built from a `DenseNetSpec`; see `pipeline.models.spec.resolve`."""

    def __init__(self, spec: DenseNetSpec, memory_efficient: bool = False) -> None:
        super().__init__()
        self.spec = spec
        k, init = spec.growth_rate, spec.num_init_features
        features = nn.Sequential()
        if spec.stem == "imagenet":
            features.add_module("conv0", nn.Conv2d(3, init, kernel_size=7, stride=2, padding=3, bias=False))
            features.add_module("norm0", nn.BatchNorm2d(init))
            features.add_module("relu0", nn.ReLU(inplace=True))
            features.add_module("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        else:
            features.add_module("conv0", nn.Conv2d(3, init, kernel_size=3, padding=1, bias=False))
        channels = init
        for i, num_layers in enumerate(spec.block_config):
            features.add_module(
                f"denseblock{i + 1}",
                _DenseBlock(num_layers, channels, k, spec.bottleneck, spec.bn_size,
                            spec.drop_rate, memory_efficient),
            )
            channels += num_layers * k
            if i != len(spec.block_config) - 1:
                out = int(math.floor(spec.compression * channels))
                features.add_module(f"transition{i + 1}", _Transition(channels, out, spec.drop_rate))
                channels = out
        features.add_module(f"norm{len(spec.block_config) + 1}", nn.BatchNorm2d(channels))
        self.features = features
        self.classifier = nn.Linear(channels, spec.num_classes)
        self.num_features = channels

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def set_memory_efficient(self, enabled: bool) -> None:
        for m in self.modules():
            if isinstance(m, _DenseLayer):
                m.memory_efficient = enabled

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.features(x), inplace=True)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.classifier(out)


def build(spec: DenseNetSpec, memory_efficient: bool = False) -> DenseNet:
    return DenseNet(spec, memory_efficient=memory_efficient)
