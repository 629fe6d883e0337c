"""Starting weights for fine-tuning (`train MODEL --init-from SOURCE`).

SOURCE is one of:
- `torchvision`: torchvision's ImageNet weights for the net, from the local torch hub cache
  (`$TORCH_HOME/hub/checkpoints/`, default `~/.cache/torch/hub/checkpoints/`); nothing is
  downloaded: a missing file is one line naming the file, where to put it and its URL;
- a state-dict file in torchvision's format, with either key style (the old `norm.1` /
  `conv.2` names of torchvision's published files, or `norm1` / `conv2`);
- a densenet-pipe checkpoint file, epoch folder or run folder (its newest checkpoint).

Every layer but the classifier must match by name and shape (a mismatch names the layer).
The classifier is loaded when its shape matches and replaced (freshly initialised) when the
class count differs, and the returned record says which.

`resolve` is torch-free (the CLI checks the file exists before submitting); `load_into`
needs torch.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from pathlib import Path
from typing import Any

from ..errors import UserError

TORCHVISION = "torchvision"
# torchvision's published ImageNet weights, by our model name.
TORCHVISION_FILES = {
    "densenet121": "densenet121-a639ec97.pth",
    "densenet161": "densenet161-8d451a50.pth",
    "densenet169": "densenet169-b2777c0a.pth",
    "densenet201": "densenet201-c1103571.pth",
}
DOWNLOADS = "https://download.pytorch.org/models/"
# torchvision's files name a dense layer's parts `norm.1`, `relu.2`, `conv.2`; modules
# named with a dot are no longer allowed, so the current names drop it.
_OLD_KEY = re.compile(
    r"^(.*\.denselayer\d+\.(?:norm|relu|conv))\.([12])\.(weight|bias|running_mean|running_var|num_batches_tracked)$")
# BatchNorm's step counter came after torchvision published its DenseNet weights; a file
# without it keeps the net's own.
_OPTIONAL = ("num_batches_tracked",)


def hub_dir() -> Path:
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "torch")
    return Path(torch_home).expanduser() / "hub" / "checkpoints"


def resolve(source: str, model_name: str) -> str:
    """The file or folder SOURCE names for `model_name`; a UserError when it is not there."""
    if source == TORCHVISION:
        file = TORCHVISION_FILES.get(model_name)
        if file is None:
            raise UserError(f"torchvision publishes no weights for {model_name}: it has "
                            f"{', '.join(TORCHVISION_FILES)}; pass --init-from FILE for another net")
        path = hub_dir() / file
        if not path.is_file():
            raise UserError(f"--init-from torchvision needs {file} in {path.parent} (no download is "
                            f"made): fetch {DOWNLOADS}{file} and put it there, or set $TORCH_HOME")
        return str(path)
    from .. import storage

    if storage.is_uri(source):
        if not storage.exists(source):
            raise UserError(f"--init-from {source} does not exist: pass a state-dict file, a "
                            "checkpoint or run folder, or `torchvision`")
        return source
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"--init-from {path} does not exist: pass a state-dict file, a checkpoint "
                        "or run folder, or `torchvision`")
    return str(path.absolute())


def _state_dict(location: str) -> tuple[dict[str, Any], str, str]:
    """(state dict, the file it came from, that file's sha256)."""
    import pickle
    import zipfile

    import torch

    from .. import storage
    from ..train import checkpoint

    file = location
    if storage.is_dir(location):
        file = checkpoint.find(location)
    data = storage.read_bytes(file)
    digest = hashlib.sha256(data).hexdigest()
    try:
        loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise UserError(f"--init-from {file} is not a state dict torch can load safely ({reason}): "
                        "pass torchvision's .pth file or a densenet-pipe checkpoint") from None
    if isinstance(loaded, dict) and "model" in loaded and "format" in loaded:
        loaded = loaded["model"]
    if not isinstance(loaded, dict) or not loaded or not all(isinstance(k, str) for k in loaded):
        raise UserError(f"--init-from {file} holds no state dict (names to tensors): pass "
                        "torchvision's .pth file or a densenet-pipe checkpoint")
    return loaded, file, digest


def _current_names(state: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in state.items():
        key = key[len("module."):] if key.startswith("module.") else key  # saved from DDP
        m = _OLD_KEY.match(key)
        out[f"{m.group(1)}{m.group(2)}.{m.group(3)}" if m else key] = value
    return out


def load_into(model, location: str, say=print) -> dict[str, Any]:
    """Load SOURCE's weights into `model` (strict but for the classifier); returns what was
    loaded: {"source", "sha256", "classifier": "loaded" | "replaced", "classes_from"}."""
    source, file, digest = _state_dict(location)
    source = _current_names(source)
    target = model.state_dict()
    head = {k for k in target if k.startswith("classifier.")}
    missing = sorted(k for k in target if k not in source and k not in head and not k.endswith(_OPTIONAL))
    if missing:
        raise UserError(f"--init-from {file} has no {missing[0]} ({len(missing)} layer(s) missing): "
                        "it is not a state dict of this architecture")
    unexpected = sorted(k for k in source if k not in target)
    if unexpected:
        raise UserError(f"--init-from {file} has {unexpected[0]}, which this net does not "
                        f"({len(unexpected)} extra): it is a state dict of another architecture")
    for key in sorted(set(target) - head):
        if key not in source:
            continue
        if tuple(source[key].shape) != tuple(target[key].shape):
            raise UserError(f"--init-from {file}: layer {key} is {tuple(source[key].shape)} there and "
                            f"{tuple(target[key].shape)} in this net: another depth, growth rate or "
                            "input channel count")
    replace = any(k not in source or tuple(source[k].shape) != tuple(target[k].shape) for k in head)
    weights = {k: v for k, v in source.items() if not (replace and k in head)}
    model.load_state_dict({**target, **weights}, strict=True)
    before = source.get("classifier.weight")
    if replace:
        say(f"init: {file}: every layer but the classifier; classifier replaced "
            f"({before.shape[0] if before is not None else '?'} -> {target['classifier.weight'].shape[0]} "
            "classes, freshly initialised)")
    else:
        say(f"init: {file}: every layer, the classifier included")
    return {"source": file, "sha256": digest, "classifier": "replaced" if replace else "loaded"}
