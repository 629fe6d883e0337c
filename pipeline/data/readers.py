"""Readers of the official dataset formats, each returning a `Source` of indexable splits.

    src = read_source(cfg)                       # cfg: PrepareConfig
    image, label = src.splits["train"][0]        # HxWx3 uint8 RGB, int
    src.classes, src.info, src.notes, src.files

No downloads: `source` points at what the user has (see datasets/README.md). Every problem a
user can fix raises UserError with the file and the fix. Splits of image files decode lazily
(in the FFCV writer's processes); a file that does not decode is recorded by path in the
split's `bad_dir` and replaced by a placeholder, and the writer decides whether to skip it or
stop, because an exception inside FFCV's writer processes would hang it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import pickle
import re
import tarfile
import zlib
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .. import errors
from ..errors import UserError
from .cards import Card, WriteDefaults, load_card
from .prepare_config import PrepareConfig, SyntheticSpec

# torchvision's ImageFolder's: a folder laid out for it holds the same images for us.
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff"}


# Only the formats image datasets come in: PIL would otherwise also open EPS (running
# Ghostscript on untrusted bytes where it is installed), PSD, and more.
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "WEBP", "PPM", "TIFF", "GIF")
# Decompression bombs: a 10 kB PNG can claim 16k x 16k pixels. PIL's own warning level
# (89.5 Mpx, several times ImageNet's largest image) is our refusal level.
MAX_PIXELS = 89_478_485
# No dataset image comes near this many bytes; a bigger "image" is read into memory by
# every writer process before it can be refused.
MAX_IMAGE_BYTES = 256 << 20


def decode_image(data: bytes) -> np.ndarray:
    """Any image PIL reads (CMYK, grayscale, palette, PNG named .JPEG) as HxWx3 uint8 RGB,
    among IMAGE_FORMATS and at most MAX_PIXELS; anything else raises ValueError."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        except UnidentifiedImageError:
            raise ValueError(f"not an image in {', '.join(IMAGE_FORMATS)}") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ValueError(f"refused as a decompression bomb ({e})") from None
    with im:
        width, height = im.size
        if width * height > MAX_PIXELS:
            raise ValueError(f"{width}x{height} pixels is over the {MAX_PIXELS:,}-pixel cap "
                             "(a decompression bomb?)")
        im.load()
        if im.mode in ("P", "PA", "LA", "RGBA") and im.mode != "RGB":
            im = im.convert("RGBA")
        if im.mode == "RGBA":
            # Transparent pixels over white, as a viewer shows them.
            background = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(background, im)
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


class Split:
    """An indexable split: `split[i] -> (HxWx3 uint8, label)`, `len(split)`, `labels`."""

    labels: np.ndarray
    bad_dir: Path | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def describe(self, i: int) -> str:
        return f"sample {i}"

    def image(self, i: int) -> np.ndarray:
        raise NotImplementedError

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        label = int(self.labels[i])
        try:
            return self.image(i), label
        except Exception as e:  # noqa: BLE001  (any decode failure is a bad file, by path)
            if self.bad_dir is None:
                raise
            reason = " ".join(str(e).split()) or type(e).__name__
            # A file name need not be UTF-8: kept, escaped, rather than crashing the writer.
            line = f"{self.describe(i)}\t{reason}".encode("utf-8", "backslashreplace")
            (self.bad_dir / str(int(i))).write_bytes(line)
            return np.zeros((8, 8, 3), np.uint8), label


class ArraySplit(Split):
    def __init__(self, images: np.ndarray, labels: Sequence[int], origin: str = ""):
        self.images = np.ascontiguousarray(images, dtype=np.uint8)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.origin = origin

    def image(self, i: int) -> np.ndarray:
        return self.images[i]

    def describe(self, i: int) -> str:
        return f"{self.origin}[{i}]"


@dataclass(frozen=True)
class TarMember:
    tar: str
    offset: int
    size: int
    name: str

    def __str__(self) -> str:
        return f"{self.tar}:{self.name}"


_fds: dict[tuple[int, str], int] = {}


def _read_member(m: TarMember) -> bytes:
    # pread, one fd per process: writer processes are forked and must not share a file offset.
    key = (os.getpid(), m.tar)
    fd = _fds.get(key)
    if fd is None:
        fd = _fds[key] = os.open(m.tar, os.O_RDONLY)
    return os.pread(fd, m.size, m.offset)


class FileSplit(Split):
    """Images in files or in members of uncompressed tars, decoded on access."""

    def __init__(self, entries: list[tuple[str | TarMember, int]]):
        self.entries = [e for e, _ in entries]
        self.labels = np.asarray([label for _, label in entries], dtype=np.int64)

    def describe(self, i: int) -> str:
        return str(self.entries[i])

    def image(self, i: int) -> np.ndarray:
        e = self.entries[i]
        size = e.size if isinstance(e, TarMember) else Path(e).stat().st_size
        if size > MAX_IMAGE_BYTES:
            raise ValueError(f"{size:,} bytes is over the {MAX_IMAGE_BYTES:,}-byte cap for one image")
        return decode_image(_read_member(e) if isinstance(e, TarMember) else Path(e).read_bytes())


class SyntheticSplit(Split):
    """Seeded, learnable images: class colour x class stripe orientation + Gaussian noise.

    Sample i of split s is a pure function of (seed, s, i), so tests can regenerate any
    sample with `synthetic_image(spec, split, i)`.
    """

    def __init__(self, spec: SyntheticSpec, split: str):
        self.spec, self.split = spec, split
        n = spec.train_size if split == "train" else spec.val_size
        self.labels = np.arange(n, dtype=np.int64) % spec.num_classes

    def image(self, i: int) -> np.ndarray:
        return synthetic_image(self.spec, self.split, i)

    def describe(self, i: int) -> str:
        return f"synthetic {self.split}[{i}]"


def synthetic_image(spec: SyntheticSpec, split: str, i: int) -> np.ndarray:
    k = spec.num_classes
    c = i % k
    rng = np.random.default_rng([spec.seed, 0 if split == "train" else 1, i])
    if spec.min_size is None:
        h = w = spec.resolution
    else:
        h, w = (int(v) for v in rng.integers(spec.min_size, spec.resolution + 1, size=2))
    hue = c / k
    colour = np.clip(np.abs((hue * 6 + np.array([0.0, 4.0, 2.0])) % 6 - 3) - 1, 0, 1)
    theta = np.pi * ((c * 3) % k) / k
    y, x = np.mgrid[0:h, 0:w].astype(np.float32) / max(h, w)
    phase = rng.uniform(0, 2 * np.pi)
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * (x * np.cos(theta) + y * np.sin(theta)) + phase)
    img = 0.25 + 0.5 * colour[None, None, :] * (0.5 + 0.5 * stripes[..., None])
    img = img + spec.noise * rng.standard_normal((h, w, 3), dtype=np.float32)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


@dataclass
class Source:
    dataset: str
    card: Card
    classes: list[str]
    splits: dict[str, Split]
    # Files whose checksums go into the manifest (archives and .mat files, not image trees).
    files: list[Path] = field(default_factory=list)
    # Extra manifest entries, e.g. CIFAR-100 coarse labels or the ImageNet layout found.
    info: dict[str, Any] = field(default_factory=dict)
    # Differences from the card and other things the user should read.
    notes: list[str] = field(default_factory=list)


def check_layout(cfg: PrepareConfig) -> Path:
    """The source is there and laid out as its dataset's reader expects, told without reading
    an image or an archive: the CLI asks this before it submits a job to a local cluster
    (whose nodes see this machine's files), and every reader starts from it. Returns the path."""
    path = Path(cfg.source).expanduser()
    if not path.exists():
        raise UserError(f"source {path} does not exist: pass --source with the path to "
                        f"the official {cfg.dataset} files (see datasets/README.md)")
    if not os.access(path, os.R_OK):
        raise UserError(f"source {path} is not readable: check its permissions")
    if cfg.dataset == "imagefolder":
        _imagefolder_roots(path, cfg)
    elif cfg.dataset == "svhn":
        _svhn_files(path, cfg)
    elif cfg.dataset == "imagenet":
        _imagenet_train(path)
    elif cfg.dataset in ("cifar10", "cifar100") and path.is_dir():
        folder, files, fix = _cifar_layout(cfg.dataset)
        _cifar_folder(path, folder, [n for names in files.values() for n in names], fix)
    return path


def read_source(cfg: PrepareConfig) -> Source:
    """The reader for `cfg.dataset` over `cfg.source`, with the card's differences noted."""
    card = load_card(cfg.dataset)
    if cfg.dataset == "synthetic":
        src = read_synthetic(cfg.synthetic, card)
    else:
        path = check_layout(cfg)
        readers = {"cifar10": read_cifar, "cifar100": read_cifar, "svhn": read_svhn,
                   "imagenet": read_imagenet, "imagefolder": read_imagefolder}
        src = readers[cfg.dataset](path, card, cfg)
    for name in ("train", "val"):
        if len(src.splits[name]) == 0:
            raise UserError(f"{cfg.dataset} {name} split under {cfg.source} has no images")
    src.notes = card.differences(
        num_classes=len(src.classes),
        classes=src.classes if card.classes else None,
        splits={k: len(v) for k, v in src.splits.items()},
    ) + src.notes
    src.card = choose_family(src, cfg)
    return src


# An image folder whose median image is at most this many pixels on its longer side trains as
# the small-image family (CIFAR-like: native size, translation + flip): RandomResizedCrop's
# 8%-area crops of a 32 px image, upsampled to 224, keep almost nothing of it.
SMALL_MAX_SIDE = 64


def median_side(split: Split, sample: int = 256) -> int:
    """The median longer side of up to `sample` evenly spaced images, from their headers."""
    from PIL import Image

    count = len(split)
    picks = sorted({round(i * (count - 1) / max(sample - 1, 1)) for i in range(min(sample, count))})
    sides = []
    for i in picks:
        try:
            if isinstance(split, FileSplit) and not isinstance(split.entries[i], TarMember):
                with Image.open(split.entries[i]) as im:
                    sides.append(max(im.size))
            else:
                sides.append(max(split.image(i).shape[:2]))
        except Exception:  # noqa: BLE001 - an unreadable image is the writer's to report
            continue
    return int(np.median(sides)) if sides else 0


def choose_family(src: Source, cfg: PrepareConfig) -> Card:
    """The card the store is written with: `--family` and `--resolution` where given, and for an
    image folder the family its images call for."""
    card, family, side = src.card, cfg.family, 0
    if src.dataset == "imagefolder" and (family is None or (family == "small" and not cfg.resolution)):
        side = median_side(src.splits["train"])
    if family is None and src.dataset == "imagefolder":
        family = "small" if 0 < side <= SMALL_MAX_SIDE else "imagenet"
        how = ("at their own size with 4-pixel translation + flip" if family == "small"
               else "with RandomResizedCrop + flip, evaluated on a centre crop")
        src.notes.append(f"the median image is {side} px on its longer side: the {family} family, "
                         f"trained {how} (--family overrides)")
    if family == "small" and card.family != "small":
        res = cfg.resolution or side or 32
        # Raw pixels (JPEG artefacts are a large part of a 32 px image), capped at 4x the
        # largest small side: the writer's pages are sized to the cap.
        card = dataclasses.replace(card, family="small", augment="translate_flip", resolution=res,
                                   eval_resolution=res,
                                   write=WriteDefaults(write_mode="raw", max_resolution=max(4 * SMALL_MAX_SIDE, res)))
    elif family == "imagenet" and card.family != "imagenet":
        card = dataclasses.replace(card, family="imagenet", augment="rrc_flip", resolution=224,
                                   eval_resolution=224)
    if cfg.resolution:
        card = dataclasses.replace(card, resolution=cfg.resolution, eval_resolution=cfg.resolution)
    return card


def read_synthetic(spec: SyntheticSpec, card: Card) -> Source:
    card.num_classes = spec.num_classes
    card.splits.train, card.splits.val = spec.train_size, spec.val_size
    card.resolution = card.eval_resolution = spec.resolution if spec.min_size is None else 224
    if spec.min_size is not None or spec.resolution > 64:
        card.family, card.augment = "imagenet", "rrc_flip"
    return Source("synthetic", card, [f"class_{c}" for c in range(spec.num_classes)],
                  {s: SyntheticSplit(spec, s) for s in ("train", "val")},
                  info={"synthetic": vars(spec).copy()})


class _ArraysOnly(pickle.Unpickler):
    """Unpickles CIFAR batches (dicts of lists, bytes and numpy arrays) and nothing else,
    so a foreign pickle cannot run code."""

    _allowed = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._allowed:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        return super().find_class(module, name)


def _unpickle(data: bytes, where: str, fix: str) -> dict:
    try:
        out = _ArraysOnly(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # noqa: BLE001  (any unpickling failure means a damaged file)
        raise UserError(f"{where} is not a CIFAR pickle ({e}): {fix}") from None
    if not isinstance(out, dict):
        raise UserError(f"{where} is not a CIFAR batch: {fix}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in out.items()}


# The largest file each official archive holds (CIFAR-100's `train`: 50,000 x 3,072 bytes
# and labels, about 155 MB), with room to spare. A member claiming more is not the format,
# and reading it would take that much memory (a 1.8 MB tar.gz can inflate to gigabytes).
MAX_MEMBER_BYTES = 200 << 20


def _check_member_size(where: str, size: int, fix: str, cap: int = MAX_MEMBER_BYTES) -> None:
    if size > cap:
        raise UserError(f"{where} is {size:,} bytes, more than the format allows ({cap:,}): {fix}")


def _cifar_layout(dataset: str) -> tuple[str, dict[str, list[str]], str]:
    """(the archive's folder, its batch files by role: train, val, meta, the fix to name) of
    CIFAR-10 or -100."""
    ten = dataset == "cifar10"
    folder = "cifar-10-batches-py" if ten else "cifar-100-python"
    archive = f"{'cifar-10' if ten else 'cifar-100'}-python.tar.gz"
    files = ({"train": [f"data_batch_{i}" for i in range(1, 6)], "val": ["test_batch"], "meta": ["batches.meta"]}
             if ten else {"train": ["train"], "val": ["test"], "meta": ["meta"]})
    return folder, files, f"pass the official {archive} (python version) or its extracted {folder}/"


def _cifar_folder(path: Path, folder: str, names: list[str], fix: str) -> Path:
    """The extracted folder that holds every batch file."""
    base = path / folder if (path / folder).is_dir() else path
    missing = [n for n in names if not (base / n).is_file()]
    if missing:
        raise UserError(f"{base} has no {', '.join(missing)}: point --source at "
                        f"{folder}/ or the tarball ({fix})")
    for n in names:
        _check_member_size(str(base / n), (base / n).stat().st_size, fix)
    return base


def _cifar_files(path: Path, folder: str, names: list[str], fix: str) -> tuple[dict[str, bytes], list[Path]]:
    """The named batch files from a tarball or an (extracted) folder."""
    if path.is_dir():
        base = _cifar_folder(path, folder, names, fix)
        return {n: (base / n).read_bytes() for n in names}, []
    found: dict[str, bytes] = {}
    seen: list[str] = []
    try:
        with tarfile.open(path, "r:*") as tar:
            for m in tar:
                seen.append(m.name)
                n = m.name.rsplit("/", 1)[-1]
                if m.isfile() and n in names and m.name.startswith(folder + "/"):
                    _check_member_size(f"{path}:{m.name}", m.size, fix)
                    found[n] = tar.extractfile(m).read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise UserError(f"{path} is truncated or not a tar archive ({errors.first_line(e)}): {fix}") from None
    missing = [n for n in names if n not in found]
    if missing:
        top = sorted({s.split("/", 1)[0] for s in seen})[:3]
        holds = f"it holds {', '.join(top)}" if top else "it is empty"
        raise UserError(f"{path} has no {folder}/{missing[0]} ({holds}): {fix}")
    return found, [path]


def read_cifar(path: Path, card: Card, cfg: PrepareConfig) -> Source:
    ten = card.name == "cifar10"
    folder, layout, fix = _cifar_layout(card.name)
    train_names, val_names, (meta_name,) = layout["train"], layout["val"], layout["meta"]
    raw, files = _cifar_files(path, folder, [*train_names, *val_names, meta_name], fix)
    label_key = "labels" if ten else "fine_labels"

    def load(names: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        images, labels, coarse = [], [], []
        for n in names:
            batch = _unpickle(raw[n], f"{path}:{n}", fix)
            if "data" not in batch or label_key not in batch:
                raise UserError(f"{path}:{n} has no data/{label_key}: {fix}")
            data = np.asarray(batch["data"], dtype=np.uint8)
            if data.ndim != 2 or data.shape[1] != 3072:
                raise UserError(f"{path}:{n} holds {data.shape} arrays, not Nx3072: {fix}")
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(np.asarray(batch[label_key], dtype=np.int64))
            if not ten:
                coarse.append(np.asarray(batch.get("coarse_labels", []), dtype=np.int64))
        return (np.concatenate(images), np.concatenate(labels),
                None if ten else np.concatenate(coarse))

    tr_x, tr_y, tr_c = load(train_names)
    va_x, va_y, va_c = load(val_names)
    meta = _unpickle(raw[meta_name], f"{path}:{meta_name}", fix)
    names_key = "label_names" if ten else "fine_label_names"
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta.get(names_key, [])]
    if not classes:
        raise UserError(f"{path}:{meta_name} has no {names_key}: {fix}")
    info: dict[str, Any] = {}
    if not ten:
        info["coarse_classes"] = [c.decode() if isinstance(c, bytes) else str(c)
                                  for c in meta.get("coarse_label_names", [])]
        # fine -> coarse, which is a function: every fine class lies in one superclass.
        mapping = {int(f): int(c) for f, c in zip(tr_y, tr_c)}
        info["fine_to_coarse"] = [mapping.get(i) for i in range(len(classes))]
    for y, where in ((tr_y, "train"), (va_y, "test")):
        if len(y) and (y.min() < 0 or y.max() >= len(classes)):
            raise UserError(f"{path} {where} labels fall outside 0..{len(classes) - 1}: {fix}")
    return Source(card.name, card, classes,
                  {"train": ArraySplit(tr_x, tr_y, f"{path}:train"),
                   "val": ArraySplit(va_x, va_y, f"{path}:test")},
                  files=files, info=info)


def _mat_dims(path: Path) -> dict[str, tuple[int, ...]]:
    """Name -> dimensions of each array in a MATLAB 5 file, read from the headers alone: a
    compressed array is inflated only as far as its header, so a small file that inflates
    to gigabytes is measured before anything is loaded. ValueError when it is not MATLAB 5."""
    import struct

    out: dict[str, tuple[int, ...]] = {}
    with open(path, "rb") as f:
        head = f.read(128)
        if len(head) < 128 or head[126:128] not in (b"IM", b"MI"):
            raise ValueError("not a MATLAB 5 .mat file")
        e = "<" if head[126:128] == b"IM" else ">"

        def sub(body: bytes, pos: int) -> tuple[bytes, int]:
            word, nbytes = struct.unpack_from(e + "II", body, pos)
            if word >> 16:  # small data element: size and type share the first word
                return body[pos + 4: pos + 4 + (word >> 16)], pos + 8
            return body[pos + 8: pos + 8 + nbytes], pos + 8 + (nbytes + 7) // 8 * 8

        while len(tag := f.read(8)) == 8:
            kind, nbytes = struct.unpack(e + "II", tag)
            start = f.tell()
            if kind == 15:  # miCOMPRESSED: zlib around one miMATRIX element
                body = zlib.decompressobj().decompress(f.read(min(nbytes, 4096)), 1024)[8:]
            else:
                body = f.read(min(nbytes, 1024))
            f.seek(start + (nbytes if kind == 15 else (nbytes + 7) // 8 * 8))
            if kind not in (14, 15):
                continue
            _, pos = sub(body, 0)                 # array flags
            dims, pos = sub(body, pos)
            name, _ = sub(body, pos)
            out[name.decode("latin-1")] = struct.unpack(e + f"{len(dims) // 4}i", dims)
    return out


def _load_svhn_mat(path: Path, most: int) -> tuple[np.ndarray, np.ndarray]:
    """X and y of one SVHN file holding at most `most` images (the official count)."""
    from scipy.io import loadmat

    fix = f"pass the cropped-digits (format 2) {path.name} from http://ufldl.stanford.edu/housenumbers/"
    try:
        dims = _mat_dims(path)
    except Exception as e:  # noqa: BLE001  (struct.error, zlib.error, ValueError, OSError)
        raise UserError(f"{path} is not a readable .mat file ({' '.join(str(e).split())}): {fix}") from None
    declared = dims.get("X", ())
    if len(declared) == 4 and declared[3] > most:
        raise UserError(f"{path}: X claims {declared[3]:,} images, more than the official "
                        f"{most:,} (a corrupt or crafted file?): {fix}")
    try:
        mat = loadmat(path, variable_names=["X", "y"])
    except Exception as e:  # noqa: BLE001  (scipy raises several types for a bad file)
        raise UserError(f"{path} is not a readable .mat file ({' '.join(str(e).split())}): {fix}") from None
    missing = [k for k in ("X", "y") if k not in mat]
    if missing:
        raise UserError(f"{path} has no {' and '.join(repr(k) for k in missing)} array: {fix}")
    x, y = mat["X"], np.asarray(mat["y"]).reshape(-1)
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != len(y):
        raise UserError(f"{path}: X is {x.shape} for {len(y)} labels, not 32x32x3xN: {fix}")
    if len(y) and (y.min() < 1 or y.max() > 10):
        raise UserError(f"{path}: labels must be 1..10 (10 is digit 0): {fix}")
    return np.ascontiguousarray(x.transpose(3, 0, 1, 2), dtype=np.uint8), (y % 10).astype(np.int64)


def _svhn_files(path: Path, cfg: PrepareConfig) -> tuple[Path, Path, Path, bool]:
    """train_32x32.mat, test_32x32.mat, extra_32x32.mat, and whether extra goes into train."""
    base = path if path.is_dir() else path.parent
    train, test, extra = base / "train_32x32.mat", base / "test_32x32.mat", base / "extra_32x32.mat"
    for f in (train, test):
        if not f.is_file():
            raise UserError(f"{f} is missing: put the official train_32x32.mat and "
                            f"test_32x32.mat in {base} and pass that folder as --source")
    if cfg.extra and not extra.is_file():
        raise UserError(f"{extra} is missing: put it beside train_32x32.mat or pass --no-extra")
    return train, test, extra, extra.is_file() if cfg.extra is None else cfg.extra


def read_svhn(path: Path, card: Card, cfg: PrepareConfig) -> Source:
    train, test, extra, use_extra = _svhn_files(path, cfg)
    tr_x, tr_y = _load_svhn_mat(train, card.splits.train or 0)
    files = [train, test]
    info: dict[str, Any] = {"extra": use_extra, "train_sizes": {"train_32x32.mat": len(tr_y)}}
    if use_extra:
        ex_x, ex_y = _load_svhn_mat(extra, card.splits.extra or 0)
        info["train_sizes"]["extra_32x32.mat"] = len(ex_y)
        tr_x, tr_y = np.concatenate([tr_x, ex_x]), np.concatenate([tr_y, ex_y])
        files.append(extra)
        card.splits.train = (card.splits.train or 0) + (card.splits.extra or 0)
    va_x, va_y = _load_svhn_mat(test, card.splits.val or 0)
    return Source("svhn", card, list(card.classes),
                  {"train": ArraySplit(tr_x, tr_y, "train"), "val": ArraySplit(va_x, va_y, str(test))},
                  files=files, info=info)


def walk_images(folder: Path, left_out: list[Path] | None = None) -> Iterator[Path]:
    """The image files under `folder`, its sub-folders too (as torchvision's ImageFolder walks
    a class folder), as found; other files go to `left_out`. Links to folders are followed,
    each folder once, except a link back to `folder` or a folder above it: that would walk the
    other classes' images into this one."""
    seen: set[tuple[int, int]] = set()
    for above in Path(folder).resolve().parents:
        st = os.stat(above)
        seen.add((st.st_dev, st.st_ino))
    for top, dirs, files in os.walk(folder, followlinks=True):
        st = os.stat(top)
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        for name in files:
            path = Path(top) / name
            if path.suffix.lower() in IMAGE_SUFFIXES:
                yield path
            elif left_out is not None and path.is_file():
                left_out.append(path)


def _images_in(folder: Path, left_out: list[Path] | None = None) -> list[Path]:
    return sorted(walk_images(folder, left_out))


def _class_folders(root: Path, left_out: list[Path] | None = None) -> dict[str, list[Path]]:
    return {d.name: _images_in(d, left_out) for d in sorted(root.iterdir()) if d.is_dir()}


def _left_out_note(root: Path, left_out: list[Path]) -> list[str]:
    if not left_out:
        return []
    kinds = sorted({p.suffix.lower() or "(none)" for p in left_out})
    return [f"{len(left_out):,} file(s) under {root} were left out, their suffix not an image's "
            f"({', '.join(kinds[:8])}; e.g. {left_out[0]}); images are {', '.join(sorted(IMAGE_SUFFIXES))}"]


def hold_out(images: list[Path], folder: Path, fraction: float) -> tuple[list[Path], list[Path]]:
    """(train, val) of one class's images: val is the fraction * n images, rounded half up (at least
    one when there are two or more) whose paths relative to the class folder hash lowest
    (sha1): the same split on every machine and every run, whatever order the files list in;
    an image added or removed moves at most one other across."""
    if len(images) < 2:
        return list(images), []
    count = max(1, int(fraction * len(images) + 0.5))  # half up: 2.5 is 3
    key = {p: hashlib.sha1(p.relative_to(folder).as_posix().encode()).hexdigest() for p in images}
    val = set(sorted(images, key=lambda p: key[p])[:count])
    return [p for p in images if p not in val], [p for p in images if p in val]


IMAGEFOLDER_FIX = "lay it out as train/<class>/*.jpg and val/<class>/*.jpg"


def _imagefolder_roots(path: Path, cfg: PrepareConfig) -> tuple[Path, Path | None]:
    """(train's folder, val's folder), or (the folder val is held out of, None)."""
    if (path / "val").is_dir():
        if cfg.val_fraction is not None:
            raise UserError(f"{path} has its own val/: drop --val-fraction, or move val/ away to hold "
                            "out a share of train/ instead")
        if not (path / "train").is_dir():
            raise UserError(f"{path / 'train'} is missing: {IMAGEFOLDER_FIX}")
        return path / "train", path / "val"
    # torchvision's own layout (root/<class>/...), or train/ alone: val is held out.
    if cfg.val_fraction is None:
        raise UserError(f"{path} has no val/ folder: {IMAGEFOLDER_FIX}, or pass --val-fraction 0.1 "
                        "to hold out a tenth of each class as val")
    return (path / "train" if (path / "train").is_dir() else path), None


def read_imagefolder(path: Path, card: Card, cfg: PrepareConfig) -> Source:
    fix = IMAGEFOLDER_FIX
    left_out: list[Path] = []
    notes: list[str] = []
    train_root, val_root = _imagefolder_roots(path, cfg)
    if val_root is not None:
        train = _class_folders(train_root, left_out)
        val = _class_folders(val_root, left_out)
        roots = {"train": train_root, "val": val_root}
    else:
        root = train_root
        train, val = {}, {}
        for name, images in _class_folders(root, left_out).items():
            train[name], val[name] = hold_out(images, root / name, cfg.val_fraction)
        roots = {"train": root, "val": root}
        notes.append(f"val is held out of {root}: {cfg.val_fraction:g} of each class's images "
                     f"({sum(map(len, val.values())):,} of {sum(map(len, train.values())) + sum(map(len, val.values())):,}), "
                     "those whose paths hash lowest (sha1)")
    if not train:
        raise UserError(f"{roots['train']} has no class folders: {fix}")
    classes = sorted(train)
    extra = sorted(set(val) - set(train))
    if extra:
        raise UserError(f"{roots['val']} has classes that train/ lacks ({', '.join(extra[:5])}): "
                        "add them to train/ or remove them from val/")
    empty = [c for c in classes if not train[c]]
    if empty:
        raise UserError(f"{roots['train'] / empty[0]} has no images ({len(empty)} empty class "
                        "folders): add images or remove the folder")
    index = {c: i for i, c in enumerate(classes)}
    notes += [f"val has no images of class {c}" for c in classes if not val.get(c)][:10]
    notes += _left_out_note(path, left_out)
    info: dict[str, Any] = {"layout": "imagefolder"}
    if cfg.val_fraction is not None:
        info["val_held_out"] = {"fraction": cfg.val_fraction, "of": str(roots["train"]),
                                "rule": "per class, fraction * n images rounded half up (at least 1 of 2 or "
                                        "more) with the lowest sha1 of their path in the class folder"}
    return Source("imagefolder", card, classes, {
        "train": FileSplit([(str(p), index[c]) for c in classes for p in train[c]]),
        "val": FileSplit([(str(p), index[c]) for c in classes for p in val.get(c, [])]),
    }, notes=notes, info=info)


def _tar_members(path: Path, base: int = 0, fileobj: Any = None) -> list[tuple[str, int, int]]:
    """(name, absolute offset, size) of each file in an uncompressed tar, checked against EOF."""
    end = path.stat().st_size
    out = []
    try:
        with tarfile.open(path if fileobj is None else None, mode="r:", fileobj=fileobj) as t:
            for m in t:
                if m.isfile():
                    out.append((m.name, base + m.offset_data, m.size))
    except (tarfile.TarError, EOFError, OSError) as e:
        raise UserError(f"{path} is truncated or not an uncompressed tar ({e}): download it again") from None
    if out and out[-1][1] + out[-1][2] > end:
        raise UserError(f"{path} is truncated ({out[-1][0]} runs past the end): download it again")
    return out


def _imagenet_train_from_tar(path: Path) -> dict[str, list[TarMember]]:
    """ILSVRC2012_img_train.tar: a tar of per-synset tars, indexed without extracting."""
    classes: dict[str, list[TarMember]] = {}
    tar_path = str(path)
    with open(path, "rb") as f:
        for name, offset, size in _tar_members(path):
            if not name.endswith(".tar"):
                continue
            wnid = Path(name).stem
            window = _Window(f, offset, size)
            inner = _tar_members(path, offset, fileobj=window)
            classes[wnid] = sorted((TarMember(tar_path, o, s, f"{name}/{n}") for n, o, s in inner
                                    if Path(n).suffix.lower() in IMAGE_SUFFIXES), key=lambda m: m.name)
    if not classes:
        raise UserError(f"{path} holds no per-class .tar files: is it ILSVRC2012_img_train.tar?")
    return classes


class _Window(io.RawIOBase):
    """A read-only view of [offset, offset+size) of an open file, for tarfile."""

    def __init__(self, f: Any, offset: int, size: int):
        self.f, self.offset, self.size, self.pos = f, offset, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = {0: pos, 1: self.pos + pos, 2: self.size + pos}[whence]
        return self.pos

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), self.size - self.pos))
        self.f.seek(self.offset + self.pos)
        data = self.f.read(n)
        b[: len(data)] = data
        self.pos += len(data)
        return len(data)


_VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})", re.IGNORECASE)


# meta.mat and the ground truth are a few hundred kB each.
_MAX_DEVKIT_BYTES = 16 << 20


def _devkit(path: Path) -> tuple[list[str], dict[str, str]]:
    """(val synsets in image-number order, wnid -> words) from the ILSVRC2012 devkit."""
    from scipy.io import loadmat

    fix = f"{path} must be the official ILSVRC2012_devkit_t12.tar.gz (or its extracted folder)"
    names = ("data/meta.mat", "data/ILSVRC2012_validation_ground_truth.txt")
    found: dict[str, bytes] = {}
    if path.is_dir():
        for n in names:
            p = path / n
            if p.is_file():
                _check_member_size(str(p), p.stat().st_size, fix, _MAX_DEVKIT_BYTES)
                found[n] = p.read_bytes()
    else:
        try:
            with tarfile.open(path, "r:*") as t:
                for m in t:
                    for n in names:
                        if m.isfile() and m.name.endswith(n):
                            _check_member_size(f"{path}:{m.name}", m.size, fix, _MAX_DEVKIT_BYTES)
                            found[n] = t.extractfile(m).read()
        except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
            raise UserError(f"{path} is truncated or not a tar archive ({errors.first_line(e)}): {fix}") from None
    missing = [n for n in names if n not in found]
    if missing:
        raise UserError(f"{path} has no {missing[0]}: {fix}")
    try:
        synsets = loadmat(io.BytesIO(found[names[0]]), squeeze_me=True)["synsets"]
        rows = [(int(s["ILSVRC2012_ID"]), str(s["WNID"]), str(s["words"]), int(s["num_children"]))
                for s in synsets]
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{path}: data/meta.mat has no readable synsets table ({e}): {fix}") from None
    id_to_wnid = {i: w for i, w, _, kids in rows if kids == 0}
    words = {w: name for _, w, name, kids in rows if kids == 0}
    try:
        gt = [id_to_wnid[int(line)] for line in found[names[1]].decode().split()]
    except (KeyError, ValueError) as e:
        raise UserError(f"{path}: ground truth names an unknown class id {e}: {fix}") from None
    return gt, words


def _first(root: Path, *candidates: str) -> Path | None:
    for c in candidates:
        if (root / c).exists():
            return root / c
    return None


def _imagenet_train(root: Path) -> tuple[Path | None, Path | None]:
    """(train/ with a folder per synset, as ours or Kaggle's layout has it; else None),
    (ILSVRC2012_img_train.tar, or None): one of them is there."""
    kaggle = root / "ILSVRC" / "Data" / "CLS-LOC"
    train_dir = _first(root, "train") or _first(kaggle, "train")
    train_tar = _first(root, "ILSVRC2012_img_train.tar")
    if not (train_dir is not None and train_dir.is_dir()) and train_tar is None:
        raise UserError(f"no ImageNet train data in {root}: expected train/ with one folder per "
                        "synset, or ILSVRC2012_img_train.tar")
    return (train_dir if train_dir is not None and train_dir.is_dir() else None), train_tar


def read_imagenet(path: Path, card: Card, cfg: PrepareConfig) -> Source:
    root = path
    kaggle = root / "ILSVRC" / "Data" / "CLS-LOC"
    train_dir, train_tar = _imagenet_train(root)
    val_dir = _first(root, "val") or _first(kaggle, "val")
    val_tar = _first(root, "ILSVRC2012_img_val.tar")
    devkit = _first(root, "ILSVRC2012_devkit_t12.tar.gz", "ILSVRC2012_devkit_t12")
    loc_csv = _first(root, "LOC_val_solution.csv")
    loc_names = _first(root, "LOC_synset_mapping.txt")
    files: list[Path] = []
    info: dict[str, Any] = {}

    if train_dir is not None:
        train = {k: [str(p) for p in v] for k, v in _class_folders(train_dir).items()}
        info["train_layout"] = f"folders under {train_dir}"
    else:
        train = _imagenet_train_from_tar(train_tar)
        files.append(train_tar)
        info["train_layout"] = f"tar of tars {train_tar}"
    if not train:
        raise UserError(f"{train_dir} has no synset folders: expected train/n01440764/... ")
    empty = [w for w, v in train.items() if not v]
    if empty:
        raise UserError(f"train class {empty[0]} has no images ({len(empty)} empty): "
                        "restore its images from ILSVRC2012_img_train.tar")
    classes = sorted(train)
    index = {w: i for i, w in enumerate(classes)}

    gt: dict[str, str] | None = None
    words: dict[str, str] = {}
    if devkit is not None:
        ordered, words = _devkit(devkit)
        gt = {f"ILSVRC2012_val_{i + 1:08d}": w for i, w in enumerate(ordered)}
        info["val_ground_truth"] = str(devkit)
        if devkit.is_file():
            files.append(devkit)
    elif loc_csv is not None:
        gt = {}
        try:
            with open(loc_csv, newline="") as f:
                for row in csv.DictReader(f):
                    gt[row["ImageId"]] = row["PredictionString"].split()[0]
        except (KeyError, IndexError, csv.Error, UnicodeDecodeError) as e:
            raise UserError(f"{loc_csv} is not Kaggle's LOC_val_solution.csv (ImageId,PredictionString): "
                            f"bad row ({e})") from None
        info["val_ground_truth"] = str(loc_csv)
        files.append(loc_csv)
    if loc_names is not None and not words:
        try:
            text = loc_names.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{loc_names} is not UTF-8 text (byte {e.start}): use Kaggle's original "
                            "LOC_synset_mapping.txt") from None
        for line in text.splitlines():
            if line.strip():
                w, _, name = line.partition(" ")
                words[w] = name.strip()

    val_entries: list[tuple[str | TarMember, str]] = []
    if val_dir is not None and val_dir.is_dir() and any(d.is_dir() for d in val_dir.iterdir()):
        val_classes = _class_folders(val_dir)
        unknown = sorted(set(val_classes) - set(train))
        if unknown:
            raise UserError(f"missing classes: {val_dir} has {', '.join(unknown[:3])} "
                            f"({len(unknown)} in all) that train/ lacks: restore those synset folders")
        val_entries = [(str(p), w) for w in sorted(val_classes) for p in val_classes[w]]
        info["val_layout"] = f"sorted into synset folders under {val_dir}"
    else:
        if val_dir is not None and val_dir.is_dir():
            flat: list[tuple[str | TarMember, str]] = [(str(p), p.stem) for p in _images_in(val_dir)]
            where = val_dir
        elif val_tar is not None:
            flat = [(TarMember(str(val_tar), o, s, n), Path(n).stem) for n, o, s in _tar_members(val_tar)
                    if Path(n).suffix.lower() in IMAGE_SUFFIXES]
            where = val_tar
            files.append(val_tar)
        else:
            raise UserError(f"no ImageNet val data in {root}: expected val/ (flat or in synset "
                            "folders) or ILSVRC2012_img_val.tar")
        if gt is None:
            raise UserError(f"{where} is flat ({len(flat)} images, no synset folders) and {root} has "
                            "no ground truth: add ILSVRC2012_devkit_t12.tar.gz or "
                            "LOC_val_solution.csv there, or sort val/ into synset folders")
        for entry, stem in flat:
            m = _VAL_NAME.search(stem)
            key = m.group(0) if m else stem
            if key not in gt:
                raise UserError(f"val image {entry} has no ground-truth entry in "
                                f"{info['val_ground_truth']}: is that the ILSVRC2012 ground truth?")
            val_entries.append((entry, gt[key]))
        info["val_layout"] = f"flat {where}"
    val_classes_seen = {w for _, w in val_entries}
    unknown = sorted(val_classes_seen - set(train))
    if unknown:
        raise UserError(f"missing classes: the val ground truth names {', '.join(unknown[:3])} "
                        f"({len(unknown)} in all) that train has no folder for: restore them")
    if words:
        absent = sorted(set(words) - set(train))
        if absent:
            raise UserError(f"missing classes: train has {len(train)} of the {len(words)} synsets "
                            f"in the class list, without {', '.join(absent[:3])}: restore them, or "
                            "prepare a subset with `prepare imagefolder`")
    lacking = sorted(set(train) - val_classes_seen)
    notes = [f"val has no images of {len(lacking)} classes, e.g. {', '.join(lacking[:3])}"] if lacking else []
    names = [words.get(w, w) for w in classes]
    info["synsets"] = classes
    return Source("imagenet", card, names, {
        "train": FileSplit([(e, index[w]) for w in classes for e in train[w]]),
        "val": FileSplit([(e, index[w]) for e, w in val_entries]),
    }, files=files, info=info, notes=notes)
