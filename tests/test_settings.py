"""The user's settings file and what the headline commands take from it (no cluster)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from pipeline import runs, settings
from pipeline.cli import app
from pipeline.errors import UserError

runner = CliRunner()


@pytest.fixture(autouse=True)
def own_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv(settings.FILE_ENV, raising=False)
    for key in settings.KEYS:
        monkeypatch.delenv(settings.env_name(key), raising=False)


def test_set_show_unset_and_the_environment_wins(tmp_path, monkeypatch):
    assert runner.invoke(app, ["config", "set", "sources.imagenet", str(tmp_path / "ilsvrc")]).exit_code == 0
    assert runner.invoke(app, ["config", "set", "store_root", str(tmp_path / "stores")]).exit_code == 0
    file = tmp_path / "config" / "densenet-pipe" / "config.yaml"
    assert settings.path() == file and file.is_file()
    shown = json.loads(runner.invoke(app, ["config", "show", "--format", "json"]).stdout)
    assert shown["settings"]["sources.imagenet"] == {"value": str(tmp_path / "ilsvrc"), "from": str(file)}
    assert shown["settings"]["sources.svhn"] == {"value": None, "from": None}
    monkeypatch.setenv("DENSENET_PIPE_SOURCES_IMAGENET", "/elsewhere")
    assert settings.get("sources.imagenet").value == "/elsewhere"
    assert settings.get("sources.imagenet").where == "$DENSENET_PIPE_SOURCES_IMAGENET"
    monkeypatch.delenv("DENSENET_PIPE_SOURCES_IMAGENET")
    assert runner.invoke(app, ["config", "unset", "sources.imagenet"]).exit_code == 0
    assert settings.get("sources.imagenet").value is None
    assert settings.get("store_root").value == str(tmp_path / "stores")


@pytest.mark.parametrize("args,needle", [
    (["config", "set", "sources.mnist", "/x"], "unknown setting 'sources.mnist'"),
    (["prepare", "imagenet", "--dry-run"],
     "imagenet needs --source (its official files): nothing in {config}/densenet-pipe/config.yaml or "
     "$DENSENET_PIPE_SOURCES_IMAGENET; set it with `densenet-pipe config set sources.imagenet /data/imagenet`"),
    (["train", "densenet169", "--dry-run"],
     "no training data: pass --data STORE, or prepare the imagenet store into {cwd}/stores/imagenet"),
    (["train", "densenet_bc100_k12", "--recipe", "svhn", "--dry-run"], "prepare the svhn store"),
])
def test_nothing_configured_is_one_line_naming_where_it_looked(args, needle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    (line,) = r.stderr.strip().splitlines()
    assert needle.format(config=tmp_path / "config", cwd=tmp_path) in line, line


def test_a_broken_settings_file_is_one_line(tmp_path):
    file = tmp_path / "config" / "densenet-pipe" / "config.yaml"
    file.parent.mkdir(parents=True)
    file.write_text("sources: [unclosed\n")
    r = runner.invoke(app, ["config", "show"])
    assert r.exit_code == 2 and "is not readable YAML" in r.stderr and "Traceback" not in r.output
    file.write_text("- a list\n")
    with pytest.raises(UserError, match="must hold a mapping"):
        settings.get("store_root")


@pytest.mark.ffcv
def test_prepare_and_train_take_the_source_and_the_store_from_the_settings(tmp_path, monkeypatch):
    """`prepare imagenet` resolves its source and output from the settings, and `train
    densenet169` finds the store there, naming it (dry runs: nothing submitted)."""
    from fixtures_data import make_ilsvrc
    from pipeline.data.prepare import prepare
    from pipeline.data.prepare_config import PrepareConfig

    make_ilsvrc(tmp_path / "ilsvrc", messy=False)
    settings.set_value("sources.imagenet", str(tmp_path / "ilsvrc"))
    settings.set_value("store_root", str(tmp_path / "stores"))
    r = runner.invoke(app, ["prepare", "imagenet", "--dry-run"])
    assert r.exit_code == 0, r.output
    planned = json.loads(r.stdout)
    assert planned["source"] == str(tmp_path / "ilsvrc") and planned["out"] == str(tmp_path / "stores" / "imagenet")
    assert "sources.imagenet from" in r.stderr
    prepare(PrepareConfig.from_dict({**planned, "workers": 1}), log=lambda _m: None)
    r = runner.invoke(app, ["train", "densenet169", "--dry-run"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["data"]["store"] == str(tmp_path / "stores" / "imagenet")
    assert f"data: {tmp_path / 'stores' / 'imagenet'}" in r.stderr


def test_a_cluster_started_for_a_job_has_its_nodes_and_shares_the_cpus():
    assert runs.local_cluster_shape(None, 2, 0) == (1, None, None)
    assert runs.local_cluster_shape({"nodes": 1, "cpus_per_node": 1}, 16, 0) == (1, None, None)
    assert runs.local_cluster_shape({"nodes": 4, "cpus_per_node": 1, "gpus_per_node": 0}, 16, 0) == (4, 4.0, None)
    # Fewer CPUs than nodes: each node still offers what one worker needs.
    assert runs.local_cluster_shape({"nodes": 4, "cpus_per_node": 1, "gpus_per_node": 0}, 2, 0) == (4, 1.0, None)
    assert runs.local_cluster_shape({"nodes": 2, "cpus_per_node": 2, "gpus_per_node": 2}, 16, 4) == (2, 8.0, 2)


@pytest.mark.parametrize("key,value,needle", [
    ("store_root", "", "store_root: the value is empty: give a path, or remove the key with "
                       "`densenet-pipe config unset store_root`"),
    ("sources.cifar10", " ", "`densenet-pipe config unset sources.cifar10`"),
    ("sources.imagenet", "s3://bucket/ilsvrc", "sources.imagenet: s3://bucket/ilsvrc is a URI"),
    ("nonsense", "", "unknown setting 'nonsense'"),
])
def test_set_refuses_what_no_command_could_use_and_keeps_the_file(key, value, needle, tmp_path):
    settings.set_value("store_root", str(tmp_path / "stores"))
    before = settings.path().read_text()
    r = runner.invoke(app, ["config", "set", key, value])
    assert r.exit_code == 2, r.output
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("error: ") and needle in line, line
    assert settings.path().read_text() == before


def test_set_a_source_this_machine_lacks_warns_and_keeps_it(tmp_path):
    r = runner.invoke(app, ["config", "set", "sources.svhn", str(tmp_path / "svhn")])
    assert r.exit_code == 0, r.output
    assert f"warning: {tmp_path / 'svhn'} does not exist on this machine" in r.stderr
    assert settings.get("sources.svhn").value == str(tmp_path / "svhn")
    (tmp_path / "svhn").mkdir()
    r = runner.invoke(app, ["config", "set", "sources.svhn", str(tmp_path / "svhn")])
    assert r.exit_code == 0 and "warning" not in r.stderr, r.output
    r = runner.invoke(app, ["config", "set", "store_root", "s3://bucket/stores"])
    assert r.exit_code == 0 and settings.get("store_root").value == "s3://bucket/stores", r.output
