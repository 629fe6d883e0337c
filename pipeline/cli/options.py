"""Option aliases shared by every command group, so a flag means the same thing everywhere."""

from __future__ import annotations

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
Recipe = Annotated[
    Optional[str],
    typer.Option("--recipe", help="Recipe name (cifar, svhn, imagenet, smoke) or a YAML path."),
]
Format = Annotated[str, typer.Option("--format", help="table or json.")]
