"""The `densenet-pipe` command line: thin commands that parse, build a config and make one call.

Nothing here imports torch, ray.train, ffcv or wandb at module level: `--help` stays fast.
"""

from __future__ import annotations

import os

# Typer's rich help costs ~0.2 s of imports and rendering on every `--help`; plain click
# help keeps the front door under 0.5 s. A user who wants rich can set TYPER_USE_RICH=1.
os.environ.setdefault("TYPER_USE_RICH", "0")

import typer  # noqa: E402
from typer.core import TyperGroup  # noqa: E402

from ..errors import JobFailed, UserError  # noqa: E402
from . import output  # noqa: E402


class _Group(TyperGroup):
    """Turns errors a user can fix into one line and an exit code, never a traceback."""

    def invoke(self, ctx):  # type: ignore[override]
        from typer._click.exceptions import UsageError  # typer's own click, not PyPI's

        try:
            return super().invoke(ctx)
        except (UserError, JobFailed) as e:
            output.error(str(e))
            raise typer.Exit(code=getattr(e, "exit_code", 2)) from None
        except UsageError as e:
            # click prints usage, a hint and the error on four lines; ours is one.
            where = e.ctx.command_path if e.ctx is not None else ctx.command_path
            # Some of click's messages run over lines ("Choose from:\n\ta,\n\tb."): one line.
            message = " ".join(e.format_message().split()).rstrip(".")
            output.error(f"{message} (see `{where} -h`)")
            raise typer.Exit(code=2) from None


app = typer.Typer(
    cls=_Group,
    name="densenet-pipe",
    help="Prepare FFCV stores, train and sweep DenseNets on Ray clusters, tracked in W&B.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _options(verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Show Ray's, Tune's and W&B's own lines while following a job.")) -> None:
    if verbose:
        from ..submit import VERBOSE_ENV

        os.environ[VERBOSE_ENV] = "1"


def _register() -> None:
    from . import models  # noqa: F401  (each module adds its commands to `app`)
    from . import prepare  # noqa: F401
    from . import train  # noqa: F401
    from . import evaluate  # noqa: F401
    from . import predict  # noqa: F401
    from . import sweep  # noqa: F401
    from . import jobs  # noqa: F401
    from . import cluster  # noqa: F401
    from . import settings  # noqa: F401


_register()


def main() -> None:
    app()
