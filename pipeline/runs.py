"""Rules about a run that the CLI (fast local checks), the job (the final word), the worker
and the sweep all apply: torch- and Ray-free, one place each.

    check_name("run", "densenet121-20261202")       # names that become folders
    workers_per_node(None, use_gpu=True, gpus=[8, 8])  # -> 8
    per_worker_batch(64, 4)                          # -> 16; 64 over 3 is an error, not 63
    check_private_folder(Path("runs/sweep-1"))       # before unpickling Tune's state from it
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from .errors import UserError

NAME = re.compile(r"[A-Za-z0-9._-]+")


def check_name(kind: str, name: str) -> str:
    """A run, sweep or store name becomes a folder: letters, digits, `.`, `_`, `-` only."""
    if not NAME.fullmatch(name or "") or name in (".", ".."):
        raise UserError(f"{kind} name {name!r} is not allowed: use letters, digits, '.', '_' and '-' "
                        "(no '/', not '.' or '..')")
    return name


def workers_per_node(requested: int | None, use_gpu: bool, gpus: list[int]) -> int:
    """Workers on each node: as asked, else one per GPU of the smallest GPU node, else 1."""
    if requested is not None:
        return requested
    have = [g for g in gpus if g >= 1]
    return min(have) if use_gpu and have else 1


def per_worker_batch(global_batch: int, workers: int) -> int:
    """The per-worker share of the global batch, which must divide evenly: a silent floor
    would train on fewer images a step than the recipe says."""
    if workers < 1 or global_batch % workers:
        raise UserError(f"global batch {global_batch} does not divide across {workers} workers: "
                        f"pick a multiple of {workers} (--batch-size) or set --workers-per-node")
    return global_batch // workers


def check_private_folder(path: Path, what: str) -> None:
    """A local folder we are about to unpickle from must be ours and writable by us alone."""
    st = os.stat(path)
    if st.st_uid != os.getuid():
        raise UserError(f"{what} {path} belongs to another user (uid {st.st_uid}): its state is "
                        "unpickled on resume, so only its owner may resume it")
    if stat.S_IMODE(st.st_mode) & 0o022:
        raise UserError(f"{what} {path} is writable by others (mode {stat.S_IMODE(st.st_mode):o}): "
                        f"its state is unpickled on resume; run `chmod go-w {path}` first")
