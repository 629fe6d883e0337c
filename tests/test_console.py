"""What a user reads while following a job: our lines and real errors, not Ray's chatter."""

from __future__ import annotations

from pipeline.console import ConsoleFilter

RAW = """\
2026-12-02 10:22:56,965\tINFO job_manager.py:581 -- Runtime env is setting up.
Running entrypoint for job train-1: python -m jobs.train --config c.json
train: started, config 8af9defc4e97
2026-12-02 10:23:03,622\tINFO worker.py:2029 -- Connected to Ray cluster.
run r: 2 worker(s) on 2 node(s), global batch 64
\x1b[36m(_stage_here pid=19701, ip=10.0.0.2)\x1b[0m node 1a2b3c4d: store s3://b/x: staging 120/480 MB, 24.0 MB/s
\x1b[36m(NodeWriter pid=19702)\x1b[0m train[0:3,375] on vm: 1,200/3,375 images (239/s)
\x1b[36m(TrainController pid=19714)\x1b[0m Requesting resources: {'CPU': 1.0} * 2
\x1b[36m(Recorder pid=19720)\x1b[0m warning: W&B init failed, training goes on: OSError: disk full
\x1b[36m(RayTrainWorker pid=19802)\x1b[0m Setting up process group for: env:// [rank=0, world_size=2]
\x1b[36m(RayTrainWorker pid=19802)\x1b[0m epoch 1/3: train loss 1.7616 top-1 err 0.5605
\x1b[36m(RayTrainWorker pid=19802)\x1b[0m Reporting training result 1: TrainingReport(checkpoint=None)
\x1b[36m(RayTrainWorker pid=19890)\x1b[0m Error in training function:
\x1b[36m(RayTrainWorker pid=19890)\x1b[0m Traceback (most recent call last):
\x1b[36m(RayTrainWorker pid=19890)\x1b[0m   File "loop.py", line 275, in train_loop
\x1b[36m(RayTrainWorker pid=19890)\x1b[0m pipeline.train.loop.TrainingDiverged: the loss is nan at epoch 1 step 2
\x1b[36m(TrainController pid=19714)\x1b[0m [FailurePolicy] RETRY
\x1b[36m(TrainController pid=19714)\x1b[0m   Error count: 1 (max allowed: 2)
\x1b[33m(raylet)\x1b[0m The node with node id: e74 has been marked dead because:
\t(2) raylet has lagging heartbeats due to slow network or busy workload.
\x1b[36m(pid=gcs_server)\x1b[0m [2026-12-02 10:24:07,348 E 18906 18906] (gcs_server) failed
\x1b[36m(RayTrainWorker pid=19802)\x1b[0m epoch 2/3: train loss 1.2 \x1b[32m [repeated 2x across cluster]\x1b[0m
╭──────────────────────────╮
│ Trial name    status     │
╰──────────────────────────╯

Trial status: 1 RUNNING
Current best trial: 48668_00000 with val_top1_error=0.03 and params={'model.depth': 10}
\x1b[36m(trial pid=21676)\x1b[0m epoch 1/4: train loss 2.2986 top-1 err 0.8945
\x1b[36m(trial pid=22179)\x1b[0m Exception ignored in: <function WeakSet.__init__.<locals>._remove at 0x7f>
\x1b[36m(trial pid=22179)\x1b[0m Traceback (most recent call last):
\x1b[36m(trial pid=22179)\x1b[0m   File "ray/_private/worker.py", line 1063, in sigterm_handler
\x1b[36m(trial pid=22179)\x1b[0m SystemExit: 1


trial   k   L
-----  --  --

wandb: Generating checksum for up to 10000 files
\x1b[36m(Recorder pid=19720)\x1b[0m Done. 0.0s
done: best val top-1 error 0.0300 at epoch 3
error: 1 trial(s) failed
"""


def test_only_our_lines_and_the_useful_line_of_an_error_remain():
    keep = ConsoleFilter()
    shown = [s for line in RAW.splitlines() for s in keep(line)]
    assert shown == [
        "train: started, config 8af9defc4e97",
        "run r: 2 worker(s) on 2 node(s), global batch 64",
        # A store staged on each node before the work: its download's progress, by node.
        "node 1a2b3c4d: store s3://b/x: staging 120/480 MB, 24.0 MB/s",
        "warning: W&B init failed, training goes on: OSError: disk full",
        "epoch 1/3: train loss 1.7616 top-1 err 0.5605",
        "worker error: pipeline.train.loop.TrainingDiverged: the loss is nan at epoch 1 step 2",
        "Ray Train: a worker failed; restarting the worker group from the latest checkpoint",
        "epoch 2/3: train loss 1.2",
        # A sweep trial of one worker trains in Tune's trial process; one the scheduler
        # stopped leaves Python's "Exception ignored" behind, which is not an error.
        "epoch 1/4: train loss 2.2986 top-1 err 0.8945",
        "trial   k   L",
        "-----  --  --",
        # The blank lines around W&B's chatter go with it.
        "done: best val top-1 error 0.0300 at epoch 3",
        "error: 1 trial(s) failed",
    ]


def test_verbose_shows_the_stream_as_it_is(cli, monkeypatch):
    from pipeline import submit

    import os

    monkeypatch.setenv(submit.VERBOSE_ENV, "0")  # restored (unset) after the test
    r = cli("--verbose", "models", "--format", "json")
    assert r.exit_code == 0
    assert os.environ.get(submit.VERBOSE_ENV) == "1"


def test_no_blank_line_is_shown_even_between_two_of_ours():
    """Tune frames each status message with blank lines, on stderr, which reaches the job log
    in no fixed order with our stdout: a frame's blank line can land between a trial's last
    line and the sweep table (seen in a fresh-clone run). Ours print none, so none is shown."""
    keep = ConsoleFilter()
    raw = ["trial_1: epoch 2/2: train loss 0.44", "", "Trial trial_1 completed after 2 iterations",
           "╭────╮", "", "trial_2: epoch 1/2: train loss 0.75", "", "", "trial   k   L", ""]
    assert [s for line in raw for s in keep(line)] == [
        "trial_1: epoch 2/2: train loss 0.44", "trial_2: epoch 1/2: train loss 0.75", "trial   k   L"]


def test_a_drivers_threads_print_whole_lines_into_one_log():
    """`print` writes a line and its newline apart; a job driver's threads (ours, Ray's log
    forwarding) must not land inside each other's lines."""
    import io
    import threading
    import time

    from pipeline.console import WholeLines

    class Log(io.StringIO):
        def write(self, text: str) -> int:
            time.sleep(0.0005)  # a log file's write: other threads run meanwhile
            return super().write(text)

    log = Log()
    out = WholeLines(log)
    lines = {who: [f"{who}: line {i} " + who * 40 for i in range(100)] for who in "ab"}

    def speak(who: str) -> None:
        for line in lines[who]:
            print(line, file=out, flush=True)

    threads = [threading.Thread(target=speak, args=(who,)) for who in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    written = log.getvalue().splitlines()
    assert sorted(written) == sorted(lines["a"] + lines["b"])
    for who in "ab":
        assert [w for w in written if w.startswith(f"{who}: ")] == lines[who]
