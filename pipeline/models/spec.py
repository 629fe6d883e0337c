"""Architecture specs of the DenseNet family, and the rules that make a spec buildable.

Torch-free on purpose: the CLI validates a model choice before anything heavy is imported
or any job is submitted.

    >>> s = resolve("densenet_bc100_k12", growth_rate=24)
    >>> s.block_config, s.num_init_features
    ((16, 16, 16), 48)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import UserError


class SpecError(UserError, ValueError):
    """A model name or override that cannot be built; the message names the broken rule."""


# ImageNet nets (Table 1): depth -> layers per block. The paper calls the (6,12,64,48) net
# DenseNet-264 although its layer count gives 265; we keep the paper's name.
IMAGENET_BLOCKS: dict[int, tuple[int, ...]] = {
    121: (6, 12, 24, 16),
    161: (6, 12, 36, 24),
    169: (6, 12, 32, 32),
    201: (6, 12, 48, 32),
    264: (6, 12, 64, 48),
}

FAMILIES = ("densenet", "densenet_bc", "densenet_imagenet", "densenet_simple")


@dataclass(frozen=True)
class DenseNetSpec:
    """Everything needed to build one DenseNet; `resolve` fills and checks it."""

    name: str
    family: str
    depth: int
    growth_rate: int
    bottleneck: bool
    compression: float
    drop_rate: float
    num_classes: int
    input_size: int
    block_config: tuple[int, ...]
    num_init_features: int
    bn_size: int = 4

    @property
    def stem(self) -> str:
        return "imagenet" if self.family == "densenet_imagenet" else "cifar"

    def complexity(self) -> dict[str, int]:
        """Params and MACs at `input_size`, counted from the architecture alone (no torch).

        MACs: conv and linear multiply-adds for one image; `pipeline.models.flops` counts the
        same on the built module, and the tests hold the two equal for every net.
        """
        k, size, params, macs = self.growth_rate, self.input_size, 0, 0

        def conv(cin: int, cout: int, kernel: int, out_size: int) -> None:
            nonlocal params, macs
            params += cin * cout * kernel * kernel
            macs += cin * cout * kernel * kernel * out_size * out_size

        c = self.num_init_features
        if self.stem == "imagenet":
            size = (size + 2 * 3 - 7) // 2 + 1
            conv(3, c, 7, size)
            params += 2 * c
            size = (size + 2 * 1 - 3) // 2 + 1
        else:
            conv(3, c, 3, size)
        for i, n in enumerate(self.block_config):
            for _ in range(n):
                params += 2 * c
                if self.bottleneck:
                    inner = self.bn_size * k
                    conv(c, inner, 1, size)
                    params += 2 * inner
                    conv(inner, k, 3, size)
                else:
                    conv(c, k, 3, size)
                c += k
            if i != len(self.block_config) - 1:
                out = int(math.floor(self.compression * c))
                params += 2 * c
                conv(c, out, 1, size)
                c, size = out, size // 2
        params += 2 * c + c * self.num_classes + self.num_classes
        macs += c * self.num_classes
        return {"params": params, "macs": macs}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["block_config"] = list(self.block_config)
        return d


@dataclass(frozen=True)
class _Preset:
    family: str
    depth: int
    growth_rate: int
    bottleneck: bool
    compression: float
    num_classes: int
    input_size: int
    drop_rate: float = 0.0
    num_blocks: int = 3
    description: str = ""


_PRESETS: dict[str, _Preset] = {}


def register(name: str, **kw: Any) -> None:
    """Register a named preset; every variant is one line of arguments."""
    if name in _PRESETS:
        raise ValueError(f"model {name!r} is registered twice")
    _PRESETS[name] = _Preset(**kw)


def _imagenet(depth: int, k: int) -> dict[str, Any]:
    return dict(family="densenet_imagenet", depth=depth, growth_rate=k, bottleneck=True,
                compression=0.5, num_classes=1000, input_size=224, num_blocks=4,
                description=f"ImageNet DenseNet-{depth} (Table 1), k={k}")


def _cifar(depth: int, k: int, bc: bool) -> dict[str, Any]:
    return dict(family="densenet_bc" if bc else "densenet", depth=depth, growth_rate=k,
                bottleneck=bc, compression=0.5 if bc else 1.0, num_classes=10, input_size=32,
                description=f"CIFAR/SVHN DenseNet{'-BC' if bc else ''} L={depth}, k={k} (Table 2)")


for _d, _k in ((121, 32), (161, 48), (169, 32), (201, 32), (264, 32)):
    register(f"densenet{_d}", **_imagenet(_d, _k))
for _d, _k in ((40, 12), (100, 12), (100, 24)):
    register(f"densenet{_d}_k{_k}", **_cifar(_d, _k, bc=False))
for _d, _k in ((100, 12), (250, 24), (190, 40)):
    register(f"densenet_bc{_d}_k{_k}", **_cifar(_d, _k, bc=True))
register("densenet_simple", family="densenet_simple", depth=11, growth_rate=12, bottleneck=False,
         compression=1.0, num_classes=10, input_size=32, num_blocks=2,
         description="two-block teaching net, 4 layers a block, for smoke runs and demos")


def names() -> list[str]:
    return list(_PRESETS)


def _cifar_blocks(depth: int, bottleneck: bool, num_blocks: int) -> tuple[int, ...]:
    # depth counts every conv and the classifier: stem conv + (num_blocks - 1) transitions +
    # classifier, plus one conv a layer (two with a bottleneck).
    per_layer = 2 if bottleneck else 1
    fixed = 1 + (num_blocks - 1) + 1
    unit = num_blocks * per_layer
    if depth <= fixed or (depth - fixed) % unit:
        kind = "DenseNet-BC" if bottleneck else "DenseNet"
        raise SpecError(
            f"depth {depth} is impossible for a {num_blocks}-block {kind}: (depth - {fixed}) "
            f"must be a positive multiple of {unit} (e.g. {fixed + unit * 2}, {fixed + unit * 4}, "
            f"{fixed + unit * 6})"
        )
    return (((depth - fixed) // unit),) * num_blocks


def resolve(
    name: str,
    *,
    depth: int | None = None,
    growth_rate: int | None = None,
    bottleneck: bool | None = None,
    compression: float | None = None,
    drop_rate: float | None = None,
    num_classes: int | None = None,
    input_size: int | None = None,
) -> DenseNetSpec:
    """Turn a registered name plus optional overrides into a checked spec.

    Raises SpecError with the violated rule for an unknown name or an impossible combination.
    """
    if name not in _PRESETS:
        raise SpecError(f"unknown model {name!r}; known models: {', '.join(_PRESETS)}")
    p = _PRESETS[name]
    depth = p.depth if depth is None else depth
    k = p.growth_rate if growth_rate is None else growth_rate
    bc = p.bottleneck if bottleneck is None else bottleneck
    theta = p.compression if compression is None else compression
    drop = p.drop_rate if drop_rate is None else drop_rate
    classes = p.num_classes if num_classes is None else num_classes
    size = p.input_size if input_size is None else input_size

    for label, value in (("depth", depth), ("growth rate", k), ("num_classes", classes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SpecError(f"{label} must be a positive integer, got {value!r}")
    if not 0.0 < theta <= 1.0:
        raise SpecError(f"compression must be in (0, 1], got {theta}")
    if not 0.0 <= drop < 1.0:
        raise SpecError(f"drop rate must be in [0, 1), got {drop}")

    family = p.family
    if family == "densenet_imagenet":
        if depth not in IMAGENET_BLOCKS:
            raise SpecError(
                f"depth {depth} is not an ImageNet DenseNet of Table 1: choose one of "
                f"{', '.join(map(str, IMAGENET_BLOCKS))}"
            )
        if not bc:
            raise SpecError("ImageNet DenseNets (Table 1) always use bottleneck layers: drop --no-bottleneck")
        blocks = IMAGENET_BLOCKS[depth]
        init = 2 * k
        min_size = 32
    else:
        if family in ("densenet", "densenet_bc"):
            family = "densenet_bc" if bc else "densenet"
        blocks = _cifar_blocks(depth, bc, p.num_blocks)
        # DenseNet-BC starts with 2k channels, the plain nets with 16 (Section 4).
        init = 2 * k if bc else 16
        min_size = 2 ** (p.num_blocks - 1)
    if size < min_size:
        raise SpecError(f"input size {size} is too small for {name}: at least {min_size} pixels")

    if (depth, k, bc, theta) == (p.depth, p.growth_rate, p.bottleneck, p.compression):
        label = name
    else:
        label = f"{name}(depth={depth},k={k},bottleneck={bc},compression={theta})"
    return DenseNetSpec(
        name=label, family=family, depth=depth, growth_rate=k, bottleneck=bc, compression=theta,
        drop_rate=drop, num_classes=classes, input_size=size, block_config=blocks,
        num_init_features=init,
    )


def family_preset(family: str) -> str:
    """The registered name a sweep starts from for a family (its smallest Table 2 net)."""
    table = {"densenet": "densenet40_k12", "densenet_bc": "densenet_bc100_k12",
             "densenet_imagenet": "densenet121", "densenet_simple": "densenet_simple"}
    if family not in table:
        raise SpecError(f"unknown family {family!r}; known families: {', '.join(table)}")
    return table[family]

