"""`densenet-pipe train` and `evaluate` as real Ray jobs on the session's local multi-node cluster.

Tiny data (a learnable synthetic store), the two-block net, 2 nodes x 1 worker: DDP over gloo,
real FFCV loaders, real checkpoints and W&B offline runs.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch

from fixtures_data import make_synthetic_store
from fixtures_nodes import kill_node_running, wait_until_gone
from pipeline import storage, submit
from pipeline.tracking import ENDED
from pipeline.train import checkpoint
from pipeline.wandb_records import NotAWandbFile, RunView

pytestmark = [pytest.mark.ray, pytest.mark.ffcv]

TRAIN = ["--recipe", "smoke", "--nodes", "2", "--batch-size", "64", "--wandb", "offline"]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_synthetic_store(tmp_path_factory.mktemp("stores") / "synthetic", 512, 128)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def trained(ray_cluster, cli, store, runs):
    # Augmentation off: FFCV's augmentations draw from numba's unseeded generator, and this
    # run is also the uninterrupted reference for the resume test.
    r = cli("train", "densenet_simple", "--data", store, "--storage", runs, "--name", "learn",
            "--epochs", "3", "--set", "data.augment=false", *TRAIN)
    assert r.exit_code == 0, r.output
    return runs / "learn", r.output


@pytest.mark.timeout(600)
def test_tiny_ddp_run_learns_on_two_nodes(trained):
    folder, output = trained
    history = json.loads((folder / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]
    # Chance is 90% top-1 error on 10 classes.
    assert history[-1]["val_top1_error"] < 0.3
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert "2 worker(s) on 2 node(s)" in output and "epoch 3/3" in output
    # Every node of the local cluster shares one log folder: each line must still arrive once.
    assert [output.count(f"epoch {e}/3: train loss") for e in (1, 2, 3)] == [1, 1, 1], output
    # A quiet console: our lines without Ray's prefixes, none of Ray's own messages.
    for chatter in ("(RayTrainWorker", "(TrainController", "Reporting training result", "\x1b[",
                    "worker error", "Exception ignored", "Done. "):
        assert chatter not in output, chatter
    for key in ("train_loss", "train_top1_error", "train_top5_error", "val_top1_error", "val_top5_error",
                "images_per_s", "epoch_time_s", "lr", "peak_memory_mib"):
        assert all(key in h for h in history), key
    assert (folder / "curves.png").stat().st_size > 10_000
    assert json.loads((folder / "config.json").read_text())["cluster"]["nodes"] == 2


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_compiled_ddp_run_trains_on_two_nodes(ray_cluster, cli, store, runs):
    """`--compile` under DDP over gloo: each worker compiles its own graphs (minutes of
    compiling on 2 cores, hence slow); the checkpoint keeps the net's own keys."""
    r = cli("train", "densenet_simple", "--data", store, "--storage", runs, "--name", "compiled",
            "--epochs", "2", "--compile", "--set", "data.augment=false", *TRAIN[:-2], "--wandb", "off")
    assert r.exit_code == 0, r.output
    assert "torch.compile on (--compile)" in r.output and "torch.compile: the first step took" in r.output
    history = json.loads((runs / "compiled" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2] and history[-1]["val_top1_error"] < 0.6
    state = checkpoint.load(runs / "compiled")
    assert not [k for k in state["model"] if "_orig_mod" in k or k.startswith("module.")]


@pytest.mark.timeout(600)
def test_checkpoint_is_self_describing_and_placed_on_two_nodes(trained, store):
    folder, _ = trained
    state = checkpoint.load(folder)
    assert state["epoch"] == 3
    assert {"model", "optimizer", "scheduler", "scaler", "history", "config", "spec", "store",
            "placement", "rng"} <= set(state)
    assert len(set(state["placement"])) == 2 and len(state["placement"]) == 2
    assert state["store"]["path"] == str(store) and len(state["store"]["manifest_sha256"]) == 64
    assert state["config"]["model"]["name"] == "densenet_simple"
    # The unwrapped model: no DDP "module." prefix.
    assert all(not k.startswith("module.") for k in state["model"])
    kept = sorted(p.name for p in folder.glob("epoch-*"))
    assert "epoch-0003" in kept and len(kept) <= 3


@pytest.mark.timeout(600)
def test_wandb_offline_run_per_training_run(trained):
    folder, output = trained
    (run,) = (folder / "wandb").glob("offline-run-*-learn-*")
    view = RunView.read(next(run.glob("*.wandb")))
    # The W&B id is the run's name and a random suffix, kept in its config: a run of the same
    # name elsewhere (another user's, or this one started again) is another W&B run.
    assert view.run_id == json.loads((folder / "config.json").read_text())["tracking"]["run_id"]
    assert re.fullmatch(r"learn-[0-9a-f]{8}", view.run_id) and view.name == "learn"
    history = json.loads((folder / "history.json").read_text())
    assert view.epochs() == [1, 2, 3]
    assert [h["epoch/val_top1_error"] for h in view.history if "epoch/epoch" in h] == \
        [h["val_top1_error"] for h in history]
    assert {"synthetic-store", "learn-model"} <= set(view.artifacts)
    assert view.summary["best_val_top1_error"] == min(h["val_top1_error"] for h in history)
    assert view.summary["ended"] == "finished" and view.exit_code == 0
    assert view.config["cluster"]["run_name"] == "learn"
    assert "wandb sync" in output


@pytest.mark.timeout(600)
def test_evaluate_matches_the_last_epochs_val_error(trained, store):
    # In this process: the `evaluate` job (CLI -> Ray job -> the same function) is run by the
    # S3 test below, on a store and a run folder in object storage.
    from pipeline.train.evaluate import evaluate

    folder, _ = trained
    result = evaluate(folder, store, loader_workers=1, say=lambda _line: None)
    history = json.loads((folder / "history.json").read_text())
    assert result["images"] == 128 and result["epoch"] == 3 and result["weights"] == "raw"
    # Two workers validated half the set each; one process sees all of it: the same error.
    assert result["top1_error"] == pytest.approx(history[-1]["val_top1_error"], abs=1e-9)
    tta = evaluate(folder / "epoch-0003", store, tta="10crop", loader_workers=1, say=lambda _line: None)
    assert tta["tta"] == "10crop" and tta["top1_error"] < 0.5


@pytest.mark.timeout(600)
def test_a_run_resumes_on_fewer_nodes_with_its_global_batch(trained, cli, store, tmp_path):
    """A shared cluster may have fewer nodes than a run started on: the 2-node run, copied,
    resumes on 1 node, the global batch (and so the steps of an epoch) unchanged."""
    import shutil

    folder, _ = trained
    shutil.copytree(folder, tmp_path / "learn", symlinks=True)
    r = cli("train", "densenet_simple", "--storage", tmp_path, "--resume", "learn", "--epochs", "4",
            "--nodes", "1", "--wandb", "off")
    assert r.exit_code == 0, r.output
    assert "1 worker(s) on 1 node(s)" in r.output
    assert "the run trained on 2 worker(s) and resumes on 1: the global batch stays 64" in r.output
    history = json.loads((tmp_path / "learn" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert json.loads((tmp_path / "learn" / "config.json").read_text())["cluster"]["nodes"] == 1
    state = checkpoint.load(tmp_path / "learn")
    assert state["epoch"] == 4 and len(state["placement"]) == 1
    assert history[-1]["val_top1_error"] < 0.3


def _wait_for(location: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not storage.exists(location):
        assert time.monotonic() < deadline, f"{location} never appeared"
        time.sleep(0.5)


def _s3_wandb_view(run: str, scratch: Path) -> RunView | None:
    """The run's offline W&B record as copied into its S3 folder, or None while there is none."""
    offline = [n for n in storage.listdir(storage.join(run, "wandb")) if n.startswith("offline-run-")]
    if not offline:
        return None
    (offline,) = offline
    names = [n for n in storage.listdir(storage.join(run, "wandb", offline)) if n.endswith(".wandb")]
    if not names:
        return None
    local = scratch / names[0]
    local.write_bytes(storage.read_bytes(storage.join(run, "wandb", offline, names[0])))
    try:
        return RunView.read(local)
    except NotAWandbFile:  # copied before wandb-core wrote its header
        return None


@pytest.mark.timeout(900)
def test_resumed_run_in_s3_ends_with_the_same_weights(trained, cli, store, s3_bucket, tmp_path):
    """Stopped after epoch 1, resumed: the same weights as the uninterrupted `trained` run.

    Its run folder is in S3 (a real S3 server on localhost): Ray Train writes the checkpoints
    there, the job writes config, history, curves and W&B files beside them, and `--resume`
    and `evaluate` read them back. The run holds after epoch 1 (a hold file) until `jobs stop`
    lands, so the stop always meets it there; the resume names epoch 1 (`--from-epoch`), with
    nothing after it to set aside. (Setting aside on S3 is tests/test_storage.py's, and
    tests/test_loop_local.py retrains from both kinds of resume.)
    """
    straight, _ = trained
    run = storage.join(s3_bucket, "broken")
    # The store too is in S3, published by a prepare job: the same images as `store`.
    s3_store = storage.join(s3_bucket, "stores", "synthetic")
    p = cli("prepare", "synthetic", "--out", s3_store, "--size", "512", "--val-size", "128", "--workers", "1")
    assert p.exit_code == 0, p.output
    assert storage.listdir(s3_store) == ["manifest.json", "train.beton", "val.beton"]
    cache = tmp_path / "node-cache"
    hold = tmp_path / "HOLD"
    hold.touch()
    common = ["densenet_simple", "--data", s3_store, "--storage", s3_bucket, "--epochs", "3",
              "--set", "data.augment=false", "--set", f"data.cache_dir={cache}", *TRAIN]
    r = cli("train", *common, "--name", "broken", "--set", f"train.hold_file={hold}", "--detach")
    assert r.exit_code == 0, r.output
    job_id = r.stdout.strip().splitlines()[-1]
    _wait_for(storage.join(run, "epoch-0001", "checkpoint.pt"), 300)
    # The W&B record reaches S3 at each checkpoint, while the run is still going (no exit
    # record yet): a run killed hard keeps what it logged. (Which rows it holds depends on
    # how far wandb-core had written when it was copied, so only the run itself is asserted.)
    deadline = time.monotonic() + 120
    while True:
        during = _s3_wandb_view(run, tmp_path)
        if during is not None and during.config.get("model", {}).get("name") == "densenet_simple":
            assert during.exit_code is None, "the first copy in S3 came only when the run ended"
            break
        assert time.monotonic() < deadline, "no W&B record in S3 while the run went on"
        time.sleep(0.5)
    # Each of the 3 nodes staged the store before training; they share this machine's disk,
    # so one downloaded it and the others found it there.
    log = cli("jobs", "logs", job_id).output
    staged = re.findall(r"node (\w{8}): store s3://\S+: (staged at|already staged)", log)
    assert len({node for node, _ in staged}) == 3, log
    assert [how for _, how in staged].count("staged at") == 1 and log.count(": staged at") == 1, log
    # While the job trains the run, a resume of it is refused: the two would prune, set aside
    # and overwrite each other's checkpoints.
    live = cli("train", *common, "--resume", "broken", "--from-epoch", "1")
    assert live.exit_code == 2 and f"run 'broken' is being trained by job {job_id}, still running" in live.output, live.output
    assert cli("jobs", "stop", job_id).exit_code == 0
    # The stopped run's W&B record is whole and says the user stopped it (copied to S3).
    stopped = _s3_wandb_view(run, tmp_path)
    assert 1 in stopped.epochs() and stopped.summary["ended"] == "stopped_by_user"
    assert stopped.exit_code == ENDED["stopped_by_user"]
    again = cli("train", *common, "--name", "broken")
    assert again.exit_code == 2 and "already exists" in again.output
    # A resume keeps the run's config and store: a new batch size or another store is refused.
    other = make_synthetic_store(tmp_path / "other", 64, 32, seed=5)
    for change, needle in ((["--batch-size", "32"], "optim.batch_size was 64, now 32"),
                           (["--data", other], "the run trained on a store whose manifest")):
        refused = cli("train", *common, "--resume", "broken", *change)
        assert refused.exit_code == 2 and needle in refused.output, refused.output
    assert [n for n in storage.listdir(run) if n.startswith("epoch-")] == ["epoch-0001"]
    hold.unlink()
    resumed = cli("train", *common, "--resume", "broken", "--from-epoch", "1")
    assert resumed.exit_code == 0, resumed.output
    assert "resumed from epoch 1" in resumed.output
    # Locations are printed without their endpoint query, as everywhere in the log.
    plain = run.split("?")[0]
    assert f"curves {plain}/curves.png\n" in resumed.output and "?endpoint_override" not in resumed.output, resumed.output
    assert "set aside" not in resumed.output
    assert not [n for n in storage.listdir(run) if n.startswith("superseded-")]
    # A later run downloads nothing: every node reads the copy already on its disk.
    assert ": staged at" not in resumed.output and "already staged" in resumed.output

    a = checkpoint.load(straight)
    b = checkpoint.load(run)
    assert a["epoch"] == b["epoch"] == 3
    assert [h["epoch"] for h in b["history"]] == [1, 2, 3]
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    assert {"epoch-0003", "config.json", "history.json", "curves.png", "wandb"} <= set(storage.listdir(run))
    history = json.loads(storage.read_text(storage.join(run, "history.json")))
    assert [h["epoch"] for h in history] == [1, 2, 3]
    # The resumed run went on in the same W&B run: both offline records carry the run's id.
    records = [n for n in storage.listdir(storage.join(run, "wandb")) if n.startswith("offline-run-")]
    saved_id = json.loads(storage.read_text(storage.join(run, "config.json")))["tracking"]["run_id"]
    assert len(records) == 2 and {n.split("-", 3)[3] for n in records} == {saved_id}, (records, saved_id)
    assert not (tmp_path / "runs").exists() and not (Path.cwd() / "runs" / "broken").exists()

    r = cli("evaluate", run, "--data", s3_store)
    assert r.exit_code == 0, r.output
    assert "already staged" in r.output
    assert f"wrote {plain}/epoch-0003/evaluation-synthetic-none.json\n" in r.output, r.output
    result = json.loads(storage.read_text(storage.join(run, "epoch-0003", "evaluation-synthetic-none.json")))
    assert result["epoch"] == 3 and result["top1_error"] == pytest.approx(history[-1]["val_top1_error"], abs=1e-9)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("args,needle", [
    (["--data", "/nonexistent/store"], "does not exist"),
    (["--set", "model.num_classes=100"], "has 10 classes"),
    (["--batch-size", "63"], "does not divide"),
    (["--nodes", "5"], "5 node"),
    (["--resume", "never-ran"], "no run 'never-ran'"),
])
def test_bad_training_input_is_one_line_exit_2(ray_cluster, cli, store, runs, args, needle):
    base = ["train", "densenet_simple", "--recipe", "smoke", "--storage", str(runs), "--wandb", "off"]
    if "--data" not in args:
        base += ["--data", str(store)]
    if "--nodes" not in args:
        base += ["--nodes", "2"]
    r = cli(*base, *args)
    assert r.exit_code == 2, r.output
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and needle in errors[0], r.output
    assert "Traceback" not in r.output


@pytest.mark.timeout(300)
def test_storage_and_stores_the_credentials_cannot_reach_are_one_line_exit_2(
        ray_cluster, cli, store, s3_refusing, tmp_path):
    """A bucket that refuses the credentials: train (storage), train (store) and prepare (out)
    each stop before any work with one line naming the URI and the credentials; so does a
    storage folder that cannot be made."""
    base = ["train", "densenet_simple", "--recipe", "smoke", "--wandb", "off", "--nodes", "2"]
    shown = s3_refusing.split("?")[0]
    for args in (["--data", str(store), "--storage", s3_refusing],
                 ["--data", f"s3://runs/stores/tiny?{s3_refusing.split('?')[1]}", "--storage", str(tmp_path / "runs")]):
        r = cli(*base, *args)
        assert r.exit_code == 2, r.output
        (error,) = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
        assert "s3://runs" in error and "credentials" in error, error
        assert "Traceback" not in r.output and "?" not in error.split("s3://runs")[1].split()[0]
    r = cli("prepare", "synthetic", "--size", "8", "--val-size", "4", "--out", s3_refusing)
    assert r.exit_code == 2, r.output
    (error,) = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert shown in error and "credentials" in error and "Traceback" not in r.output
    # A folder no node can make: a file stands where its parent should be.
    (tmp_path / "a-file").write_text("")
    r = cli(*base, "--data", str(store), "--storage", str(tmp_path / "a-file" / "runs"))
    assert r.exit_code == 2, r.output
    # The job's own lines, its error among them, come on stdout; every node's check failed,
    # and only one line says so (no "Unhandled error" of Ray's for the checks not awaited).
    (error,) = [line for line in r.stdout.splitlines() if "error" in line.lower()]
    assert error.startswith("error: node ") and \
        f"storage {tmp_path / 'a-file' / 'runs'} cannot be written" in error, r.output
    assert "Traceback" not in r.output and (tmp_path / "a-file").is_file()
    # `jobs status` shows the failed job's last lines as text, without Ray's colour codes.
    job_id = re.search(r"submitted job (\S+)", r.stderr).group(1)
    status = cli("jobs", "status", job_id)
    assert status.exit_code == 0 and "FAILED" in status.stdout, status.output
    assert error in status.stdout and "Connected to Ray cluster" in status.stdout
    assert "\x1b" not in status.stdout


@pytest.mark.timeout(300)
def test_corrupt_checkpoint_for_evaluate_and_resume(ray_cluster, cli, store, runs, tmp_path):
    bad = tmp_path / "epoch-0001"
    bad.mkdir()
    (bad / "checkpoint.pt").write_bytes(b"not a checkpoint")
    r = cli("evaluate", bad, "--data", store)
    assert r.exit_code == 2, r.output
    assert "corrupt" in r.stderr and "Traceback" not in r.output


@pytest.mark.kills_node
@pytest.mark.timeout(900)
def test_a_whole_node_killed_mid_run_restarts_on_the_nodes_left(ray_cluster, cli, store, runs, tmp_path):
    """--nodes 2 on the 3-node cluster: one worker's node (raylet, its workers, its agents) is
    SIGKILLed after epoch 1 (the run holds there until then); the run restarts from its latest
    checkpoint on the two nodes left and finishes, each epoch once, its W&B run (held on the
    driver's node) whole."""
    from pipeline import local_cluster

    folder = runs / "node-lost"
    hold = tmp_path / "HOLD"
    hold.touch()
    r = cli("train", "densenet_simple", "--data", store, "--storage", runs, "--name", "node-lost",
            "--epochs", "3", "--set", f"train.hold_file={hold}", *TRAIN, "--detach")
    assert r.exit_code == 0, r.output
    job_id = r.stdout.strip().splitlines()[-1]
    _wait_for(folder / "epoch-0001" / "checkpoint.done", 300)
    # Killed before Ray Train's controller has recorded epoch 1 (it sees reports when it polls
    # its workers), the run would restart from scratch; wait until its record names the checkpoint.
    snapshot = folder / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + 120
    while "epoch-0001" not in (snapshot.read_text() if snapshot.exists() else ""):
        assert time.monotonic() < deadline, "Ray Train never recorded epoch 1"
        time.sleep(0.2)
    server = submit.connect(None, start=False)
    # The node is found from the job's own worker: worker -> its raylet -> our `ray start`.
    victim = None
    for actor in server.actors(job_id):
        if actor["class_name"] == "RayTrainWorker" and (victim := kill_node_running(int(actor["pid"]))):
            break
    assert victim is not None, "no training worker on a worker node"
    lost = actor["node_id"]
    hold.unlink()
    try:
        r = cli("jobs", "logs", job_id, "--follow")
        assert r.exit_code == 0, r.output
        assert "resumed from epoch" in r.output
        history = json.loads((folder / "history.json").read_text())
        assert [h["epoch"] for h in history] == [1, 2, 3]
        state = checkpoint.load(folder)
        assert len(set(state["placement"])) == 2
        # The restarted rank 0 went on with the same W&B run: one run, every epoch, the restart counted.
        (data,) = folder.glob("wandb/offline-run-*/*.wandb")
        view = RunView.read(data)
        assert view.run_id.startswith("node-lost-") and view.name == "node-lost" and view.epochs() == [1, 2, 3]
        assert view.summary["worker_restarts"] >= 1 and view.summary["ended"] == "finished"
        assert view.exit_code == 0
    finally:
        wait_until_gone(server, lost)
        assert cli("cluster", "up", "--nodes", "3", "--cpus-per-node", "1").exit_code == 0
    assert len(local_cluster.running().alive()) == 3


@pytest.mark.timeout(600)
def test_two_users_runs_of_one_name_at_once_keep_their_own_w_and_b_records(ray_cluster, cli, store, tmp_path):
    """A run name is the user's: two people's `--name twin`, each in their own storage, train
    at once on one cluster. Each job's rank 0 logs to its own driver's W&B run."""
    jobs, holds = {}, {}
    for who in ("ann", "bob"):
        holds[who] = tmp_path / f"HOLD-{who}"
        holds[who].touch()
        r = cli("train", "densenet_simple", "--recipe", "smoke", "--data", store, "--storage", tmp_path / who,
                "--name", "twin", "--nodes", "1", "--epochs", "2", "--wandb", "offline",
                "--set", f"train.hold_file={holds[who]}", "--detach")
        assert r.exit_code == 0, r.output
        jobs[who] = r.stdout.strip().splitlines()[-1]
    for who in jobs:  # both hold after epoch 1: both runs are alive at once
        _wait_for(str(tmp_path / who / "twin" / "epoch-0001" / "checkpoint.done"), 300)
    for who, job in jobs.items():
        holds[who].unlink()
        r = cli("jobs", "logs", job, "--follow")
        assert r.exit_code == 0, r.output
    for who in jobs:
        (data,) = (tmp_path / who / "twin").glob("wandb/offline-run-*/*.wandb")
        view = RunView.read(data)
        assert view.config["cluster"]["storage"] == str(tmp_path / who)
        assert view.epochs() == [1, 2] and view.summary["ended"] == "finished"


@pytest.mark.timeout(300)
def test_init_from_weights_of_another_net_is_one_line_from_the_job(ray_cluster, cli, store, runs, tmp_path):
    """The job's driver checks `--init-from` against the net before any worker starts."""
    from pipeline.models.densenet import build
    from pipeline.models.spec import resolve

    torch.save(build(resolve("densenet121")).state_dict(), tmp_path / "densenet121.pth")
    r = cli("train", "densenet_simple", "--recipe", "smoke", "--data", store, "--storage", runs,
            "--nodes", "2", "--wandb", "off", "--init-from", tmp_path / "densenet121.pth")
    assert r.exit_code == 2, r.output
    # The job's one line (its log, on stdout), then the CLI's line saying the job failed.
    errors = [line for line in r.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "it is not a state dict of this architecture" in errors[0], r.output
    assert "has no features.norm3.bias" in errors[0] and "Traceback" not in r.output


@pytest.mark.timeout(300)
def test_a_fine_tune_job_records_its_source_and_every_epoch_in_w_and_b(trained, cli, store, runs):
    """Through Ray Train, rank 0 reaches W&B through the driver's Recorder: the weights a
    fine-tune starts from are an artifact of its run, and every epoch is in its record."""
    source, _ = trained
    r = cli("train", "densenet_simple", "--data", store, "--storage", runs, "--name", "tuned",
            "--epochs", "2", "--init-from", source, *TRAIN)
    assert r.exit_code == 0, r.output
    assert "warning: W&B" not in r.output, r.output
    # Said once, by the rank that loads them, not again by the driver that checks them.
    assert len(re.findall(r"^init: .*: every layer", r.output, re.M)) == 1, r.output
    init = checkpoint.load(runs / "tuned")["init"]
    assert init["source"].startswith(str(source / "epoch-0003"))
    (data,) = (runs / "tuned").rglob("offline-run-*/*.wandb")
    view = RunView.read(data)
    assert view.epochs() == [1, 2] and f"init-{init['sha256'][:16]}" in view.artifacts
    assert view.summary["init_sha256"] == init["sha256"] and view.summary["ended"] == "finished"


@pytest.mark.timeout(600)
def test_predict_a_store_and_a_folder_as_ray_data_jobs(trained, cli, store, tmp_path, ray_cluster):
    """Folders and stores are classified by Ray Data actors across the cluster; the rows match
    the in-process path image for image, and an unreadable image is a row, not a failure."""
    from PIL import Image

    from pipeline import infer
    from pipeline.data.readers import synthetic_image

    run, _ = trained
    out = tmp_path / "store.json"
    r = cli("predict", run, store, "--format", "json", "--out", out, "--actors", "2")
    assert r.exit_code == 0, r.output
    rows = json.loads(out.read_text())
    here = infer.predict_store(infer.load(run), store, top_k=5)
    assert len(rows) == len(here) == 128
    # Progress as each tenth of the images is in, ending with all of them.
    told = re.findall(r"^predicted ([\d,]+) of 128 images \((\d+)%", r.output, re.M)
    assert told and told[-1] == ("128", "100") and [int(n) for n, _ in told] == sorted(int(n) for n, _ in told)
    assert [row["input"] for row in rows] == [row["input"] for row in here]
    assert [row["top"][0]["class"] for row in rows] == [row["top"][0]["class"] for row in here]
    assert all(row["label"] for row in rows)
    wrong = sum(row["top"][0]["class"] != row["label"] for row in rows)
    assert f"top-1 error {wrong / 128:.4f} on 128 labelled image(s)" in r.output, r.output

    from pipeline.data.prepare_config import SyntheticSpec

    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.fromarray(synthetic_image(SyntheticSpec(), "val", i)).save(images / f"{i}.png")
    (images / "3.png").write_bytes(b"not a png")
    r = cli("predict", run, images, "--out", tmp_path / "folder.csv", "--actors", "1")
    assert r.exit_code == 0, r.output
    lines = (tmp_path / "folder.csv").read_text().splitlines()
    assert len(lines) == 1 + 4 and lines[-1].startswith(str(images / "3.png")) and "not an image" in lines[-1]
    # With --address (a cluster elsewhere) the job checks its own --out before any image: it is
    # there, so the job stops in one line and the file is kept.
    kept = (tmp_path / "folder.csv").read_text()
    r = cli("predict", run, images, "--out", tmp_path / "folder.csv", "--address", ray_cluster.dashboard_url)
    assert r.exit_code == 2, r.output
    assert f"error: {tmp_path / 'folder.csv'} exists: pass --force" in r.stdout
    assert "predicting" not in r.stdout and (tmp_path / "folder.csv").read_text() == kept
