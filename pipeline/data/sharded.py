"""`prepare --nodes N`: each split written as N contiguous shards, one per node, then merged.

    written = write_splits_sharded(cfg, src, settings, Path("tmp"), log)
    page, skipped, shards, metadata = written["train"]

Runs in the prepare job's driver. Each node runs one Ray task pinned to it that holds all of
the node's CPUs and writes samples [start, stop) of each split with that many writer
processes into the node's temporary folder, exactly as a 1-node prepare would write them (one
task for both splits: a task start costs seconds of imports). The task then streams its
files' pages back in 32 MiB objects (the shard on the driver's own node leaves its files
where the driver reads them), and the driver merges the shards in
order (`merge.py`), so the store's samples are in the same order as a 1-node prepare's and its
images are byte-identical (for the deterministic write modes: raw, jpg, smart). Every node must
see the same --source (a shared mount or the same copy on each), which each shard checks.

A node's shard waits on its disk, not in Ray's object store, until the driver reaches it: the
stream holds at most a few chunks ahead of the merge.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import UserError
import numpy as np

from .merge import CHUNK, data_chunks, merge_betons, read_layout, read_metadata
from .prepare_config import PrepareConfig
from .readers import Source
from .writer import WriteSettings

Log = Callable[[str], None]
# Chunks a shard may stream ahead of the merge: memory held per node is this times CHUNK.
AHEAD = 4


def shard_bounds(n: int, parts: int) -> list[tuple[int, int]]:
    """`parts` contiguous [start, stop) slices of range(n), sizes differing by at most one
    (fewer slices when n < parts: no shard is empty)."""
    parts = max(1, min(parts, n))
    q, r = divmod(n, parts)
    bounds, start = [], 0
    for i in range(parts):
        stop = start + q + (i < r)
        bounds.append((start, stop))
        start = stop
    return bounds


def pick_nodes(count: int) -> list[tuple[str, int]]:
    """(node id, CPUs) of `count` alive nodes that have CPUs, most CPUs first."""
    import ray

    if not ray.is_initialized():
        ray.init(log_to_driver=True)
    nodes = sorted(((n["NodeID"], int(n["Resources"].get("CPU", 0))) for n in ray.nodes()
                    if n.get("Alive") and n["Resources"].get("CPU", 0) >= 1),
                   key=lambda x: -x[1])
    if len(nodes) < count:
        raise UserError(f"--nodes {count} needs {count} nodes with CPUs; the cluster has "
                        f"{len(nodes)}: pass --nodes {max(len(nodes), 1)} or add nodes")
    return nodes[:count]


def _write_shard(cfg_dict: dict[str, Any], bounds: dict[str, tuple[int, int]],
                 expected: dict[str, int], workers: int, keep_dir: str | None = None) -> Iterator[Any]:
    """On a node: write each split's [start, stop) slice; yield a head (per split its Layout,
    page size and skipped images), then every split's pages in order. With `keep_dir` (the
    shard on the driver's own node) the files are written there and left for the driver to
    read: only the head is yielded."""
    from .prepare import write_indices, writer_settings
    from .readers import read_source

    cfg = PrepareConfig.from_dict(cfg_dict)
    host = socket.gethostname()
    src = read_source(cfg)
    for name, n in expected.items():
        if len(src.splits[name]) != n:
            raise UserError(f"{host} sees {len(src.splits[name]):,} {name} images in {cfg.source}, "
                            f"the driver {n:,}: with --nodes every node must see the same --source "
                            "(a shared mount)")
    settings = writer_settings(cfg, src)
    if keep_dir is not None:
        tmp = Path(keep_dir)
        tmp.mkdir(parents=True, exist_ok=True)
    else:
        tmp = Path(tempfile.mkdtemp(prefix="densenet-pipe-shard-"))
    try:
        head, paths = {}, {}
        for name, (start, stop) in bounds.items():
            paths[name] = tmp / f"{name}.beton"
            page, skipped = write_indices(
                paths[name], src.splits[name], settings, workers=workers,
                indices=list(range(start, stop)), skip_bad=cfg.skip_bad, bad_dir=tmp / f"bad-{name}",
                name=name, log=lambda s: print(s, flush=True),
                label=f"{name}[{start:,}:{stop:,}] on {host}")
            head[name] = {"layout": read_layout(paths[name]), "page": page, "skipped": skipped}
        yield {"splits": head, "host": host}
        if keep_dir is None:
            for name in bounds:
                yield from data_chunks(paths[name], head[name]["layout"], CHUNK)
    finally:
        if keep_dir is None:
            shutil.rmtree(tmp, ignore_errors=True)


def _unwrap(e: Exception, shard: str) -> Exception:
    cause = getattr(e, "cause", None)
    if isinstance(cause, UserError):
        return UserError(f"{shard}: {cause}")
    return e


def write_splits_sharded(cfg: PrepareConfig, src: Source, settings: WriteSettings, tmp: Path,
                         log: Log) -> dict[str, tuple[int, dict[int, str], list[dict], np.ndarray]]:
    """Write every split of `src` into `tmp` across `cfg.nodes` nodes; returns per split
    (page size, skipped images by index, one record per shard for the manifest, the merged
    file's metadata read back). The driver never imports FFCV: its import costs seconds that
    would come after the shards, on the critical path."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    names = list(src.splits)
    nodes = pick_nodes(cfg.nodes)
    sizes = {name: len(src.splits[name]) for name in names}
    bounds = {name: shard_bounds(n, len(nodes)) for name, n in sizes.items()}
    # A split smaller than the node count has fewer shards; its last nodes write none of it.
    task = ray.remote(_write_shard)
    # The shard on this node writes into `tmp` and the merge reads it from the disk: its
    # pages need not pass through the object store.
    here = ray.get_runtime_context().get_node_id()
    local: dict[int, Path] = {}
    gens = []
    for i, (node, cpus) in enumerate(nodes):
        mine = {name: b[i] for name, b in bounds.items() if i < len(b)}
        if node == here:
            local[i] = tmp / f".shard-{i}"
        log(f"shard {i} on node {node[:8]}{' (this one)' if i in local else ''} with {cpus} writer(s): "
            + ", ".join(f"{name} [{a:,}, {z:,})" for name, (a, z) in mine.items()))
        gens.append(task.options(
            num_cpus=cpus, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
            _generator_backpressure_num_objects=AHEAD,
        ).remote(cfg.to_dict(), mine, sizes, cpus, str(local[i]) if i in local else None))

    def get(i: int, ref: Any) -> Any:
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            raise _unwrap(e, f"shard {i}") from None

    def pages(i: int, name: str, layout) -> Iterator[Any]:
        if i in local:
            yield from data_chunks(local[i] / f"{name}.beton", layout, CHUNK)
            return
        nbytes = layout.data_bytes
        while nbytes > 0:
            chunk = get(i, next(gens[i]))
            nbytes -= len(chunk)
            yield chunk

    out: dict[str, tuple[int, dict[int, str], list[dict], np.ndarray]] = {}
    try:
        heads = [get(i, next(gen)) for i, gen in enumerate(gens)]
        log(f"{len(heads)} shards written; merging them in order")
        for name in names:
            parts = [(i, h["splits"][name]) for i, h in enumerate(heads) if name in h["splits"]]
            merge_betons(tmp / f"{name}.beton",
                         [(p["layout"], pages(i, name, p["layout"])) for i, p in parts])
            skipped: dict[int, str] = {}
            for _, p in parts:
                skipped.update(p["skipped"])
            records = [{"start": a, "stop": z, "host": heads[i]["host"], "samples": p["layout"].num_samples}
                       for (i, p), (a, z) in zip(parts, bounds[name])]
            log(f"{name}: merged {len(parts)} shards into {name}.beton "
                f"({os.path.getsize(tmp / f'{name}.beton') / 2**20:,.1f} MiB)")
            meta = read_metadata(tmp / f"{name}.beton", parts[0][1]["layout"])
            out[name] = (parts[0][1]["page"], skipped, records, meta)
    finally:
        for gen in gens:
            try:
                ray.cancel(gen)
            except Exception:  # noqa: BLE001  (a finished task cannot be cancelled; fine)
                pass
        for folder in local.values():
            shutil.rmtree(folder, ignore_errors=True)
    return out
