"""prepare -> real FFCV stores -> read back with the real loaders (tiny fixtures)."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fixtures_data import make_cifar, make_ilsvrc, make_svhn
from pipeline.config import DataSection
from pipeline.data.prepare import prepare
from pipeline.data.prepare_config import PrepareConfig
from pipeline.data.store import open_store
from pipeline.errors import UserError

pytestmark = pytest.mark.ffcv
ROOT = Path(__file__).resolve().parents[1]
EVAL = DataSection(augment=False, channels_last=False, loader_workers=1)


@pytest.fixture
def no_compile():
    from ffcv.pipeline.compiler import Compiler

    Compiler.set_enabled(False)
    yield
    Compiler.set_enabled(True)


def quiet(_: str) -> None:
    pass


def read_all(store, split, data_cfg=EVAL, batch_size=16, **kw):
    from pipeline.data.loaders import make_loader

    loader, manifest = make_loader(store, split, batch_size, data_cfg, **kw)
    xs, ys = [], []
    for x, y in loader:
        xs.append(x.clone())
        ys.append(y.clone())
    return np.concatenate(xs), np.concatenate(ys), manifest, loader


def unnormalise(x: np.ndarray, manifest) -> np.ndarray:
    mean = np.array(manifest.mean)[None, :, None, None]
    std = np.array(manifest.std)[None, :, None, None]
    return np.rint((x * std + mean) * 255).astype(np.int64).transpose(0, 2, 3, 1)


@pytest.mark.timeout(120)
def test_cifar10_raw_round_trip_is_pixel_exact(tmp_path):
    """The one test with FFCV's numba compilation on: the path training takes."""
    path, exp = make_cifar(tmp_path / "src", 10)
    out = tmp_path / "stores" / "cifar10"
    m = prepare(PrepareConfig(dataset="cifar10", source=str(path), out=str(out)), log=quiet)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "train.beton", "val.beton"]
    assert m.splits["train"].count == 20 and m.splits["val"].count == 6
    assert m.classes == exp["classes"] and m.fixed_size == [32, 32] and m.writer.write_mode == "raw"
    assert m.sources[0]["name"] == "cifar-10-python.tar.gz" and m.sources[0]["matches_card"] is False
    assert any("the card says 50000" in d for d in m.card_differences)
    for split in ("train", "val"):
        x, y, manifest, _ = read_all(out, split, drop_last=False, order="sequential")
        assert x.dtype == np.float32 and x.shape[1:] == (3, 32, 32) and y.dtype == np.int64
        assert np.array_equal(unnormalise(x, manifest), exp[f"{split}_x"])
        assert np.array_equal(y, exp[f"{split}_y"])
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


@pytest.mark.timeout(120)
def test_svhn_with_extra_labels_exact(tmp_path, no_compile):
    exp = make_svhn(tmp_path / "src", n_train=6, n_test=4, n_extra=3)
    out = tmp_path / "svhn"
    m = prepare(PrepareConfig(dataset="svhn", source=str(tmp_path / "src"), out=str(out)), log=quiet)
    assert m.splits["train"].count == 9 and m.info["extra"] is True
    assert m.augment == "translate"
    x, y, manifest, _ = read_all(out, "train", drop_last=False, order="sequential")
    assert np.array_equal(y, np.concatenate([exp["train"][1], exp["extra"][1]]))
    assert np.array_equal(unnormalise(x, manifest), np.concatenate([exp["train"][0], exp["extra"][0]]))


@pytest.mark.timeout(120)
def test_imagenet_bad_file_stops_or_is_skipped(tmp_path, no_compile):
    exp = make_ilsvrc(tmp_path / "src", train="tar", val="devkit")
    out = tmp_path / "imagenet"
    cfg = PrepareConfig(dataset="imagenet", source=str(tmp_path / "src"), out=str(out),
                        max_resolution=48)
    with pytest.raises(UserError, match=f"cannot be read, first .*{exp['truncated']}.*--skip-bad"):
        prepare(cfg, log=quiet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    cfg.skip_bad = True
    m = prepare(cfg, log=quiet)
    assert m.splits["train"].count == exp["train_count"] - 1
    assert len(m.skipped) == 1 and m.skipped[0]["path"].endswith(exp["truncated"])
    assert m.classes[0] == "tench, Tinca tinca" and m.family == "imagenet" and m.fixed_size is None
    data_cfg = DataSection(augment=False, channels_last=False, loader_workers=1, eval_resolution=32)
    x, y, _, _ = read_all(out, "val", data_cfg)
    assert x.shape == (exp["val_count"], 3, 32, 32)
    assert np.array_equal(y, exp["val_y"])
    train_cfg = DataSection(augment=True, channels_last=True, loader_workers=1, resolution=24)
    x, y, _, loader = read_all(out, "train", train_cfg, batch_size=4)
    assert x.shape == (8, 3, 24, 24) and len(loader) == 2
    assert sorted(y.tolist()) != [] and set(y.tolist()) <= {0, 1, 2}


@pytest.mark.timeout(120)
def test_jpg_mode_and_max_resolution(tmp_path, no_compile):
    from ffcv.fields.rgb_image import IMAGE_MODES
    from ffcv.reader import Reader

    make_ilsvrc(tmp_path / "src", val="sorted", messy=False)
    out = tmp_path / "s"
    m = prepare(PrepareConfig(dataset="imagenet", source=str(tmp_path / "src"), out=str(out),
                              write_mode="jpg", max_resolution=32, jpeg_quality=80), log=quiet)
    assert m.writer.write_mode == "jpg" and m.writer.jpeg_quality == 80
    meta = Reader(str(out / "train.beton")).metadata["f0"]
    assert (meta["mode"] == IMAGE_MODES["jpg"]).all() and max(meta["height"].max(), meta["width"].max()) <= 32


@pytest.mark.timeout(120)
def test_store_is_never_overwritten_without_force_and_damage_is_caught(tmp_path, no_compile):
    cfg = PrepareConfig(dataset="synthetic", out=str(tmp_path / "syn"))
    cfg.synthetic.train_size, cfg.synthetic.val_size = 40, 10
    prepare(cfg, log=quiet)
    first = json.loads((tmp_path / "syn" / "manifest.json").read_text())
    with pytest.raises(UserError, match="already a store: pass --force"):
        prepare(cfg, log=quiet)
    cfg.force, cfg.synthetic.seed = True, 1
    prepare(cfg, log=quiet)
    second = json.loads((tmp_path / "syn" / "manifest.json").read_text())
    assert first["splits"]["train"]["sha256"] != second["splits"]["train"]["sha256"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["syn"]

    beton = tmp_path / "syn" / "val.beton"
    open_store(tmp_path / "syn")
    # A split's file for the store (as `predict` takes it) is named, with the folder to pass.
    with pytest.raises(UserError, match=f"is a file of the store {tmp_path / 'syn'}: pass the store's folder"):
        open_store(beton)
    (tmp_path / "loose.beton").write_bytes(b"")
    with pytest.raises(UserError, match="is a file, not a store"):
        open_store(tmp_path / "loose.beton")
    data = bytearray(beton.read_bytes())
    data[-1] ^= 0xFF
    beton.write_bytes(bytes(data))
    with pytest.raises(UserError, match="val.beton does not match the sha256"):
        open_store(tmp_path / "syn")
    (tmp_path / "syn" / "manifest.json").unlink()
    with pytest.raises(UserError, match="is not a store"):
        open_store(tmp_path / "syn")
    from pipeline.data.loaders import make_loader
    with pytest.raises(UserError, match="is not a store"):
        make_loader(tmp_path / "syn", "train", 4, EVAL)


def test_unwritable_output_and_bad_source_leave_nothing(tmp_path):
    (tmp_path / "file").write_text("x")
    cfg = PrepareConfig(dataset="synthetic", out=str(tmp_path / "file" / "store"))
    with pytest.raises(UserError, match="cannot create .*file"):
        prepare(cfg, log=quiet)
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(UserError, match="permission denied"):
            prepare(PrepareConfig(dataset="synthetic", out=str(locked / "s")), log=quiet)
    with pytest.raises(UserError, match="does not exist"):
        prepare(PrepareConfig(dataset="cifar10", source=str(tmp_path / "none.tar.gz"),
                              out=str(tmp_path / "c")), log=quiet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"] + (["locked"] if os.geteuid() else [])


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


@pytest.mark.timeout(120)
def test_full_disk_is_one_line_exit_2_and_nothing_published(tmp_path):
    """A file-size limit makes writes fail with EFBIG, as a full disk fails with ENOSPC."""
    cfg = {"dataset": "synthetic", "out": str(tmp_path / "out" / "syn"),
           "synthetic": {"train_size": 2000, "val_size": 10}}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    r = subprocess.run([sys.executable, "-m", "jobs.prepare", "--config", str(tmp_path / "cfg.json")],
                       cwd=ROOT, capture_output=True, text=True, timeout=100,
                       preexec_fn=_limit_file_size)
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "disk full" in errors[0] and "Traceback" not in r.stderr
    assert list((tmp_path / "out").iterdir()) == []


def _small(out: Path, **kw) -> PrepareConfig:
    cfg = PrepareConfig(dataset="synthetic", out=str(out), **kw)
    cfg.synthetic.train_size, cfg.synthetic.val_size = 40, 10
    return cfg


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.mark.timeout(120)
def test_force_replaces_only_a_store_or_an_empty_folder(tmp_path, no_compile, cli):
    work = tmp_path / "work"
    (work / "thesis").mkdir(parents=True)
    (work / "thesis" / "chapter1.tex").write_text("It was a dark and stormy night.")
    with pytest.raises(UserError, match="--force replaces only a store or an empty folder.*'thesis'"):
        prepare(_small(work, force=True), log=quiet)
    r = cli("prepare", "synthetic", "--out", work, "--force")
    assert r.exit_code == 2 and r.stderr.count("error:") == 1 and "only a store" in r.stderr
    assert (work / "thesis" / "chapter1.tex").read_text() == "It was a dark and stormy night."
    # Without --force the refusal does not advise the --force that would be refused too.
    r = cli("prepare", "synthetic", "--out", work)
    assert r.exit_code == 2 and "is already a non-empty folder that is not a store (it holds 'thesis')" in r.stderr
    assert "pass --force" not in r.stderr, r.stderr

    store = tmp_path / "syn"
    prepare(_small(store), log=quiet)
    (store / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="'notes.txt'"):
        prepare(_small(store, force=True), log=quiet)
    assert (store / "notes.txt").exists() and open_store(store).dataset == "synthetic"
    (store / "notes.txt").unlink()
    prepare(_small(store, force=True), log=quiet)
    empty = tmp_path / "empty"
    empty.mkdir()
    prepare(_small(empty, force=True), log=quiet)
    assert open_store(empty).splits["train"].count == 40


@pytest.mark.timeout(60)
def test_protected_folders_are_never_an_out(tmp_path, monkeypatch):
    from pipeline.data.publish import PROJECT_ROOT, check_out

    home, here = tmp_path / "home", tmp_path / "home" / "here"
    here.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(here)
    for out, what in (("/", "the root folder"), (str(home), "your home folder"), (".", "the current folder"),
                      (str(PROJECT_ROOT), "the project's folder"), (str(tmp_path), "a folder that holds")):
        with pytest.raises(UserError, match=what):
            check_out(out, force=True)
    assert check_out("stores/x", force=True) == here / "stores" / "x"


@pytest.mark.timeout(120)
def test_leftovers_of_a_dead_prepare_are_removed_and_a_live_one_locks(tmp_path, no_compile):
    import fcntl

    out = tmp_path / "syn"
    dead = _dead_pid()
    stale = [tmp_path / f".syn.prepare-{dead}-0000", tmp_path / f".syn.old-{dead}-0001"]
    for p in stale:
        (p / "train.beton").parent.mkdir()
        (p / "train.beton").write_bytes(b"x" * 1000)
    alive = tmp_path / f".syn.prepare-{os.getpid()}-0002"
    alive.mkdir()
    lines: list[str] = []
    prepare(_small(out), log=lines.append)
    assert not any(p.exists() for p in stale) and alive.exists()
    assert sum("left by an interrupted prepare" in line for line in lines) == 2
    alive.rmdir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["syn"]

    with open(tmp_path / ".syn.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("4242")
        held.flush()
        with pytest.raises(UserError, match=r"another prepare is writing .*syn \(pid 4242\)"):
            prepare(_small(out, force=True), log=quiet)
    assert open_store(out).splits["train"].count == 40


@pytest.mark.timeout(180)
def test_a_sigkilled_prepare_leaves_nothing_after_the_next_one(tmp_path):
    out = tmp_path / "stores" / "syn"
    cfg = {"dataset": "synthetic", "out": str(out), "synthetic": {"train_size": 20000, "val_size": 10}}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    cmd = [sys.executable, "-m", "jobs.prepare", "--config", str(tmp_path / "cfg.json")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list(out.parent.glob(".syn.prepare-*/train.beton")):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        writers = []
        while not writers and proc.poll() is None and time.monotonic() < deadline:
            writers = [int(c) for c in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        assert writers, "the prepare started no writer processes"
    finally:
        proc.kill()
        proc.wait()
    assert not out.exists() and list(out.parent.glob(".syn.prepare-*"))
    # Its writer processes die with it rather than writing on as orphans.
    deadline = time.monotonic() + 10
    while any(_running(w) for w in writers):
        assert time.monotonic() < deadline, f"writer processes {writers} outlived the prepare"
        time.sleep(0.1)
    cfg["synthetic"]["train_size"] = 40
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=150)
    assert r.returncode == 0, r.stderr
    assert f"pid {proc.pid}" in r.stdout and "left by an interrupted prepare" in r.stdout
    assert sorted(p.name for p in out.parent.iterdir()) == ["syn"]
    assert open_store(out).splits["train"].count == 40


def test_a_writer_whose_prepare_died_before_it_started_exits_at_once():
    # A prepare SIGKILLed between a writer's fork and its PR_SET_PDEATHSIG sends the writer
    # no signal: it must see that its parent is no longer the prepare, and stop.
    check = ("import os, sys; from pipeline.data.writer import _die_with_parent; "
             "_die_with_parent(int(sys.argv[1])); print('writing')")
    for parent, rc, out in ((os.getpid(), 0, "writing\n"), (_dead_pid(), 1, "")):
        r = subprocess.run([sys.executable, "-c", check, str(parent)], cwd=ROOT, capture_output=True,
                           text=True, timeout=60)
        assert (r.returncode, r.stdout) == (rc, out), r.stderr


@pytest.mark.timeout(120)
def test_a_prepared_store_is_hashed_once(tmp_path, no_compile, monkeypatch):
    # Each .beton is read for its sha256 once, when written; the checks of the written store
    # and of the published one (the same files, renamed) use that hash. A later change to a
    # file is still caught (the test above).
    from pipeline.data import store

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    hashed = []
    real = store.sha256_file
    monkeypatch.setattr(store, "sha256_file", lambda path, *a: hashed.append(Path(path).name) or real(path, *a))
    cfg = PrepareConfig(dataset="synthetic", out=str(tmp_path / "syn"))
    cfg.synthetic.train_size, cfg.synthetic.val_size = 40, 10
    m = prepare(cfg, log=quiet)
    assert sorted(hashed) == ["train.beton", "val.beton"]
    assert m.splits["train"].sha256 == real(tmp_path / "syn" / "train.beton")


@pytest.mark.timeout(120)
def test_the_sources_are_checksummed_beside_the_writing_not_before_it(tmp_path, monkeypatch):
    import hashlib

    from pipeline.data import prepare as prepare_module
    from pipeline.data import store as store_module

    path, _ = make_cifar(tmp_path / "src", 10)
    in_process: list[str] = []
    for module in (store_module, prepare_module):
        monkeypatch.setattr(module, "md5_file", lambda p, *a: in_process.append(str(p)) or "x", raising=False)
    lines: list[str] = []
    real_write = prepare_module.write_indices

    def write(*args, **kwargs):
        lines.append("writing")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(prepare_module, "write_indices", write)
    m = prepare(PrepareConfig(dataset="cifar10", source=str(path), out=str(tmp_path / "out")), log=lines.append)
    # Announced, then handed to a process of its own before the first split is written; this
    # process never reads the archive for it, and the manifest has its true md5.
    assert lines.index(f"checksumming {path} (while the splits are written)") < lines.index("writing")
    assert in_process == []
    assert m.sources[0]["md5"] == hashlib.md5(path.read_bytes()).hexdigest()
