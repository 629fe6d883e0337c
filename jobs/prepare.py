"""`python -m jobs.prepare --config cfg.json`: write one FFCV store (the `prepare` Ray job).

The config is a PrepareConfig as JSON (what `densenet-pipe prepare` submits). Exit codes:
0 published, 2 bad input (one `error:` line; nothing published), 1 anything else. SIGTERM
(`densenet-pipe jobs stop`) cleans up the temporary folder before exiting.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import Any


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    """Prepare the store described by `cfg`; returns a summary of the published manifest."""
    from pipeline.data.prepare import prepare
    from pipeline.data.prepare_config import PrepareConfig

    m = prepare(PrepareConfig.from_dict(cfg), log=lambda s: print(s, flush=True))
    return {"store": m.path, "dataset": m.dataset, "num_classes": m.num_classes,
            "train": m.splits["train"].count, "val": m.splits["val"].count,
            "skipped": len(m.skipped)}


def _stop(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    from pipeline.errors import UserError

    parser = argparse.ArgumentParser(prog="python -m jobs.prepare", description=__doc__)
    parser.add_argument("--config", required=True, type=Path, help="PrepareConfig JSON file")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _stop)
    try:
        try:
            cfg = json.loads(args.config.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read config {args.config}: {e}") from None
        summary = run(cfg)
    except UserError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("error: prepare interrupted; nothing was published", file=sys.stderr, flush=True)
        return 130
    print(f"prepared {json.dumps(summary)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
