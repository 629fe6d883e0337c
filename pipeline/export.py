"""A trained net as a file other tools load: safetensors, TorchScript or ONNX, plus a JSON
sidecar, each checked against the PyTorch net before it is published.

    result = export("runs/r1", "onnx", Path("r1.onnx"))   # r1.onnx + r1.onnx.json

The model file holds weights only (safetensors) or the traced graph (TorchScript, ONNX with
a dynamic batch axis). The sidecar names the architecture (the spec that rebuilds it),
the classes, the preprocessing and the source checkpoint's sha256. Every export runs the
exported file with its ecosystem's own reader (safetensors into our net, `torch.jit.load`,
onnxruntime) on a fixed batch; a max abs difference to the PyTorch logits over 1e-4 fails
the export and nothing is left at the destination.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from . import storage
from .errors import UserError

FORMATS = {"safetensors": ".safetensors", "torchscript": ".pt", "onnx": ".onnx"}
TOLERANCE = 1e-4
PARITY_BATCH = 4


def _write_model(net, fmt: str, target: Path, example) -> None:
    import torch

    if fmt == "safetensors":
        from safetensors.torch import save_file

        state = {k: v.contiguous() for k, v in net.model.state_dict().items()}
        save_file(state, str(target), metadata={"format": "pt", "architecture": json.dumps(net.spec.to_dict())})
    elif fmt == "torchscript":
        import warnings

        # torch marks TorchScript deprecated; it is still what C++ and older servers load.
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.save(torch.jit.trace(net.model, example), str(target))
    else:
        import logging
        import warnings

        batch = torch.export.Dim("batch", min=1)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            logging.getLogger("torch.onnx").setLevel(logging.ERROR)
            program = torch.onnx.export(net.model, (example,), dynamo=True, input_names=["image"],
                                        output_names=["logits"], dynamic_shapes=({0: batch},),
                                        verbose=False)
            program.save(str(target))


def run_exported(fmt: str, path: Path, images: np.ndarray, spec=None) -> np.ndarray:
    """Logits of an exported file on `images` (N x 3 x R x R float32), read back the way its
    ecosystem reads it."""
    import torch

    if fmt == "safetensors":
        from safetensors.torch import load_file

        from .models.densenet import build

        model = build(spec)
        model.load_state_dict(load_file(str(path)))
        model.eval()
        with torch.no_grad():
            return model(torch.from_numpy(images)).numpy()
    if fmt == "torchscript":
        import warnings

        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(str(path))(torch.from_numpy(images)).numpy()
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images})[0]


def default_out(checkpoint_file: str, fmt: str) -> Path:
    """Beside the checkpoint: RUN-epoch-NNNN.<ext> in the checkpoint's folder, when local."""

    folder = storage.parent(checkpoint_file)
    name = f"{storage.name(storage.parent(folder))}-{storage.name(folder)}{FORMATS[fmt]}"
    if storage.is_uri(folder):
        return Path(name)
    return Path(folder) / name


def export(checkpoint_path: str | Path, fmt: str, out: Path | None = None, *, force: bool = False,
           wandb_mode: str | None = None, registry: str | None = None, weights: str = "auto",
           log=print) -> dict[str, Any]:
    """Export, check parity, then publish `out` and `out.json`; returns the sidecar.

    With W&B (`wandb_mode`, default the training run's `tracking.wandb`) the two files are
    logged as a `model` artifact by a run of job type `export` in the training run's group;
    online, `registry` links it into that W&B registry collection."""
    import torch

    from . import infer

    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
    net = infer.load(checkpoint_path, weights)
    out = Path(out or default_out(net.checkpoint, fmt)).expanduser().absolute()
    if out.is_dir():
        # As `cp` does: into the folder, under the name it would have beside the checkpoint.
        out = out / default_out(net.checkpoint, fmt).name
    sidecar_path = out.with_name(out.name + ".json")
    for path in (out, sidecar_path):
        storage.check_out_file(path, "--out", force=force)
    res = net.preprocess.resolution
    rng = np.random.default_rng(0)
    images = rng.standard_normal((PARITY_BATCH, 3, res, res)).astype(np.float32)
    with torch.no_grad():
        reference = net.model(torch.from_numpy(images)).numpy()
    with tempfile.TemporaryDirectory(prefix=".export-", dir=out.parent) as tmp:
        staged = Path(tmp) / out.name
        _write_model(net, fmt, staged, torch.from_numpy(images[:2]))
        got = run_exported(fmt, staged, images, net.spec)
        diff = float(np.abs(got - reference).max())
        log(f"parity on a fixed batch of {PARITY_BATCH}: max abs difference {diff:.2e} "
            f"(limit {TOLERANCE:g})")
        if not diff <= TOLERANCE:
            raise UserError(f"the {fmt} export differs from the PyTorch net by {diff:.2e} (> {TOLERANCE:g}): "
                            "nothing was written; report this with the checkpoint")
        sidecar = {
            "format": fmt, "file": out.name, "architecture": net.spec.to_dict(),
            "classes": net.classes, "preprocess": net.preprocess.to_dict(),
            "source": {"checkpoint": net.checkpoint, "sha256": net.sha256, "epoch": net.epoch,
                       "weights": net.weights},
            "parity": {"batch": PARITY_BATCH, "max_abs_difference": diff, "tolerance": TOLERANCE},
            "inputs": {"name": "image", "shape": ["batch", 3, res, res]},
            "outputs": {"name": "logits", "shape": ["batch", len(net.classes)]},
        }
        (Path(tmp) / sidecar_path.name).write_text(json.dumps(sidecar, indent=2) + "\n")
        # The model file first, the sidecar last: a sidecar says its model file is whole.
        os.replace(staged, out)
        os.replace(Path(tmp) / sidecar_path.name, sidecar_path)
    sidecar["path"] = str(out)
    _track(net, sidecar, out, sidecar_path, wandb_mode, registry, log)
    return sidecar


def _track(net, sidecar: dict[str, Any], out: Path, sidecar_path: Path, wandb_mode: str | None,
           registry: str | None, log) -> None:
    import time

    from .config import Config, apply_overrides
    from .tracking import Tracker, resolve_mode

    cfg = Config.from_dict(net.config) if net.config else Config()
    if wandb_mode:
        cfg = apply_overrides(cfg, {"tracking.wandb": wandb_mode})
    mode = resolve_mode(cfg.tracking.wandb)
    if mode == "disabled":
        return
    if registry and mode != "online":
        log(f"warning: --registry {registry} needs W&B online (an API key); the export is logged "
            "offline, unlinked: `wandb sync` it, then link it in the W&B app")
        registry = None

    run = cfg.cluster.run_name or storage.name(storage.parent(storage.parent(net.checkpoint)))
    tracker = Tracker.start(cfg, run_id=f"{run}-export-{sidecar['format']}-{time.strftime('%Y%m%d-%H%M%S')}",
                            run_dir=out.parent, job_type="export", group=run, announce=False)
    if not tracker.active:
        return
    tracker.log_export([out, sidecar_path], f"{run}-{sidecar['format']}", ["latest"],
                       {k: v for k, v in sidecar.items() if k != "path"}, registry)
    tracker.summary({"export_format": sidecar["format"], "parity_max_abs_difference":
                     sidecar["parity"]["max_abs_difference"], "source_sha256": net.sha256})
    where = tracker.where
    tracker.finish()
    log(f"W&B: logged as a model artifact{' in ' + where if where else ''}"
        + (f", linked to the registry collection {registry}" if registry else ""))
