"""Sweeps: the space is checked before submitting; a real Tune sweep runs on the local cluster."""

from __future__ import annotations

import csv
import json
import re
import time
from pathlib import Path

import pytest

from fixtures_data import make_synthetic_store
from pipeline import config as C
from pipeline.tracking import ENDED
from pipeline.train import checkpoint
from pipeline.tune.space import plan_space
from pipeline.wandb_records import RunView


def _cfg(**sweep) -> C.Config:
    return C.apply_overrides(C.load_recipe("cifar"), {f"sweep.{k}": v for k, v in sweep.items()})


def test_depths_that_break_the_family_rule_are_dropped_with_the_rule():
    plan = plan_space(_cfg(family="densenet_bc", growth_rates=[12, 24], depths=[40, 100, 101, 190]))
    assert plan.params["model.depth"].values == [40, 100, 190]
    assert len(plan.dropped) == 1 and "depth 101" in plan.dropped[0] and "multiple of 6" in plan.dropped[0]
    assert plan.dropped[0].endswith("; dropped")
    assert plan.grid_size() == 6
    plain = plan_space(_cfg(family="densenet", depths=[40, 100, 101]))
    assert plain.params["model.depth"].values == [40, 100]


def test_any_config_key_can_be_swept():
    plan = plan_space(_cfg(search="random", growth_rates=[12],
                           space=["optim.lr=loguniform:0.01:0.3", "model.compression=choice:0.5,1.0"]))
    assert plan.params["optim.lr"].kind == "loguniform" and plan.params["optim.lr"].values == [0.01, 0.3]
    assert plan.params["model.compression"].values == [0.5, 1.0]


@pytest.mark.parametrize("sweep,message", [
    (dict(), "search space is empty"),
    (dict(space=["optim.lrr=choice:0.1"]), "unknown key optim.lrr"),
    (dict(space=["optim.lr=uniform:0.3:0.1"]), "empty range"),
    (dict(space=["optim.lr=loguniform:0:0.1"]), "LOW > 0"),
    (dict(space=["optim.lr=uniform:0.1:0.3"]), "needs --search random"),
    (dict(space=["optim.lr=normal:1:2"]), "KIND one of"),
    (dict(space=["model.compression=choice:0.5,1.5"]), "compression must be in"),
    (dict(depths=[101, 102]), "no depth in [101, 102]"),
    (dict(space=["cluster.nodes=choice:1,2"]), "cannot be swept"),
    (dict(growth_rates=[12], samples=0), "--samples must be >= 1, got 0"),
    (dict(growth_rates=[12], samples=3), "same seed: repeat it with other seeds"),
    (dict(growth_rates=[12], reduction_factor=1.0), "--reduction-factor > 1"),
    (dict(growth_rates=[12], grace_period=0), "--grace-period must be >= 1"),
])
def test_bad_spaces_are_refused_before_submitting(sweep, message):
    with pytest.raises(C.ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        plan_space(_cfg(**sweep))


def test_bad_sweep_cli_input_is_one_line_exit_2(cli, tmp_path):
    r = cli("sweep", "densenet_bc", "--data", tmp_path, "--space", "optim.lrr=choice:0.1")
    assert r.exit_code == 2 and r.stderr.startswith("error: ") and "unknown key optim.lrr" in r.stderr
    r = cli("sweep", "resnet", "--growth-rate", "12")
    assert r.exit_code == 2 and "unknown family" in r.stderr
    r = cli("sweep", "densenet_bc", "--growth-rate", "12,x")
    assert r.exit_code == 2 and "comma-separated integers" in r.stderr


@pytest.fixture(scope="module")
def hard_store(tmp_path_factory) -> Path:
    # Noisy enough that tiny nets differ in val error, so ASHA has something to cut.
    return make_synthetic_store(tmp_path_factory.mktemp("stores") / "noisy", 256, 128,
                                noise=1.5, seed=3)


@pytest.mark.ray
@pytest.mark.ffcv
@pytest.mark.timeout(1200)
def test_real_sweep_with_asha_table_plot_wandb_and_resume(ray_cluster, cli, hard_store, tmp_path):
    args = ["sweep", "densenet_bc", "--data", hard_store, "--growth-rate", "4,8", "--depth", "10,11,16",
            "--recipe", "smoke", "--epochs", "4", "--batch-size", "32", "--grace-period", "1",
            "--reduction-factor", "2", "--storage", tmp_path, "--name", "s1", "--wandb", "offline"]
    r = cli(*args)
    assert r.exit_code == 0, r.output
    assert "depth 11 is impossible" in r.output and "multiple of 6 (e.g. 16, 28, 40); dropped" in r.output
    folder = tmp_path / "s1"
    rows = json.loads((folder / "results.json").read_text())
    assert len(rows) == 4
    assert {(row["growth_rate"], row["depth"]) for row in rows} == {(4, 10), (4, 16), (8, 10), (8, 16)}
    assert [row["best_val_top1_error"] for row in rows] == sorted(row["best_val_top1_error"] for row in rows)
    assert any(row["stopped_early"] for row in rows), rows
    assert all(row["params"] > 0 and row["macs"] > 0 for row in rows)
    # Trials train side by side into one console: every line of theirs names its trial and
    # comes before the table, in the order the trial said it: its start, then each epoch it
    # trained once (for one the scheduler stopped, the epochs Tune was told, and any its
    # worker finished before the stop reached it).
    before_table, table_on = r.output.split("\ntrial  ")
    for row in rows:
        mine = [line for line in before_table.splitlines() if line.startswith(row["trial"] + ": ")]
        assert "1 worker(s) on 1 node(s)" in mine[0], (row, r.output)
        told = [int(e) for e in re.findall(r": epoch (\d)/4: train loss", "\n".join(mine))]
        assert told == list(range(1, len(told) + 1)) and len(told) >= row["epochs_run"], (row, r.output)
        if not row["stopped_early"]:
            assert len(told) == row["epochs_run"], (row, r.output)
    assert not re.search(r"^(trial_\w+: )?epoch \d", table_on, re.M), r.output
    assert not re.search(r"^epoch \d", r.output, re.M) and "\n\n" not in r.output, r.output
    with open(folder / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 4
    assert (folder / "val_error_vs_params_macs.png").stat().st_size > 10_000
    for row in rows:
        # What each trial reported to Tune is in its W&B run, the scheduler's stop included.
        view = _wandb_run(folder / "trials" / row["trial"])
        reported = list(range(1, row["epochs_run"] + 1))
        # Every epoch the trial trained is in its record once, in order: what Tune was told,
        # and for a trial the scheduler stopped, the epochs its worker ran before the stop
        # reached it (Ray Train's reports are asynchronous: under load that can be more than one).
        assert view.epochs()[:len(reported)] == reported, (row, view.epochs())
        assert view.epochs() == list(range(1, len(view.epochs()) + 1)) and len(view.epochs()) <= 4
        if not row["stopped_early"]:
            assert view.epochs() == reported
        assert view.config["tracking"]["group"] == "s1" and view.config["cluster"]["run_name"] == row["trial"]
        assert view.summary["stopped_early"] is row["stopped_early"]
        assert view.summary["ended"] == ("stopped_early" if row["stopped_early"] else "finished")
        assert view.summary["epochs_done"] >= row["epochs_run"]
        assert view.summary["best_val_top1_error"] <= row["best_val_top1_error"] + 1e-12
        assert view.exit_code == 0
        assert any("step/loss" in h for h in view.history)
    (summary,) = (folder / "wandb").glob("offline-run-*-s1-*-summary")
    table = RunView.read(next(summary.glob("*.wandb"))).history[0]
    assert table["sweep/results/_type"] == "table-file" and table["sweep/results/nrows"] == 4

    before = {p: p.stat().st_mtime_ns for p in folder.glob("trials/*/history.json")}
    # A new sweep of the same name, or a resume of one that is not there, is refused here,
    # before a job is submitted.
    r = cli(*args)
    assert r.exit_code == 2 and "sweep 's1' already exists in" in r.stderr and "submitted" not in r.output, r.output
    r = cli(*args[:-4], "--resume", "s9")
    assert r.exit_code == 2 and "no sweep 's9' under" in r.stderr and "submitted" not in r.output, r.output
    # A resume goes on with the sweep's saved config: another value for what its trials learn
    # is refused before anything is submitted, and no other flag is needed.
    r = cli("sweep", "densenet_bc", "--resume", "s1", "--storage", tmp_path, "--epochs", "5")
    assert r.exit_code == 2 and "train.epochs was 4, now 5" in r.stderr and "submitted" not in r.output, r.output
    shown = json.loads(cli("sweep", "densenet_bc", "--resume", "s1", "--storage", tmp_path, "--dry-run").stdout)
    assert shown["sweep"]["growth_rates"] == [4, 8] and shown["train"]["epochs"] == 4 and shown["sweep"]["resume"]
    r = cli("sweep", "densenet_bc", "--resume", "s1", "--storage", tmp_path)
    assert r.exit_code == 0, r.output
    assert "resuming sweep s1" in r.output
    assert len(json.loads((folder / "results.json").read_text())) == 4
    assert {p: p.stat().st_mtime_ns for p in folder.glob("trials/*/history.json")} == before


def _wandb_run(run_folder: Path) -> RunView:
    """The one W&B offline run of a training run, read as W&B's records."""
    (data,) = run_folder.glob("wandb/offline-run-*/*.wandb")
    return RunView.read(data)


def _wait(what, seconds: float = 300):
    deadline = time.monotonic() + seconds
    while not (found := what()):
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.5)
    return found


@pytest.mark.ray
@pytest.mark.ffcv
@pytest.mark.timeout(900)
def test_a_failed_trial_and_a_stopped_sweep_keep_their_wandb_record(ray_cluster, cli, hard_store, tmp_path):
    # One trial at a time: the first diverges at once (lr 1e30), the second holds after its
    # first epoch (the hold file) until `jobs stop` lands. Each trial spans 2 nodes: a Ray
    # Train run inside its Tune trial (the sweep above trains one-worker trials in the
    # trial's own process).
    hold = tmp_path / "HOLD"
    hold.touch()
    args = ["sweep", "densenet_bc", "--data", hard_store, "--growth-rate", "4", "--depth", "10",
            "--space", "optim.lr=grid:1.0e+30,0.05", "--scheduler", "fifo", "--recipe", "smoke",
            "--epochs", "3", "--batch-size", "32", "--nodes", "2", "--storage", tmp_path, "--wandb", "offline",
            "--set", "cluster.max_failures=0", "--set", "sweep.max_concurrent=1",
            "--set", f"train.hold_file={hold}"]
    r = cli(*args, "--name", "s2", "--detach")
    assert r.exit_code == 0, r.output
    job_id = r.stdout.strip().splitlines()[-1]
    trials = tmp_path / "s2" / "trials"

    def ended(view_code: int):
        def check():
            for data in trials.glob("*/wandb/offline-run-*/*.wandb"):
                if RunView.read(data).exit_code == view_code:
                    return data
            return None
        return check

    failed = RunView.read(_wait(ended(ENDED["failed"])))
    _wait(lambda: list(trials.glob("*/epoch-0001/checkpoint.done")))
    r = cli("jobs", "stop", job_id)
    assert r.exit_code == 0, r.output
    stopped = RunView.read(_wait(ended(ENDED["stopped_by_user"]), 120))

    assert failed.config["optim"]["lr"] == 1e30 and failed.summary["ended"] == "failed"
    assert failed.summary["stopped_early"] is False and failed.epochs() == []
    assert stopped.config["optim"]["lr"] == 0.05 and stopped.summary["ended"] == "stopped_by_user"
    # Epoch 1 was reported (its checkpoint exists) and is in W&B, once.
    assert (trials / stopped.config["cluster"]["run_name"] / "epoch-0001").is_dir()
    assert stopped.epochs() == [1] and stopped.summary["epochs_done"] == 1
    r = cli("jobs", "status", job_id)
    assert "STOPPED" in r.output

    # Its trials go on only on the store they trained on.
    other = make_synthetic_store(tmp_path / "other", 64, 32, seed=4)
    r = cli(*[other if a == hard_store else a for a in args], "--resume", "s2")
    assert r.exit_code == 2 and "the sweep's trials trained on a store whose manifest sha256" in r.output, r.output
    # Resumed: the stopped trial goes on from its checkpoint to the end; the failed one is
    # kept as failed, so the sweep still says so (exit 1).
    before = checkpoint.load(trials / stopped.config["cluster"]["run_name"])["history"]
    hold.unlink()
    r = cli(*args, "--resume", "s2")
    assert r.exit_code == 1 and "1 trial(s) failed, the first with" in r.output, r.output
    # The trial's rank 0 is a Ray Train worker here: its lines, named by the trial, still
    # come through the sweep's driver, in order, before the table.
    resumed = r.output.split("\ntrial  ")[0]
    assert re.findall(r"^trial_\w+: (resumed from epoch 1|epoch \d/3: train loss)", resumed, re.M) == [
        "resumed from epoch 1", "epoch 2/3: train loss", "epoch 3/3: train loss"], r.output
    # The one line names why: the diverged loss, not the Ray actor it happened in.
    assert "training diverged; lower optim.lr" in r.output.split("trial(s) failed")[1], r.output
    resumed = checkpoint.load(trials / stopped.config["cluster"]["run_name"])
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    # Continued from a checkpoint, not started again: epoch 1 is the row made before the stop.
    assert resumed["history"][0] == before[0]


def test_optuna_search_builds_from_the_plan():
    from ray.tune.search.optuna import OptunaSearch

    from pipeline.tune.space import sample_overrides

    plan = plan_space(_cfg(search="optuna", samples=4, growth_rates=[12, 24],
                           space=["optim.lr=loguniform:0.01:0.3"]))
    space = sample_overrides(plan)
    assert set(space) == {"model.growth_rate", "optim.lr"}
    searcher = OptunaSearch(space=space, metric="val_top1_error", mode="min")
    suggestion = searcher.suggest("t1")
    assert suggestion["model.growth_rate"] in (12, 24) and 0.01 <= suggestion["optim.lr"] <= 0.3


def test_the_table_explains_its_star_only_when_a_row_has_one(capsys):
    from pipeline.tune.sweep import print_table

    row = {"trial": "t0", "growth_rate": 12, "depth": 40, "params": 1.0e6, "macs": 5.0e8,
           "best_val_top1_error": 0.25, "epochs_run": 3, "stopped_early": False, "time_s": 1.0}
    print_table([row])
    assert "*" not in capsys.readouterr().out
    print_table([row, {**row, "trial": "t1", "epochs_run": 1, "stopped_early": True}])
    out = capsys.readouterr().out
    assert " 1*" in out and "* stopped early by the scheduler" in out
