"""Option aliases shared by every command group, so a flag means the same thing everywhere."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

Address = Annotated[
    Optional[str],
    typer.Option("--address", envvar="RAY_ADDRESS", show_envvar=True,
                 help="Ray job server, e.g. http://head:8265. Default: the embedded local cluster."),
]
Detach = Annotated[bool, typer.Option("--detach", help="Print the job id and return at once.")]
StopOnInterrupt = Annotated[
    bool, typer.Option("--stop-on-interrupt", help="Ctrl-C stops the job instead of asking.")]
Sets = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="Override any config key: --set optim.lr=0.05 (repeatable)."),
]
def complete_models(incomplete: str) -> list[str]:
    from ..models import spec

    return [n for n in spec.names() if n.startswith(incomplete)]


def complete_recipes(incomplete: str) -> list[str]:
    from ..config import recipe_names

    return [n for n in recipe_names() if n.startswith(incomplete)]


def complete_datasets(incomplete: str) -> list[str]:
    from ..data.prepare_config import DATASETS

    return [n for n in DATASETS if n.startswith(incomplete)]


def complete_jobs(incomplete: str) -> list[str]:
    """Job ids of the local cluster (or $RAY_ADDRESS's), newest first; nothing when none is up."""
    import os

    try:
        from ..submit import connect

        server = connect(os.environ.get("RAY_ADDRESS"), start=False, note=lambda _m: None)
        jobs = server.list_jobs()
    except Exception:  # noqa: BLE001  (completion must never print an error)
        return []
    ids = [j.get("submission_id") or j.get("job_id") or "" for j in jobs]
    return [i for i in ids if i and i.startswith(incomplete)]


# Listed from the package's folder (not `config.recipe_names`): --help stays free of torch.
_RECIPES = ", ".join(sorted(p.stem for p in (Path(__file__).parents[1] / "recipes").glob("*.yaml")))
Recipe = Annotated[
    Optional[str],
    typer.Option("--recipe", autocompletion=complete_recipes,
                 help=f"Recipe name ({_RECIPES}) or a YAML path."),
]
class TableFormat(str, Enum):
    """What a listing prints: a plain table for people, JSON for scripts."""

    table = "table"
    json = "json"


Format = Annotated[TableFormat, typer.Option("--format", help="table or json.")]


class StageMode(str, Enum):
    """`data.stage`: when a node copies the store to its own disk (`pipeline.data.staging`)."""

    auto = "auto"
    always = "always"
    never = "never"


Stage = Annotated[
    Optional[StageMode],
    typer.Option("--stage", help="Copy the store to each node's disk first: auto (object storage "
                 "and network filesystems; the default), always, or never (read a path in place)."),
]


class WeightsChoice(str, Enum):
    """Which weights of a checkpoint a command uses (`pipeline.infer.pick_weights`)."""

    auto = "auto"
    ema = "ema"
    raw = "raw"


Weights = Annotated[
    WeightsChoice,
    typer.Option("--weights", help="auto (the moving average when the run kept one with --ema, "
                 "else the raw weights), ema or raw."),
]

Epoch = Annotated[
    Optional[int],
    typer.Option("--epoch", help="With a run folder: that epoch's checkpoint, not the newest."),
]


def at_epoch(checkpoint: str, epoch: int | None) -> str:
    """CHECKPOINT, or with --epoch that epoch's folder of the run CHECKPOINT names."""
    if epoch is None:
        return checkpoint
    from ..train.checkpoint import epoch_folder

    return epoch_folder(checkpoint, epoch)
