"""Scratch folders named for the process that made them, and the sweep that removes those
of processes that are gone.

A process killed mid-work (a lost node, `jobs stop`, the kernel's OOM killer) cannot remove
its own scratch folder; the next process of the same kind on that machine does, by the pid
in the name. A pid that runs again (reused, or another user's) keeps its folder: nothing of
a live process is removed.

    tmp = scratch.folder("densenet-ckpt-")       # <temp>/densenet-ckpt-<pid>-xxxxxxxx
    scratch.remove_dead("densenet-ckpt-")        # the names of the folders removed
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def alive(pid: int) -> bool:
    """Whether a process with this pid runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def folder(prefix: str) -> tempfile.TemporaryDirectory:
    """A temporary folder named `<prefix><pid>-...`, removed when the context ends."""
    return tempfile.TemporaryDirectory(prefix=f"{prefix}{os.getpid()}-")


def make(prefix: str) -> Path:
    """A folder named `<prefix><pid>-...` in the temp folder; the caller removes it."""
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-"))


def remove_dead(prefix: str, root: str | os.PathLike | None = None) -> list[str]:
    """Remove the `<prefix><pid>-...` folders in `root` (the temp folder) whose process is
    gone; returns their names."""
    removed = []
    for path in sorted(Path(root or tempfile.gettempdir()).glob(f"{prefix}*-*")):
        pid = path.name[len(prefix):].split("-", 1)[0]
        if not path.is_dir() or not pid.isdigit() or alive(int(pid)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path.name)
    return removed
