"""Dataset cards: one YAML per dataset in the repository's `datasets/` folder.

    card = load_card("cifar10")
    card.num_classes, card.mean, card.files[0].md5

A card says what an official release should look like; readers compare what they find with
it (`differences`) and the prepare job reports every difference without failing on it, so
subsets (ImageNet-100, tiny test fixtures) still prepare.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from ..parsing import ConfigError, parse_dataclass
from ..errors import UserError

CARDS_DIR = Path(__file__).resolve().parents[2] / "datasets"

Family = Literal["small", "imagenet"]
Augment = Literal["translate_flip", "translate", "rrc_flip", "none"]


@dataclass
class CardFile:
    name: str
    md5: str | None = None
    url: str | None = None
    optional: bool = False


@dataclass
class SplitSizes:
    train: int | None = None
    val: int | None = None
    extra: int | None = None


@dataclass
class WriteDefaults:
    write_mode: Literal["raw", "jpg", "smart", "proportion"] = "raw"
    max_resolution: int | None = None
    jpeg_quality: int = 90
    compress_probability: float = 0.5


@dataclass
class Card:
    name: str
    description: str = ""
    # None: whatever the source holds (imagefolder).
    num_classes: int | None = None
    classes: list[str] = field(default_factory=list)
    splits: SplitSizes = field(default_factory=SplitSizes)
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.25, 0.25, 0.25])
    resolution: int = 224
    eval_resolution: int = 224
    # "small": fixed-size images, pad-and-crop augmentation; "imagenet": varied sizes,
    # RandomResizedCrop for training and a 224/256 centre crop for evaluation.
    family: Family = "imagenet"
    augment: Augment = "rrc_flip"
    files: list = field(default_factory=list)
    write: WriteDefaults = field(default_factory=WriteDefaults)

    def differences(self, *, num_classes: int | None = None, classes: list[str] | None = None,
                    splits: dict[str, int] | None = None) -> list[str]:
        """What differs between the card and what a reader found, one sentence each."""
        out = []
        if num_classes is not None and self.num_classes is not None and num_classes != self.num_classes:
            out.append(f"{num_classes} classes found, the card says {self.num_classes}")
        if classes and self.classes and list(classes) != list(self.classes):
            out.append("class names differ from the card's")
        for split, n in (splits or {}).items():
            expected = getattr(self.splits, split, None)
            if expected is not None and n != expected:
                out.append(f"{split} has {n} images, the card says {expected}")
        return out


def card_names() -> list[str]:
    return sorted(p.stem for p in CARDS_DIR.glob("*.yaml"))


def load_card(name: str) -> Card:
    path = CARDS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise UserError(f"no dataset card {path}: datasets are {', '.join(card_names())}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
        files = [parse_dataclass(CardFile, f, "files.") for f in data.pop("files", [])]
        card = parse_dataclass(Card, data)
    except (yaml.YAMLError, ConfigError) as e:
        raise UserError(f"dataset card {path} is invalid: {e}") from None
    card.files = files
    return card
