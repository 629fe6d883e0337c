"""What every job's runtime env carries, and what it must never carry."""

from __future__ import annotations

import pytest

from pipeline.submit import JobServer, job_env


@pytest.mark.parametrize("mode, expected", [("online", None), ("offline", "offline"),
                                            ("off", "disabled")])
def test_job_env_never_carries_the_wandb_key(monkeypatch, mode, expected):
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef0123456789abcdef01234567")
    env = job_env({"tracking": {"wandb": mode}}, JobServer("http://127.0.0.1:1"))
    assert "WANDB_API_KEY" not in env
    assert not any("0123456789abcdef" in value for value in env.values())
    assert env.get("WANDB_MODE") == expected
    assert env["PYTHONUNBUFFERED"] == "1"
    # Ray Train's 60 s for workers to start is too short on a busy cluster; yours wins.
    assert env["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] == "300"
    # An elastic run's slow start is a group sized for a node just lost: Ray's 60 s.
    elastic = job_env({"cluster": {"min_nodes": 2, "nodes": 3}}, JobServer("http://127.0.0.1:1"))
    assert elastic["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] == "60"
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "900")
    assert job_env({}, JobServer("http://127.0.0.1:1"))["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] == "900"


def test_only_prepare_jobs_run_without_numba():
    # Training decodes with numba-compiled FFCV pipelines; prepare only writes and merges.
    server = JobServer("http://127.0.0.1:1")
    assert job_env({}, server, "prepare")["NUMBA_DISABLE_JIT"] == "1"
    for job in ("train", "sweep", "evaluate", "predict"):
        assert "NUMBA_DISABLE_JIT" not in job_env({}, server, job), job


def test_streamed_job_lines_lose_their_control_characters():
    from pipeline.submit import _Lines

    got: list[str] = []
    lines = _Lines(got.append)
    # A tar member named with an escape sequence that would clear the screen and retitle it.
    lines.feed("bad member train/\x1b[2J\x1b]0;owned\x07x.JPEG\tskipped\nepoch 1/3\r")
    lines.feed(" done\x00\n")
    lines.flush()
    assert got == ["bad member train/x.JPEG\tskipped", "epoch 1/3 done"]


def test_a_loc_synset_mapping_in_another_encoding_is_one_line(tmp_path):
    from fixtures_data import make_ilsvrc
    from pipeline.data.prepare_config import PrepareConfig
    from pipeline.data.readers import read_source
    from pipeline.errors import UserError

    make_ilsvrc(tmp_path / "src", val="loc", messy=False)
    (tmp_path / "src" / "LOC_synset_mapping.txt").write_bytes("n01440764 tanche, poisson\n".encode("utf-16"))
    with pytest.raises(UserError, match="LOC_synset_mapping.txt is not UTF-8 text"):
        read_source(PrepareConfig(dataset="imagenet", source=str(tmp_path / "src"), out=str(tmp_path / "o")))


class _Nodes:
    """A stand-in for the job server's node list."""

    def __init__(self, *shapes):
        self.shapes = shapes

    def nodes(self):
        return [{"state": state, "resources_total": {"CPU": shape[0], "memory": shape[1]}
                 if isinstance(shape, tuple) else {"CPU": shape}} for state, shape in self.shapes]


def test_a_drivers_cpus_are_capped_at_the_largest_alive_node():
    from pipeline.submit import driver_fit

    cluster = _Nodes(("ALIVE", 0), ("ALIVE", 4), ("DEAD", 16))
    assert driver_fit(cluster, {"num_cpus": 8}) == {"num_cpus": 4}
    assert driver_fit(cluster, {"num_cpus": 2}) == {"num_cpus": 2}
    assert driver_fit(cluster, None) is None
    assert driver_fit(_Nodes(("ALIVE", 0)), {"num_cpus": 2}) == {"num_cpus": 0}
    # Memory is capped on the node that gives the most CPUs, then the most memory.
    gib = 2**30
    cluster = _Nodes(("ALIVE", (0, 64 * gib)), ("ALIVE", (4, 8 * gib)), ("ALIVE", (4, 16 * gib)))
    assert driver_fit(cluster, {"num_cpus": 8, "memory": 12 * gib}) == {"num_cpus": 4, "memory": 12 * gib}
    assert driver_fit(cluster, {"num_cpus": 2, "memory": 32 * gib}) == {"num_cpus": 2, "memory": 16 * gib}


def test_a_drivers_resources_go_into_the_submission(monkeypatch):
    from pipeline.submit import JobServer

    sent = []
    server = JobServer("http://127.0.0.1:1")
    monkeypatch.setattr(server, "_json", lambda method, path, body=None, **kw: sent.append(body) or
                        {"submission_id": body["submission_id"]})
    assert server.submit("python -m jobs.prepare", {}, {}, "prepare-1", {"num_cpus": 2, "num_gpus": 0}) == "prepare-1"
    assert sent[0]["entrypoint_num_cpus"] == 2 and "entrypoint_num_gpus" not in sent[0]
    server.submit("python -m jobs.prepare", {}, {}, "prepare-2", {"num_cpus": 1, "memory": 3 * 2**30})
    assert sent[1]["entrypoint_memory"] == 3 * 2**30
    sent.pop()
    server.submit("python -m jobs.train", {}, {}, "train-1")
    assert not any(k.startswith("entrypoint_num") for k in sent[1])


def test_a_job_left_pending_says_what_it_waits_for(monkeypatch):
    """On a shared cluster a job waits for others' CPUs; following it says so, and which
    jobs run, instead of nothing until Ray gives up on it."""
    from pipeline import submit

    class Busy(JobServer):
        polls = 0

        def job(self, job_id):
            self.polls += 1
            status = "PENDING" if self.polls < 8 else "SUCCEEDED"
            return {"status": status}

        def logs(self, job_id):
            return "" if self.polls < 8 else "prepared\n"

        def list_jobs(self):
            return [{"submission_id": "sweep-1", "status": "RUNNING"},
                    {"submission_id": "prepare-2", "status": "PENDING"},
                    {"submission_id": "train-0", "status": "SUCCEEDED"}]

    monkeypatch.setattr(submit, "PENDING_NOTE_S", 0.25)
    notes: list[str] = []
    got: list[str] = []
    info = submit._poll(Busy("http://127.0.0.1:1"), "prepare-2", submit._Lines(got.append), 10.0,
                        note=notes.append, driver={"num_cpus": 2.0, "memory": 3 << 30})
    assert info["status"] == "SUCCEEDED" and got == ["prepared"]
    assert len(notes) == 1, notes
    assert notes[0].startswith("job prepare-2 has waited ")
    assert "its driver needs 2 CPU(s) and 3.0 GiB of memory free on one node; running now: sweep-1 (" in notes[0]


def test_a_train_or_sweep_job_is_listed_with_the_run_or_sweep_it_works_on():
    from pipeline.submit import job_name

    assert job_name("train", {"cluster": {"run_name": "baseline"}}) == "baseline"
    assert job_name("sweep", {"sweep": {"name": "s1"}, "cluster": {"run_name": None}}) == "s1"
    assert job_name("prepare", {"out": "stores/x"}) == "" and job_name("train", {}) == ""
