"""Locations of run folders: paths and object-store URIs (`pipeline.storage`).

Training, resuming and evaluating with runs in a real S3 server: tests/test_train.py.
"""

from __future__ import annotations

import pytest

from pipeline import storage
from pipeline.errors import UserError


def test_join_parent_and_name_keep_the_query():
    uri = "s3://bucket/runs?endpoint_override=host:9000&scheme=http"
    run = storage.join(uri, "r1", "epoch-0001")
    assert run == "s3://bucket/runs/r1/epoch-0001?endpoint_override=host:9000&scheme=http"
    assert storage.parent(run) == "s3://bucket/runs/r1?endpoint_override=host:9000&scheme=http"
    assert storage.name(run) == "epoch-0001"
    assert storage.join("/data/runs", "r1") == "/data/runs/r1"
    assert storage.parent("/data/runs/r1") == "/data/runs"


def test_credentials_in_a_location_are_refused():
    with pytest.raises(UserError, match="carries credentials"):
        storage.check("s3://AKIAEXAMPLE:secret@bucket/runs")
    with pytest.raises(UserError, match="storage nope://"):
        storage.check("nope://bucket/runs")
    assert storage.check("/any/local/folder") == "/any/local/folder"


def test_local_write_is_atomic_and_listdir_sorted(tmp_path):
    target = tmp_path / "a" / "history.json"
    storage.write_text(target, "[1]")
    storage.write_text(target, "[1, 2]")
    assert target.read_text() == "[1, 2]" and storage.listdir(tmp_path / "a") == ["history.json"]
    assert storage.listdir(tmp_path / "missing") == []


@pytest.mark.timeout(120)
@pytest.mark.parametrize("where", ["path", "s3"])
def test_of_jobs_claiming_one_run_folder_at_once_one_gets_it(where, tmp_path, request):
    """Two jobs given one run name in one storage at the same moment both pass the "already
    exists" check; the claim that follows lets only one of them train into the folder."""
    from concurrent.futures import ThreadPoolExecutor

    base = str(tmp_path) if where == "path" else request.getfixturevalue("s3_bucket")
    run = storage.join(base, f"claimed-{where}", "twin")
    if where == "path":  # atomic here: of eight at once, exactly one
        with ThreadPoolExecutor(8) as pool:
            assert sorted(pool.map(lambda _: storage.claim_dir(run), range(8))) == [False] * 7 + [True]
    else:  # an object store has no atomic create: one after the other
        assert storage.claim_dir(run) is True
        assert storage.claim_dir(run) is False
    assert storage.is_dir(run)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("where", ["path", "s3"])
def test_a_run_taken_back_sets_newer_checkpoints_aside(where, tmp_path, request):
    """`--from-epoch`'s move, on a folder and on object storage (moto's S3 server)."""
    import hashlib
    import json

    from pipeline.train import checkpoint

    base = str(tmp_path) if where == "path" else request.getfixturevalue("s3_bucket")
    run = storage.join(base, f"taken-back-{where}")
    for epoch in (1, 2, 3):
        body = f"weights {epoch}".encode()
        folder = storage.join(run, f"epoch-{epoch:04d}")
        storage.write_bytes(storage.join(folder, checkpoint.FILE), body)
        storage.write_text(storage.join(folder, checkpoint.DONE), json.dumps(
            {"bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}))
    storage.write_text(storage.join(run, checkpoint.RAY_RECORD), "{}")
    said: list[str] = []
    aside = checkpoint.set_aside_after(run, 1, say=said.append)
    assert storage.listdir(run) == ["epoch-0001", storage.name(aside)]
    assert storage.listdir(aside) == [checkpoint.RAY_RECORD, "epoch-0002", "epoch-0003"]
    assert storage.read_text(storage.join(aside, "epoch-0003", checkpoint.FILE)) == "weights 3"
    assert "epoch-0002, epoch-0003" in said[0]
    assert checkpoint.newest(run) == storage.join(run, "epoch-0001", checkpoint.FILE)
