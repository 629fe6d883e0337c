"""`python -m jobs.predict --config cfg.json`: batch inference across the cluster on Ray Data.

Config keys: checkpoint, inputs (folders and image files, or one store), top_k, batch_size,
actors (model-holding Ray Data actors), gpu, split (for a store), format (table|json|csv),
out (the file the rows go to, written whole at the end; empty: `default_out`), force
(replace an existing out).

Every actor loads the checkpoint once and classifies batches: image paths for files and
folders (every node must see them, as with stores), index ranges of the split for a store
(each actor reads its ranges with an FFCV loader). One row per image, in input order; an
image that does not decode is a row with its error.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from jobs import common


@dataclass
class PredictConfig:
    checkpoint: str
    inputs: list[str]
    out: str
    top_k: int = 5
    batch_size: int = 64
    actors: int = 1
    gpu: bool = False
    split: str = "val"
    format: str = "table"
    weights: str = "auto"
    force: bool = False

# A store is read in ranges of this many images: one FFCV loader per range.
STORE_CHUNK = 1024


class _Predictor:
    """A Ray Data actor: the net, loaded once, on its GPU with --gpu."""

    def __init__(self, checkpoint: str, top_k: int, gpu: bool, store: str | None, split: str,
                 batch_size: int, digest: str = "", weights: str = "auto"):
        import torch

        from pipeline import infer

        self.net = infer.load(checkpoint, weights)
        if gpu:
            self.net.model.to(torch.device("cuda"))
        self.top_k, self.store, self.split, self.batch_size = top_k, store, split, batch_size
        self.digest = digest

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        from pipeline import infer

        if self.store is None:
            rows = infer.predict_paths(self.net, [Path(p) for p in batch["path"]], self.top_k,
                                       batch_size=self.batch_size)
            order = list(batch["order"])
        else:
            rows, order = [], []
            for start, stop in zip(batch["start"], batch["stop"]):
                part = infer.predict_store(self.net, self.store, self.split, self.top_k,
                                           self.batch_size, indices=range(int(start), int(stop)),
                                           digest=self.digest)
                rows += part
                order += list(range(int(start), int(stop)))
        return {"order": np.asarray(order, dtype=np.int64),
                "row": np.asarray([json.dumps(r) for r in rows], dtype=object)}


def run(data: dict[str, Any]) -> None:
    import ray

    from pipeline import infer
    from pipeline import storage
    from pipeline.data.staging import display, locate, prestage
    from pipeline.data.store import MANIFEST
    from pipeline.errors import UserError
    from pipeline.parsing import parse_dataclass

    conf = parse_dataclass(PredictConfig, data)
    if not conf.inputs:
        raise UserError("predict config: inputs is empty: name image files, folders or a store")
    checkpoint = common.resolve_path(conf.checkpoint)
    inputs = [common.resolve_path(i) for i in conf.inputs]
    top_k, batch_size, fmt, split, gpu = conf.top_k, conf.batch_size, conf.format, conf.split, conf.gpu
    weights = conf.weights
    out = Path(common.resolve_path(conf.out) if conf.out else default_out(fmt))
    storage.check_out_file(out, "--out", force=conf.force)
    net = infer.load(checkpoint, weights)  # here first: a checkpoint that is not ours is one line
    one = inputs[0] if len(inputs) == 1 else ""
    store = one if one and (storage.is_uri(one) or (Path(one) / MANIFEST).is_file()) else None
    digest = ""
    if store is not None:
        manifest, digest = locate(store)
        from pipeline import runs

        runs.check_checkpoint_classes(net.spec.num_classes, net.classes, manifest.classes, display(store))
        count = manifest.splits[split].count
        items = [{"start": s, "stop": min(s + STORE_CHUNK, count)} for s in range(0, count, STORE_CHUNK)]
        what = f"{count:,} images of {display(store)} ({split})"
    else:
        files = infer.image_files(inputs)
        items = [{"order": i, "path": str(p)} for i, p in enumerate(files)]
        count = len(files)
        what = f"{count:,} image(s)"
    actors = max(1, min(conf.actors, len(items)))
    print(f"predicting {what} with {actors} actor(s) on Ray Data{' (GPUs)' if gpu else ''}", flush=True)
    ray.init(log_to_driver=True)
    if store is not None:
        from pipeline.config import DataSection

        prestage(store, digest, DataSection(store=store), say=lambda line: print(line, flush=True))
    dataset = ray.data.from_items(items).map_batches(
        _Predictor, fn_constructor_kwargs={"checkpoint": checkpoint, "top_k": top_k, "gpu": gpu,
                                           "store": store, "split": split, "batch_size": batch_size,
                                           "digest": digest, "weights": weights},
        batch_size=1 if store is not None else batch_size, compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=1, num_gpus=1 if gpu else 0)
    arrived = _told(dataset.iter_rows(), count)
    rows = [json.loads(r["row"]) for r in sorted(arrived, key=lambda r: int(r["order"]))]
    text = infer.render(rows, fmt, min(top_k, len(net.classes)))
    infer.write_rows(out, text)
    bad = sum(1 for r in rows if r["error"])
    if score := infer.scored(rows):
        print(score, flush=True)
    print(f"wrote {len(rows):,} row(s) to {display(out)}" + (f"; {bad} image(s) could not be read" if bad else ""),
          flush=True)


def default_out(fmt: str) -> str:
    """Where the rows go when the user named no file (a remote cluster: the CLI's folder is
    not there): predictions-TIME.FORMAT in the job's home folder."""
    suffix = "txt" if fmt == "table" else fmt
    return str(common.home_folder() / f"predictions-{time.strftime('%Y%m%d-%H%M%S')}.{suffix}")


def _told(rows: Iterable[dict], count: int) -> Iterator[dict]:
    """`rows` as they come, with a progress line when another tenth of `count` is in (at most
    one every 2 s) and when all are: a folder of a million images is minutes of work that Ray
    Data's own bars (Ray's chatter on the console) would leave silent."""
    began = last = time.monotonic()
    done, told, whole = 0, 0, max(count, 1)
    for row in rows:
        done += 1
        yield row
        now = time.monotonic()
        tenth = done * 10 // whole
        if done == count or (tenth > told and now - last >= 2.0):
            told, last = tenth, now
            print(f"predicted {done:,} of {count:,} images ({done / whole:.0%}, "
                  f"{done / max(now - began, 1e-9):,.0f}/s)", flush=True)


if __name__ == "__main__":
    common.main(run)
