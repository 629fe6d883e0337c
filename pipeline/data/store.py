"""A store: `train.beton`, `val.beton` and `manifest.json` in one directory.

    m = open_store("stores/cifar10")     # Manifest, or UserError naming the problem
    m.num_classes, m.classes, m.mean, m.std, m.splits["train"].count
    m.beton("train")                     # absolute path of train.beton

A directory without a valid manifest, or whose .beton files do not match the sha256 in it, is
not a store and nothing reads it. Hashing a large store takes a while, so a verified
(path, size, mtime, inode) is remembered in the user's cache directory; a file that changes
size or mtime is hashed again. Torch-free.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..parsing import ConfigError, parse_dataclass
from ..errors import UserError
from ..runs import NAME

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
SPLITS = ("train", "val")


@dataclass
class SplitInfo:
    file: str
    count: int
    sha256: str
    bytes: int


@dataclass
class WriterInfo:
    write_mode: str
    max_resolution: int | None
    jpeg_quality: int
    compress_probability: float
    smart_threshold: int | None
    page_size: int
    # How many nodes wrote it (`prepare --nodes`), and per split the [start, stop) slice
    # each wrote, with its host, in merge order.
    nodes: int = 1
    shards: dict = field(default_factory=dict)


@dataclass
class Manifest:
    format_version: int
    dataset: str
    num_classes: int
    classes: list[str]
    writer: WriterInfo
    mean: list[float]
    std: list[float]
    resolution: int
    eval_resolution: int
    # "small" (fixed-size, pad-and-crop) or "imagenet" (RandomResizedCrop, 224/256 centre crop).
    family: str
    # The train augmentation the card asks for when data.augment is on.
    augment: str
    # Every image's (height, width) is this when all are the same size, else None.
    fixed_size: list[int] | None
    # "train"/"val" -> SplitInfo.
    splits: dict = field(default_factory=dict)
    # FFCV field name -> {"type": ..., settings}; the order is the order in the .beton.
    fields: dict = field(default_factory=dict)
    sources: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    card_differences: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    created: str = ""
    # Set by open_store: where the store lives.
    path: str = ""

    def beton(self, split: str) -> Path:
        if split not in self.splits:
            raise UserError(f"store {self.path} has no split {split!r}: splits are {', '.join(self.splits)}")
        return Path(self.path) / self.splits[split].file

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("path")
        return d


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def md5_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: Path, manifest: Manifest) -> Path:
    path = Path(directory) / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.tmp")
    tmp.write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
    tmp.replace(path)
    return path


def _cache_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "densenet-pipe" / "verified-stores.json"


def _stamp(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"


def hash_file(path: Path) -> str:
    """sha256 of a .beton just written, remembered: the check that follows need not read it
    again (a store's files are hashed once, not once per check)."""
    digest = sha256_file(path)
    _remember(_stamp(path), digest)
    return digest


def remember_moved(path: Path, digest: str) -> None:
    """A file hashed by this process under another name and renamed to `path` (a rename
    keeps the inode and its bytes): known by `open_store` without hashing it again."""
    _remember(_stamp(path), digest)


def _read_cache() -> dict[str, str]:
    try:
        data = json.loads(_cache_file().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _remember(stamp: str, digest: str) -> None:
    path = _cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        cache = _read_cache()
        cache[stamp] = digest
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(dict(list(cache.items())[-512:])))
        tmp.replace(path)
    except OSError:
        pass  # A cache that cannot be written only costs a re-hash next time.


def parse_manifest(data: Any, where: str) -> Manifest:
    try:
        if not isinstance(data, dict):
            raise ConfigError("expected a JSON object")
        data = dict(data)
        # Free-form parts are checked for their container type only.
        loose = {k: data.pop(k) for k in ("splits", "fields", "sources", "skipped", "info") if k in data}
        for k, v in loose.items():
            want = list if k in ("sources", "skipped") else dict
            if not isinstance(v, want):
                raise ConfigError(f"{k}: expected a {want.__name__}")
        splits = {k: parse_dataclass(SplitInfo, v, f"splits.{k}.") for k, v in loose.pop("splits", {}).items()}
        m = parse_dataclass(Manifest, data)
    except (ConfigError, TypeError) as e:
        raise UserError(f"{where} is not a valid store manifest ({e}): prepare the store again "
                        "with `densenet-pipe prepare`") from None
    m.splits = splits
    for k, v in loose.items():
        setattr(m, k, v)
    return m


def check_manifest(m: Manifest, where: str) -> Manifest:
    """The rules every manifest meets wherever the store lives; returns it."""
    if m.format_version != FORMAT_VERSION:
        raise UserError(f"{where} has format {m.format_version}, this version reads "
                        f"{FORMAT_VERSION}: prepare the store again")
    missing = [s for s in SPLITS if s not in m.splits]
    if missing:
        raise UserError(f"{where} lists no {missing[0]} split: prepare the store again")
    for name, s in m.splits.items():
        if not NAME.fullmatch(s.file) or s.file in (".", ".."):
            raise UserError(f"{where} names {s.file!r} for its {name} split, which is not a file "
                            "inside the store: prepare the store again")
    return m


def open_store(path: str | os.PathLike, *, verify: bool = True) -> Manifest:
    """The store's Manifest after checking it and (with `verify`) each .beton's sha256."""
    root = Path(path).expanduser()
    where = root / MANIFEST
    if root.is_file() and (root.parent / MANIFEST).is_file():
        raise UserError(f"{root} is a file of the store {root.parent}: pass the store's folder, {root.parent}")
    if root.is_file():
        raise UserError(f"{root} is a file, not a store: pass the folder `densenet-pipe prepare` wrote")
    if not root.is_dir():
        raise UserError(f"store {root} does not exist: prepare it with `densenet-pipe prepare`")
    try:
        data = json.loads(where.read_text())
    except FileNotFoundError:
        raise UserError(f"{root} is not a store (no {MANIFEST}): prepare it with "
                        "`densenet-pipe prepare`; an interrupted prepare leaves none") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{where} is unreadable ({e}): prepare the store again") from None
    m = check_manifest(parse_manifest(data, str(where)), str(where))
    m.path = str(root.resolve())
    cache = _read_cache() if verify else {}
    for s in m.splits.values():
        beton = root / s.file
        if not beton.is_file():
            raise UserError(f"store {root} lacks {s.file}: prepare the store again")
        if beton.stat().st_size != s.bytes:
            raise UserError(f"{beton} is {beton.stat().st_size} bytes, the manifest says {s.bytes}: "
                            "the store is damaged; prepare it again")
        if not verify:
            continue
        stamp = _stamp(beton)
        if cache.get(stamp) == s.sha256:
            continue
        digest = sha256_file(beton)
        if digest != s.sha256:
            raise UserError(f"{beton} does not match the sha256 in its manifest: the store is "
                            "damaged or was changed; prepare it again")
        _remember(stamp, digest)
    return m
