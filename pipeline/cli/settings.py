"""`densenet-pipe config show | set | unset`: the user's settings file (`pipeline.settings`)."""

from __future__ import annotations

from typing import Annotated

import typer

from .. import settings
from . import app, output
from .options import Format, TableFormat

config_app = typer.Typer(name="config", no_args_is_help=True,
                         help="Your settings: where datasets' files live, where stores go.")
app.add_typer(config_app)


def _keys(incomplete: str) -> list[str]:
    return [k for k in settings.KEYS if k.startswith(incomplete)]


@config_app.command("show")
def show(fmt: Format = TableFormat.table) -> None:
    """Every setting, its value and where it came from (an environment variable or the file)."""
    rows = settings.show()
    if fmt == "json":
        output.as_json({"file": str(settings.path()),
                        "settings": {s.key: {"value": s.value, "from": s.where or None} for s in rows}})
        return
    output.info(f"settings file: {settings.path()} (each key also from $DENSENET_PIPE_<KEY>)")
    output.table(["key", "value", "from"],
                 [[s.key, s.value if s.value is not None else "-", s.where or "-"] for s in rows])


@config_app.command("set")
def set_(key: Annotated[str, typer.Argument(metavar="KEY", autocompletion=_keys,
                                            help=f"One of: {', '.join(settings.KEYS)}.")],
         value: Annotated[str, typer.Argument(metavar="VALUE", help="A path (or a URI for store_root).")]) -> None:
    """Set KEY to VALUE in the settings file."""
    from pathlib import Path

    from ..errors import UserError
    from ..storage import is_uri

    settings.check_key(key)
    if not value.strip():
        raise UserError(f"{key}: the value is empty: give a path, or remove the key with "
                        f"`densenet-pipe config unset {key}`")
    if is_uri(value):
        if key != "store_root":
            raise UserError(f"{key}: {value} is a URI, and prepare reads a dataset's official files "
                            "from a path: copy them to a disk or mount every node sees, and set that path")
    else:
        value = str(Path(value).expanduser().absolute())
        if key != "store_root" and not Path(value).exists():
            # The cluster's nodes may hold the files at a path this machine lacks.
            output.warn(f"{value} does not exist on this machine; set anyway (a remote cluster's nodes may have it)")
    file = settings.set_value(key, value)
    output.info(f"{key} = {value} (in {file})")


@config_app.command("unset")
def unset(key: Annotated[str, typer.Argument(metavar="KEY", autocompletion=_keys)]) -> None:
    """Remove KEY from the settings file."""
    file = settings.set_value(key, None)
    output.info(f"{key} removed (from {file})")
