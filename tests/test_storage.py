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
