"""`python -m jobs.train --config cfg.json`: one Ray Train run (the `train` Ray job).

Checks the store and the model against it, then trains; see `pipeline.train.trainer`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jobs import common


def prepare_config(data: dict[str, Any]):
    """The validated config with absolute paths and the store's class count, and the manifest."""
    from pipeline.config import Config, apply_overrides, validate
    from pipeline.data.store import open_store
    from pipeline.errors import UserError
    from pipeline.storage import check

    cfg = validate(Config.from_dict(data))
    manifest = open_store(common.resolve_path(cfg.data.store))
    if cfg.model.num_classes not in (None, manifest.num_classes):
        raise UserError(f"model.num_classes is {cfg.model.num_classes} but store {manifest.path} has "
                        f"{manifest.num_classes} classes: drop model.num_classes or use the matching store")
    storage = check(cfg.cluster.storage or str(Path.home() / "densenet-pipe" / "runs"))
    cfg = apply_overrides(cfg, {"data.store": manifest.path, "model.num_classes": manifest.num_classes,
                                "cluster.storage": common.resolve_path(storage)})
    return cfg, manifest


def run(data: dict[str, Any]) -> None:
    from pipeline.data.store import sha256_file
    from pipeline.train import trainer

    cfg, manifest = prepare_config(data)
    trainer.run(cfg, manifest, manifest_sha256=sha256_file(Path(manifest.path) / "manifest.json"))


if __name__ == "__main__":
    common.main(run)
