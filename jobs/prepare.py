"""`python -m jobs.prepare --config cfg.json`: write one FFCV store (the `prepare` Ray job).

The config is a PrepareConfig as JSON (what `densenet-pipe prepare` submits). Exit codes as
in `jobs.common`: 0 published, 2 bad input (one `error:` line; nothing published), 1 anything
else. SIGTERM (`densenet-pipe jobs stop`) removes the temporary folder before exiting.
"""

from __future__ import annotations

import json
import signal
from typing import Any

from jobs import common
from pipeline.errors import JobFailed


def _stop(signum: int, frame: Any) -> None:
    raise JobFailed("prepare was stopped; nothing was published")


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    """Prepare the store described by `cfg`; returns a summary of the published manifest."""
    from pipeline.data.prepare import prepare
    from pipeline.data.prepare_config import PrepareConfig

    signal.signal(signal.SIGTERM, _stop)
    cfg = {**cfg, **{key: common.resolve_path(cfg[key]) for key in ("source", "out") if cfg.get(key)}}
    m = prepare(PrepareConfig.from_dict(cfg), log=lambda s: print(s, flush=True))
    summary = {"store": m.path, "dataset": m.dataset, "num_classes": m.num_classes,
               "train": m.splits["train"].count, "val": m.splits["val"].count,
               "skipped": len(m.skipped)}
    print(f"prepared {json.dumps(summary)}", flush=True)
    return summary


if __name__ == "__main__":
    common.main(run)
