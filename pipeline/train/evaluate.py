"""Evaluate a checkpoint on a store's val split: top-1/top-5 error, optionally with TTA.

    result = evaluate("runs/r1/epoch-0300", "stores/cifar10", tta="flip")
    result["top1_error"], result["top5_error"]

TTA: `flip` averages the softmax of the image and its mirror. `10crop` is the paper's
ImageNet protocol: the four corner crops and the centre crop, each also mirrored. For
ImageNet-like stores the crops come from the centre square of the image resized to
eval_resolution / (224/256) (256 px for 224 crops); for 32x32 stores from the image
padded by 4 black pixels, as the training translation pads it (FFCV's RandomTranslate fills
black before the image is normalised: normalised, black is -mean/std, not 0).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from .. import runs
from ..config import Config
from ..errors import UserError
from ..models.densenet import build
from ..models.spec import DenseNetSpec
from . import amp, checkpoint
from .metrics import Tally

TTA = ("none", "flip", "10crop")


def ten_crops(images: torch.Tensor, size: int) -> list[torch.Tensor]:
    h, w = images.shape[-2:]
    corners = [(0, 0), (0, w - size), (h - size, 0), (h - size, w - size),
               ((h - size) // 2, (w - size) // 2)]
    crops = [images[..., y:y + size, x:x + size] for y, x in corners]
    return crops + [c.flip(-1) for c in crops]


def pad_as_translated(images: torch.Tensor, pad: int, mean: list[float], std: list[float]) -> torch.Tensor:
    """Normalised NCHW images padded by `pad` pixels of black, normalised as they are."""
    n, c, h, w = images.shape
    black = torch.tensor([-m / s for m, s in zip(mean, std)], dtype=images.dtype, device=images.device)
    out = black.view(1, c, 1, 1).expand(n, c, h + 2 * pad, w + 2 * pad).clone()
    out[..., pad:pad + h, pad:pad + w] = images
    return out


def trained_store(state: dict[str, Any], checkpoint_path: str) -> str:
    """The store a checkpoint's net trained on, as the training job saw it: `evaluate`'s
    default --data."""
    from .. import storage

    path = (state.get("store") or {}).get("path")
    if not path:
        raise UserError(f"{storage.display(checkpoint_path)} does not record the store it trained on: "
                        "pass --data STORE")
    if not storage.is_file(storage.join(path, "manifest.json")):
        raise UserError(f"the net trained on {storage.display(path)}, which is not there now (moved or "
                        "removed): pass --data STORE with the same classes")
    return path


def evaluate(checkpoint_path: str | Path, store: str | Path, *, tta: str = "none",
             batch_size: int = 128, loader_workers: int = 2, amp_mode: str = "auto",
             stage: str = "auto", gpu: bool = False, weights: str = "auto",
             say=print) -> dict[str, Any]:
    from ..data.loaders import EVAL_CROP_RATIO, TRANSLATE_PADDING, make_loader
    from ..data.staging import display, local_copy, locate

    if tta not in TTA:
        raise UserError(f"unknown --tta {tta!r}: use one of {', '.join(TTA)}")
    state = checkpoint.load(checkpoint_path)
    cfg = Config.from_dict(state["config"])
    spec = DenseNetSpec(**{**state["spec"], "block_config": tuple(state["spec"]["block_config"])})
    manifest, digest = locate(str(store))
    runs.check_checkpoint_classes(spec.num_classes, state.get("store", {}).get("classes"),
                                  manifest.classes, str(store))
    trained_on = state.get("store", {})
    other_store = bool(trained_on.get("manifest_sha256")) and trained_on["manifest_sha256"] != digest
    if other_store:
        # Legitimate (a new test set with the same classes), but never by accident unsaid.
        say(f"note: the net trained on {trained_on.get('path') or 'another store'}; {display(str(store))} "
            "is another store with the same classes (its manifest differs)")
    from ..infer import pick_weights

    model = build(spec)
    chosen, kind = pick_weights(state, weights)
    model.load_state_dict(chosen)
    model.eval()
    if gpu and not torch.cuda.is_available():
        raise UserError("--gpu: this node has no CUDA GPU that torch can use: evaluate on the CPU "
                        "(no --gpu) or on a cluster with GPUs")
    device = torch.device("cuda" if gpu else "cpu")
    model.to(device)
    dtype = amp.resolve_dtype(amp_mode, device)

    data = dataclasses.replace(cfg.data, loader_workers=loader_workers, store=str(store), stage=stage)
    readable = local_copy(str(store), digest, data, say)
    crop = data.eval_resolution or data.resolution or manifest.eval_resolution
    ratio = None
    if tta == "10crop" and manifest.family != "small":
        data = dataclasses.replace(data, eval_resolution=round(crop / EVAL_CROP_RATIO))
        ratio = 1.0
    threads = torch.get_num_threads()
    loader, _ = make_loader(readable, "val", batch_size, data, distributed=False, channels_last=False,
                            crop_ratio=ratio, verify=False)
    torch.set_num_threads(threads)

    tally = Tally()
    t0 = time.perf_counter()
    with torch.no_grad(), amp.autocast(device, dtype):
        for images, labels in loader:
            images = images.to(device, non_blocking=True)
            if tta == "none":
                probs = model(images).float().softmax(1)
            elif tta == "flip":
                probs = (model(images).float().softmax(1) + model(images.flip(-1)).float().softmax(1)) / 2
            else:
                if manifest.family == "small":
                    images = pad_as_translated(images, TRANSLATE_PADDING, manifest.mean, manifest.std)
                views = ten_crops(images, crop)
                probs = sum(model(v.contiguous()).float().softmax(1) for v in views) / len(views)
            tally.add(probs, labels.to(device))
    return {
        "checkpoint": checkpoint.find(checkpoint_path),
        "store": display(str(store)), "dataset": manifest.dataset, "tta": tta, "images": int(tally.n),
        "epoch": state["epoch"], "model": spec.name, "weights": kind, "num_classes": spec.num_classes,
        "top1_error": tally.top1_error, "top5_error": tally.top5_error,
        "store_trained_on": not other_store,
        "seconds": time.perf_counter() - t0,
    }
