"""`densenet-pipe predict` and `export`: a trained net put to use, in this process.

Both read one checkpoint and a few files; neither needs a cluster, so neither is a Ray job
(see docs/decisions.md).
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import UserError
from . import app, output
from .options import Address, Detach, Epoch, Weights, WeightsChoice, at_epoch

CheckpointArg = Annotated[str, typer.Argument(
    metavar="CHECKPOINT", help="A run folder (its newest checkpoint), an epoch-NNNN folder or its checkpoint.pt.")]


class RowFormat(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"


class ExportFormat(str, Enum):
    safetensors = "safetensors"
    torchscript = "torchscript"
    onnx = "onnx"


@app.command("predict")
def predict(
    checkpoint: CheckpointArg,
    inputs: Annotated[list[str], typer.Argument(metavar="INPUT...", help="Image files, folders of images, or a store (its --split).")],
    top_k: Annotated[int, typer.Option("--top-k", help="Classes per image, most probable first.")] = 5,
    fmt: Annotated[Optional[RowFormat], typer.Option("--format", help="table, json or csv (default: --out's suffix, .csv or .json; else table).")] = None,
    out_given: Annotated[Optional[str], typer.Option("--out", help="Write the rows here (a cluster job's default: predictions-TIME.FORMAT).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out file.")] = False,
    split: Annotated[Optional[str], typer.Option(help="With a store: the split to classify (default val; a store's train.beton or val.beton given as INPUT names it).")] = None,
    in_process: Annotated[bool, typer.Option("--in-process", help="Run here even for folders and stores, not as a cluster job.")] = False,
    actors: Annotated[int, typer.Option(help="Cluster job: Ray Data actors holding the model.")] = 2,
    gpu: Annotated[bool, typer.Option("--gpu/--cpu", help="Cluster job: one GPU per actor.")] = False,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 64,
    weights: Weights = WeightsChoice.auto,
    epoch: Epoch = None,
    address: Address = None,
    detach: Detach = False,
) -> None:
    """Classify images with a trained net: one row per image, its top-k classes.

    Image files run in this process; folders and stores run as a Ray job of batch inference
    across the cluster (Ray Data actors holding the model). Preprocessing is the net's eval
    transform (the store's mean/std, resolution and centre crop, recorded in the checkpoint).
    An image that does not decode is a row with its error.
    """
    from .. import infer
    from ..data.store import MANIFEST
    from ..storage import check_folder_named, is_uri

    if split not in (None, "train", "val"):
        raise UserError(f"unknown --split {split!r}: a store has train and val")
    check_folder_named(out_given, "--out", takes_folder=False)
    out = Path(out_given) if out_given is not None else None
    if top_k < 1:
        raise UserError(f"--top-k must be >= 1, got {top_k}")
    if actors < 1 or batch_size < 1:
        raise UserError("--actors and --batch-size must be >= 1")
    fmt = RowFormat(infer.row_format(fmt.value if fmt else None, out))
    checkpoint = at_epoch(checkpoint, epoch)
    inputs, split = _split_files_as_stores(inputs, split)
    stores = [i for i in inputs if is_uri(i) or (Path(i) / MANIFEST).is_file()]
    if stores and len(inputs) > 1:
        raise UserError("a store is classified on its own: pass one store, or image files and folders")
    many = bool(stores) or any(Path(i).is_dir() for i in inputs)
    if out is not None and (address is None or not many or in_process):
        # Here, before any work; a remote cluster's job checks its own path.
        from ..storage import check_out_file

        out = out.expanduser().absolute()
        check_out_file(out, "--out", force=force)
    if many and not in_process:
        _predict_job(checkpoint, inputs, top_k, fmt, out, split, actors, gpu, batch_size, address, detach,
                     weights.value, force)
        return
    net = infer.load(checkpoint, weights.value)
    if stores:
        rows = infer.predict_store(net, stores[0], split=split, top_k=top_k, batch_size=batch_size)
    else:
        rows = infer.predict_paths(net, infer.image_files(inputs), top_k=top_k, batch_size=batch_size)
    text = infer.render(rows, fmt.value, min(top_k, len(net.classes)))
    bad = sum(1 for r in rows if r["error"])
    if out is None:
        output.result(text)
    else:
        infer.write_rows(out, text)
        output.info(f"wrote {len(rows)} row(s) to {out}")
    if score := infer.scored(rows):
        output.info(score)
    if bad:
        output.warn(f"{bad} of {len(rows)} image(s) could not be read; their rows say why")


def _split_files_as_stores(inputs: list[str], split: str | None) -> tuple[list[str], str]:
    """A store's `train.beton` or `val.beton` given as an input stands for that split of the
    store (the file alone has no class names, mean or std: those are in its manifest)."""
    from ..data.store import MANIFEST
    from ..storage import is_uri

    out = []
    for item in inputs:
        path = Path(item).expanduser()
        if is_uri(item) or path.suffix != ".beton":
            out.append(item)
            continue
        if not (path.parent / MANIFEST).is_file() or path.stem not in ("train", "val"):
            raise UserError(f"{item} is an FFCV file outside a store (no {MANIFEST} beside it, or not "
                            "train.beton / val.beton): pass the store's folder")
        if split is not None and split != path.stem:
            raise UserError(f"{item} is the store's {path.stem} split but --split says {split}: "
                            "drop one of them")
        out.append(str(path.parent))
        split = path.stem
    return out, split or "val"


def _predict_job(checkpoint: str, inputs: list[str], top_k: int, fmt: RowFormat, out: Path | None,
                 split: str, actors: int, gpu: bool, batch_size: int, address: str | None,
                 detach: bool, weights: str = "auto", force: bool = False) -> None:
    import time

    from .. import infer, submit
    from ..data.store import MANIFEST

    local = address is None
    if local:
        missing = [i for i in [checkpoint, *inputs] if "://" not in i and not Path(i).expanduser().exists()]
        if missing:
            raise UserError(f"{missing[0]} does not exist: pass a checkpoint, then image files, folders or a store")
        for i in inputs:
            folder = Path(i).expanduser()
            if "://" not in i and folder.is_dir() and not (folder / MANIFEST).is_file():
                infer.check_folder(folder)  # before a job is submitted for nothing
    if out is None and local:
        out = Path(f"predictions-{time.strftime('%Y%m%d-%H%M%S')}.{'txt' if fmt is RowFormat.table else fmt.value}")

    def where(p: str | Path) -> str:
        return str(Path(p).expanduser().absolute()) if local and "://" not in str(p) else str(p)

    # A remote job without --out picks its own place on the cluster (jobs.predict.default_out)
    # and names it in its last line.
    cfg = {"checkpoint": where(checkpoint), "inputs": [where(i) for i in inputs], "top_k": top_k,
           "batch_size": batch_size, "actors": actors, "gpu": gpu, "split": split,
           "format": fmt.value, "out": where(out) if out is not None else "", "weights": weights,
           "force": force}
    resources = {"nodes": 1, "cpus_per_node": 1, "gpus_per_node": 1 if gpu else 0}
    code = submit.run_job("predict", cfg, address=address, detach=detach, resources=resources)
    if code:
        raise typer.Exit(code=code)
    if not detach and local:
        output.result(cfg["out"])


@app.command("export")
def export(
    checkpoint: CheckpointArg,
    fmt: Annotated[ExportFormat, typer.Option("--format", help="safetensors, torchscript or onnx.")],
    out_given: Annotated[Optional[str], typer.Option("--out", help="Model file to write, or a folder to write it into (default: beside the checkpoint).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing export.")] = False,
    wandb: Annotated[Optional[str], typer.Option(help="online, offline or off (default: $WANDB_MODE, else the training run's).")] = None,
    registry: Annotated[Optional[str], typer.Option(help="Online: link the export into this W&B registry collection.")] = None,
    weights: Weights = WeightsChoice.auto,
    epoch: Epoch = None,
) -> None:
    """Export a trained net with a JSON sidecar, after a parity check against PyTorch.

    The sidecar (OUT.json) holds the architecture, classes, preprocessing and the source
    checkpoint's sha256. The export fails, writing nothing, when the exported file's logits
    differ from the PyTorch net's by more than 1e-4 on a fixed batch.
    """
    from ..export import export as run_export
    from ..storage import check_folder_named

    check_folder_named(out_given, "--out")
    out = Path(out_given) if out_given is not None else None

    if wandb not in (None, "online", "offline", "off"):
        raise UserError(f"unknown --wandb {wandb!r}: use online, offline or off")
    if wandb is None:
        from ..config import wandb_environment

        wandb = wandb_environment().get("tracking.wandb")  # WANDB_MODE, else the run's own
    sidecar = run_export(at_epoch(checkpoint, epoch), fmt.value, out, force=force, wandb_mode=wandb, registry=registry,
                         weights=weights.value,
                         log=output.info)
    output.info(f"wrote {sidecar['path']} and {sidecar['path']}.json")
    output.result(sidecar["path"])
