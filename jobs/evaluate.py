"""`python -m jobs.evaluate --config cfg.json`: top-1/top-5 error of a checkpoint on a store.

Config keys: checkpoint, store (a path or URI; empty: the store the net trained on), tta (none|flip|10crop), batch_size,
loader_workers, stage (auto|always|never, see `pipeline.data.staging`), gpu (the driver
holds one GPU and evaluates on it), out (a JSON file for the result, or a folder to
write it into; default: evaluation-<store>-<tta>.json beside the checkpoint).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from jobs import common


@dataclass
class EvaluateConfig:
    checkpoint: str
    store: str = ""
    # Values are checked where they are used, with the flag's name in the error.
    tta: str = "none"
    batch_size: int = 128
    loader_workers: int = 2
    stage: str = "auto"
    gpu: bool = False
    weights: str = "auto"
    out: str | None = None


def run(data: dict[str, Any]) -> None:
    from pipeline import storage
    from pipeline.parsing import parse_dataclass
    from pipeline.train import checkpoint
    from pipeline.train.evaluate import evaluate

    conf = parse_dataclass(EvaluateConfig, data)
    ckpt = common.resolve_path(conf.checkpoint)
    if conf.store:
        store = common.resolve_path(conf.store)
    else:
        from pipeline.train.evaluate import trained_store

        store = trained_store(checkpoint.load(ckpt), ckpt)
        print(f"data: {storage.display(store)} (the store the net trained on)", flush=True)
    # Where the result goes is settled before the work: a folder takes it under its default name.
    name = f"evaluation-{storage.name(store)}-{conf.tta}.json"
    out = common.resolve_path(conf.out) if conf.out else storage.join(storage.parent(checkpoint.find(ckpt)), name)
    if storage.is_dir(out):
        out = storage.join(out, name)
    _check_replaceable(out)
    result = evaluate(ckpt, store, tta=conf.tta, batch_size=conf.batch_size,
                      loader_workers=conf.loader_workers, stage=conf.stage, gpu=conf.gpu,
                      weights=conf.weights, say=lambda line: print(line, flush=True))
    storage.write_text(out, json.dumps(result, indent=2) + "\n")
    print(f"{result['model']} epoch {result['epoch']} ({result['weights']} weights) on {result['dataset']} val ({result['images']} images, "
          f"tta {result['tta']}): top-1 error {result['top1_error']:.4f}"
          + (f", top-5 error {result['top5_error']:.4f}" if result["num_classes"] > 5 else ""), flush=True)
    print(f"wrote {storage.display(out)}", flush=True)


def _check_replaceable(out: str) -> None:
    """An evaluation written before is replaced (evaluating again updates it); another file is kept."""
    from pipeline import storage
    from pipeline.errors import UserError

    if not storage.is_file(out):
        return
    try:
        ours = "top1_error" in json.loads(storage.read_text(out))
    except (ValueError, TypeError, UnicodeDecodeError):
        ours = False
    if not ours:
        raise UserError(f"--out {out} exists and holds no evaluation result: choose another --out "
                        "(a result written before is replaced)")


if __name__ == "__main__":
    common.main(run)
