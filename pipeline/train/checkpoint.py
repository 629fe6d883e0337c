"""Self-describing checkpoints: everything needed to resume or evaluate, written atomically.

Torch is imported only to save or load, so the CLI can `find` checkpoints cheaply.
A checkpoint folder holds `checkpoint.pt` (loaded with `weights_only=True`) and
`config.json` (the resolved config, readable without torch).
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

from .. import storage
from ..errors import UserError

FILE = "checkpoint.pt"
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
    return folder / FILE


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


def newest(run_dir: str | os.PathLike) -> str | None:
    """The newest `epoch-*/checkpoint.pt` under a run folder, or None."""
    for folder in reversed([n for n in storage.listdir(run_dir) if n.startswith("epoch-")]):
        file = storage.join(run_dir, folder, FILE)
        if storage.is_file(file):
            return file
    return None


def load(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load and check a checkpoint; a corrupt or foreign file is a UserError, not a traceback."""
    import torch

    file = find(path)
    try:
        state = torch.load(storage.open_bytes(file), map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"checkpoint {file} is corrupt or not a densenet-pipe checkpoint ({reason[:120]}): "
                        "pick another checkpoint or retrain") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or "model" not in state:
        raise UserError(f"checkpoint {file} is not a densenet-pipe checkpoint (format {FORMAT}): "
                        "pick a checkpoint written by `densenet-pipe train`")
    return state
