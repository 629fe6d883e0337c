"""Self-describing checkpoints: everything needed to resume or evaluate, written atomically.

Torch is imported only to save or load, so the CLI can `find` checkpoints cheaply.
A checkpoint folder holds `checkpoint.pt` (loaded with `weights_only=True`),
`config.json` (the resolved config, readable without torch) and, written last,
`checkpoint.done` (the .pt's size and sha256). Ray copies a checkpoint folder into the run
folder file by file; a copy cut short has no marker or a short .pt. Such a folder is not a
checkpoint: `newest` skips it, saying so, and `load` refuses a .pt that does not match.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

from .. import scratch, storage
from ..errors import UserError

FILE = "checkpoint.pt"
DONE = "checkpoint.done"
FORMAT = 1


def save(folder: Path, state: dict[str, Any]) -> Path:
    """Write `state` (tensors, numbers, strings, lists, dicts) into `folder` atomically."""
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {"format": FORMAT, **state}
    tmp = folder / f".{FILE}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, folder / FILE)
    if "config" in state:
        cfg_tmp = folder / ".config.json.tmp"
        cfg_tmp.write_text(json.dumps(state["config"], indent=2, sort_keys=True) + "\n")
        os.replace(cfg_tmp, folder / "config.json")
    digest = _sha256(folder / FILE)
    done_tmp = folder / f".{DONE}.tmp"
    done_tmp.write_text(json.dumps({"bytes": (folder / FILE).stat().st_size, "sha256": digest}) + "\n")
    os.replace(done_tmp, folder / DONE)
    return folder / FILE


def publish(folder: Path, location: str) -> None:
    """Copy a checkpoint folder `save` wrote to `location` (a path or URI), its marker last:
    a copy cut short is not a checkpoint (`complete`)."""
    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith("."))
    for file in sorted(files, key=lambda p: p.name == DONE):
        storage.upload_file(file, storage.join(location, file.name))


def prune(run_dir: str, keep: int, scores: dict[str, float], newest: str) -> list[str]:
    """Ray Train's retention, for checkpoints written without it: the `keep` best of a run
    folder's checkpoints by val error (`scores`, by folder name) and always the newest; the
    rest are deleted. Returns the names deleted."""
    ranked = sorted((n for n in storage.listdir(run_dir) if n.startswith("epoch-") and n in scores),
                    key=lambda n: (scores[n], n))
    gone = [n for n in ranked[keep:] if n != newest]
    for name in gone:
        storage.delete_tree(storage.join(run_dir, name))
    return gone


# A worker writes each checkpoint into a scratch folder named for its pid before Ray copies
# it to storage; a worker killed meanwhile (a lost node, `jobs stop`) leaves it behind.
SCRATCH_PREFIX = "densenet-ckpt-"


def scratch_dir():
    """A TemporaryDirectory for one checkpoint, named for this process."""
    return scratch.folder(SCRATCH_PREFIX)


def remove_dead_scratch(root: str | os.PathLike | None = None) -> list[str]:
    """Remove the checkpoint scratch folders in `root` (the temp folder) of processes that
    are gone; returns their names."""
    return scratch.remove_dead(SCRATCH_PREFIX, root)


def find(path: str | os.PathLike) -> str:
    """The checkpoint file for a file, a checkpoint folder, or a run folder (its newest).

    Paths and storage URIs alike (`pipeline.storage`); returns a location string.
    """
    path = str(path)
    if storage.is_file(path):
        return path
    if storage.is_file(storage.join(path, FILE)):
        return storage.join(path, FILE)
    if storage.is_dir(path):
        found = newest(path)
        if found is not None:
            return found
        raise UserError(f"no checkpoint in {path}: pass a checkpoint folder (epoch-NNNN) or its {FILE}")
    raise UserError(f"checkpoint {path} does not exist: pass a checkpoint folder or file")


def _marker(folder: str) -> dict[str, Any] | None:
    try:
        data = json.loads(storage.read_text(storage.join(folder, DONE)))
        return data if isinstance(data, dict) and {"bytes", "sha256"} <= set(data) else None
    except (OSError, ValueError, UserError):
        return None


def complete(folder: str | os.PathLike) -> bool:
    """Whether a checkpoint folder was written whole: its marker, and a .pt of that size."""
    marker = _marker(str(folder))
    if marker is None:
        return False
    try:
        return storage.size(storage.join(str(folder), FILE)) == marker["bytes"]
    except (OSError, UserError):
        return False


def newest(run_dir: str | os.PathLike, say=print) -> str | None:
    """The newest complete `epoch-*/checkpoint.pt` under a run folder, or None; every newer
    folder that is not a whole checkpoint is named through `say`."""
    for folder in reversed([n for n in storage.listdir(run_dir) if n.startswith("epoch-")]):
        where = storage.join(run_dir, folder)
        if complete(where):
            return storage.join(where, FILE)
        say(f"skipping {where}: not a complete checkpoint (a copy cut short?)")
    return None


def epoch_folder(run_dir: str | os.PathLike, epoch: int) -> str:
    """The checkpoint folder of `epoch` in a run folder, or a UserError listing those there."""
    where = storage.join(str(run_dir), f"epoch-{epoch:04d}")
    if not complete(where):
        have = [n for n in storage.listdir(run_dir) if n.startswith("epoch-")
                and complete(storage.join(str(run_dir), n))]
        raise UserError(f"no complete checkpoint of epoch {epoch} in {run_dir}; it has "
                        f"{', '.join(have) or 'none'}: pick one of those")
    return where


# Ray Train's record of the checkpoints it wrote; a run taken back to an older epoch must
# not be restored from it.
RAY_RECORD = "checkpoint_manager_snapshot.json"


def set_aside_after(run_dir: str | os.PathLike, epoch: int, say=print) -> str | None:
    """Take a run back to epoch `epoch`: its newer checkpoints, and Ray's record of them,
    move into `superseded-<time>/` in the run folder (kept, never deleted), so the run
    resumes from `epoch`. Returns that folder, or None when nothing was newer."""
    import time

    run_dir = str(run_dir)
    epoch_folder(run_dir, epoch)
    newer = [n for n in storage.listdir(run_dir)
             if n.startswith("epoch-") and n[6:].isdigit() and int(n[6:]) > epoch]
    if not newer:
        return None
    aside = storage.join(run_dir, f"superseded-{time.strftime('%Y%m%d-%H%M%S')}")
    for name in newer + [n for n in (RAY_RECORD,) if storage.exists(storage.join(run_dir, n))]:
        storage.move(storage.join(run_dir, name), storage.join(aside, name))
    say(f"set aside {', '.join(newer)} in {aside}: the run continues from epoch {epoch}")
    return aside


def _sha256(source: io.BytesIO | Path) -> str:
    h = hashlib.sha256()
    if isinstance(source, Path):
        with open(source, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    else:
        h.update(source.getbuffer())
    return h.hexdigest()


def load(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load and check a checkpoint; a corrupt or foreign file is a UserError, not a traceback."""
    import torch

    file = find(path)
    source = storage.open_bytes(file)
    marker = _marker(storage.parent(file))
    if marker is not None and _sha256(source) != marker["sha256"]:
        raise UserError(f"checkpoint {file} is corrupt (it does not match its {DONE}): "
                        "pick another checkpoint (--epoch N) or retrain")
    try:
        state = torch.load(source, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"checkpoint {file} is corrupt or not a densenet-pipe checkpoint ({reason[:120]}): "
                        "pick another checkpoint or retrain") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or "model" not in state:
        raise UserError(f"checkpoint {file} is not a densenet-pipe checkpoint (format {FORMAT}): "
                        "pick a checkpoint written by `densenet-pipe train`")
    return state
