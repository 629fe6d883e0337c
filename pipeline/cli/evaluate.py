"""`densenet-pipe evaluate CHECKPOINT [--data STORE]`: top-1/top-5 error as a Ray job."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import UserError
from . import app, output
from .options import Address, Detach, Epoch, Stage, StageMode, StopOnInterrupt, Weights, WeightsChoice, at_epoch

TTA = ("none", "flip", "10crop")


@app.command("evaluate")
def evaluate(
    checkpoint: Annotated[str, typer.Argument(metavar="CHECKPOINT", help="A checkpoint folder (epoch-NNNN), its checkpoint.pt, or a run folder (its newest).")],
    data: Annotated[Optional[str], typer.Option("--data", help="Store with the val split: a folder or a URI (s3://..., gs://...); default: the store the net trained on.")] = None,
    tta: Annotated[str, typer.Option(help="none, flip or 10crop (the paper's ImageNet protocol).")] = "none",
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 128,
    out: Annotated[Optional[str], typer.Option(help="Result JSON file, or a folder to write it into (default: beside the checkpoint).")] = None,
    epoch: Epoch = None,
    stage: Stage = None,
    weights: Weights = WeightsChoice.auto,
    gpu: Annotated[bool, typer.Option("--gpu", help="Evaluate on a GPU: the job starts on a node with one.")] = False,
    address: Address = None,
    detach: Detach = False,
    stop_on_interrupt: StopOnInterrupt = False,
) -> None:
    """Print a checkpoint's top-1/top-5 val error and write it as JSON."""
    if tta not in TTA:
        raise UserError(f"unknown --tta {tta!r}: use one of {', '.join(TTA)}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    if address is None:
        from ..storage import check_folder_named

        check_folder_named(out, "--out")
    checkpoint = at_epoch(checkpoint, epoch)
    cfg = {"checkpoint": checkpoint, "store": data or "", "tta": tta, "batch_size": batch_size,
           "stage": (stage or StageMode.auto).value, "gpu": gpu, "weights": weights.value}
    if out:
        cfg["out"] = out
    if address is None:
        from ..data.store import open_store
        from ..storage import check, is_uri
        from ..train.checkpoint import find, load

        found = find(checkpoint if is_uri(checkpoint) else Path(checkpoint).expanduser())
        cfg["checkpoint"] = found if is_uri(found) else str(Path(found).resolve())
        state = load(cfg["checkpoint"])  # torch, but a corrupt file fails here, not in the job
        if data is None:
            from ..storage import display
            from ..train.evaluate import trained_store

            data = trained_store(state, cfg["checkpoint"])
            output.info(f"data: {display(data)} (the store the net trained on; --data picks another)")
            cfg["store"] = data
        if is_uri(data):
            check(data)
        else:
            cfg["store"] = open_store(Path(data)).path
        if out and not is_uri(out):
            cfg["out"] = str(Path(out).resolve())
    from .. import submit

    raise typer.Exit(submit.run_job("evaluate", cfg, address=address, detach=detach,
                                    stop_on_interrupt=stop_on_interrupt,
                                    resources={"nodes": 1, "gpus_per_node": 1} if gpu else None,
                                    driver={"num_gpus": 1} if gpu else None))
