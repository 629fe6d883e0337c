"""Join .beton shards written from contiguous slices of one split into one .beton.

    layout = read_layout(Path("part-0.beton"))          # what a merge needs from one shard
    merge_betons(Path("train.beton"), [(layout0, chunks0), (layout1, chunks1)])
    merged = MergedFile(Path("train.beton"), capacity=n)  # or shard by shard, as they finish:
    merged.append_file(layout1, Path("part-1.beton"), position=1); ...; merged.close()

A shard is an ordinary FFCV file: header, field descriptors, one metadata row per sample,
page-aligned data pages, then the allocation table. The merge copies every shard's pages as
they are, one shard after the other in the order they come, and rewrites only what points
into them: the pointer columns of the metadata and the allocation table, each moved by where
its shard's pages now start. No image is decoded or encoded again, so a merged store reads
back pixel-identical to its shards, its samples in the shards' order. Pages stay page-aligned, which FFCV's page-wise readers
(QUASI_RANDOM order, OS-cache mode) rely on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator

import numpy as np

# Metadata sub-fields that hold file offsets, by the name FFCV's fields give them
# (RGBImageField: data_ptr; BytesField and NDArrayField: ptr).
POINTER_COLUMNS = ("data_ptr", "ptr")
CHUNK = 32 << 20


class MergeError(Exception):
    pass


@dataclass
class Layout:
    """One shard file, as the merge sees it (small: no page data)."""

    prefix: bytes          # header + field descriptors, copied verbatim
    metadata: bytes        # num_samples rows of the metadata dtype
    alloc_table: bytes
    num_samples: int
    page_size: int
    data_start: int        # first page's offset in the shard file
    data_bytes: int        # whole pages, data_start .. alloc_table_ptr
    # FFCV's record types, as the shard's writer had them: the merge and its read-back need no
    # FFCV import (seconds of numba compiling in the driver, on the critical path).
    header_dtype: np.dtype
    alloc_dtype: np.dtype
    metadata_dtype: np.dtype


def _align(offset: int, page: int) -> int:
    return -(-offset // page) * page


def read_layout(path: Path) -> Layout:
    from ffcv.reader import Reader
    from ffcv.types import ALLOC_TABLE_TYPE as alloc_t, HeaderType as header_t

    r = Reader(str(path))
    metadata_start = header_t.itemsize + r.field_descriptors.nbytes
    meta_bytes = r.metadata.nbytes
    header = r.header
    page = int(header["page_size"])
    alloc_ptr = int(header["alloc_table_ptr"])
    data_start = _align(metadata_start + meta_bytes, page)
    with open(path, "rb") as f:
        prefix = f.read(metadata_start)
        metadata = f.read(meta_bytes)
        f.seek(alloc_ptr)
        alloc = f.read()
    if len(alloc) % alloc_t.itemsize:
        raise MergeError(f"{path}: allocation table of {len(alloc)} bytes is cut short")
    return Layout(prefix=prefix, metadata=metadata, alloc_table=alloc,
                  num_samples=int(header["num_samples"]), page_size=page,
                  data_start=data_start, data_bytes=max(0, alloc_ptr - data_start),
                  header_dtype=header_t, alloc_dtype=alloc_t, metadata_dtype=r.metadata.dtype)


def data_chunks(path: Path, layout: Layout, size: int = CHUNK) -> Iterator[np.ndarray]:
    """The shard's pages, in order, `size` bytes at a time, as uint8 arrays: Ray stores an
    array's buffer as it is and hands the reader a view of it, where bytes are copied on
    both sides."""
    with open(path, "rb") as f:
        f.seek(layout.data_start)
        left = layout.data_bytes
        while left:
            chunk = np.empty(min(size, left), dtype=np.uint8)
            got = f.readinto(memoryview(chunk))
            if not got:
                raise MergeError(f"{path} ends {left} bytes before its allocation table")
            left -= got
            yield chunk[:got]


def _fields_prefix(layout: Layout) -> bytes:
    """The field descriptors: every shard of a split must have the same ones."""
    return layout.prefix[layout.header_dtype.itemsize:]


def _shift_pointers(meta: np.ndarray, delta: int) -> None:
    for name in meta.dtype.names:
        sub = meta.dtype[name]
        for column in sub.names or ():
            if column in POINTER_COLUMNS:
                meta[name][column] += np.uint64(delta) if delta >= 0 else -np.uint64(-delta)


def _check_like(first: Layout, lay: Layout, i: int) -> None:
    if (lay.page_size != first.page_size or _fields_prefix(lay) != _fields_prefix(first)
            or lay.metadata_dtype != first.metadata_dtype):
        raise MergeError(f"shard {i} was written with other fields or page size than shard 0")
    if len(lay.metadata) != lay.num_samples * lay.metadata_dtype.itemsize:
        raise MergeError(f"shard {i}: metadata size does not match its {lay.num_samples} samples")


class MergedFile:
    """One .beton built from shards appended as they arrive, in any order.

    The pages go first, from where the metadata of `capacity` samples ends (the split's size:
    images skipped while writing only leave that region a few rows short, which FFCV never
    reads, since it reads `num_samples` rows). Each shard says its `position` among the
    split's shards; `close` writes the metadata rows and the allocation table in that order,
    so the samples come in order wherever their pages landed (FFCV finds a sample's pages by
    pointer). A merge can then run while later shards are still being written.
    """

    def __init__(self, out: Path, capacity: int):
        self.out, self.capacity = out, capacity
        self.first: Layout | None = None
        self.file: BinaryIO | None = None
        self.parts: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.samples = 0
        self.data_start = 0

    def append(self, layout: Layout, chunks: Iterable[bytes | np.ndarray], position: int | None = None) -> None:
        """Append a shard whose pages come as `chunks` (bytes or uint8 arrays, in order)."""
        def copy(f: BinaryIO) -> int:
            written = 0
            for chunk in chunks:
                f.write(chunk)
                written += len(chunk)
            return written

        self._append(layout, position, copy)

    def append_file(self, layout: Layout, path: Path, position: int | None = None) -> None:
        """Append a shard from its file on this machine: the kernel copies the pages
        (copy_file_range), so they need not pass through this process."""
        def copy(f: BinaryIO) -> int:
            with open(path, "rb") as src:
                return _copy_range(src, f, layout.data_start, layout.data_bytes)

        self._append(layout, position, copy)

    def _append(self, layout: Layout, position: int | None, copy: Callable[[BinaryIO], int]) -> None:
        position = len(self.parts) if position is None else position
        if position in self.parts:
            raise MergeError(f"shard {position} was merged already")
        if self.first is None:
            self.first = layout
            self.data_start = _align(len(layout.prefix) + self.capacity * layout.metadata_dtype.itemsize,
                                     layout.page_size)
            # Unbuffered: pages arrive in large chunks or are copied by the kernel, and the
            # file's offset is then the one place that says where the next shard starts.
            self.file = open(self.out, "wb", buffering=0)
            self.file.seek(self.data_start)
        _check_like(self.first, layout, position)
        if self.samples + layout.num_samples > self.capacity:
            raise MergeError(f"shard {position} brings the split past the {self.capacity} samples it has")
        base = self.file.tell()
        delta = base - layout.data_start
        meta = np.frombuffer(layout.metadata, dtype=layout.metadata_dtype).copy()
        _shift_pointers(meta, delta)
        alloc = np.frombuffer(layout.alloc_table, dtype=layout.alloc_dtype).copy()
        if len(alloc):
            alloc["ptr"] = (alloc["ptr"].astype(np.int64) + delta).astype(np.uint64)
        try:
            written = copy(self.file)
            if written != layout.data_bytes:
                raise MergeError(f"a shard sent {written} bytes of pages, its layout says {layout.data_bytes}")
        except BaseException:
            # A shard cut off half-way (its node lost) leaves the file as it was before it, so
            # the same shard can be appended again from elsewhere.
            self.file.seek(base)
            self.file.truncate(base)
            raise
        self.parts[position] = (meta, alloc)
        self.samples += layout.num_samples

    def close(self) -> int:
        """Write what points into the pages; returns the number of samples."""
        if self.first is None or self.file is None:
            raise MergeError("nothing to merge")
        first, f = self.first, self.file
        metas, allocs, first_sample = [], [], 0
        for position in sorted(self.parts):
            meta, alloc = self.parts[position]  # `alloc` is this file's own copy
            alloc["sample_id"] += np.uint64(first_sample)
            metas.append(meta)
            allocs.append(alloc)
            first_sample += len(meta)
        alloc_ptr = f.tell()
        all_metas, all_allocs = np.concatenate(metas), np.concatenate(allocs)
        _check_pointers(all_metas, all_allocs, self.data_start, alloc_ptr)
        f.write(all_allocs.tobytes())
        header = np.frombuffer(first.prefix[:first.header_dtype.itemsize], dtype=first.header_dtype).copy()[0]
        header["num_samples"] = self.samples
        header["alloc_table_ptr"] = alloc_ptr
        f.seek(0)
        f.write(header.tobytes())
        f.write(_fields_prefix(first))
        f.write(all_metas.tobytes())
        f.close()
        self.file = None
        return self.samples

    def discard(self) -> None:
        """Close without finishing (the caller removes the file with its temporary folder)."""
        if self.file is not None:
            self.file.close()
            self.file = None


def merge_betons(out: Path, shards: Iterable[tuple[Layout, Iterable[bytes | np.ndarray]]]) -> int:
    """Write `out` from `shards` (each a Layout and its pages' bytes in order, as bytes or
    uint8 arrays); returns the number of samples."""
    shards = list(shards)
    if not shards:
        raise MergeError("nothing to merge")
    for i, (lay, _) in enumerate(shards):
        _check_like(shards[0][0], lay, i)
    merged = MergedFile(out, sum(lay.num_samples for lay, _ in shards))
    try:
        for lay, chunks in shards:
            merged.append(lay, chunks)
        return merged.close()
    finally:
        merged.discard()


def _copy_range(src: BinaryIO, dst: BinaryIO, offset: int, count: int) -> int:
    """Copy `count` bytes from `offset` in `src` to where `dst` stands; returns bytes copied.
    In the kernel where it can (same filesystem), else through a buffer."""
    start = dst.tell()
    done = 0
    try:
        while done < count:
            n = os.copy_file_range(src.fileno(), dst.fileno(), count - done, offset + done, start + done)
            if n == 0:
                break
            done += n
    except (OSError, AttributeError):  # another filesystem, an old kernel, not Linux
        src.seek(offset + done)
        dst.seek(start + done)
        while done < count:
            chunk = src.read(min(CHUNK, count - done))
            if not chunk:
                break
            dst.write(chunk)
            done += len(chunk)
    dst.seek(start + done)
    return done


def read_metadata(path: Path, layout: Layout) -> np.ndarray:
    """Every sample's metadata row of a .beton written with `layout`'s types, read back from
    the file with numpy alone."""
    header = np.fromfile(path, dtype=layout.header_dtype, count=1)[0]
    return np.fromfile(path, dtype=layout.metadata_dtype, count=int(header["num_samples"]),
                       offset=len(layout.prefix))


def _check_pointers(meta: np.ndarray, alloc: np.ndarray, lo: int, hi: int) -> None:
    """Every pointer in the metadata must name an allocation inside the merged pages."""
    ptrs = [meta[name][column] for name in meta.dtype.names
            for column in (meta.dtype[name].names or ()) if column in POINTER_COLUMNS]
    if not len(alloc):
        return
    starts = alloc["ptr"]
    ends = starts + alloc["size"]
    if starts.min() < lo or ends.max() > hi:
        raise MergeError("an allocation points outside the merged pages")
    known = np.sort(starts)
    for p in ptrs:
        hit = np.searchsorted(known, p)
        if (hit >= len(known)).any() or (known[np.minimum(hit, len(known) - 1)] != p).any():
            raise MergeError("a sample's pointer names no allocation after the merge")
