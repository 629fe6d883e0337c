"""Where a store may be written, and how it replaces an old one. Torch-free: the CLI checks
`--out` with it before submitting, the prepare job again before writing.

    check_out(out, force)                  # refuses what must never be replaced
    with publishing(out, log) as tmp:      # lock beside the store, stale leftovers cleaned
        ... write tmp ...
        publish(tmp, out)                  # one atomic exchange where the OS has one

`--force` replaces a store (a folder holding our manifest.json and nothing but the files it
names) or an empty folder; never anything else, and never `/`, the home folder, the current
folder, the project's own folder or a folder that holds any of them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

from ..errors import UserError
from ..scratch import alive

MANIFEST = "manifest.json"
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _protected() -> list[Path]:
    return [Path("/"), Path.home().resolve(), Path.cwd().resolve(), PROJECT_ROOT]


def foreign_entries(folder: Path) -> list[str]:
    """Entries of `folder` that are not part of a store of ours (all of them when there is
    no manifest of ours)."""
    entries = sorted(p.name for p in folder.iterdir())
    try:
        data = json.loads((folder / MANIFEST).read_text())
        files = {s["file"] for s in data["splits"].values()} | {MANIFEST}
        if "format_version" not in data or "dataset" not in data:
            raise ValueError("not ours")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return entries
    return [e for e in entries if e not in files]


def check_out(out: str | os.PathLike, force: bool) -> Path:
    """The absolute `--out` folder, or a UserError naming why it may not be written."""
    out = Path(out).expanduser().absolute()
    real = out.resolve()
    for place in _protected():
        if real == place or place.is_relative_to(real):
            what = {Path("/"): "the root folder", Path.home().resolve(): "your home folder",
                    Path.cwd().resolve(): "the current folder", PROJECT_ROOT: "the project's folder"}.get(real)
            what = what or f"a folder that holds {place}"
            raise UserError(f"--out {out} is {what}: a store needs a folder of its own, e.g. "
                            f"--out {out / 'stores' / 'NAME'}")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise UserError(f"--out {out} is a file or a link: choose a folder path for the store")
    if out.is_dir() and any(out.iterdir()):
        _check_replace(str(out), foreign_entries(out), force, "folder")
    return out


def _check_replace(where: str, foreign: list[str], force: bool, kind: str) -> None:
    """A non-empty `--out` is replaced only with --force, and only when all of it is a store."""
    holds = f"{foreign[0]!r}{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}" if foreign else ""
    if not force and not foreign:
        raise UserError(f"{where} is already a store: pass --force to replace it, or choose another --out")
    if not force:
        # --force would be refused too: advising it would send the user round in a circle.
        raise UserError(f"{where} is already a non-empty {kind} that is not a store (it holds "
                        f"{holds}): choose another --out (--force replaces only a store)")
    if foreign:
        raise UserError(f"--force replaces only a store or an empty {kind}, and {where} holds "
                        f"{holds}: choose another --out; nothing was touched")


def check_remote_out(out: str, force: bool, probe: bool = True) -> str:
    """`--out` in object storage: the same rules as a folder (`check_out`), read remotely;
    with `probe`, a small object written and removed there, so that a missing bucket or
    credentials fail now, not at the upload after hours of writing."""
    from .. import storage

    storage.check(out)
    where = storage.display(out)
    entries = storage.listdir(out)
    if probe:
        storage.check_writable(out)
    if not entries:
        return out
    ours = set()
    if MANIFEST in entries:
        try:
            data = json.loads(storage.read_text(storage.join(out, MANIFEST)))
            ours = {s["file"] for s in data["splits"].values()} | {MANIFEST}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            ours = set()
    _check_replace(where, [e for e in entries if e not in ours], force, "prefix")
    return out


def publish_remote(local: Path, out: str, force: bool, log: Callable[[str], None] = print) -> None:
    """Upload the store in `local` to `out`: the .beton files first, `manifest.json` last, so
    a reader sees a store only when it is whole. A store being replaced loses its manifest
    first: readers then see no store, never a mix of old and new files."""
    from .. import storage

    check_remote_out(out, force, probe=False)  # it may have appeared while we wrote
    where = storage.display(out)
    old = storage.listdir(out)
    if MANIFEST in old:
        storage.delete(storage.join(out, MANIFEST))
    files = [f for f in sorted(local.iterdir()) if f.is_file() and f.name != MANIFEST]
    total = sum(f.stat().st_size for f in files)
    start, done = time.monotonic(), 0
    for f in files:
        done += storage.upload_file(f, storage.join(out, f.name))
        seconds = max(time.monotonic() - start, 1e-6)
        log(f"uploaded {f.name} to {where}: {done / 1e6:.1f}/{total / 1e6:.1f} MB, "
            f"{done / 1e6 / seconds:.1f} MB/s")
    for name in old:
        if name != MANIFEST and not (local / name).exists():
            storage.delete(storage.join(out, name))
    storage.upload_file(local / MANIFEST, storage.join(out, MANIFEST))


def _leftovers(out: Path) -> Iterator[tuple[Path, int]]:
    for kind in ("prepare", "old"):
        for p in out.parent.glob(f".{out.name}.{kind}-*"):
            parts = p.name.rsplit("-", 2)
            if len(parts) == 3 and parts[1].isdigit():
                yield p, int(parts[1])


@contextlib.contextmanager
def publishing(out: Path, log: Callable[[str], None] = print) -> Iterator[Path]:
    """Hold the lock `.NAME.lock` beside `out` and yield a fresh temp folder beside it.

    A second prepare to the same `out` is refused while this one runs; folders left by a
    prepare whose process is gone are removed first (and named). The temp folder is removed
    on any exit; after `publish` it holds nothing.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    lock_path = out.parent / f".{out.name}.lock"
    fd = _lock(lock_path, out)
    try:
        for path, pid in _leftovers(out):
            if not alive(pid):
                shutil.rmtree(path, ignore_errors=True)
                log(f"removed {path}, left by an interrupted prepare (pid {pid})")
        tmp = out.parent / f".{out.name}.prepare-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        # Unlinked while still held: a process that opened the old file sees it is stale.
        with contextlib.suppress(OSError):
            lock_path.unlink()
        os.close(fd)


def _lock(lock_path: Path, out: Path) -> int:
    # A killed prepare's writer processes hold its lock for the moment they take to die.
    deadline = time.monotonic() + 10
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if holder.isdigit() and not alive(int(holder)) and time.monotonic() < deadline:
                time.sleep(0.2)
                continue
            raise UserError(f"another prepare is writing {out} (pid {holder}): wait for it to "
                            "finish, or choose another --out") from None
        try:
            same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            return fd
        os.close(fd)  # its holder unlinked it as we opened it: take the new one


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def publish(tmp: Path, out: Path, force: bool = True) -> None:
    """Make `tmp` the store `out`. An existing store is swapped out in one atomic step where
    the filesystem allows it (readers see the old or the new store, never none), then removed."""
    if out.exists() and any(out.iterdir()):
        check_out(out, force)  # it may have appeared, or changed, while we wrote
        if _exchange(tmp, out):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old store
            return
        old = out.with_name(f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
        return
    if out.exists():
        out.rmdir()
    tmp.rename(out)
