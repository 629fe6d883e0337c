"""Run folders on a local or shared disk, or in an object store (`s3://`, `gs://`, ...).

A location is a plain path or a URI that pyarrow reads (the same ones Ray Train takes as a
`storage_path`), query included: `s3://bucket/runs?endpoint_override=host:9000&scheme=http`.
Ray Train writes the checkpoints there itself; this module is how everything else (config,
history, curves, sweep results, W&B files, resume and evaluate) reads and writes beside
them. Credentials come from the nodes' environment (AWS_ACCESS_KEY_ID, GOOGLE_APPLICATION_
CREDENTIALS, ...), never from the location: a location is printed and saved in configs.

pyarrow is imported only for URIs, so local runs and the CLI do not pay for it.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from .errors import UserError


def is_uri(location: str | os.PathLike) -> bool:
    return "://" in str(location)


def _split(location: str) -> tuple[str, str]:
    base, _, query = str(location).partition("?")
    return base, query


def display(location: str | os.PathLike) -> str:
    """A location without its query (endpoints and options stay out of log lines)."""
    return str(location).split("?", 1)[0]


def join(location: str | os.PathLike, *parts: str) -> str:
    """`location/part/...`, keeping a URI's query at the end."""
    if not is_uri(location):
        return str(Path(location, *parts))
    base, query = _split(str(location))
    base = "/".join([base.rstrip("/"), *(p.strip("/") for p in parts if p)])
    return base + (f"?{query}" if query else "")


def name(location: str | os.PathLike) -> str:
    return _split(str(location))[0].rstrip("/").rsplit("/", 1)[-1]


def parent(location: str | os.PathLike) -> str:
    if not is_uri(location):
        return str(Path(location).parent)
    base, query = _split(str(location))
    return base.rstrip("/").rsplit("/", 1)[0] + (f"?{query}" if query else "")


def check_out_file(path: Path, flag: str, *, force: bool = False, holds: str | None = None,
                   ours=None) -> None:
    """A local file a command is about to write, checked before any work: not a folder, its
    folder there, and a file already there replaced only with --force, or when `ours(path)`
    says it is a `holds` this command wrote before."""
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder: name the file to write")
    if path.exists() and not force and not (ours is not None and ours(path)):
        if ours is None:
            raise UserError(f"{path} exists: pass --force to replace it, or choose another {flag}")
        raise UserError(f"{flag} {path} exists and holds no {holds}: choose another {flag} "
                        f"(a {holds} written before is replaced)")
    if not path.parent.is_dir():
        raise UserError(f"{path.parent} does not exist: create it or choose another {flag}")


def check_folder_named(raw: str | None, flag: str, *, takes_folder: bool = True) -> None:
    """`--out x/` names a folder, as it does for cp: when there is none (or the flag takes
    only a file) it is refused, not written as a file called x."""
    if not raw or is_uri(raw) or not raw.endswith(("/", os.sep)):
        return
    if not takes_folder:
        raise UserError(f"{flag} {raw} names a folder: name the file to write")
    if not Path(raw).expanduser().is_dir():
        raise UserError(f"{flag} {raw} names a folder, and there is none: create it, or name the "
                        "file to write")


def check(location: str) -> str:
    """A UserError for a location that cannot be used; else the location unchanged."""
    if not is_uri(location):
        return location
    base, _ = _split(location)
    scheme, _, rest = base.partition("://")
    if "@" in rest.split("/", 1)[0]:
        raise UserError(f"storage {scheme}://...@... carries credentials: locations are printed "
                        "and saved with each run; give the nodes credentials in their environment "
                        "(e.g. AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY) instead")
    try:
        _fs(location)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds for a bad URI
        raise UserError(f"storage {base}: {str(e).splitlines()[0][:160]}; use a folder every node "
                        "mounts or a URI pyarrow reads (s3://bucket/path, gs://bucket/path)") from None
    return location


def _fs(location: str) -> tuple[Any, str]:
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(str(location))


def _remote(fn):
    """A store that cannot be reached or refuses us is a UserError naming the location."""
    import functools

    @functools.wraps(fn)
    def call(location, *args, **kwargs):
        try:
            return fn(location, *args, **kwargs)
        except OSError as e:
            if not is_uri(location) or isinstance(e, (FileNotFoundError, NotADirectoryError)):
                raise
            base = _split(str(location))[0]
            raise UserError(f"storage {base}: {str(e).splitlines()[0][:200]}; check the URI and "
                            "the credentials in this machine's and the nodes' environment") from None
    return call


@_remote
def _kind(location: str | os.PathLike) -> str | None:
    """"file", "dir", "other", or None when nothing is there."""
    if not is_uri(location):
        path = Path(location)
        return "dir" if path.is_dir() else "file" if path.is_file() else "other" if path.exists() else None
    import pyarrow.fs

    fs, path = _fs(str(location))
    kind = fs.get_file_info(path).type
    return {pyarrow.fs.FileType.File: "file", pyarrow.fs.FileType.Directory: "dir",
            pyarrow.fs.FileType.NotFound: None}.get(kind, "other")


def exists(location: str | os.PathLike) -> bool:
    return _kind(location) is not None


def is_dir(location: str | os.PathLike) -> bool:
    return _kind(location) == "dir"


def is_file(location: str | os.PathLike) -> bool:
    return _kind(location) == "file"


@_remote
def listdir(location: str | os.PathLike) -> list[str]:
    """Names directly under `location`, sorted; empty when it does not exist."""
    if not is_uri(location):
        folder = Path(location)
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    import pyarrow.fs

    fs, path = _fs(str(location))
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(i.base_name for i in infos)


@_remote
def makedirs(location: str | os.PathLike) -> None:
    if not is_uri(location):
        Path(location).mkdir(parents=True, exist_ok=True)
        return
    fs, path = _fs(str(location))
    fs.create_dir(path, recursive=True)


def claim_dir(location: str | os.PathLike) -> bool:
    """Make the folder; False when it was there already. On a filesystem the making is
    atomic, so of two jobs claiming one name at once exactly one gets True. An object store
    has no atomic create: there it is `makedirs`, True unless the prefix already holds files."""
    if not is_uri(location):
        Path(location).parent.mkdir(parents=True, exist_ok=True)
        try:
            Path(location).mkdir()
        except FileExistsError:
            return False
        return True
    if exists(location):
        return False
    makedirs(location)
    return True


@_remote
def size(location: str | os.PathLike) -> int:
    """A file's size in bytes (OSError when it is not there)."""
    if not is_uri(location):
        return Path(location).stat().st_size
    import pyarrow.fs

    fs, path = _fs(str(location))
    info = fs.get_file_info(path)
    if info.type != pyarrow.fs.FileType.File:
        raise FileNotFoundError(str(location))
    return info.size


@_remote
def read_bytes(location: str | os.PathLike) -> bytes:
    if not is_uri(location):
        return Path(location).read_bytes()
    fs, path = _fs(str(location))
    with fs.open_input_stream(path) as f:
        return f.read()


@_remote
def write_bytes(location: str | os.PathLike, data: bytes) -> None:
    """Readers see the old file or the new one, never half of it (an object PUT is whole)."""
    if not is_uri(location):
        target = Path(location)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_bytes(data)
        tmp.replace(target)
        return
    fs, path = _fs(str(location))
    with fs.open_output_stream(path) as f:
        f.write(data)


@_remote
def move(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Rename a file or folder; on object storage a copy of every object, then a delete."""
    if not is_uri(source):
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)
        return
    import pyarrow.fs

    fs, src = _fs(str(source))
    _, dst = _fs(str(target))
    if fs.get_file_info(src).type == pyarrow.fs.FileType.Directory:
        pyarrow.fs.copy_files(src, dst, source_filesystem=fs, destination_filesystem=fs)
        fs.delete_dir(src)
    else:
        fs.move(src, dst)


@_remote
def delete(location: str | os.PathLike) -> None:
    """Remove a file; nothing when it is not there."""
    if not is_uri(location):
        Path(location).unlink(missing_ok=True)
        return
    fs, path = _fs(str(location))
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


@_remote
def delete_tree(location: str | os.PathLike) -> None:
    """Remove a folder and all under it; nothing when it is not there."""
    if not is_uri(location):
        import shutil

        shutil.rmtree(location, ignore_errors=True)
        return
    fs, path = _fs(str(location))
    try:
        fs.delete_dir(path)
    except FileNotFoundError:
        pass


def check_writable(location: str) -> None:
    """Write and remove a small object under `location`: a UserError naming the location and
    where credentials come from when this process cannot (run on each node before training)."""
    import uuid

    probe = join(location, f".write-check-{uuid.uuid4().hex[:12]}")
    try:
        write_bytes(probe, b"densenet-pipe write check\n")
        delete(probe)
    except UserError as e:
        where = _split(location)[0]
        if "NO_SUCH_BUCKET" in str(e) or "bucket does not exist" in str(e).lower():
            scheme, _, rest = where.partition("://")
            raise UserError(f"storage {where}: the bucket {scheme}://{rest.split('/', 1)[0]} does not "
                            "exist: create it first, or fix the URI") from None
        why = str(e).split(": ", 1)[-1].split("; check the URI", 1)[0]
        raise UserError(f"storage {where} cannot be written from here ({why}): "
                        "give every node credentials in its environment (AWS_ACCESS_KEY_ID/"
                        "AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS) or an instance role"
                        ) from None
    except OSError as e:
        raise UserError(f"storage {location} cannot be written from here ({e.strerror or e}): "
                        "choose a folder every node can write") from None


@_remote
def upload_file(local: Path, location: str, progress=None) -> int:
    """Stream a local file to `location` (a path or URI); returns its size. Object stores
    make the object visible only when the upload completes."""
    import shutil

    if not is_uri(location):
        target = Path(location)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.copyfile(local, tmp)
        tmp.replace(target)
        return target.stat().st_size
    fs, path = _fs(str(location))
    done = 0
    with open(local, "rb") as src, fs.open_output_stream(path) as dst:
        while block := src.read(8 << 20):
            dst.write(block)
            done += len(block)
            if progress is not None:
                progress(len(block))
    return done


def write_text(location: str | os.PathLike, text: str) -> None:
    write_bytes(location, text.encode())


def read_text(location: str | os.PathLike) -> str:
    return read_bytes(location).decode()


def upload_dir(local: Path, location: str) -> int:
    """Copy a local folder's files under `location`; returns how many."""
    count = 0
    for file in sorted(Path(local).rglob("*")):
        if file.is_file() and not file.is_symlink():
            write_bytes(join(location, *file.relative_to(local).parts), file.read_bytes())
            count += 1
    return count


def open_bytes(location: str | os.PathLike) -> io.BytesIO | Path:
    """A local path as is, or a URI's bytes in memory: what `torch.load` takes."""
    return Path(location) if not is_uri(location) else io.BytesIO(read_bytes(location))


def local_scratch(location: str | os.PathLike, purpose: str) -> Path:
    """A local folder standing in for `location` where a tool needs a real disk (W&B): the
    location itself for a path; for a URI a new folder each call, so that nothing an earlier
    run left in one is copied into this run's location (a fresh-clone run once read an
    earlier test's finished W&B run from a folder keyed by the URI alone)."""
    if not is_uri(location):
        return Path(location)
    import hashlib
    import tempfile

    digest = hashlib.sha1(str(location).encode()).hexdigest()[:10]
    base = Path(tempfile.gettempdir()) / "densenet-pipe" / purpose
    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{name(location)}-{digest}-", dir=base))
