"""Stores anywhere, read from node-local disk.

    manifest, digest = locate("s3://bucket/stores/cifar10")   # in the driver: checks, no download
    folder = local_copy(location, digest, cfg.data)           # on each node: the folder to read

A store lives on a local disk, on a shared filesystem or in object storage (any URI that
`pipeline.storage` takes). FFCV reads a .beton with random page reads, which a network
filesystem or a bucket serves badly, so each node copies the store once into a cache folder
(`data.cache_dir`, default the node's temp folder) named by the manifest's sha256: every worker
on the node, every trial of a sweep and every later run reads that copy. A lock beside it makes
one download per node however many workers start at once; a copy is checked against the
manifest's sha256s while it is written and appears under its final name only when whole, so a
corrupt or partial object never poisons the cache. Above `data.cache_max_gb` the least recently
used stores are removed (a reader that has one open keeps its files until it closes them).

`data.stage`: "auto" stages a store in object storage or on a network filesystem and reads a
local one in place; "always" stages any store; "never" reads a path in place. Torch-free.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from .. import storage
from ..storage import display  # noqa: F401  (its callers import it from here too)
from ..errors import UserError
from .store import MANIFEST, Manifest, check_manifest, open_store, parse_manifest, sha256_file

STAGED = ".staged.json"
# Filesystems whose reads cross the network (fuse mounts are mostly gcsfuse, s3fs, sshfs...).
NETWORK_FS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "glusterfs", "ceph", "beegfs",
              "gpfs", "afs", "9p", "davfs", "ocfs2", "wekafs"}
_CHUNK = 8 << 20


def locate(location: str, *, verify: bool = True) -> tuple[Manifest, str]:
    """The store's Manifest (`path` = `location`) and its manifest's sha256.

    A path is opened and (with `verify`) checked against its sha256s here, once, so that no
    worker hashes a shared store again. A URI's manifest and file sizes are checked here; each
    node checks the contents of its own copy.
    """
    if not storage.is_uri(location):
        manifest = open_store(location, verify=verify)
        return manifest, sha256_file(Path(manifest.path) / MANIFEST)
    storage.check(location)
    where = storage.join(location, MANIFEST)
    try:
        raw = storage.read_bytes(where)
    except FileNotFoundError:
        raise UserError(f"{display(location)} is not a store (no {MANIFEST}): publish one with "
                        f"`densenet-pipe prepare DATASET ... --out {display(location)}`; a prepare "
                        "still uploading has none yet") from None
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise UserError(f"{display(where)} is not valid JSON ({e}): prepare the store again") from None
    manifest = check_manifest(parse_manifest(data, display(where)), display(where))
    for split in manifest.splits.values():
        beton = storage.join(location, split.file)
        try:
            have = storage.size(beton)
        except FileNotFoundError:
            raise UserError(f"store {display(location)} lacks {split.file}: prepare the store "
                            "again") from None
        if have != split.bytes:
            raise UserError(f"{display(beton)} is {have} bytes, the manifest says {split.bytes}: the "
                            "store is damaged or half-uploaded; prepare it again")
    manifest.path = location
    return manifest, hashlib.sha256(raw).hexdigest()


def filesystem(path: str | os.PathLike) -> str:
    """The type of the filesystem `path` is on ("ext4", "nfs4", ...; "" when unknown)."""
    real = os.path.realpath(path)
    best, kind = "", ""
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return ""
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        mount = parts[1].replace("\\040", " ")
        inside = real == mount or real.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, kind = mount, parts[2]
    return kind


def plan(location: str, mode: str) -> tuple[bool, str]:
    """(stage it?, why), for the log."""
    if storage.is_uri(location):
        return True, "the store is in object storage"
    if mode == "always":
        return True, "--stage always"
    kind = filesystem(location) or "unknown"
    if mode == "never":
        return False, f"--stage never ({kind} filesystem)"
    if kind in NETWORK_FS or kind.startswith("fuse."):
        return True, f"the store is on a network filesystem ({kind}); --stage never reads it in place"
    return False, f"the store is on a local {kind} filesystem; --stage always copies it"


def cache_root(cache_dir: str = "") -> Path:
    return Path(cache_dir).expanduser() if cache_dir else Path(tempfile.gettempdir()) / "densenet-pipe-stores"


def local_copy(location: str, digest: str, data_cfg: Any, say: Callable[[str], None] = print,
               progress: Callable[[str], None] | None = None) -> Path:
    """The folder this node reads the store from: `location` itself, or its staged copy."""
    stage, why = plan(location, data_cfg.stage)
    if not stage:
        return Path(location)
    if not digest:
        digest = locate(location, verify=False)[1]
    return stage_store(location, digest, cache_root(data_cfg.cache_dir),
                       int(data_cfg.cache_max_gb * 1e9), why, say, progress)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def stage_store(location: str, digest: str, root: Path, max_bytes: int, why: str = "",
                say: Callable[[str], None] = print, progress: Callable[[str], None] | None = None) -> Path:
    """Copy the store into `root/<digest>` unless it is there already; returns that folder."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot make the store cache {root} ({e.strerror}): set data.cache_dir to "
                        "a writable folder on each node's local disk") from None
    key = digest[:24]
    folder = root / key
    with _locked(root / f".{key}.lock"):
        if (folder / STAGED).is_file():
            os.utime(folder / STAGED)
            say(f"store {display(location)}: already staged at {folder}, nothing to download")
            return folder
        shutil.rmtree(folder, ignore_errors=True)
        tmp = root / f".{key}.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        start = time.monotonic()
        try:
            total = _copy_store(location, digest, tmp, progress or say)
            seconds = max(time.monotonic() - start, 1e-6)
            (tmp / STAGED).write_text(json.dumps({"source": display(location), "bytes": total,
                                                  "seconds": round(seconds, 3)}) + "\n")
            tmp.rename(folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    say(f"store {display(location)}: staged at {folder} ({why}): {total / 1e6:.1f} MB in "
        f"{seconds:.1f} s, {total / 1e6 / seconds:.1f} MB/s")
    evict(root, max_bytes, keep=folder, say=say)
    return folder


def _copy_store(location: str, digest: str, into: Path, say: Callable[[str], None]) -> int:
    raw = storage.read_bytes(storage.join(location, MANIFEST))
    if hashlib.sha256(raw).hexdigest() != digest:
        raise UserError(f"{display(location)} changed since this run checked it (its {MANIFEST} has a "
                        "new sha256): a prepare replaced it; start the run again")
    manifest = check_manifest(parse_manifest(json.loads(raw), display(location)), display(location))
    total = sum(s.bytes for s in manifest.splits.values())
    progress = _Progress(display(location), total, say)
    for split in manifest.splits.values():
        source = storage.join(location, split.file)
        h = hashlib.sha256()
        written = 0
        with _reader(source) as src, open(into / split.file, "wb") as dst:
            while block := src.read(_CHUNK):
                h.update(block)
                dst.write(block)
                written += len(block)
                progress.add(len(block))
        if written != split.bytes or h.hexdigest() != split.sha256:
            raise UserError(f"{display(source)} does not match its manifest ({written} bytes read, "
                            f"{split.bytes} expected, sha256 {'differs' if written == split.bytes else 'not checked'}): "
                            "the store is damaged or half-written; prepare it again (nothing was cached)")
    (into / MANIFEST).write_bytes(raw)
    return total


@contextlib.contextmanager
def _reader(location: str) -> Iterator[Any]:
    if not storage.is_uri(location):
        with open(location, "rb") as f:
            yield f
        return
    fs, path = storage._fs(location)
    try:
        stream = fs.open_input_stream(path)
    except FileNotFoundError:
        raise UserError(f"{display(location)} is gone: the store was removed or is being replaced; "
                        "prepare it again") from None
    except OSError as e:
        raise UserError(f"storage {display(location)}: {str(e).splitlines()[0][:200]}; check the URI "
                        "and the credentials in the nodes' environment") from None
    with stream:
        yield stream


class _Progress:
    """A line every few seconds while a large store downloads: bytes and MB/s so far."""

    def __init__(self, name: str, total: int, say: Callable[[str], None], every: float = 5.0):
        self.name, self.total, self.say, self.every = name, total, say, every
        self.done = 0
        self.start = self.last = time.monotonic()

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every and self.done < self.total:
            self.last = now
            rate = self.done / 1e6 / max(now - self.start, 1e-6)
            self.say(f"store {self.name}: staging {self.done / 1e6:.0f}/{self.total / 1e6:.0f} MB, "
                     f"{rate:.1f} MB/s")


def cached(root: Path) -> list[tuple[Path, int, float]]:
    """(folder, bytes, last used) of each whole store in the cache, least recently used first."""
    found = []
    if not root.is_dir():
        return found
    for folder in root.iterdir():
        marker = folder / STAGED
        if folder.name.startswith(".") or not marker.is_file():
            continue
        size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
        found.append((folder, size, marker.stat().st_mtime))
    return sorted(found, key=lambda entry: entry[2])


def evict(root: Path, max_bytes: int, keep: Path | None = None,
          say: Callable[[str], None] = print) -> list[Path]:
    """Remove least-recently-used stores until the cache holds at most `max_bytes`."""
    entries = cached(root)
    total = sum(size for _, size, _ in entries)
    removed = []
    for folder, size, _ in entries:
        if total <= max_bytes:
            break
        if keep is not None and folder == keep:
            continue
        lock = root / f".{folder.name}.lock"
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue  # being staged right now
        try:
            shutil.rmtree(folder, ignore_errors=True)
        finally:
            os.close(fd)
        total -= size
        removed.append(folder)
        say(f"store cache {root}: removed {folder.name} ({size / 1e6:.1f} MB, least recently used) "
            f"to stay under {max_bytes / 1e9:g} GB")
    return removed


def prestage(location: str, digest: str, data_cfg: Any, say: Callable[[str], None] = print,
             min_cpus: float = 0.0) -> int:
    """Stage the store on every alive node that can run workers (`min_cpus` CPUs) before
    training starts: a bad store or missing credentials then fail the job with one line, not
    every worker in turn. Returns how many nodes were asked."""
    stage, _ = plan(location, data_cfg.stage)
    if not stage:
        return 0
    from ..node_tasks import on_each_node

    results = on_each_node(_stage_here, location, digest, data_cfg, min_cpus=min_cpus)
    for node, lines in results:
        for line in lines:
            say(f"node {node[:8]}: {line}")
    return len(results)


def _stage_here(location: str, digest: str, data_cfg: Any) -> list[str]:
    import ray

    lines: list[str] = []
    node = ray.get_runtime_context().get_node_id()[:8]
    # Progress goes out as it happens (Ray forwards a task's prints to the job log, and the
    # console shows this task's lines: pipeline/console.py).
    local_copy(location, digest, data_cfg, say=lines.append,
               progress=lambda line: print(f"node {node}: {line}", flush=True))
    return lines
