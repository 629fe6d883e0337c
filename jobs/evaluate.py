"""`python -m jobs.evaluate --config cfg.json`: top-1/top-5 error of a checkpoint on a store.

Config keys: checkpoint, store (a path or URI), tta (none|flip|10crop), batch_size,
loader_workers, stage (auto|always|never, see `pipeline.data.staging`), gpu (the driver
holds one GPU and evaluates on it), out (a JSON file for
the result; default: evaluation-<store>-<tta>.json beside the checkpoint).
"""

from __future__ import annotations

import json
from typing import Any

from jobs import common


def run(data: dict[str, Any]) -> None:
    from pipeline import storage
    from pipeline.errors import UserError
    from pipeline.train import checkpoint
    from pipeline.train.evaluate import evaluate

    unknown = set(data) - {"checkpoint", "store", "tta", "batch_size", "loader_workers", "out", "stage", "gpu", "weights"}
    if unknown or "checkpoint" not in data or "store" not in data:
        raise UserError(f"evaluate config needs checkpoint and store (unknown keys: {sorted(unknown)})")
    ckpt = common.resolve_path(data["checkpoint"])
    store = common.resolve_path(data["store"])
    result = evaluate(ckpt, store, tta=data.get("tta", "none"), batch_size=int(data.get("batch_size", 128)),
                      loader_workers=int(data.get("loader_workers", 2)), stage=data.get("stage", "auto"), gpu=bool(data.get("gpu", False)),
                      weights=data.get("weights", "auto"),
                      say=lambda line: print(line, flush=True))
    out = common.resolve_path(data["out"]) if data.get("out") else storage.join(
        storage.parent(checkpoint.find(ckpt)), f"evaluation-{storage.name(store)}-{result['tta']}.json")
    storage.write_text(out, json.dumps(result, indent=2) + "\n")
    print(f"{result['model']} epoch {result['epoch']} ({result['weights']} weights) on {result['dataset']} val ({result['images']} images, "
          f"tta {result['tta']}): top-1 error {result['top1_error']:.4f}, top-5 error "
          f"{result['top5_error']:.4f}", flush=True)
    print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    common.main(run)
