"""A trained net put to use: load it from a checkpoint with what it needs to see an image
(classes, mean/std, resolution, crop), and classify image files, folders or a store.

    net = load("runs/r1")                               # a run folder, epoch folder or .pt
    rows = predict_paths(net, ["cat.jpg", "photos/"], top_k=5)

The eval transform is the FFCV val pipeline's, in numpy and OpenCV: the centre square of
side ratio x min(h, w) (1.0 for small-image stores, 224/256 otherwise), resized with
INTER_AREA to the eval resolution, normalised by the store's mean/std. A test holds it
equal to the FFCV loader's tensors.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from .errors import UserError

EVAL_CROP_RATIO = 224 / 256


@dataclass
class Preprocess:
    mean: list[float]
    std: list[float]
    resolution: int
    crop_ratio: float
    channels: int = 3

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "input_size": self.resolution,
                "crop_ratio": self.crop_ratio, "channels": self.channels,
                "layout": "NCHW float32, RGB, (x/255 - mean) / std"}


@dataclass
class Trained:
    model: Any            # torch.nn.Module in eval mode
    spec: Any             # DenseNetSpec
    classes: list[str]
    preprocess: Preprocess
    checkpoint: str
    sha256: str
    epoch: int
    config: dict[str, Any]
    # "ema" (the moving average of the weights) or "raw".
    weights: str = "raw"


WEIGHTS = ("auto", "ema", "raw")


def pick_weights(state: dict[str, Any], weights: str = "auto") -> tuple[dict[str, Any], str]:
    """(state dict, "ema"|"raw") of a checkpoint: its weights' moving average when it has one
    and `weights` is auto or ema; the raw weights otherwise."""
    if weights not in WEIGHTS:
        raise UserError(f"unknown --weights {weights!r}: use one of {', '.join(WEIGHTS)}")
    if weights != "raw" and "model_ema" in state:
        return state["model_ema"]["weights"], "ema"
    if weights == "ema":
        raise UserError("--weights ema: this checkpoint has no moving average of its weights (it was "
                        "trained without --ema): use --weights raw")
    return state["model"], "raw"


def _preprocess(state: dict[str, Any]) -> Preprocess:
    """From the store record in the checkpoint; older checkpoints lack mean/std and take
    them from their dataset's card."""
    from .data.cards import load_card

    store = state.get("store", {})
    data = state.get("config", {}).get("data", {})
    if "mean" in store:
        mean, std = store["mean"], store["std"]
        stored_eval, family = store["eval_resolution"], store["family"]
    else:
        card = load_card(store.get("dataset") or "imagefolder")
        mean, std, stored_eval, family = list(card.mean), list(card.std), card.eval_resolution, card.family
    res = data.get("eval_resolution") or data.get("resolution") or stored_eval
    return Preprocess(list(mean), list(std), int(res), 1.0 if family == "small" else EVAL_CROP_RATIO)


def load(checkpoint_path: str | Path, weights: str = "auto") -> Trained:
    """The net of a densenet-pipe checkpoint, in eval mode on the CPU (`pick_weights`)."""
    from .models.densenet import build
    from .models.spec import DenseNetSpec
    from .storage import read_bytes
    from .train import checkpoint

    file = checkpoint.find(checkpoint_path)
    state = checkpoint.load(file)
    spec = DenseNetSpec(**{**state["spec"], "block_config": tuple(state["spec"]["block_config"])})
    model = build(spec)
    chosen, kind = pick_weights(state, weights)
    model.load_state_dict(chosen)
    model.eval()
    classes = list(state.get("store", {}).get("classes") or [str(i) for i in range(spec.num_classes)])
    return Trained(model, spec, classes, _preprocess(state), file,
                   hashlib.sha256(read_bytes(file)).hexdigest(), int(state.get("epoch", 0)),
                   dict(state.get("config") or {}), kind)


def eval_transform(image: np.ndarray, pre: Preprocess) -> np.ndarray:
    """HxWx3 uint8 RGB -> 3xRxR float32, as the FFCV val pipeline makes it."""
    import cv2

    h, w = image.shape[:2]
    side = int(pre.crop_ratio * min(h, w))
    top, left = (h - side) // 2, (w - side) // 2
    crop = np.ascontiguousarray(image[top:top + side, left:left + side])
    resized = cv2.resize(crop, (pre.resolution, pre.resolution), interpolation=cv2.INTER_AREA)
    mean = np.asarray(pre.mean, dtype=np.float64) * 255
    std = np.asarray(pre.std, dtype=np.float64) * 255
    return ((resized - mean) / std).astype(np.float32).transpose(2, 0, 1)


def _images_in(folder: Path) -> Iterator[Path]:
    from .data.readers import walk_images

    return walk_images(folder)


def _no_images(folder: Path) -> UserError:
    from .data.readers import IMAGE_SUFFIXES

    return UserError(f"{folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}): "
                     "pass image files or a folder of them")


def check_folder(folder: Path) -> None:
    """A folder to classify holds at least one image (stops at the first)."""
    if next(_images_in(folder), None) is None:
        raise _no_images(folder)


def image_files(inputs: Iterable[str | Path]) -> list[Path]:
    """Files as given, folders walked (sorted) for image files; a missing input is a UserError."""
    out: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(_images_in(path))
            if not found:
                raise _no_images(path)
            out += found
        elif path.is_file():
            out.append(path)
        else:
            raise UserError(f"{path} does not exist: pass image files, folders of images or a store")
    return out


def _rows(net: Trained, logits, names: list[str], top_k: int) -> list[dict[str, Any]]:
    import torch

    probs = torch.softmax(logits.float(), dim=1)
    p, idx = probs.topk(min(top_k, probs.shape[1]), dim=1)
    return [{"input": name, "error": None,
             "top": [{"class": net.classes[int(i)], "index": int(i), "probability": float(q)}
                     for q, i in zip(pr, ix)]}
            for name, pr, ix in zip(names, p, idx)]


def predict_paths(net: Trained, paths: list[Path], top_k: int = 5, batch_size: int = 64) -> list[dict[str, Any]]:
    """One row per image, in order; an image that does not decode is a row with its error."""
    import torch

    from .data.readers import MAX_IMAGE_BYTES, decode_image

    rows: list[dict[str, Any]] = []
    for start in range(0, len(paths), batch_size):
        batch, names, slots = [], [], []
        chunk = paths[start:start + batch_size]
        out: list[dict[str, Any] | None] = [None] * len(chunk)
        for j, path in enumerate(chunk):
            try:
                if path.stat().st_size > MAX_IMAGE_BYTES:
                    raise ValueError(f"over the {MAX_IMAGE_BYTES:,}-byte cap for one image")
                batch.append(eval_transform(decode_image(path.read_bytes()), net.preprocess))
                names.append(str(path))
                slots.append(j)
            except (ValueError, OSError) as e:
                out[j] = {"input": str(path), "error": " ".join(str(e).split())[:200], "top": []}
        if batch:
            device = next(net.model.parameters()).device
            with torch.no_grad():
                logits = net.model(torch.from_numpy(np.stack(batch)).to(device))
            for j, row in zip(slots, _rows(net, logits, names, top_k)):
                out[j] = row
        for path, row in zip(chunk, out):
            # torchvision's ImageFolder layout: a folder named after one of the net's classes
            # labels the images in it, so a held-out folder is scored as a store would be.
            if row is not None and path.parent.name in net.classes:
                row["label"] = path.parent.name
        rows += [r for r in out if r is not None]
    return rows


def scored(rows: list[dict[str, Any]]) -> str | None:
    """"top-1 error E on N labelled image(s)" over the rows with a label and no error."""
    labelled = [r for r in rows if r.get("label") and not r["error"] and r["top"]]
    if not labelled:
        return None
    wrong = sum(1 for r in labelled if r["top"][0]["class"] != r["label"])
    return f"top-1 error {wrong / len(labelled):.4f} on {len(labelled):,} labelled image(s)"


def predict_store(net: Trained, store: str | Path, split: str = "val", top_k: int = 5,
                  batch_size: int = 64, indices: range | None = None, digest: str = "",
                  say=lambda _line: None) -> list[dict[str, Any]]:
    """One row per image of a store's split (named `STORE/split#INDEX`), with its label;
    `indices` picks a contiguous part of the split. A store in object storage (or with
    --stage always) is read from this node's staged copy; `digest` is its manifest's sha256
    when the caller checked it already."""
    import dataclasses

    import torch

    from .config import DataSection
    from .data.loaders import make_loader
    from .data.staging import display, local_copy, locate
    from .data.store import open_store
    from . import runs

    if not digest:
        _, digest = locate(str(store))
    data = dataclasses.replace(DataSection(), store=str(store), loader_workers=1,
                               eval_resolution=net.preprocess.resolution)
    readable = local_copy(str(store), digest, data, say)
    manifest = open_store(readable, verify=False)
    runs.check_checkpoint_classes(net.spec.num_classes, net.classes, manifest.classes, display(store))
    if split not in ("train", "val"):
        raise UserError(f"--split must be train or val, got {split!r}")
    indices = indices if indices is not None else range(manifest.splits[split].count)
    store = display(store)
    loader, _ = make_loader(readable, split, batch_size, data, channels_last=False,
                            crop_ratio=net.preprocess.crop_ratio, indices=np.asarray(indices),
                            verify=False, training=False)
    device = next(net.model.parameters()).device
    rows: list[dict[str, Any]] = []
    with torch.no_grad():
        for images, labels in loader:
            names = [f"{store}/{split}#{indices[len(rows) + i]}" for i in range(len(labels))]
            batch = _rows(net, net.model(images.to(device)), names, top_k)
            for row, label in zip(batch, labels.tolist()):
                row["label"] = manifest.classes[int(label)]
            rows += batch
    return rows


ROW_FORMATS = ("table", "json", "csv")


def row_format(fmt: str | None, out: str | Path | None) -> str:
    """--format, or else the one --out's suffix names (rows.csv: CSV), or else a table."""
    if fmt is not None:
        return fmt
    suffix = Path(out).suffix.lower().lstrip(".") if out is not None else ""
    return suffix if suffix in ("json", "csv") else "table"


def write_rows(out: Path, text: str) -> None:
    """Readers see the old file or the whole new one."""
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text + "\n")
    tmp.replace(out)


def render(rows: list[dict[str, Any]], fmt: str, top_k: int) -> str:
    """Rows as a plain table, JSON or CSV (input, label when known, top-k classes and
    probabilities, error)."""
    import csv
    import io
    import json

    if fmt == "json":
        return json.dumps(rows, indent=2)
    headers = ["input", "label"] if any("label" in r for r in rows) else ["input"]
    for k in range(1, top_k + 1):
        headers += [f"top{k}", f"p{k}"]
    headers.append("error")
    table = []
    for r in rows:
        line = [r["input"]] + ([r.get("label", "")] if "label" in headers else [])
        for k in range(top_k):
            top = r["top"][k] if k < len(r["top"]) else None
            line += [top["class"], f"{top['probability']:.4f}"] if top else ["", ""]
        table.append(line + [r["error"] or ""])
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(headers)
        writer.writerows(table)
        return buffer.getvalue().rstrip("\n")
    from .tables import format_table

    return format_table(headers, table)
