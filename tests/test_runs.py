"""The run rules in one place (pipeline/runs.py), and where the CLI and the job apply them."""

from __future__ import annotations

import json
import os
import re

import pytest

from pipeline import config as C, local_cluster, runs
from pipeline.errors import UserError


@pytest.mark.parametrize("name", ["..", ".", "a/b", "/etc", "../up", "", "x y", "naïve"])
def test_names_that_would_escape_or_break_a_folder_are_refused(name, cli, tmp_path):
    with pytest.raises(UserError, match="is not allowed"):
        runs.check_name("run", name)
    if name:
        with pytest.raises(C.ConfigError, match="run name"):
            C.validate(C.apply_overrides(C.load_recipe("smoke"), {"cluster.run_name": name}))


def test_bad_run_and_sweep_names_are_one_line_exit_2(cli, tmp_path):
    r = cli("train", "densenet_simple", "--data", tmp_path, "--name", "../../etc")
    assert r.exit_code == 2 and "run name '../../etc' is not allowed" in r.stderr
    r = cli("sweep", "densenet_bc", "--growth-rate", "4", "--data", tmp_path, "--name", "a/b")
    assert r.exit_code == 2 and "sweep name 'a/b' is not allowed" in r.stderr


def test_workers_per_node_and_the_batch_split_are_decided_once():
    assert runs.workers_per_node(None, use_gpu=True, gpus=[0, 3, 4]) == 3
    assert runs.workers_per_node(None, use_gpu=False, gpus=[8]) == 1
    assert runs.workers_per_node(2, use_gpu=True, gpus=[8]) == 2
    assert runs.per_worker_batch(64, 2, 2) == 16
    # 64 over one node with 3 GPUs was silently 63 a step.
    with pytest.raises(UserError, match="global batch 64 does not divide across 3 workers"):
        runs.per_worker_batch(64, 1, runs.workers_per_node(None, use_gpu=True, gpus=[3]))


@pytest.mark.ffcv
@pytest.mark.timeout(120)
def test_a_manifest_naming_a_file_outside_its_store_is_refused(tmp_path):
    from fixtures_data import make_synthetic_store
    from pipeline.data.store import open_store

    store = make_synthetic_store(tmp_path / "s", 20, 10)
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["splits"]["train"]["file"] = "../../etc/passwd"
    (store / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="not a file inside the store"):
        open_store(store, verify=False)


def test_a_folder_to_unpickle_from_must_be_ours_and_not_writable_by_others(tmp_path):
    folder = tmp_path / "sweep"
    folder.mkdir(mode=0o755)
    runs.check_private_folder(folder, "sweep folder")
    os.chmod(folder, 0o777)
    with pytest.raises(UserError, match="writable by others .*chmod go-w"):
        runs.check_private_folder(folder, "sweep folder")


def test_the_local_clusters_short_folder_is_private_and_never_a_planted_link(tmp_path):
    mine = tmp_path / "mine"
    assert local_cluster.private_dir(mine) == mine and (mine.stat().st_mode & 0o777) == 0o700
    os.chmod(mine, 0o755)
    local_cluster.private_dir(mine)
    assert (mine.stat().st_mode & 0o777) == 0o700
    planted = tmp_path / "planted"
    planted.symlink_to(mine)
    with pytest.raises(UserError, match="is a link or a file"):
        local_cluster.private_dir(planted)


def _saved() -> dict:
    return C.apply_overrides(C.load_recipe("smoke"), {"cluster.run_name": "r", "data.store": "/s/cifar",
                                                      "optim.batch_size": 64}).to_dict()


def test_resume_trains_with_the_runs_own_config_and_only_the_allowed_changes():
    saved = _saved()
    # Resumed with the default recipe and a few flags: the saved values win where none was given.
    asked = C.apply_overrides(C.load_recipe("cifar"), {"train.epochs": 9, "cluster.run_name": "r",
                                                       "tracking.wandb": "off",
                                                       "model.name": "densenet_simple"}).to_dict()
    merged = runs.resume_config(saved, asked, ["train.epochs", "tracking.wandb", "model.name"], "r")
    assert merged["train"]["epochs"] == 9 and merged["tracking"]["wandb"] == "off"
    assert merged["optim"] == saved["optim"] and merged["model"] == saved["model"]
    assert merged["data"]["store"] == "/s/cifar"
    asked["optim"]["batch_size"] = 32
    with pytest.raises(UserError, match=r"optim.batch_size was 64, now 32; a resume may change how long, "
                                         r"where .*not what it learns"):
        runs.resume_config(saved, asked, ["optim.batch_size"], "r")
    asked["model"]["name"] = "densenet121"
    with pytest.raises(UserError, match="model.name was 'densenet_simple', now 'densenet121'"):
        runs.resume_config(saved, asked, ["model.name"], "r")


def test_a_resume_may_move_a_fixed_size_run_to_other_nodes_but_not_an_elastic_one():
    """Where a run trains is not what it learns: the global batch is fixed, so a run may
    resume on the nodes a shared cluster has left. An elastic run's range sets its lr
    scaling, and a fixed run cannot turn elastic half-way."""
    saved = C.apply_overrides(C.Config.from_dict(_saved()), {"cluster.nodes": 4}).to_dict()
    asked = C.apply_overrides(C.Config.from_dict(saved), {
        "cluster.nodes": 2, "cluster.workers_per_node": 2, "data.loader_workers": 1}).to_dict()
    changed = ["cluster.nodes", "cluster.workers_per_node", "data.loader_workers"]
    merged = runs.resume_config(saved, asked, changed, "r")
    assert (merged["cluster"]["nodes"], merged["cluster"]["workers_per_node"]) == (2, 2)
    assert merged["data"]["loader_workers"] == 1 and merged["optim"] == saved["optim"]
    asked["cluster"]["min_nodes"] = 1
    with pytest.raises(UserError, match=r"trained on a fixed 4 node\(s\).*resume with --nodes N"):
        runs.resume_config(saved, asked, [*changed, "cluster.min_nodes"], "r")
    elastic = C.apply_overrides(C.Config.from_dict(saved), {"cluster.min_nodes": 2}).to_dict()
    with pytest.raises(UserError, match=r"elastic run of 2-4 nodes: .*cluster.nodes stays 4, not 2"):
        runs.resume_config(elastic, asked, ["cluster.nodes"], "r")
    longer = C.apply_overrides(C.Config.from_dict(elastic), {"train.epochs": 50}).to_dict()
    assert runs.resume_config(elastic, longer, ["train.epochs"], "r")["train"]["epochs"] == 50


def test_a_resume_on_workers_that_do_not_divide_the_runs_batch_says_what_to_change(tmp_path):
    """The batch is the run's and stays: the line asks for other nodes, not another batch."""
    from pipeline.train import checkpoint

    saved = C.apply_overrides(C.Config.from_dict(_saved()), {"train.epochs": 4}).to_dict()
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.json").write_text(json.dumps(saved))
    checkpoint.save(tmp_path / "r" / "epoch-0001", {"epoch": 1})
    asked = C.apply_overrides(C.load_recipe("smoke"), {
        "cluster.run_name": "r", "train.resume": True, "cluster.nodes": 3,
        "train.resume_changes": ["cluster.nodes"]})
    with pytest.raises(UserError, match=r"^--resume r: the run's global batch 64 does not divide across 3 "
                                         r"worker\(s\) \(3 nodes x 1\); a resumed run keeps its batch"):
        runs.resumed(asked, str(tmp_path))
    asked = C.apply_overrides(asked, {"cluster.nodes": 4})
    assert runs.resumed(asked, str(tmp_path)).cluster.nodes == 4


def _sweep(**changes) -> C.Config:
    return C.apply_overrides(C.load_recipe("smoke"), {
        "sweep.name": "s", "sweep.growth_rates": [4, 8], "sweep.depths": [10], "train.epochs": 3,
        "data.store": "/s/cifar", "cluster.storage": "/r", **changes})


def test_a_resumed_sweep_goes_on_with_its_saved_config_and_only_the_allowed_changes(tmp_path):
    """`sweep FAMILY --resume NAME` needs no other flag: the trials go on with what they
    started with. A flag given again with its value is fine; with another value, what the
    trials learn (or how many run, or for how long) is refused, naming both values."""
    (tmp_path / "s").mkdir()
    runs.save_sweep(str(tmp_path / "s"), _sweep(), "ab" * 32)
    assert runs.saved_sweep(str(tmp_path / "s"))["manifest_sha256"] == "ab" * 32

    def asked(changed: list[str], **flags) -> C.Config:
        # What the CLI builds: the default recipe, the flags given, the names of those given.
        return C.apply_overrides(C.load_recipe("cifar"), {
            "sweep.name": "s", "sweep.resume": True, "sweep.resume_changes": changed,
            "cluster.storage": str(tmp_path), **flags})

    merged = runs.resumed_sweep(asked(["sweep.family", "sweep.name", "sweep.resume"],
                                      **{"sweep.family": "densenet_bc"}), str(tmp_path))
    assert merged.sweep.growth_rates == [4, 8] and merged.train.epochs == 3 and merged.sweep.resume
    assert merged.data.store == "/s/cifar" and merged.cluster.storage == str(tmp_path)
    assert merged.optim == _sweep().optim and merged.model == _sweep().model
    again = asked(["sweep.growth_rates", "train.epochs", "tracking.wandb"],
                  **{"sweep.growth_rates": [4, 8], "train.epochs": 3, "tracking.wandb": "off"})
    merged = runs.resumed_sweep(again, str(tmp_path))
    assert merged.tracking.wandb == "off" and merged.train.epochs == 3
    for key, value, old in [("train.epochs", 5, 3), ("sweep.growth_rates", [4], [4, 8]),
                            ("sweep.max_concurrent", 4, 0), ("cluster.nodes", 2, 1)]:
        with pytest.raises(UserError, match=rf"^--resume s goes on with the sweep's own config: "
                                            + re.escape(f"{key} was {old!r}, now {value!r}; ") + ".*start a new sweep"):
            runs.resumed_sweep(asked([key], **{key: value}), str(tmp_path))
    with pytest.raises(UserError, match=r"no sweep 'gone' under .* to resume"):
        runs.resumed_sweep(asked([], **{"sweep.name": "gone"}), str(tmp_path))
    (tmp_path / "s" / runs.SWEEP_FILE).write_text("{not json")
    with pytest.raises(UserError, match=r"sweep.json is not valid JSON .*the sweep's config is damaged"):
        runs.resumed_sweep(asked([]), str(tmp_path))


def test_a_sweep_saved_before_sweep_json_goes_on_with_the_flags_as_given(tmp_path):
    (tmp_path / "old").mkdir()
    asked = _sweep(**{"sweep.name": "old", "sweep.resume": True, "train.epochs": 7})
    assert runs.resumed_sweep(asked, str(tmp_path)).train.epochs == 7


def test_a_resume_with_nothing_left_to_train_is_refused(tmp_path):
    """A resumed run whose newest checkpoint (or --from-epoch) is already at its epochs
    would start a job that trains nothing: one line names the epochs and the fix."""
    from pipeline.train import checkpoint

    saved = C.apply_overrides(C.Config.from_dict(_saved()), {"train.epochs": 2}).to_dict()
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.json").write_text(json.dumps(saved))
    checkpoint.save(tmp_path / "r" / "epoch-0002", {"epoch": 2})

    def asked(epochs: int, changed: list[str], **more) -> C.Config:
        return C.apply_overrides(C.load_recipe("smoke"), {
            "cluster.run_name": "r", "train.resume": True, "train.epochs": epochs,
            "train.resume_changes": changed, **more})

    for epochs in (1, 2):
        with pytest.raises(UserError, match=r"--resume r: the run has trained 2 of its \d epochs, nothing "
                                             r"is left to train: pass --epochs 3 or more"):
            runs.resumed(asked(epochs, ["train.epochs"]), str(tmp_path))
    with pytest.raises(UserError, match="trained 2 of its 2 epochs"):
        runs.resumed(asked(2, []), str(tmp_path))
    assert runs.resumed(asked(3, ["train.epochs"]), str(tmp_path)).train.epochs == 3
    # Taken back to epoch 1, the run has an epoch to train again.
    back = runs.resumed(asked(2, [], **{"train.resume_from_epoch": 1}), str(tmp_path))
    assert back.train.epochs == 2 and back.train.resume_from_epoch == 1
    assert runs.trained_epochs(str(tmp_path / "none")) == 0


def test_a_checkpoint_meets_only_a_store_with_its_classes_by_name_and_order():
    runs.check_checkpoint_classes(3, ["cat", "dog", "fox"], ["cat", "dog", "fox"], "s")
    runs.check_checkpoint_classes(3, None, ["a", "b", "c"], "s")  # checkpoints of round one
    with pytest.raises(UserError, match="predicts 3 classes but store s has 2"):
        runs.check_checkpoint_classes(3, ["cat", "dog", "fox"], ["cat", "dog"], "s")
    with pytest.raises(UserError, match="class 1 is 'dog' but store s calls it 'fox'"):
        runs.check_checkpoint_classes(3, ["cat", "dog", "fox"], ["cat", "fox", "dog"], "s")


class Nodes:
    """A stand-in for a cluster's node list: each call returns the next listing (the last
    one again once they run out), and time passes only when the rule sleeps."""

    def __init__(self, *listings: list[runs.Shape]):
        self.listings, self.calls, self.now, self.notes = list(listings), 0, 0.0, []

    def alive(self) -> list[runs.Shape]:
        self.calls += 1
        return self.listings[min(self.calls, len(self.listings)) - 1]

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def wait(self, nodes: int, demand, wait_s: float = 0.0, **kw) -> list[runs.Shape]:
        return runs.await_placement(self.alive, nodes, demand, wait_s, note=self.notes.append,
                                    sleep=self.sleep, clock=lambda: self.now, **kw)


def test_placement_counts_only_nodes_that_hold_a_whole_share():
    cluster = Nodes([(4.0, 0.0), (2.0, 0.0), (4.0, 1.0)])
    assert cluster.wait(2, lambda _: (4, 0)) == [(4.0, 0.0), (2.0, 0.0), (4.0, 1.0)]
    with pytest.raises(UserError) as e:
        cluster.wait(3, lambda _: (4, 0))
    assert str(e.value) == ("the job needs 3 node(s) with 4 CPU and 0 GPU each but the cluster has "
                            "3 node(s): 1 x (4 CPU, 1 GPU), 1 x (4 CPU, 0 GPU), 1 x (2 CPU, 0 GPU): "
                            "ask for fewer (--nodes), or give --wait-for-nodes SECONDS to let it scale up")
    assert cluster.now == 0 and cluster.notes == []


def test_each_fix_fits_the_cluster_that_is_short():
    cpus_only = Nodes([(1.0, 0.0)] * 3)
    with pytest.raises(UserError, match=r"has 3 node\(s\): 3 x \(1 CPU, 0 GPU\): run on CPUs \(without --gpu\)"):
        cpus_only.wait(1, lambda _: (1, 1))
    with pytest.raises(UserError, match=r"at http://h:8265 has .*`densenet-pipe cluster up --nodes 4 "
                                        r"--cpus-per-node 1.5`$"):
        cpus_only.wait(4, lambda _: (1.5, 0), cluster="the cluster at http://h:8265", local=True)
    with pytest.raises(UserError, match=r"has 0 node\(s\): nothing"):
        Nodes([]).wait(1, lambda _: (1, 0))


def test_placement_waits_for_nodes_that_join_and_gives_up_at_its_deadline():
    growing = Nodes([(2.0, 0.0)], [(2.0, 0.0), (2.0, 0.0)])
    assert len(growing.wait(2, lambda _: (2, 0), wait_s=30)) == 2
    assert growing.calls == 2 and 0 < growing.now < 30
    assert growing.notes == ["waiting up to 30 s for 2 node(s) with 2 CPU and 0 GPU each "
                             "(the cluster has 1) ..."]

    never = Nodes([(2.0, 0.0)])
    with pytest.raises(UserError, match=r"after waiting 5 s: "):
        never.wait(2, lambda _: (2, 0), wait_s=5)
    assert never.now >= 5 and len(never.notes) == 1


def test_the_demand_may_follow_the_nodes_it_is_offered():
    # One worker per GPU of the smallest GPU node: a 2-GPU node joining lowers every node's
    # share to 2, and then both 2-GPU and 4-GPU nodes hold it.
    def per_node(shapes):
        wpn = runs.workers_per_node(None, True, [int(gpu) for _, gpu in shapes])
        return wpn * 1.0, wpn

    cluster = Nodes([(8.0, 4.0), (1.0, 0.0)], [(8.0, 4.0), (4.0, 2.0)])
    assert cluster.wait(2, per_node, wait_s=10)[1] == (4.0, 2.0)


def test_a_new_run_or_sweep_meets_nothing_and_a_resumed_one_exists():
    runs.check_new_or_resumed("run", "a", "s3://b/runs", resume=False, exists=False)
    runs.check_new_or_resumed("sweep", "s", "runs", resume=True, exists=True)
    with pytest.raises(UserError, match=r"^sweep 's' already exists in runs: pass --resume NAME to "
                                        r"continue it, or --name for a new sweep$"):
        runs.check_new_or_resumed("sweep", "s", "runs", resume=False, exists=True)
    with pytest.raises(UserError, match=r"^no run 'a' under s3://b/runs to resume: check --resume NAME and --storage$"):
        runs.check_new_or_resumed("run", "a", "s3://b/runs", resume=True, exists=False)


def test_a_sweep_trial_trains_in_its_own_process_only_when_it_is_one_worker():
    assert runs.trial_in_process(1, None, False, None)
    assert runs.trial_in_process(1, 1, True, None)
    # A GPU node's workers default to one per GPU: that may be several.
    assert not runs.trial_in_process(1, None, True, None)
    assert not runs.trial_in_process(2, 1, False, None)
    assert not runs.trial_in_process(1, 2, False, None)
    assert not runs.trial_in_process(1, 1, False, 1)  # elastic


def test_a_missing_or_taken_name_in_object_storage_is_named_without_the_uris_query():
    """The endpoint query is how to reach the bucket, not where the run is; lines show the
    location as users write it in `aws s3 ls`."""
    where = "s3://bkt/runs?endpoint_override=127.0.0.1:9000&scheme=http"
    with pytest.raises(UserError, match=r"^no sweep 's' under s3://bkt/runs to resume") as e:
        runs.check_new_or_resumed("sweep", "s", where, True, False)
    with pytest.raises(UserError, match=r"^run 'r' already exists in s3://bkt/runs: ") as e2:
        runs.check_new_or_resumed("run", "r", where, False, True)
    assert "endpoint_override" not in str(e.value) + str(e2.value)


def test_a_folder_held_by_a_live_job_is_refused_to_another_and_taken_over_when_it_ended(tmp_path, monkeypatch):
    """job.json names the job working in a run or sweep folder; a second job for the same
    folder is refused while that one is pending or running on the cluster."""
    folder = tmp_path / "r"
    folder.mkdir()
    monkeypatch.setenv(runs.JOB_ID_ENV, "train-1")
    runs.hold_folder(str(folder), "run", "r", live=lambda: {"train-1"})
    assert json.loads((folder / runs.JOB_FILE).read_text())["job"] == "train-1"
    # Ray Train restarting the same job's workers is the same job.
    runs.hold_folder(str(folder), "run", "r", live=lambda: {"train-1"})
    monkeypatch.setenv(runs.JOB_ID_ENV, "train-2")
    with pytest.raises(UserError, match=r"^run 'r' is being trained by job train-1, still running on this "
                                        r"cluster: wait for it to end, or stop it with `densenet-pipe jobs stop train-1`$"):
        runs.hold_folder(str(folder), "run", "r", live=lambda: {"train-1", "train-2"})
    assert json.loads((folder / runs.JOB_FILE).read_text())["job"] == "train-1"
    with pytest.raises(UserError, match=r"^sweep 'r' is being run by job train-1"):
        runs.hold_folder(str(folder), "sweep", "r", live=lambda: {"train-1"})
    # Ended (or unknown to this cluster, or the state API silent): the new job takes it.
    runs.hold_folder(str(folder), "run", "r", live=lambda: None)
    assert json.loads((folder / runs.JOB_FILE).read_text())["job"] == "train-2"
