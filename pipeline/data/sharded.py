"""`prepare --nodes N`: each split written in contiguous pieces by N nodes, merged as they come.

    written = write_splits_sharded(cfg, src, settings, Path("tmp"), log)
    page, skipped, shards, metadata = written["train"]

Runs in the prepare job's driver. Each node runs one writer actor pinned to it that holds all
of the node's CPUs (FFCV is imported once per node) and writes whatever piece of a split the
driver hands it, with that many writer processes, exactly as a 1-node prepare would write those
samples. Pieces are handed out as nodes free up, each the work left divided by the node count
(guided self-scheduling): the first pieces are large, the last ones small, so a slow or busy
node takes less and the nodes finish within a small piece of each other. A node whose writer
dies in the middle of a piece loses that piece only: it is handed whole to the nodes left; so
is a piece written on a node lost before its pages reached the driver.

The driver appends each finished piece's pages to the split's file as soon as it is done, in
whatever order pieces finish (FFCV finds a sample's pages by pointer, not by position), and
writes the metadata rows in sample order at the end (`merge.MergedFile`). The merge so runs
behind the writing instead of after it, and the store's samples are in the same order as a
1-node prepare's, their images byte-identical (for the deterministic write modes: raw, jpg,
smart). Pages of a piece on another node stream back in 32 MiB objects; a piece written on the
driver's own node is read from its disk. Every node must see the same --source (a shared mount
or the same copy on each), which each writer checks.

A piece waits on its node's disk, not in Ray's object store, until the driver takes it: a
stream holds at most a few chunks ahead of the merge.
"""

from __future__ import annotations

import os
import queue
import secrets
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from .. import errors, scratch
from ..errors import UserError
from .merge import CHUNK, Layout, MergedFile, data_chunks, read_layout, read_metadata
from .prepare_config import HOLD_ENV, HOLD_STREAMS_ENV, PIECES_ENV, PrepareConfig
from .readers import Source
from .writer import WriteSettings

Log = Callable[[str], None]
# Chunks a piece may stream ahead of the merge: memory held per node is this times CHUNK.
AHEAD = 4
# The smallest piece handed out (fewer when a split is smaller than this per node): each piece
# costs a writer start, a file and a round trip to the driver.
SMALLEST = 512
# No piece is more than this fraction of a node's share of the whole job: a piece's pages are
# merged when it ends, so the pieces that end last, which are merged after all writing is
# done, should be small. Pure guided self-scheduling hands the first node half the job on 2
# nodes, which it finishes last.
LARGEST_SHARE = 4
# A writer off the driver's machine writes its pieces in <temp>/<this><pid>-...
SHARD_PREFIX = "densenet-pipe-shard-"
# A piece that could not be read back from its node this many times fails the prepare: a node
# lost costs its pieces once, a fault that follows a piece everywhere would never end.
TRIES = 3


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


@dataclass(frozen=True)
class Piece:
    split: str
    index: int   # its place among the split's pieces, in sample order
    start: int
    stop: int

    def __str__(self) -> str:
        return f"{self.split}[{self.start:,}:{self.stop:,}]"


class Pieces:
    """The splits' samples in contiguous pieces, in order, each sized when a node asks for it:
    the samples not yet handed out over the node count, at most a LARGEST_SHARE-th of a node's
    share of the job, at least SMALLEST (or a split's share per node, when that is less, so a
    small split still spreads over every node)."""

    def __init__(self, sizes: dict[str, int], nodes: int, smallest: int = SMALLEST):
        self.sizes, self.nodes = dict(sizes), max(1, nodes)
        self.next = {name: 0 for name in sizes}
        self.count = {name: 0 for name in sizes}
        self.left = sum(sizes.values())
        self.cap = max(1, -(-self.left // (self.nodes * LARGEST_SHARE)))
        self.floor = {name: max(1, min(smallest, -(-n // self.nodes))) for name, n in sizes.items()}
        self.again: list[Piece] = []

    def give_back(self, piece: Piece) -> None:
        """A piece whose node died before it was written: the next `take` hands it out again,
        whole (its place among the split's pieces is already fixed)."""
        self.again.append(piece)
        self.left += piece.stop - piece.start

    def take(self) -> Piece | None:
        if self.again:
            piece = self.again.pop(0)
            self.left -= piece.stop - piece.start
            return piece
        for name, n in self.sizes.items():
            start = self.next[name]
            if start < n:
                break
        else:
            return None
        stop = min(n, start + max(self.floor[name], min(self.cap, -(-self.left // self.nodes))))
        piece = Piece(name, self.count[name], start, stop)
        self.next[name] = stop
        self.count[name] += 1
        self.left -= stop - start
        return piece


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


def machine_id() -> str:
    """This machine's boot id: Ray nodes started on one machine share it."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return socket.gethostname()


def on_drivers_machine(shared_dir: str, token: str | None, machine: str) -> bool:
    """Whether this node can write pieces where the driver reads them from its own disk: it
    runs on the driver's machine (`machine`, the driver's boot id) and reads the driver's
    `token` in `shared_dir` (a container on that machine with other mounts does not). Another
    machine that sees the folder does so over a network filesystem: streaming moves each byte
    over the network once, writing there and copying back three times."""
    if token is None or machine != machine_id():
        return False
    try:
        return (Path(shared_dir) / ".token").read_text() == token
    except OSError:
        return False


class NodeWriter:
    """On one node: writes the pieces it is handed. A node on the driver's machine that sees
    the driver's piece folder (`shared_dir`, holding `token`) writes there and the driver
    copies its pieces from the disk; any other writes into its own temporary folder and its
    pieces stream to the driver (`_stream`)."""

    def __init__(self, cfg_dict: dict[str, Any], expected: dict[str, int], workers: int,
                 shared_dir: str, token: str | None, machine: str):
        self.args = (cfg_dict, expected, shared_dir, token, machine)
        self.workers = workers
        self.host = socket.gethostname()
        self.src: Source | None = None
        self.keep = False
        self.dir: Path | None = None

    def _setup(self) -> None:
        """On the first piece, not in __init__: an error here then reaches the driver as the
        piece's error, one line, where a failed actor start is a dead actor."""
        from .prepare import writer_settings
        from .readers import read_source

        cfg_dict, expected, shared_dir, token, machine = self.args
        self.cfg = PrepareConfig.from_dict(cfg_dict)
        src = read_source(self.cfg)
        for name, n in expected.items():
            if len(src.splits[name]) != n:
                raise UserError(f"{self.host} sees {len(src.splits[name]):,} {name} images in "
                                f"{self.cfg.source}, the driver {n:,}: with --nodes every node must see "
                                "the same --source (a shared mount)")
        self.settings = writer_settings(self.cfg, src)
        self.keep = on_drivers_machine(shared_dir, token, machine)
        # A writer lost on this machine earlier (its node or process killed) left its folder.
        scratch.remove_dead(SHARD_PREFIX)
        self.dir = Path(shared_dir) if self.keep else scratch.make(SHARD_PREFIX)
        self.src = src

    def write(self, piece: Piece) -> dict[str, Any]:
        from .prepare import write_indices

        if self.src is None:
            self._setup()
        _hold(HOLD_ENV)
        # The writer's pid in the name: a piece given to another node after this one was lost
        # never meets a file this one may still be writing (a node unreachable, not dead).
        path = self.dir / f"{piece.split}-{piece.index:05d}-{os.getpid()}.beton"
        page, skipped = write_indices(
            path, self.src.splits[piece.split], self.settings, workers=self.workers,
            indices=list(range(piece.start, piece.stop)), skip_bad=self.cfg.skip_bad,
            bad_dir=self.dir / f"bad-{piece.split}-{piece.index:05d}-{os.getpid()}", name=piece.split,
            log=lambda line: print(line, flush=True), label=f"{piece} on {self.host}")
        return {"layout": read_layout(path), "page": page, "skipped": skipped, "host": self.host,
                "path": str(path), "shared": self.keep}

    def close(self) -> None:
        if self.dir is not None and not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)


def _hold(env: str) -> None:
    hold = os.environ.get(env)
    if not hold or not os.path.exists(hold):
        return
    Path(f"{hold}.{os.getpid()}").touch()
    while os.path.exists(hold):
        time.sleep(0.1)


def _stream(path: str, layout: Layout) -> Iterator[np.ndarray]:
    """On a writer's node: a written piece's pages, then the file is removed. A task of its own
    (no CPU asked for), so the node's writer goes on with its next piece meanwhile: the writer
    forks its processes, which a writer actor serving two calls at once on threads cannot do."""
    _hold(HOLD_STREAMS_ENV)
    try:
        yield from data_chunks(Path(path), layout, CHUNK)
    finally:
        Path(path).unlink(missing_ok=True)


def _node_alive(node: str) -> bool:
    import ray

    return any(n["NodeID"] == node and n.get("Alive") for n in ray.nodes())


def _unwrap(e: Exception, where: str) -> Exception:
    cause = getattr(e, "cause", None)
    if isinstance(cause, UserError):
        return UserError(f"{where}: {cause}")
    return e


def write_splits_sharded(cfg: PrepareConfig, src: Source, settings: WriteSettings, tmp: Path,
                         log: Log) -> dict[str, tuple[int, dict[int, str], list[dict], np.ndarray]]:
    """Write every split of `src` into `tmp` across `cfg.nodes` nodes; returns per split
    (page size, skipped images by index, one record per piece for the manifest, the merged
    file's metadata read back). The driver never imports FFCV: its import costs seconds that
    would come after the pieces, on the critical path."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    names = list(src.splits)
    nodes = pick_nodes(cfg.nodes)
    sizes = {name: len(src.splits[name]) for name in names}
    for name, n in sizes.items():
        if not n:
            raise UserError(f"{cfg.source} has no {name} images: check --source")
    here = ray.get_runtime_context().get_node_id()
    local_dir = tmp / ".pieces"
    local_dir.mkdir()
    token = secrets.token_hex(16)
    (local_dir / ".token").write_text(token)
    # `node`: only this node's writer uses the folder, as on a cluster of one node a machine.
    only_here = os.environ.get(PIECES_ENV) == "node"
    writer_cls = ray.remote(NodeWriter)
    stream_task = ray.remote(_stream)
    writers = []
    for node, cpus in nodes:
        writers.append(writer_cls.options(
            num_cpus=cpus,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
        ).remote(cfg.to_dict(), sizes, cpus, str(local_dir),
                 None if only_here and node != here else token, machine_id()))
    log(f"writing {' and '.join(names)} in pieces handed to {len(nodes)} nodes as each frees up: "
        + ", ".join(f"node {node[:8]}{' (this one)' if node == here else ''} with {cpus} writer(s)"
                    for node, cpus in nodes))

    merged = {name: MergedFile(tmp / f"{name}.beton", n) for name, n in sizes.items()}
    heads: dict[Piece, tuple[int, dict[str, Any]]] = {}
    done: queue.Queue = queue.Queue()
    # (piece, node, None) when a piece is merged; (piece, node, error) when its pages could not
    # be read back from its node (lost with its disk): the driver's loop hands it out again.
    settled: queue.Queue = queue.Queue()
    failed: list[BaseException] = []

    def where(i: int, piece: Piece | None = None) -> str:
        return f"{piece} on node {nodes[i][0][:8]}" if piece else f"node {nodes[i][0][:8]}"

    def merge() -> None:
        # Appends each piece as it is done, while the nodes write the next ones.
        while (item := done.get()) is not None:
            piece, i, head = item
            try:
                if head["shared"]:
                    merged[piece.split].append_file(head["layout"], Path(head["path"]), position=piece.index)
                    Path(head["path"]).unlink(missing_ok=True)
                else:
                    # No retry of its own: a stream cut off is handed out again as a piece,
                    # which also covers its node being gone with the pages on its disk.
                    stream = stream_task.options(
                        num_cpus=0, max_retries=0, _generator_backpressure_num_objects=AHEAD,
                        scheduling_strategy=NodeAffinitySchedulingStrategy(nodes[i][0], soft=False),
                    ).remote(head["path"], head["layout"])
                    merged[piece.split].append(head["layout"], (ray.get(ref) for ref in stream),
                                               position=piece.index)
            except ray.exceptions.RayError as e:
                if not isinstance(e, ray.exceptions.RayTaskError):  # Ray's, not our code's
                    settled.put((piece, i, e))  # the merged file is as it was before the piece
                    continue
                failed.append(_unwrap(e, where(i, piece)))
                return
            except BaseException as e:  # noqa: BLE001  (raised by the driver's loop below)
                failed.append(_unwrap(e, where(i, piece)))
                return
            settled.put((piece, i, None))

    merger = threading.Thread(target=merge, name="merge", daemon=True)
    merger.start()
    plan = Pieces(sizes, len(nodes))
    busy: dict[Any, tuple[int, Piece, float]] = {}
    alive = set(range(len(writers)))
    merging: set[Piece] = set()  # written, not yet settled by the merge
    lost: dict[Piece, int] = {}  # times a piece's pages could not be read back
    out: dict[str, tuple[int, dict[int, str], list[dict], np.ndarray]] = {}
    total, written, began = sum(sizes.values()), 0, time.monotonic()

    def hand(i: int) -> None:
        piece = plan.take()
        if piece is not None:
            busy[writers[i].write.remote(piece)] = (i, piece, time.monotonic())

    def hand_idle() -> None:
        for j in sorted(alive - {b[0] for b in busy.values()}):
            hand(j)

    def drop(i: int) -> None:
        alive.discard(i)
        ray.kill(writers[i])  # unreachable rather than dead: it writes nothing more

    def unread(piece: Piece, i: int, e: BaseException) -> None:
        """A written piece whose pages never reached the driver: written again elsewhere."""
        nonlocal written
        heads.pop(piece, None)
        written -= piece.stop - piece.start
        lost[piece] = lost.get(piece, 0) + 1
        if lost[piece] >= TRIES:
            raise RuntimeError(f"{piece} could not be read back from its node {TRIES} times, the last "
                               f"from {where(i)}: {errors.last_line(e)}") from None
        gone = isinstance(e, ray.exceptions.NodeDiedError) or not _node_alive(nodes[i][0])
        if gone and i in alive:
            drop(i)
        why = "the node is gone" if gone else errors.last_line(e).split(". ")[0]
        if not alive:
            raise RuntimeError(f"{piece} could not be read back from {where(i)} ({why}), and no node "
                               "is left to write it again") from None
        plan.give_back(piece)
        log(f"warning: {piece} could not be read back from {where(i)} ({why}); it is written again")
        hand_idle()

    try:
        for i in range(len(writers)):
            hand(i)
        while (busy or merging) and not failed:
            news: list[tuple[Piece, int, BaseException | None]] = []
            if busy:
                ready, _ = ray.wait(list(busy), num_returns=1, timeout=1.0)
            else:
                ready = []
                try:
                    news.append(settled.get(timeout=1.0))
                except queue.Empty:
                    pass
            while not settled.empty():
                news.append(settled.get_nowait())
            for piece, i, e in news:
                merging.discard(piece)
                if e is not None:
                    unread(piece, i, e)
            for ref in ready:
                i, piece, handed = busy.pop(ref)
                try:
                    head = ray.get(ref)
                except ray.exceptions.RayTaskError as e:
                    raise _unwrap(e, where(i, piece)) from None
                except ray.exceptions.RayActorError as e:
                    # A node lost (a spot node reclaimed, a writer killed for memory): its
                    # piece goes to the nodes left, whole; the pieces it finished are merged.
                    drop(i)
                    if not alive:
                        raise RuntimeError(f"the writer on {where(i)} died writing {piece}, the last "
                                           f"node left: {errors.last_line(e)}") from None
                    plan.give_back(piece)
                    log(f"warning: the writer on {where(i)} died writing {piece}; the piece goes to "
                        f"the {len(alive)} node(s) left")
                    hand_idle()
                    continue
                hand(i)
                heads[piece] = (i, head)
                merging.add(piece)
                done.put((piece, i, head))
                # The job's progress, in the driver's own words: the writers' lines are theirs
                # (one per node every few seconds), kept in the job's log, not on the console.
                now = time.monotonic()
                written += piece.stop - piece.start
                log(f"{piece} written on {where(i)} in {now - handed:.1f} s: {written:,} of {total:,} "
                    f"images ({written / total:.0%}, {written / max(now - began, 1e-9):,.0f}/s)")
        done.put(None)
        merger.join()
        if failed:
            raise failed[0]
        for name in names:
            pieces = sorted((p for p in heads if p.split == name), key=lambda p: p.index)
            merged[name].close()
            skipped: dict[int, str] = {}
            for p in pieces:
                skipped.update(heads[p][1]["skipped"])
            records = [{"start": p.start, "stop": p.stop, "node": nodes[heads[p][0]][0][:8],
                        "host": heads[p][1]["host"], "samples": heads[p][1]["layout"].num_samples}
                       for p in pieces]
            copied = sum(1 for p in pieces if heads[p][1]["shared"])
            log(f"{name}: {len(pieces)} pieces from {len({r['node'] for r in records})} node(s) merged "
                f"into {name}.beton ({os.path.getsize(tmp / f'{name}.beton') / 2**20:,.1f} MiB; "
                f"{copied} copied on this machine, {len(pieces) - copied} streamed)")
            first = heads[pieces[0]][1]
            out[name] = (first["page"], skipped, records, read_metadata(tmp / f"{name}.beton", first["layout"]))
    finally:
        done.put(None)
        for m in merged.values():
            m.discard()
        for writer in writers:
            try:
                ray.get(writer.close.remote(), timeout=30)
            except Exception:  # noqa: BLE001  (a dead writer has nothing left to remove)
                pass
            ray.kill(writer)
        shutil.rmtree(local_dir, ignore_errors=True)
    return out
