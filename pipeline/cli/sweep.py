"""`densenet-pipe sweep FAMILY --data STORE --growth-rate 12,24 --depth 40,100`: a Ray Tune job."""

from __future__ import annotations

import time
from typing import Annotated, Optional

import typer

from ..errors import UserError
from . import app, output
from .options import Address, Detach, Recipe, Sets, Stage, StopOnInterrupt
from .train import finalize_paths, submit_job


def _ints(text: str | None, flag: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} takes comma-separated integers, e.g. {flag} 12,24,40; got {text!r}") from None


@app.command("sweep")
def sweep(
    family: Annotated[str, typer.Argument(metavar="FAMILY", help="densenet (no bottleneck) or densenet_bc.")],
    data: Annotated[Optional[str], typer.Option("--data", help="Store from `prepare`: a folder or a URI (s3://..., gs://...).")] = None,
    stage: Stage = None,
    growth_rate: Annotated[Optional[str], typer.Option(help="Growth rates to try, e.g. 12,24,40.")] = None,
    depth: Annotated[Optional[str], typer.Option(help="Depths to try, e.g. 40,100,190 (those the family forbids are dropped).")] = None,
    space: Annotated[Optional[list[str]], typer.Option("--space", help="KEY=KIND:ARGS, e.g. optim.lr=loguniform:0.01:0.3 (repeatable).")] = None,
    search: Annotated[Optional[str], typer.Option(help="grid, random or optuna.")] = None,
    samples: Annotated[Optional[int], typer.Option(help="random/optuna: trials in all. Grid search runs each point once (repeat it with --space train.seed=grid:0,1,2).")] = None,
    scheduler: Annotated[Optional[str], typer.Option(help="asha (stop bad trials early) or fifo.")] = None,
    grace_period: Annotated[Optional[int], typer.Option(help="ASHA: epochs every trial gets.")] = None,
    reduction_factor: Annotated[Optional[float], typer.Option(help="ASHA: keep 1/R of the trials at each rung.")] = None,
    max_concurrent: Annotated[Optional[int], typer.Option(help="Trials at once (default: what the cluster holds).")] = None,
    recipe: Recipe = None,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs per trial (ASHA's max).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Global batch per trial.")] = None,
    nodes: Annotated[Optional[int], typer.Option(help="Ray nodes per trial.")] = None,
    workers_per_node: Annotated[Optional[int], typer.Option(help="Workers per node per trial.")] = None,
    gpus: Annotated[Optional[bool], typer.Option("--gpu/--cpu", help="Train trials on GPUs.")] = None,
    storage: Annotated[Optional[str], typer.Option(help="Where the sweep folder goes.")] = None,
    name: Annotated[Optional[str], typer.Option(help="Sweep name (default: family and start time).")] = None,
    resume: Annotated[Optional[str], typer.Option(help="Continue the sweep NAME; finished trials are kept.")] = None,
    wandb: Annotated[Optional[str], typer.Option(help="online, offline or off.")] = None,
    wandb_project: Annotated[Optional[str], typer.Option(help="W&B project.")] = None,
    sets: Sets = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved config and space; submit nothing.")] = False,
    address: Address = None,
    detach: Detach = False,
    stop_on_interrupt: StopOnInterrupt = False,
) -> None:
    """Sweep growth rate, depth and any config key with Ray Tune; each trial trains with Ray Train."""
    from ..config import apply_overrides
    from ..runs import resumed_sweep
    from ..storage import is_uri
    from ..tune.space import plan_space
    from .train import build_config, given_keys

    if family not in ("densenet", "densenet_bc"):
        raise UserError(f"unknown family {family!r}: sweep densenet or densenet_bc")
    if resume and name and resume != name:
        raise UserError(f"--resume {resume} and --name {name} disagree: give only --resume")
    sweep_name = resume or name or f"sweep-{family}-{time.strftime('%Y%m%d-%H%M%S')}"
    flags = {
        "data.store": data, "data.stage": stage.value if stage else None, "sweep.family": family, "sweep.growth_rates": _ints(growth_rate, "--growth-rate"),
        "sweep.depths": _ints(depth, "--depth"), "sweep.space": space, "sweep.search": search,
        "sweep.samples": samples, "sweep.scheduler": scheduler, "sweep.grace_period": grace_period,
        "sweep.reduction_factor": reduction_factor, "sweep.max_concurrent": max_concurrent,
        "sweep.name": sweep_name, "sweep.resume": bool(resume), "train.epochs": epochs,
        "optim.batch_size": batch_size, "cluster.nodes": nodes,
        "cluster.workers_per_node": workers_per_node, "cluster.use_gpu": gpus,
        "cluster.storage": storage, "tracking.wandb": wandb, "tracking.project": wandb_project,
        "cluster.address": address,
    }
    # A resume goes on with the sweep's saved config; the flags given are checked against it.
    cfg = build_config(recipe or "cifar", None, flags, sets, check=not resume)
    if resume:
        cfg = apply_overrides(cfg, {"sweep.resume_changes": given_keys(flags, sets)})
    else:
        for line in plan_space(cfg).dropped:
            output.info(line)
    cfg = finalize_paths(cfg, address)
    # The job's word is final; where the CLI sees the sweep's folder it answers first, and
    # sizes the embedded cluster by the sweep's own trials.
    placed = cfg
    if resume and address is None and not is_uri(cfg.cluster.storage):
        placed = resumed_sweep(cfg, cfg.cluster.storage)
        plan_space(placed)
    if dry_run:
        output.result(placed.to_json())
        return
    raise typer.Exit(submit_job("sweep", cfg, address, detach, stop_on_interrupt, placed=placed))
