"""Submitting jobs to a real local Ray cluster: follow, detach, stop, Ctrl-C, bad input."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from pipeline import local_cluster, submit
from pipeline.config import Config
from pipeline.errors import UserError

ROOT = local_cluster.project_root()


def _job_ids(cli) -> list[str]:
    result = cli("jobs", "list", "--format", "json")
    assert result.exit_code == 0, result.output
    return [j["submission_id"] for j in json.loads(result.stdout)]


def _wait_status(cli, job_id: str, wanted: set[str], timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while True:
        result = cli("jobs", "status", job_id, "--format", "json")
        assert result.exit_code == 0, result.output
        status = json.loads(result.stdout)["status"]
        if status in wanted or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_config_digest_matches_config():
    cfg = Config()
    assert submit.config_digest(cfg.to_dict()) == cfg.digest()


def test_package_holds_code_and_config_but_no_data(tmp_path):
    for rel in ["jobs/a.py", "pipeline/b.py", ".git/HEAD", ".venv/bin/python", "stores/c/train.beton",
                "runs/x/ckpt.pt", "wandb/offline-run/x", "pipeline/__pycache__/b.cpython-311.pyc",
                ".cluster/cluster.json", "notes.txt"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(rel)
    (tmp_path / "link.py").symlink_to(tmp_path / "notes.txt")
    cfg = {"model": {"name": "densenet_simple"}}
    one = submit.package_working_dir(tmp_path, "train", cfg)
    two = submit.package_working_dir(tmp_path, "train", cfg)
    assert one.data == two.data, "the same files must give the same package (uploaded once)"
    import io
    import zipfile

    with zipfile.ZipFile(io.BytesIO(one.data)) as zf:
        names = sorted(zf.namelist())
        assert json.loads(zf.read(one.config_path)) == cfg
    assert names == sorted(["jobs/a.py", "pipeline/b.py", "notes.txt", one.config_path])
    assert one.config_path == f".densenet-pipe/train-{submit.config_digest(cfg)}.json"


SECRETS = [".env", ".env.prod", "gcp-key.json", "pipeline/service_key.json", "auth_token", ".netrc",
           "server.pem", ".ssh/id_rsa", "cluster/ray-token", ".aws/credentials"]


def _names(package: submit.Package) -> list[str]:
    import io
    import zipfile

    with zipfile.ZipFile(io.BytesIO(package.data)) as zf:
        return sorted(zf.namelist())


def test_package_never_holds_secrets_and_only_git_tracked_or_new_code(tmp_path):
    files = ["pipeline/b.py", "jobs/a.py", "README.md", *SECRETS]
    for rel in files + ["pipeline/new.py", "scratch.txt"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(rel)
    plain = _names(submit.package_working_dir(tmp_path, "train", {}))
    assert not set(SECRETS) & set(plain) and "scratch.txt" in plain
    git = ["git", "-C", str(tmp_path), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], check=True)
    # Committed by mistake, a secret is still left out.
    subprocess.run([*git, "add", "-f", *files], check=True)
    names = _names(submit.package_working_dir(tmp_path, "train", {}))
    assert [n for n in names if not n.startswith(".densenet-pipe/")] == \
        ["README.md", "jobs/a.py", "pipeline/b.py", "pipeline/new.py"]


def test_the_docker_build_ignores_the_same_secrets():
    ignore = (ROOT / "cluster" / "Dockerfile.dockerignore").read_text().split()
    for pattern in submit.SECRET_PATTERNS:
        assert f"**/{pattern}" in ignore, pattern


def test_address_forms():
    assert submit.normalize_address("head:8265") == "http://head:8265"
    assert submit.normalize_address("https://ray.example.com/") == "https://ray.example.com"
    for bad in ("ray://head:10001", "head:6379", "ftp://head"):
        with pytest.raises(UserError, match="--address"):
            submit.normalize_address(bad)


def test_job_entrypoint_maps_errors_to_exit_codes(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"bogus": 1}))
    for config, needle in ((tmp_path / "missing.json", "cannot read config"),
                           (bad, "unknown key bogus")):
        out = subprocess.run([sys.executable, "-m", "jobs.doctor", "--config", str(config)],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert out.returncode == 2, out.stderr
        assert out.stderr.strip().splitlines() == [out.stderr.strip()], "one line, no traceback"
        assert needle in out.stderr


@pytest.mark.timeout(30)
def test_unreachable_address_fails_fast(cli):
    port = _free_port()
    result = cli("doctor", "--quick", "--address", f"http://127.0.0.1:{port}")
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: cannot reach Ray job server at http://127.0.0.1:{port}")
    assert "densenet-pipe cluster up" in result.stderr and "Traceback" not in result.output


@pytest.mark.timeout(30)
def test_jobs_commands_without_a_cluster_say_how_to_get_one(cli, tmp_path, monkeypatch):
    monkeypatch.setenv(local_cluster.CLUSTER_DIR_ENV, str(tmp_path))
    result = cli("jobs", "list")
    assert result.exit_code == 2
    assert "no local Ray cluster is up" in result.stderr and "cluster up" in result.stderr


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_doctor_streams_every_node_and_succeeds(ray_cluster, cli):
    result = cli("doctor", "--quick")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "doctor: checking 3 node(s) (quick)" in lines
    assert sum(1 for line in lines if line.startswith("doctor: node ") and "answered" in line) == 3
    assert "doctor: all 3 node(s) ready" in lines
    assert "succeeded" in result.stderr


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_detach_then_status_logs_and_list(ray_cluster, cli):
    result = cli("doctor", "--quick", "--detach")
    assert result.exit_code == 0, result.output
    job_id = result.stdout.strip()
    assert job_id.startswith("doctor-")
    assert f"densenet-pipe jobs logs {job_id} --follow" in result.stderr
    assert job_id in _job_ids(cli)

    followed = cli("jobs", "logs", job_id, "--follow")
    assert followed.exit_code == 0, followed.output
    assert "doctor: all 3 node(s) ready" in followed.stdout
    status = cli("jobs", "status", job_id)
    assert status.exit_code == 0 and "SUCCEEDED" in status.stdout
    assert "config:" in status.stdout and "jobs.doctor" in status.stdout
    logs = cli("jobs", "logs", job_id)
    assert logs.exit_code == 0 and "doctor: started" in logs.stdout


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_following_over_the_websocket_gets_every_line_once_to_the_last(ray_cluster, cli):
    """Past the polling seconds the log streams over the websocket, which the follow leaves as
    soon as the job's status is terminal, reading the rest of the log in one request: the
    lines printed just before the driver exits still arrive, each once, in order."""
    result = cli("doctor", "--quick", "--detach")
    assert result.exit_code == 0, result.output
    job_id = result.stdout.strip()
    server = submit.connect(None, start=False)
    lines: list[str] = []
    assert submit.follow(server, job_id, lines.append, poll_seconds=0) == 0
    text = server.logs(job_id)
    assert lines == [submit.clean_line(line) for line in text.rstrip("\n").split("\n")]
    assert any(line.startswith("doctor: started") for line in lines) and "doctor: all 3 node(s) ready" in lines


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_stop_a_running_job(ray_cluster, cli):
    result = cli("doctor", "--quick", "--burn-in", "600", "--detach")
    assert result.exit_code == 0, result.output
    job_id = result.stdout.strip()
    assert _wait_status(cli, job_id, {"RUNNING"}) == "RUNNING"
    stopped = cli("jobs", "stop", job_id)
    assert stopped.exit_code == 0, stopped.output
    assert f"job {job_id} stopped" in stopped.stderr
    assert _wait_status(cli, job_id, {"STOPPED"}, timeout=5) == "STOPPED"
    again = cli("jobs", "stop", job_id)
    assert again.exit_code == 0 and "already ended: STOPPED" in again.stderr


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_job_someone_else_submitted_is_listed_as_theirs_and_stopped_only_with_force(ray_cluster, cli):
    """A shared cluster holds everyone's jobs and one token lets anyone stop any of them."""
    server = submit.connect(None, start=False)
    theirs = server.submit(f"{server.python} -c 'import time; time.sleep(600)'", {},
                           {"densenet_pipe_job": "train", "user": "someone@elsewhere", "name": "their-run"},
                           f"train-theirs-{secrets.token_hex(2)}")
    mine = cli("doctor", "--quick", "--detach").stdout.strip()
    assert _wait_status(cli, theirs, {"RUNNING"}) == "RUNNING"
    listed = cli("jobs", "list")
    row = next(line for line in listed.stdout.splitlines() if line.startswith(theirs))
    assert "someone@elsewhere" in row and " their-run " in row, listed.stdout
    assert "name:       their-run" in cli("jobs", "status", theirs).stdout
    only_mine = _ids(cli("jobs", "list", "--mine", "--format", "json"))
    assert mine in only_mine and theirs not in only_mine
    assert submit.submitter() in cli("jobs", "status", mine).stdout
    refused = cli("jobs", "stop", theirs)
    assert refused.exit_code == 2, refused.output
    assert refused.stderr.strip() == (f"error: job {theirs} was submitted by someone@elsewhere, not by you "
                                      f"({submit.submitter()}): pass --force to stop it anyway")
    assert _wait_status(cli, theirs, {"STOPPED"}, timeout=2) == "RUNNING"
    stopped = cli("jobs", "stop", theirs, "--force")
    assert stopped.exit_code == 0 and f"job {theirs} stopped" in stopped.stderr, stopped.output


def _ids(result) -> list[str]:
    assert result.exit_code == 0, result.output
    return [j["submission_id"] for j in json.loads(result.stdout)]


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_ctrl_c_leaves_the_job_running_or_stops_it(ray_cluster, cli):
    """stdin is not a terminal: Ctrl-C leaves the job running; --stop-on-interrupt stops it."""
    def started(*flag: str) -> tuple[subprocess.Popen, float]:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from pipeline.cli import main; main()", "doctor", "--quick",
             "--burn-in", "600", *flag],
            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
            # As from a terminal: a suite started in the background (`make test &`) ignores
            # SIGINT, and a child would inherit that and keep ignoring it.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        for line in proc.stdout:
            if line.startswith("doctor: started"):
                break
        return proc, time.monotonic()

    def interrupted(proc: subprocess.Popen) -> tuple[int, str, str]:
        proc.send_signal(signal.SIGINT)
        # A guard against a hang, not a timing: the stopped job gets up to 30 s to end.
        out, err = proc.communicate(timeout=150)
        return proc.returncode, err + out, err.split("submitted job ")[1].split()[0]

    # Two CLIs at once, so the second case runs while the first waits out its polling phase.
    following, since = started()
    polling, _ = started("--stop-on-interrupt")
    try:
        # Within the polling seconds: one place an interrupt can land.
        time.sleep(1)
        code, err, job_id = interrupted(polling)
        assert code == 1, err + cli("jobs", "logs", job_id).stdout
        assert _wait_status(cli, job_id, {"STOPPED"}, timeout=5) == "STOPPED"

        # Past the first 10 s of polling (`submit.follow`): the interrupt lands while following
        # the websocket, where it was once lost.
        time.sleep(max(0.0, since + 12 - time.monotonic()))
        code, err, job_id = interrupted(following)
        assert code == 130, err
        assert f"stop it with `densenet-pipe jobs stop {job_id}`" in err
        assert _wait_status(cli, job_id, {"RUNNING"}) == "RUNNING"
        assert cli("jobs", "stop", job_id).exit_code == 0
    finally:
        for proc in (following, polling):
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_job_that_rejects_its_config_exits_2_with_its_error(ray_cluster):
    lines: list[str] = []
    code = submit.run_job("doctor", {"bogus": 1}, address=None, on_line=lines.append)
    assert code == 2
    assert any(line.startswith("error: unknown key bogus") for line in lines)
    assert not any("Traceback" in line for line in lines)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_too_many_nodes_fails_fast_and_submits_nothing(ray_cluster, cli):
    before = _job_ids(cli)
    with pytest.raises(UserError) as e:
        submit.run_job("doctor", {"quick": True}, address=None,
                       resources={"nodes": 4, "cpus_per_node": 1, "gpus_per_node": 0})
    message = str(e.value)
    assert "needs 4 node(s) with 1 CPU and 0 GPU each" in message
    assert "has 3 node(s): 3 x (1 CPU, 0 GPU)" in message
    assert "cluster up --nodes 4" in message

    with pytest.raises(UserError, match="after waiting 2 s"):
        submit.run_job("doctor", {"quick": True}, address=None,
                       resources={"nodes": 4}, wait_for_nodes=2)
    assert _job_ids(cli) == before


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_gpus_on_a_cpu_only_cluster_are_refused(ray_cluster, cli):
    before = _job_ids(cli)
    with pytest.raises(UserError) as e:
        submit.run_job("doctor", {"quick": True}, address=ray_cluster.dashboard_url,
                       resources={"nodes": 1, "cpus_per_node": 1, "gpus_per_node": 1})
    assert "1 GPU each" in str(e.value) and "without --gpu" in str(e.value)
    assert _job_ids(cli) == before


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_unknown_job_id_is_one_line_exit_2(ray_cluster, cli):
    for command in (["status"], ["logs"], ["logs", "--follow"], ["stop"]):
        result = cli("jobs", command[0], "no-such-job", *command[1:])
        assert result.exit_code == 2, result.output
        assert result.stderr == ("error: no job 'no-such-job' on "
                                 f"{ray_cluster.dashboard_url}: see `densenet-pipe jobs list`\n")
    with pytest.raises(UserError, match="unknown job 'nope'"):
        submit.run_job("nope", {}, address=None)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_working_dir_over_the_cap_is_refused(ray_cluster, cli, tmp_path):
    copy = tmp_path / "project"
    for folder in ("pipeline", "jobs"):
        shutil.copytree(ROOT / folder, copy / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))
    with open(copy / "data.bin", "wb") as f:
        f.truncate(101 * 1024**2)
    before = _job_ids(cli)
    out = subprocess.run([sys.executable, "-c", "from pipeline.cli import main; main()",
                          "doctor", "--quick"], cwd=copy, capture_output=True, text=True,
                         timeout=60, env={**os.environ, "PYTHONPATH": str(copy)})
    assert out.returncode == 2, out.stderr
    # 101 MiB of data plus the project's own code, whatever size that has grown to.
    code = sum(f.stat().st_size for f in copy.rglob("*")
               if f.is_file() and f.name != "data.bin" and "__pycache__" not in f.parts)
    assert out.stderr.startswith(f"error: the job's working dir {copy} holds "
                                 f"{(101 * 1024**2 + code) / 1024**2:.0f} MiB of files, over Ray's 100 MiB")
    assert "(largest: data.bin (101 MiB)" in out.stderr and len(out.stderr.splitlines()) == 1
    assert _job_ids(cli) == before


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_full_doctor_imports_the_training_stack_on_every_node(ray_cluster, cli):
    result = cli("doctor")
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.stdout.splitlines() if "2.60.0" in line.split()]
    assert len(rows) == 3 and all("yes" in row for row in rows), result.stdout
