"""What one `prepare` job does, as a typed, JSON-able config (torch-free).

    cfg = PrepareConfig.from_dict({"dataset": "cifar10", "source": "/data/cifar-10-python.tar.gz",
                                   "out": "/stores/cifar10"})
    validate_prepare(cfg)        # ConfigError with the key and the fix
    cfg.to_dict()                # what the CLI submits and the job reads back

Writer settings left as None take the dataset card's defaults (raw for 32x32 sets, FFCV's
500 px / 50% JPEG at quality 90 for ImageNet-like sets).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from ..parsing import ConfigError, parse_dataclass

DATASETS = ("cifar10", "cifar100", "svhn", "imagenet", "imagefolder", "synthetic")


# How `prepare --nodes` moves pieces (sharded.py). Unset: nodes on the driver's machine write
# into the store's folder and the others stream; `node`: only the driver's own node does, as
# on a cluster of one node a machine. The job gets it from the environment `prepare` ran in.
PIECES_ENV = "DENSENET_PIPE_PIECES"
# A file: while it exists, each node's writer waits before writing a piece and leaves
# `<file>.<pid>` to say so (how a test meets a writer in the middle of its work).
HOLD_ENV = "DENSENET_PIPE_HOLD_PIECES"
# The same for a written piece's stream to the driver: it waits before its first chunk (how a
# test loses a node between writing a piece and handing it over).
HOLD_STREAMS_ENV = "DENSENET_PIPE_HOLD_STREAMS"


@dataclass
class SyntheticSpec:
    train_size: int = 2000
    val_size: int = 500
    num_classes: int = 10
    resolution: int = 32
    # Images of varied sizes in [min_size, resolution] (an ImageNet-like set) when set.
    min_size: int | None = None
    noise: float = 0.25
    seed: int = 0


@dataclass
class PrepareConfig:
    dataset: Literal["cifar10", "cifar100", "svhn", "imagenet", "imagefolder", "synthetic"] = "synthetic"
    source: str = ""
    out: str = ""
    write_mode: Literal["raw", "jpg", "smart", "proportion"] | None = None
    max_resolution: int | None = None
    jpeg_quality: int | None = None
    compress_probability: float | None = None
    # Images whose raw bytes exceed this are stored as JPEG in write_mode=smart.
    smart_threshold: int = 256 * 256 * 3
    workers: int = 2
    # Nodes that write the store, each a contiguous shard with all its CPUs, merged in order
    # by the driver; 1 writes it in the driver with `workers` processes.
    nodes: int = 1
    skip_bad: bool = False
    force: bool = False
    # SVHN: None uses extra_32x32.mat when it sits beside train_32x32.mat.
    extra: bool | None = None
    # The store's loader family and train/eval resolution; None: the card's (an image
    # folder's family from its images' median size, `readers.choose_family`).
    family: Literal["small", "imagenet"] | None = None
    resolution: int | None = None
    # imagefolder without a val/ folder: this share of each class's images is held out as
    # val (`readers.hold_out`).
    val_fraction: float | None = None
    synthetic: SyntheticSpec = field(default_factory=SyntheticSpec)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PrepareConfig":
        return parse_dataclass(cls, data)


def validate_prepare(cfg: PrepareConfig) -> PrepareConfig:
    """Every rule a prepare config must pass before it is submitted; returns it unchanged."""
    s = cfg.synthetic
    checks = [
        (cfg.dataset == "synthetic" or bool(cfg.source),
         f"{cfg.dataset} needs --source: the official files or folder (see datasets/README.md)"),
        (bool(cfg.out), "out is empty: pass --out DIR"),
        (cfg.max_resolution is None or cfg.max_resolution >= 8, "max_resolution must be >= 8 pixels"),
        (cfg.resolution is None or cfg.resolution >= 8, "--resolution must be >= 8 pixels"),
        (cfg.jpeg_quality is None or 1 <= cfg.jpeg_quality <= 100, "jpeg_quality must be in 1..100"),
        (cfg.compress_probability is None or 0 <= cfg.compress_probability <= 1,
         "compress_probability must be in [0, 1]"),
        (cfg.smart_threshold >= 1, "smart_threshold must be >= 1 byte"),
        (cfg.workers >= 1, "workers must be >= 1"),
        (cfg.nodes >= 1, "--nodes must be >= 1"),
        (cfg.val_fraction is None or 0 < cfg.val_fraction < 1,
         f"--val-fraction must be in (0, 1), e.g. 0.1, got {cfg.val_fraction}"),
        (cfg.val_fraction is None or cfg.dataset == "imagefolder",
         f"--val-fraction is for imagefolder sources without a val/ folder; {cfg.dataset} has its own val split"),
        (s.train_size >= 1 and s.val_size >= 1, "synthetic sizes must be >= 1"),
        (s.num_classes >= 2, "synthetic num_classes must be >= 2"),
        (s.resolution >= 8, "synthetic resolution must be >= 8 pixels"),
        (s.min_size is None or 8 <= s.min_size <= s.resolution,
         "synthetic min_size must be in [8, resolution]"),
        (s.noise >= 0, "synthetic noise must be >= 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    return cfg
