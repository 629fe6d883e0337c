"""`python -m jobs.sweep --config cfg.json`: a Ray Tune sweep, each trial a Ray Train run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jobs import common
from jobs.train import prepare_config


def run(data: dict[str, Any]) -> None:
    from pipeline.data.store import sha256_file
    from pipeline.tune import sweep

    cfg, manifest = prepare_config(data)
    sweep.run(cfg, manifest, manifest_sha256=sha256_file(Path(manifest.path) / "manifest.json"))


if __name__ == "__main__":
    common.main(run)
