"""Join .beton shards written from contiguous slices of one split into one .beton.

    layout = read_layout(Path("part-0.beton"))          # what a merge needs from one shard
    merge_betons(Path("train.beton"), [(layout0, chunks0), (layout1, chunks1)])

A shard is an ordinary FFCV file: header, field descriptors, one metadata row per sample,
page-aligned data pages, then the allocation table. The merge copies every shard's pages as
they are, one after the other, and rewrites only what points into them: the pointer columns
of the metadata and the allocation table, each moved by where its shard's pages now start.
No image is decoded or encoded again, so a merged store reads back pixel-identical to its
shards, in the shards' order. Pages stay page-aligned, which FFCV's page-wise readers
(QUASI_RANDOM order, OS-cache mode) rely on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

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


def merge_betons(out: Path, shards: Iterable[tuple[Layout, Iterable[bytes | np.ndarray]]]) -> int:
    """Write `out` from `shards` (each a Layout and its pages' bytes in order, as bytes or
    uint8 arrays); returns the number of samples."""
    shards = list(shards)
    if not shards:
        raise MergeError("nothing to merge")
    layouts = [s[0] for s in shards]
    first = layouts[0]
    header_t, alloc_t, metadata_dtype = first.header_dtype, first.alloc_dtype, first.metadata_dtype
    for i, lay in enumerate(layouts):
        if (lay.page_size != first.page_size or _fields_prefix(lay) != _fields_prefix(first)
                or lay.metadata_dtype != metadata_dtype):
            raise MergeError(f"shard {i} was written with other fields or page size than shard 0")
        if len(lay.metadata) != lay.num_samples * metadata_dtype.itemsize:
            raise MergeError(f"shard {i}: metadata size does not match its {lay.num_samples} samples")
    page = first.page_size
    total = sum(lay.num_samples for lay in layouts)
    metadata_start = len(first.prefix)
    data_start = _align(metadata_start + total * metadata_dtype.itemsize, page)

    metas, allocs, bases = [], [], []
    base, first_sample = data_start, 0
    for lay in layouts:
        delta = base - lay.data_start
        meta = np.frombuffer(lay.metadata, dtype=metadata_dtype).copy()
        _shift_pointers(meta, delta)
        alloc = np.frombuffer(lay.alloc_table, dtype=alloc_t).copy()
        if len(alloc):
            alloc["ptr"] = (alloc["ptr"].astype(np.int64) + delta).astype(np.uint64)
            alloc["sample_id"] += np.uint64(first_sample)
        metas.append(meta)
        allocs.append(alloc)
        bases.append(base)
        base += lay.data_bytes
        first_sample += lay.num_samples
    alloc_ptr = base
    all_allocs = np.concatenate(allocs) if allocs else np.zeros(0, alloc_t)
    _check_pointers(np.concatenate(metas), all_allocs, data_start, alloc_ptr)

    header = np.frombuffer(first.prefix[:header_t.itemsize], dtype=header_t).copy()[0]
    header["num_samples"] = total
    header["alloc_table_ptr"] = alloc_ptr
    with open(out, "wb") as f:
        f.write(header.tobytes())
        f.write(_fields_prefix(first))
        for meta in metas:
            f.write(meta.tobytes())
        _pad_to(f, data_start)
        for (lay, chunks), want in zip(shards, bases):
            if f.tell() != want:
                raise MergeError(f"shard pages would start at {f.tell()}, not {want}")
            written = 0
            for chunk in chunks:
                f.write(chunk)
                written += len(chunk)
            if written != lay.data_bytes:
                raise MergeError(f"a shard sent {written} bytes of pages, its layout says {lay.data_bytes}")
        f.write(all_allocs.tobytes())
    return total


def read_metadata(path: Path, layout: Layout) -> np.ndarray:
    """Every sample's metadata row of a .beton written with `layout`'s types, read back from
    the file with numpy alone."""
    header = np.fromfile(path, dtype=layout.header_dtype, count=1)[0]
    return np.fromfile(path, dtype=layout.metadata_dtype, count=int(header["num_samples"]),
                       offset=len(layout.prefix))


def _pad_to(f: BinaryIO, offset: int) -> None:
    f.write(b"\0" * (offset - f.tell()))


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
