"""`python -m jobs.train --config cfg.json`: one Ray Train run (the `train` Ray job).

Checks the store and the model against it, then trains; see `pipeline.train.trainer`.
"""

from __future__ import annotations

from typing import Any

from jobs import common


def prepare_config(data: dict[str, Any]):
    """The validated config with absolute paths and the store's class count, and the manifest."""
    from pipeline.config import Config, apply_overrides, validate
    from pipeline.data.staging import locate
    from pipeline.errors import UserError
    from pipeline.runs import check_classes, check_resizing, default_storage, resumed, resumed_sweep
    from pipeline.storage import check

    cfg = Config.from_dict(data)
    # A resume is validated as the run's (or sweep's) saved config with the allowed changes.
    cfg = cfg if cfg.train.resume or cfg.sweep.resume else validate(cfg)
    # The CLI fills in ./runs for the embedded cluster; a remote cluster's default is its own.
    storage = check(cfg.cluster.storage or default_storage(local_cluster=False))
    if cfg.train.resume:
        cfg = resumed(cfg, common.resolve_path(storage))
    elif cfg.sweep.resume:
        cfg = resumed_sweep(cfg, common.resolve_path(storage))
    if not cfg.data.store:
        raise UserError("no training data: pass --data STORE (a folder made by `densenet-pipe prepare`)")
    manifest, digest = locate(common.resolve_path(cfg.data.store))
    check_classes(cfg.model.num_classes, manifest.num_classes, manifest.path)
    check_resizing(cfg.data.min_res, manifest.family, manifest.path)
    cfg = apply_overrides(cfg, {"data.store": manifest.path, "model.num_classes": manifest.num_classes,
                                "cluster.storage": common.resolve_path(storage)})
    if cfg.model.init_from:
        cfg = _check_init(cfg)
    return cfg, manifest, digest


def _check_init(cfg):
    """The starting weights fit the net (one line if not), checked here once, not by every
    worker. Quietly: rank 0 says what it loaded when it loads it."""
    from pipeline.config import apply_overrides
    from pipeline.models.densenet import build
    from pipeline.models.init import load_into, resolve

    location = resolve(cfg.model.init_from, cfg.model.name)
    load_into(build(cfg.model_spec()), location, say=lambda line: None)
    return apply_overrides(cfg, {"model.init_from": location})


def run(data: dict[str, Any]) -> None:
    from pipeline.train import trainer

    cfg, manifest, digest = prepare_config(data)
    trainer.run(cfg, manifest, manifest_sha256=digest)


if __name__ == "__main__":
    common.main(run)
