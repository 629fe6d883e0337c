"""`densenet-pipe predict` and `export`: a trained net put to use, in this process.

Both read one checkpoint and a few files; neither needs a cluster, so neither is a Ray job
(see docs/decisions.md).
"""

from __future__ import annotations

import csv
import io
import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import UserError
from . import app, output

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


def _render(rows: list[dict], fmt: RowFormat, top_k: int) -> str:
    if fmt is RowFormat.json:
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
    if fmt is RowFormat.csv:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(headers)
        writer.writerows(table)
        return buffer.getvalue().rstrip("\n")
    from ..tables import format_table

    return format_table(headers, table)


@app.command("predict")
def predict(
    checkpoint: CheckpointArg,
    inputs: Annotated[list[str], typer.Argument(metavar="INPUT...", help="Image files, folders of images, or a store (its --split).")],
    top_k: Annotated[int, typer.Option("--top-k", help="Classes per image, most probable first.")] = 5,
    fmt: Annotated[RowFormat, typer.Option("--format", help="table, json or csv.")] = RowFormat.table,
    out: Annotated[Optional[Path], typer.Option(help="Write the rows here instead of stdout.")] = None,
    split: Annotated[str, typer.Option(help="With a store: the split to classify.")] = "val",
) -> None:
    """Classify images with a trained net: one row per image, its top-k classes.

    Preprocessing is the net's eval transform (the store's mean/std, resolution and centre
    crop, recorded in the checkpoint). An image that does not decode is a row with its error.
    """
    from .. import infer
    from ..data.store import MANIFEST

    if top_k < 1:
        raise UserError(f"--top-k must be >= 1, got {top_k}")
    if out is not None and out.is_dir():
        raise UserError(f"--out {out} is a folder: name the file to write")
    net = infer.load(checkpoint)
    stores = [i for i in inputs if (Path(i) / MANIFEST).is_file()]
    if stores and len(inputs) > 1:
        raise UserError("a store is classified on its own: pass one store, or image files and folders")
    if stores:
        rows = infer.predict_store(net, stores[0], split=split, top_k=top_k)
    else:
        rows = infer.predict_paths(net, infer.image_files(inputs), top_k=top_k)
    text = _render(rows, fmt, min(top_k, len(net.classes)))
    bad = sum(1 for r in rows if r["error"])
    if out is None:
        output.result(text)
    else:
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(text + "\n")
        tmp.replace(out)
        output.info(f"wrote {len(rows)} row(s) to {out}")
    if bad:
        output.warn(f"{bad} of {len(rows)} image(s) could not be read; their rows say why")


@app.command("export")
def export(
    checkpoint: CheckpointArg,
    fmt: Annotated[ExportFormat, typer.Option("--format", help="safetensors, torchscript or onnx.")],
    out: Annotated[Optional[Path], typer.Option(help="Model file to write (default: beside the checkpoint).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing export.")] = False,
    wandb: Annotated[Optional[str], typer.Option(help="online, offline or off (default: the training run's).")] = None,
    registry: Annotated[Optional[str], typer.Option(help="Online: link the export into this W&B registry collection.")] = None,
) -> None:
    """Export a trained net with a JSON sidecar, after a parity check against PyTorch.

    The sidecar (OUT.json) holds the architecture, classes, preprocessing and the source
    checkpoint's sha256. The export fails, writing nothing, when the exported file's logits
    differ from the PyTorch net's by more than 1e-4 on a fixed batch.
    """
    from ..export import export as run_export

    if wandb not in (None, "online", "offline", "off"):
        raise UserError(f"unknown --wandb {wandb!r}: use online, offline or off")
    sidecar = run_export(checkpoint, fmt.value, out, force=force, wandb_mode=wandb, registry=registry,
                         log=output.info)
    output.info(f"wrote {sidecar['path']} and {sidecar['path']}.json")
    output.result(sidecar["path"])
