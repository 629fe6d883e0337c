"""Stores in object storage (a real S3 server on localhost) and node-local staging, in-process.

The Ray path (prepare to S3 -> train on 2 nodes from S3 -> evaluate from S3) is in
tests/test_train.py; here are the rules each piece keeps.
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from types import SimpleNamespace

import pytest

from fixtures_data import make_synthetic_store
from pipeline import storage
from pipeline.data import staging
from pipeline.data.prepare import prepare
from pipeline.data.prepare_config import PrepareConfig
from pipeline.data.store import MANIFEST, open_store, sha256_file
from pipeline.errors import UserError

pytestmark = pytest.mark.ffcv


def _data(cache: Path, stage: str = "auto", max_gb: float = 10.0):
    return SimpleNamespace(stage=stage, cache_dir=str(cache), cache_max_gb=max_gb)


def _prepare(out: str, force: bool = False, seed: int = 0) -> None:
    prepare(PrepareConfig.from_dict({"dataset": "synthetic", "out": out, "workers": 1, "force": force,
                                     "synthetic": {"train_size": 64, "val_size": 32, "seed": seed}}),
            log=lambda _: None)


@pytest.fixture(scope="module")
def published(s3_bucket) -> str:
    uri = storage.join(s3_bucket, "stores", "tiny")
    _prepare(uri)
    return uri


def test_prepare_publishes_a_whole_store_to_object_storage(published, s3_bucket, tmp_path):
    assert storage.listdir(published) == ["manifest.json", "train.beton", "val.beton"]
    manifest, digest = staging.locate(published)
    assert manifest.path == published and manifest.splits["train"].count == 64
    assert digest == __import__("hashlib").sha256(storage.read_bytes(storage.join(published, MANIFEST))).hexdigest()
    # The same rules as a folder: an existing store is replaced only with --force.
    with pytest.raises(UserError, match="already a store: pass --force"):
        _prepare(published)
    # Nothing was written under the current folder (an s3:/ folder, say).
    assert not Path("s3:").exists()


def test_a_store_is_staged_once_verified_and_reused(published, tmp_path):
    manifest, digest = staging.locate(published)
    lines: list[str] = []
    first = staging.local_copy(published, digest, _data(tmp_path / "cache"), say=lines.append)
    again = staging.local_copy(published, digest, _data(tmp_path / "cache"), say=lines.append)
    assert first == again == tmp_path / "cache" / digest[:24]
    assert ": staged at" in lines[0] and "MB/s" in lines[0] and "object storage" in lines[0]
    assert "already staged" in lines[1] and "nothing to download" in lines[1]
    copy = open_store(first)  # verified against the manifest's sha256s
    for split in ("train", "val"):
        assert sha256_file(copy.beton(split)) == manifest.splits[split].sha256


def test_a_corrupt_object_fails_in_one_line_and_does_not_poison_the_cache(s3_bucket, tmp_path):
    uri = storage.join(s3_bucket, "stores", "corrupt")
    _prepare(uri, seed=3)
    _, digest = staging.locate(uri)
    good = storage.read_bytes(storage.join(uri, "val.beton"))
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF
    storage.write_bytes(storage.join(uri, "val.beton"), bytes(bad))
    cache = tmp_path / "cache"
    with pytest.raises(UserError) as e:
        staging.local_copy(uri, digest, _data(cache))
    assert "val.beton does not match its manifest" in str(e.value) and "\n" not in str(e.value)
    assert "endpoint_override" not in str(e.value)  # the location is shown without its query
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []
    # Mended in the bucket, the next run downloads it again and succeeds.
    storage.write_bytes(storage.join(uri, "val.beton"), good)
    lines: list[str] = []
    folder = staging.local_copy(uri, digest, _data(cache), say=lines.append)
    assert ": staged at" in lines[0] and open_store(folder).splits["val"].count == 32
    # A half-uploaded object is caught from its size before anything is downloaded.
    storage.write_bytes(storage.join(uri, "train.beton"), good[:100])
    with pytest.raises(UserError, match="train.beton is 100 bytes, the manifest says"):
        staging.locate(uri)


def test_missing_store_and_unreachable_server_are_one_line(s3_bucket):
    with pytest.raises(UserError, match="is not a store \\(no manifest.json\\)"):
        staging.locate(storage.join(s3_bucket, "stores", "nothing-here"))
    with pytest.raises(UserError, match="check the URI and the credentials"):
        staging.locate("s3://runs/x?endpoint_override=127.0.0.1:9&scheme=http&region=us-east-1")


def test_a_store_for_a_bucket_that_is_not_there_is_refused_before_any_writing(s3_bucket, tmp_path):
    """Found as a user: the upload failed with pyarrow's NO_SUCH_BUCKET after the whole
    store was written (hours, for ImageNet). A probe object settles it first."""
    said: list[str] = []
    out = f"s3://nobucket/stores/x?{s3_bucket.split('?', 1)[1]}"
    with pytest.raises(UserError) as e:
        prepare(PrepareConfig.from_dict({"dataset": "synthetic", "out": out, "workers": 1,
                                         "synthetic": {"train_size": 64, "val_size": 32}}), log=said.append)
    assert str(e.value) == ("storage s3://nobucket/stores/x: the bucket s3://nobucket does not exist: "
                            "create it first, or fix the URI")
    assert said == []
    # A bucket that is there takes the probe and keeps nothing of it.
    storage.check_writable(storage.join(s3_bucket, "stores", "probe"))
    assert storage.listdir(storage.join(s3_bucket, "stores", "probe")) == []


def _stage_in_process(args):
    location, digest, cache = args
    lines: list[str] = []
    staging.local_copy(location, digest, _data(Path(cache)), say=lines.append)
    return lines


def test_workers_starting_at_once_download_once(published, tmp_path):
    _, digest = staging.locate(published)
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        results = pool.map(_stage_in_process, [(published, digest, str(tmp_path / "cache"))] * 3)
    lines = [line for result in results for line in result]
    assert sum(": staged at" in line for line in lines) == 1, lines
    assert sum("already staged" in line for line in lines) == 2, lines


def test_paths_are_read_in_place_unless_told_and_the_cache_evicts_lru(tmp_path):
    a = make_synthetic_store(tmp_path / "a", 64, 32, seed=1)
    b = make_synthetic_store(tmp_path / "b", 64, 32, seed=2)
    stage, why = staging.plan(str(a), "auto")
    assert not stage and "local" in why
    assert staging.local_copy(str(a), "", _data(tmp_path / "cache")) == Path(a)
    assert not (tmp_path / "cache").exists()
    size = sum(s.bytes for s in open_store(a).splits.values())
    lines: list[str] = []
    # Room for one store: staging the second evicts the least recently used first.
    data = _data(tmp_path / "cache", stage="always", max_gb=1.5 * size / 1e9)
    first = staging.local_copy(str(a), "", data, say=lines.append)
    second = staging.local_copy(str(b), "", data, say=lines.append)
    assert not first.exists() and second.exists()
    assert any("removed" in line and first.name in line for line in lines), lines
    assert staging.filesystem("/proc") == "proc"
    assert staging.plan("/nfs-mounted", "never")[0] is False
