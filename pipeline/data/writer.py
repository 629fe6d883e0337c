"""Write one split into a .beton with FFCV's DatasetWriter (RGBImageField + IntField).

    n = write_beton(Path("tmp/train.beton"), split, WriteSettings("raw"), workers=2,
                    log=print)

FFCV 1.0.2's writer waits forever when one of its processes dies (a full disk, an image it
cannot encode); `_GuardedWriter` watches them and raises `WriteFailed` instead, with the
worker's error, after stopping the others.
"""

from __future__ import annotations

import ctypes
import errno
import os
import queue
import time
from dataclasses import dataclass
from multiprocessing import Process, Queue, Value
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .readers import ArraySplit, Split, SyntheticSplit

MIN_PAGE = 1 << 21
MAX_PAGE = 1 << 28
DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class WriteFailed(Exception):
    def __init__(self, kind: str, err: int | None, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind, self.errno, self.message = kind, err, message

    @property
    def disk_full(self) -> bool:
        return self.errno in DISK_FULL


@dataclass
class WriteSettings:
    write_mode: str = "raw"
    max_resolution: int | None = None
    jpeg_quality: int = 90
    compress_probability: float = 0.5
    smart_threshold: int | None = None


def page_size_for(split: Split, settings: WriteSettings) -> int:
    """A power of two that holds the largest raw image with room to spare."""
    if isinstance(split, ArraySplit):
        largest = int(np.prod(split.images.shape[1:]))
    elif isinstance(split, SyntheticSplit):
        largest = split.spec.resolution ** 2 * 3
    else:
        # Without a cap, room for a 4096x4096 photo; every worker pads its last page, so
        # a cap (--max-resolution) also keeps small stores small.
        largest = (settings.max_resolution or 4096) ** 2 * 3
    if settings.max_resolution:
        largest = min(largest, settings.max_resolution ** 2 * 3)
    page = max(MIN_PAGE, 1 << int(np.ceil(np.log2(largest + 1))))
    return min(page, MAX_PAGE)


def _die_with_parent(parent: int) -> None:
    """A writer process outlives a SIGKILLed prepare otherwise, holding its lock and memory.
    `parent` is the prepare's pid: one killed between this process's fork and the prctl
    below sends no signal, and this process has been handed to another parent already."""
    try:
        import ctypes
        import signal

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: the parent's finally still stops its workers on a normal exit
    if os.getppid() != parent:
        os._exit(1)


def _guarded(work_fn: Callable, errors: Any, parent: int, *args: Any) -> None:
    _die_with_parent(parent)
    try:
        work_fn(*args)
    except BaseException as e:  # noqa: BLE001  (reported to the parent, which raises)
        errors.put((type(e).__name__, getattr(e, "errno", None), " ".join(str(e).split())))
        errors.close()
        errors.join_thread()
        os._exit(1)


def _make_writer_class() -> type:
    from ffcv.memory_allocator import MemoryAllocator
    from ffcv.writer import DatasetWriter

    class _GuardedWriter(DatasetWriter):
        """DatasetWriter whose wait loop notices dead workers and reports progress."""

        log: Callable[[str], None] = staticmethod(lambda s: None)
        label: str = ""

        def _write_common(self, num_samples, queue_content, work_fn, extra_worker_args):
            self.num_samples = num_samples
            self.prepare()
            procs: list[Process] = []
            try:
                work, allocations, errors = Queue(), Queue(), Queue()
                for todo in queue_content:
                    work.put(todo)
                for _ in range(self.num_workers):
                    work.put(None)
                done = Value(ctypes.c_uint64, 0)
                allocator = MemoryAllocator(self.fname, self.data_region_start, self.page_size)
                args = (work, self.metadata_sm, self.metadata_type, self.fields, allocator,
                        done, allocations, *extra_worker_args)
                procs = [Process(target=_guarded, args=(work_fn, errors, os.getpid(), *args), daemon=True)
                         for _ in range(self.num_workers)]
                for p in procs:
                    p.start()
                start = last = time.monotonic()
                collected: list = []
                while len(collected) < len(procs):
                    try:
                        collected.append(allocations.get(timeout=0.2))
                        continue
                    except queue.Empty:
                        pass
                    self._check(procs, errors)
                    now = time.monotonic()
                    if now - last >= 5:
                        n = done.value
                        self.log(f"{self.label}: {n:,}/{num_samples:,} images "
                                 f"({n / (now - start):,.0f}/s)")
                        last = now
                for p in procs:
                    p.join()
                self._check(procs, errors)
                self.finalize([x for content in collected for x in content])
                elapsed = max(time.monotonic() - start, 1e-9)
                self.log(f"{self.label}: {num_samples:,} images in {elapsed:.1f} s "
                         f"({num_samples / elapsed:,.0f}/s)")
            finally:
                for p in procs:
                    if p.is_alive():
                        p.kill()
                        p.join()
                self.metadata_sm.close()
                self.metadata_sm.unlink()

        @staticmethod
        def _check(procs: Sequence[Process], errors: Any) -> None:
            try:
                kind, err, message = errors.get_nowait()
            except queue.Empty:
                failed = [p for p in procs if p.exitcode not in (None, 0)]
                if not failed:
                    return
                kind, err, message = "WorkerDied", None, f"exit code {failed[0].exitcode}"
            raise WriteFailed(kind, err, message)

    return _GuardedWriter


def beton_fields(settings: WriteSettings) -> dict[str, Any]:
    """The store's FFCV fields, in file order."""
    from ffcv.fields import IntField, RGBImageField

    return {
        "image": RGBImageField(write_mode=settings.write_mode, max_resolution=settings.max_resolution,
                               smart_threshold=settings.smart_threshold,
                               jpeg_quality=settings.jpeg_quality,
                               compress_probability=settings.compress_probability),
        "label": IntField(),
    }


def write_beton(path: Path, split: Split, settings: WriteSettings, *, workers: int,
                indices: Sequence[int] | None = None, log: Callable[[str], None] = print,
                label: str = "") -> int:
    """Write `split` (or its `indices`) to `path`; returns the page size used."""
    fields = beton_fields(settings)
    page = page_size_for(split, settings)
    writer = _make_writer_class()(str(path), fields, page_size=page, num_workers=workers)
    writer.log = log
    writer.label = label or path.stem
    n = len(split) if indices is None else len(indices)
    writer.from_indexed_dataset(split, indices=None if indices is None else list(indices),
                                chunksize=max(1, min(100, n // (4 * workers) or 1)))
    return page


def read_labels(path: Path) -> tuple[int, np.ndarray]:
    """(sample count, labels) straight from a .beton's metadata, for verification."""
    from ffcv.reader import Reader

    r = Reader(str(path))
    return int(r.num_samples), np.asarray(r.metadata["f1"]).astype(np.int64)
