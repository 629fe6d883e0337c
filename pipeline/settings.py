"""The user's settings: where each dataset's official files live, and where stores go.

    # ~/.config/densenet-pipe/config.yaml  ($XDG_CONFIG_HOME honoured; $DENSENET_PIPE_CONFIG
    # names another file)
    store_root: /data/stores
    sources:
      imagenet: /data/ILSVRC2012
      cifar10: /data/cifar-10-python.tar.gz

Every key can also come from the environment, which wins over the file:
`DENSENET_PIPE_STORE_ROOT`, `DENSENET_PIPE_SOURCES_IMAGENET`, ... (`env_name`).
`prepare DATASET` reads `sources.DATASET` when `--source` is not given and writes to
`store_root/DATASET`; `train MODEL` without `--data` trains on `store_root/DATASET`.
Without a `store_root` it is `stores/` in the current folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError

FILE_ENV = "DENSENET_PIPE_CONFIG"
DEFAULT_STORE_ROOT = "stores"
DATASETS = ("imagenet", "cifar10", "cifar100", "svhn", "imagefolder")
KEYS = ("store_root",) + tuple(f"sources.{d}" for d in DATASETS)
# What `--source` points at for each dataset (datasets/README.md has the layouts).
SOURCE_EXAMPLES = {
    "imagenet": "/data/imagenet  (ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar, devkit)",
    "cifar10": "/data/cifar-10-python.tar.gz",
    "cifar100": "/data/cifar-100-python.tar.gz",
    "svhn": "/data/svhn  (train_32x32.mat, test_32x32.mat)",
    "imagefolder": "/data/my-images  (train/CLASS/*.jpg, val/CLASS/*.jpg)",
}


def config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base).expanduser() / "densenet-pipe"


def path() -> Path:
    return Path(os.environ[FILE_ENV]).expanduser() if os.environ.get(FILE_ENV) else config_dir() / "config.yaml"


def env_name(key: str) -> str:
    return "DENSENET_PIPE_" + key.upper().replace(".", "_")


def check_key(key: str) -> None:
    if key not in KEYS:
        raise UserError(f"unknown setting {key!r}: settings are {', '.join(KEYS)}")


def _load_file() -> dict[str, Any]:
    import yaml

    file = path()
    if not file.exists():
        return {}
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as e:
        reason = " ".join(str(e).split())[:160]
        raise UserError(f"settings file {file} is not readable YAML ({reason}): fix it or "
                        f"remove it and use `densenet-pipe config set`") from None
    if not isinstance(data, dict):
        raise UserError(f"settings file {file} must hold a mapping (store_root: ..., sources: ...)")
    return data


def _flat(data: dict[str, Any]) -> dict[str, str]:
    out = {}
    if data.get("store_root") not in (None, ""):
        out["store_root"] = str(data["store_root"])
    for name, value in (data.get("sources") or {}).items():
        if value not in (None, ""):
            out[f"sources.{name}"] = str(value)
    return out


@dataclass
class Setting:
    key: str
    value: str | None
    where: str  # the environment variable or the file it came from; "" when unset


def get(key: str) -> Setting:
    check_key(key)
    env = env_name(key)
    if os.environ.get(env):
        return Setting(key, os.environ[env], f"${env}")
    value = _flat(_load_file()).get(key)
    return Setting(key, value, str(path()) if value is not None else "")


def show() -> list[Setting]:
    return [get(k) for k in KEYS]


def set_value(key: str, value: str | None) -> Path:
    """Write `key` (None removes it) into the settings file, keeping every other key."""
    import yaml

    check_key(key)
    data = _load_file()
    if key == "store_root":
        data.pop("store_root", None) if value is None else data.__setitem__("store_root", value)
    else:
        sources = dict(data.get("sources") or {})
        name = key.split(".", 1)[1]
        sources.pop(name, None) if value is None else sources.__setitem__(name, value)
        data["sources"] = sources
        if not sources:
            data.pop("sources")
    file = path()
    file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = file.with_name(f".{file.name}.tmp")
    tmp.write_text("# densenet-pipe settings; `densenet-pipe config show` lists every key.\n"
                   + yaml.safe_dump(data, sort_keys=True))
    os.replace(tmp, file)
    return file


def where_to_add(key: str, example: str) -> str:
    """Where a missing key was looked for, and the one line that sets it."""
    return (f"nothing in {path()} or ${env_name(key)}; set it with "
            f"`densenet-pipe config set {key} {example}`")


def store_root() -> Path:
    root = get("store_root").value or DEFAULT_STORE_ROOT
    return Path(root).expanduser()


def source_for(dataset: str) -> tuple[str, str]:
    """(the dataset's official files, where that came from), or a UserError saying where it
    looked and the line to add."""
    key = f"sources.{dataset}"
    found = get(key) if key in KEYS else Setting(key, None, "")
    if not found.value:
        example = SOURCE_EXAMPLES.get(dataset, "/path/to/files").split()[0]
        raise UserError(f"{dataset} needs --source (its official files): {where_to_add(key, example)}")
    return found.value, found.where
