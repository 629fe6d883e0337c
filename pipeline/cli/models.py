"""`densenet-pipe models`: every architecture with its depth, growth rate, params and MACs."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..errors import UserError
from ..models import spec
from . import app, output
from .options import Format, TableFormat, complete_models


@app.command("models")
def models(
    name: Annotated[Optional[str], typer.Argument(metavar="[MODEL]", autocompletion=complete_models, help="Show one model (with overrides).")] = None,
    depth: Annotated[Optional[int], typer.Option(help="Override the depth L.")] = None,
    growth_rate: Annotated[Optional[int], typer.Option(help="Override the growth rate k.")] = None,
    bottleneck: Annotated[Optional[bool], typer.Option("--bottleneck/--no-bottleneck")] = None,
    compression: Annotated[Optional[float], typer.Option(help="Transition compression theta.")] = None,
    num_classes: Annotated[Optional[int], typer.Option(help="Classifier outputs.")] = None,
    fmt: Format = TableFormat.table,
) -> None:
    """List the DenseNet zoo: params and multiply-accumulates (MACs) at each net's input size.

    MACs count conv and linear multiply-adds for one image; BN, ReLU and pooling are not
    counted.
    """
    overrides = dict(depth=depth, growth_rate=growth_rate, bottleneck=bottleneck,
                     compression=compression, num_classes=num_classes)
    if name is None and any(v is not None for v in overrides.values()):
        raise UserError("overrides need a model name: densenet-pipe models NAME --depth ...")
    specs = [spec.resolve(n, **overrides) for n in ([name] if name else spec.names())]

    rows = []
    for s in specs:
        p = s.complexity()
        rows.append({
            "name": s.name, "family": s.family, "depth": s.depth, "growth_rate": s.growth_rate,
            "bottleneck": s.bottleneck, "compression": s.compression,
            "num_classes": s.num_classes, "input_size": s.input_size,
            "blocks": list(s.block_config), **p,
        })
    if fmt == "json":
        output.as_json(rows)
        return
    output.table(
        ["name", "depth", "k", "BC", "theta", "blocks", "classes", "input", "params", "MACs"],
        [[r["name"], r["depth"], r["growth_rate"], "yes" if r["bottleneck"] else "no",
          r["compression"], "-".join(map(str, r["blocks"])), r["num_classes"],
          r["input_size"], f"{r['params'] / 1e6:.2f}M", f"{r['macs'] / 1e9:.3f}G"] for r in rows],
    )
