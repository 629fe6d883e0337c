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
    if "://" not in value:
        from pathlib import Path

        value = str(Path(value).expanduser().absolute())
    file = settings.set_value(key, value)
    output.info(f"{key} = {value} (in {file})")


@config_app.command("unset")
def unset(key: Annotated[str, typer.Argument(metavar="KEY", autocompletion=_keys)]) -> None:
    """Remove KEY from the settings file."""
    file = settings.set_value(key, None)
    output.info(f"{key} removed (from {file})")
