"""What every job entrypoint shares: arguments, config, working folder, exit codes.

    # jobs/evaluate.py
    from jobs import common

    def run(cfg: dict) -> None:
        ...

    if __name__ == "__main__":
        common.main(run)

`main` parses `--config PATH`, loads that JSON (written by `pipeline.submit`), prints one
line naming the job and config digest (the job's first output), moves into the job's base
folder (see `base_folder`), calls `run(cfg)` and exits: 0 when it returns, 2 with one
`error:` line on UserError (bad input), 1 with one line on JobFailed, 1 with the traceback
on anything else.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

from pipeline.errors import JobFailed, UserError

WORKDIR_ENV = "DENSENET_PIPE_WORKDIR"
HOME_ENV = "DENSENET_PIPE_HOME"


def load_config(path: str | Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise UserError(f"cannot read config {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"config {path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise UserError(f"config {path} must hold a JSON object")
    return data


def base_folder() -> Path | None:
    """Where relative paths in a config point.

    The folder the user ran `densenet-pipe` in when the job runs on the local cluster
    (`DENSENET_PIPE_WORKDIR`, set by the submitter), else the cluster's shared folder
    (`DENSENET_PIPE_HOME`, set on every node by the configs in cluster/), else None: the
    job's own copy of the code, which Ray deletes later.
    """
    for key in (WORKDIR_ENV, HOME_ENV):
        value = os.environ.get(key)
        if value and Path(value).is_dir():
            return Path(value)
    return None


def resolve_path(path: str) -> str:
    """An absolute path (or the URI unchanged) for `path` as the job sees it.

    Ray Train workers start in the job's code copy, not in the driver's folder: resolve every
    path in the driver before handing a config to workers. Without a base folder a relative
    path would point into that copy, which Ray deletes: what a job wrote there would be lost
    and what it read is not there, so such a path is refused.
    """
    if "://" in path or not path:
        return path
    given = Path(path).expanduser()
    if not given.is_absolute() and base_folder() is None:
        raise UserError(f"{path} is a relative path, and this cluster sets no {HOME_ENV} on its "
                        "nodes: the job runs in a copy of the code that Ray deletes; pass an "
                        f"absolute path on the cluster or a URI, or set {HOME_ENV} to a shared "
                        "folder on every node (cluster/README.md)")
    return str(given.resolve())


def home_folder() -> Path:
    """Where a job on a remote cluster puts what the user named no place for: the base
    folder, else ~/densenet-pipe on the driver's node (a training run's default storage
    is the runs/ folder in it)."""
    return base_folder() or Path.home() / "densenet-pipe"


def main(run: Callable[[dict[str, Any]], Any], argv: list[str] | None = None) -> None:
    name = Path(sys.modules[run.__module__].__file__ or "job").stem
    parser = argparse.ArgumentParser(prog=f"python -m jobs.{name}")
    parser.add_argument("--config", required=True, help="the resolved config JSON")
    args = parser.parse_args(argv)
    from pipeline.console import WholeLines

    sys.stdout, sys.stderr = WholeLines(sys.stdout), WholeLines(sys.stderr)
    try:
        cfg = load_config(args.config)
        from pipeline.config import digest

        print(f"{name}: started, config {digest(cfg)}", flush=True)
        folder = base_folder()
        if folder is not None:
            os.chdir(folder)
        run(cfg)
    except UserError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr, flush=True)
        sys.exit(2)
    except JobFailed as e:
        print(f"error: {_one_line(e)}", file=sys.stderr, flush=True)
        sys.exit(1)
    except Exception:
        traceback.print_exc()
        sys.exit(1)
    sys.exit(0)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split("\n")[0].split()) or type(e).__name__
