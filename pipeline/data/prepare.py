"""Read a dataset, write its FFCV store into a temporary folder, verify it, publish it.

    manifest = prepare(PrepareConfig(dataset="cifar10", source="cifar-10-python.tar.gz",
                                     out="stores/cifar10"), log=print)

The store is written into `.<name>.prepare-<pid>-<id>/` beside `out` under a lock
(`.<name>.lock`), checked (sample counts, labels, sha256 via `open_store`), and only then
published: renamed to `out`, or swapped with the old store in one step (`publish.py` has the
rules for what `--force` may replace). Anything that fails removes the temporary folder; one
left by a killed process is removed by the next prepare to the same `out`.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from .. import errors, storage
from ..errors import UserError
from .publish import check_out, publish, publishing
from .prepare_config import PrepareConfig, validate_prepare
from .readers import ArraySplit, FileSplit, Source, Split, read_source
from .store import (FORMAT_VERSION, MANIFEST, Manifest, SplitInfo, WriterInfo, hash_file, open_store,
                    remember_moved, write_manifest)
from .writer import DISK_FULL, WriteFailed, WriteSettings, read_labels, write_beton

Log = Callable[[str], None]


def writer_settings(cfg: PrepareConfig, src: Source) -> WriteSettings:
    """Flags win over the card's defaults."""
    d = src.card.write
    mode = cfg.write_mode or d.write_mode
    return WriteSettings(
        write_mode=mode,
        max_resolution=cfg.max_resolution if cfg.max_resolution is not None else d.max_resolution,
        jpeg_quality=cfg.jpeg_quality if cfg.jpeg_quality is not None else d.jpeg_quality,
        compress_probability=(cfg.compress_probability if cfg.compress_probability is not None
                              else d.compress_probability),
        smart_threshold=cfg.smart_threshold if mode == "smart" else None,
    )


def _fixed_size(src: Source, settings: WriteSettings) -> list[int] | None:
    split = src.splits["train"]
    if isinstance(split, ArraySplit):
        h, w = split.images.shape[1:3]
    elif src.dataset == "synthetic" and src.info["synthetic"]["min_size"] is None:
        h = w = src.info["synthetic"]["resolution"]
    else:
        return None
    r = settings.max_resolution
    if r and max(h, w) > r:
        ratio = r / max(h, w)
        h, w = int(ratio * h), int(ratio * w)
    return [int(h), int(w)]


def _estimate_bytes(src: Source, settings: WriteSettings) -> int:
    total = 0
    for split in src.splits.values():
        if isinstance(split, FileSplit):
            side = settings.max_resolution or 500
            per = side * side * 3 * 0.75
        elif isinstance(split, ArraySplit):
            per = int(np.prod(split.images.shape[1:]))
        else:
            side = settings.max_resolution or src.info.get("synthetic", {}).get("resolution", 32)
            per = side * side * 3
        if settings.write_mode == "jpg":
            per /= 8
        elif settings.write_mode == "proportion":
            per *= 1 - settings.compress_probability * 7 / 8
        total += int(per * len(split))
    return total


def _check_output(out: Path, force: bool) -> None:
    check_out(out, force)
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {parent} ({e.strerror}): choose an --out you can write to") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to {parent} (permission denied): choose an --out you can "
                        "write to, or fix that folder's permissions")


def write_indices(path: Path, split: Split, settings: WriteSettings, *, workers: int,
                  indices: list[int] | None, skip_bad: bool, bad_dir: Path, name: str, log: Log,
                  label: str = "") -> tuple[int, dict[int, str]]:
    """Write `split` (or its `indices`) to `path`, leaving unreadable images out when
    `skip_bad`; returns (page size, {index: "path\treason"} of the images left out)."""
    bad_dir.mkdir(exist_ok=True)
    split.bad_dir = bad_dir
    todo = None if indices is None else list(indices)
    everything = range(len(split)) if indices is None else indices
    skipped: dict[int, str] = {}
    for _ in range(3):
        page = write_beton(path, split, settings, workers=workers, indices=todo, log=log,
                           label=label or name)
        bad = {int(p.name): p.read_text(errors="replace") for p in bad_dir.iterdir()}
        new = {i: t for i, t in bad.items() if i not in skipped}
        for p in bad_dir.iterdir():
            p.unlink()
        if not new:
            break
        for i in sorted(new):
            log(f"unreadable image: {new[i].replace(chr(9), ' (', 1)})")
        if not skip_bad:
            first, reason = new[min(new)].split("\t", 1)
            raise UserError(f"{len(new)} {name} image(s) cannot be read, first {first} ({reason}): "
                            "replace them, or pass --skip-bad to leave them out (listed in the "
                            "manifest); nothing was published")
        skipped.update(new)
        todo = [i for i in everything if i not in skipped]
        if not todo:
            where = "" if indices is None else f" in {label}"
            raise UserError(f"every {name} image{where} is unreadable: check --source")
        log(f"{label or name}: rewriting without {len(skipped)} unreadable image(s)")
    else:
        raise UserError(f"{name}: images keep failing to decode in different ways; check the disk")
    bad_dir.rmdir()
    return page, skipped


def _check_split(name: str, split: Split, path: Path, skipped: dict[int, str],
                 metadata: np.ndarray | None) -> tuple[SplitInfo, list[dict]]:
    """The written split read back (its `metadata` when the caller read it already): its
    labels are the source's, less the skipped images."""
    kept = [i for i in range(len(split)) if i not in skipped]
    if not kept:
        raise UserError(f"every {name} image is unreadable: check --source")
    expected = split.labels[kept]
    if metadata is None:
        count, labels = read_labels(path)
    else:
        count, labels = len(metadata), np.asarray(metadata["f1"]).astype(np.int64)
    if count != len(expected) or not np.array_equal(labels, expected):
        raise RuntimeError(f"{path} verification failed: {count} samples, expected {len(expected)}")
    info = SplitInfo(file=path.name, count=count, sha256=hash_file(path), bytes=path.stat().st_size)
    skipped_list = [dict(zip(("path", "reason"), skipped[i].split("\t", 1)), split=name) for i in sorted(skipped)]
    return info, skipped_list


class _Checksums:
    """The sources' md5s, worked out by a process of their own while the splits are written:
    ImageNet's tars are 150 GB, minutes of reading that used to come before any writing. A
    process rather than a thread: the writer forks its workers from this one, which a thread
    holding a lock at that moment would leave locked in them."""

    def __init__(self, src: Source, log: Log):
        import subprocess
        import sys

        self.src = src
        for f in src.files:
            log(f"checksumming {f} (while the splits are written)")
        root = str(Path(__file__).resolve().parents[2])
        code = ("import json, sys; sys.path.insert(0, sys.argv[1]); from pipeline.data.store import md5_file; "
                "print(json.dumps([md5_file(p) for p in sys.argv[2:]]))")
        self.proc = (subprocess.Popen([sys.executable, "-c", code, root, *map(str, src.files)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                     if src.files else None)

    def result(self) -> list[dict]:
        import json

        digests: list[str] = []
        if self.proc is not None:
            out, err = self.proc.communicate()
            if self.proc.returncode != 0:
                last = errors.last_line(err) if err.strip() else f"exit code {self.proc.returncode}"
                raise UserError(f"cannot checksum the source files: {last}")
            digests = json.loads(out)
        card_md5 = {f.name: f.md5 for f in self.src.card.files if f.md5}
        out_rows = []
        for f, digest in zip(self.src.files, digests):
            want = card_md5.get(f.name)
            if want and want != digest:
                self.src.notes.append(f"md5 of {f.name} is {digest}, the card says {want} (a different release?)")
            out_rows.append({"name": f.name, "path": str(f), "bytes": f.stat().st_size, "md5": digest,
                             "matches_card": None if not want else want == digest})
        return out_rows

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def _largest_side(beton: Path, meta: np.ndarray | None = None) -> int:
    """The longest side of any image in a written .beton (0 when it has none), from FFCV's
    per-image metadata (`meta` when already read): nothing is decoded."""
    if meta is None:
        from ffcv.reader import Reader

        meta = Reader(str(beton)).metadata
    if not len(meta):
        return 0
    image = meta[meta.dtype.names[0]]
    return int(max(image["width"].max(), image["height"].max()))


def _write_store(tmp: Path, src: Source, settings: WriteSettings, cfg: PrepareConfig,
                 log: Log) -> dict[str, SplitInfo]:
    """Both splits and the manifest into `tmp`, checked as a reader will check them."""
    checksums = _Checksums(src, log)
    splits, skipped, page, shards = {}, [], 0, {}
    try:
        if cfg.nodes > 1:
            from .sharded import write_splits_sharded

            written = write_splits_sharded(cfg, src, settings, tmp, log)
        else:
            written = {name: (*write_indices(tmp / f"{name}.beton", src.splits[name], settings,
                                             workers=cfg.workers, indices=None, skip_bad=cfg.skip_bad,
                                             bad_dir=tmp / f".bad-{name}", name=name, log=log), [], None)
                       for name in ("train", "val")}
        sources = checksums.result()
    finally:
        checksums.stop()
    for name, (page, bad, split_shards, meta) in written.items():
        splits[name], bad_list = _check_split(name, src.splits[name], tmp / f"{name}.beton", bad, meta)
        skipped += bad_list
        if split_shards:
            shards[name] = split_shards
    card = src.card
    # Small images stay at their size: an ImageNet-style card's 224 px would have the loader
    # upsample a folder of 32 px images 49-fold in pixels for no information.
    resolution, eval_resolution = card.resolution, card.eval_resolution
    if not cfg.resolution:
        resolution = min(resolution, _largest_side(tmp / splits["train"].file, written["train"][3])
                         or resolution)
        eval_resolution = min(eval_resolution, _largest_side(tmp / splits["val"].file, written["val"][3])
                              or eval_resolution)
    if (resolution, eval_resolution) != (card.resolution, card.eval_resolution):
        log(f"note: the images are at most {max(resolution, eval_resolution)} px on a side: the store "
            f"trains at {resolution} and evaluates at {eval_resolution} px (the card says "
            f"{card.resolution}/{card.eval_resolution}; prepare --resolution N, or train --set data.resolution=N, overrides)")
    manifest = Manifest(
        format_version=FORMAT_VERSION, dataset=src.dataset, num_classes=len(src.classes),
        classes=list(src.classes), splits=splits,
        fields={"image": {"type": "RGBImageField"}, "label": {"type": "IntField"}},
        writer=WriterInfo(write_mode=settings.write_mode, max_resolution=settings.max_resolution,
                          jpeg_quality=settings.jpeg_quality,
                          compress_probability=settings.compress_probability,
                          smart_threshold=settings.smart_threshold,
                          page_size=page, nodes=cfg.nodes, shards=shards),
        mean=list(card.mean), std=list(card.std), resolution=resolution,
        eval_resolution=eval_resolution, family=card.family, augment=card.augment,
        fixed_size=_fixed_size(src, settings), sources=sources, skipped=skipped,
        card_differences=list(src.notes), info=src.info,
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    )
    write_manifest(tmp, manifest)
    open_store(tmp)
    for note in src.notes:
        log(f"note: {note}")
    if skipped:
        log(f"skipped {len(skipped)} unreadable image(s); they are listed in {MANIFEST}")
    return splits


def prepare(cfg: PrepareConfig, log: Log = print) -> Manifest:
    """Write the store `cfg.out` from `cfg.source`; returns its verified Manifest."""
    validate_prepare(cfg)
    if storage.is_uri(cfg.out):
        return _prepare_to_uri(cfg, log)
    out = Path(cfg.out).expanduser().absolute()
    _check_output(out, cfg.force)
    src = read_source(cfg)
    settings = writer_settings(cfg, src)
    sizes = ", ".join(f"{k} {len(v):,}" for k, v in src.splits.items())
    log(f"{src.dataset}: {len(src.classes)} classes, {sizes}; writing {settings.write_mode} "
        f"(max resolution {settings.max_resolution or 'none'}) with {cfg.workers} workers")
    need = _estimate_bytes(src, settings)
    free = shutil.disk_usage(out.parent).free
    if need > free:
        raise UserError(f"not enough disk space for {out}: about {need / 2**30:.1f} GiB needed, "
                        f"{free / 2**30:.1f} GiB free; free some space or choose another --out")
    try:
        with publishing(out, log) as tmp:
            splits = _write_store(tmp, src, settings, cfg, log)
            publish(tmp, out, cfg.force)
        for info in splits.values():
            remember_moved(out / info.file, info.sha256)
    except WriteFailed as e:
        if e.disk_full:
            raise UserError(f"disk full while writing {out} ({e.message}): free some space or "
                            "choose --out on a larger disk; nothing was published") from None
        raise
    except OSError as e:
        if e.errno in DISK_FULL:
            raise UserError(f"disk full while writing {out} ({e.strerror}): free some space or "
                            "choose --out on a larger disk; nothing was published") from None
        if isinstance(e, PermissionError):
            raise UserError(f"permission denied writing {e.filename or out}: choose an --out you "
                            "can write to") from None
        raise
    log(f"wrote {out}: train {splits['train'].count:,}, val {splits['val'].count:,} images, "
        f"{(splits['train'].bytes + splits['val'].bytes) / 2**20:,.1f} MiB")
    return open_store(out)


def _prepare_to_uri(cfg: PrepareConfig, log: Log) -> Manifest:
    """Write the store on this node's disk, check it, then publish it to object storage."""
    import tempfile

    from .publish import check_remote_out, publish_remote
    from .staging import display, locate

    check_remote_out(cfg.out, cfg.force)
    src = read_source(cfg)
    settings = writer_settings(cfg, src)
    sizes = ", ".join(f"{k} {len(v):,}" for k, v in src.splits.items())
    log(f"{src.dataset}: {len(src.classes)} classes, {sizes}; writing {settings.write_mode} "
        f"(max resolution {settings.max_resolution or 'none'}) with {cfg.workers} workers, then "
        f"uploading to {display(cfg.out)}")
    scratch = Path(tempfile.gettempdir())
    need, free = _estimate_bytes(src, settings), shutil.disk_usage(scratch).free
    if need > free:
        raise UserError(f"not enough disk space in {scratch} to write the store before uploading it: "
                        f"about {need / 2**30:.1f} GiB needed, {free / 2**30:.1f} GiB free; set TMPDIR "
                        "on the nodes to a larger disk")
    with tempfile.TemporaryDirectory(prefix="densenet-pipe-prepare-") as tmp:
        try:
            splits = _write_store(Path(tmp), src, settings, cfg, log)
        except WriteFailed as e:
            if e.disk_full:
                raise UserError(f"disk full while writing the store in {tmp} ({e.message}): set "
                                "TMPDIR to a larger disk; nothing was published") from None
            raise
        publish_remote(Path(tmp), cfg.out, cfg.force, log)
    log(f"wrote {display(cfg.out)}: train {splits['train'].count:,}, val {splits['val'].count:,} "
        f"images, {(splits['train'].bytes + splits['val'].bytes) / 2**20:,.1f} MiB")
    return locate(cfg.out)[0]
