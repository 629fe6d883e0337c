"""What a job does with the paths it is given, on a cluster of its own or the embedded one."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs import common
from pipeline.errors import UserError


@pytest.fixture
def remote(monkeypatch, tmp_path):
    """A job on a cluster that sets neither base folder: its cwd is Ray's copy of the code."""
    monkeypatch.delenv(common.WORKDIR_ENV, raising=False)
    monkeypatch.delenv(common.HOME_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_relative_path_without_a_base_folder_is_refused_not_written_into_rays_copy(remote):
    for path in ("stores/x", "predictions.csv", "./runs"):
        with pytest.raises(UserError, match=rf"{path} is a relative path, and this cluster sets no "
                                            rf"{common.HOME_ENV}.*pass an absolute path on the cluster or a URI"):
            common.resolve_path(path)
    assert common.resolve_path("/data/stores/x") == "/data/stores/x"
    assert common.resolve_path("s3://bucket/stores/x") == "s3://bucket/stores/x"
    assert common.resolve_path("") == ""


def test_a_base_folder_is_where_relative_paths_and_unnamed_outputs_go(remote, monkeypatch, tmp_path):
    from jobs.predict import default_out

    assert Path(default_out("csv")).parent == Path.home() / "densenet-pipe"
    shared = tmp_path / "shared"
    shared.mkdir()
    monkeypatch.setenv(common.HOME_ENV, str(shared))
    monkeypatch.chdir(shared)  # as `common.main` does before the job runs
    assert common.resolve_path("stores/x") == str(shared / "stores" / "x")
    assert Path(default_out("csv")).parent == shared and default_out("table").endswith(".txt")


def test_a_prepare_job_given_a_relative_out_on_such_a_cluster_writes_nothing(remote):
    import signal

    from jobs import prepare

    before = signal.getsignal(signal.SIGTERM)  # the job takes SIGTERM over: give it back
    try:
        with pytest.raises(UserError, match="stores/syn is a relative path"):
            prepare.run({"dataset": "synthetic", "out": "stores/syn", "workers": 1,
                         "synthetic": {"train_size": 8, "val_size": 4}})
    finally:
        signal.signal(signal.SIGTERM, before)
    assert not (remote / "stores").exists()
