"""`python -m jobs.sweep --config cfg.json`: a Ray Tune sweep, each trial a Ray Train run."""

from __future__ import annotations

from typing import Any

from jobs import common
from jobs.train import prepare_config


def run(data: dict[str, Any]) -> None:
    from pipeline.tune import sweep

    cfg, manifest, digest = prepare_config(data)
    sweep.run(cfg, manifest, manifest_sha256=digest)


if __name__ == "__main__":
    common.main(run)
