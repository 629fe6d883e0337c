"""`densenet-pipe jobs list | status ID | logs ID [--follow] | stop ID`: jobs on a cluster.

Every command talks to `--address` (or RAY_ADDRESS), else to the running local cluster;
none of them starts a cluster.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from ..errors import UserError
from . import app, output
from .options import Address, Format, TableFormat, complete_jobs

jobs_app = typer.Typer(name="jobs", help="List, inspect, follow and stop jobs on the cluster.",
                       no_args_is_help=True)
app.add_typer(jobs_app)

JobId = Annotated[str, typer.Argument(metavar="JOB_ID", autocompletion=complete_jobs, help="Job id, as `submit` printed it or `jobs list` shows.")]


def _when(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else ""


def _took(job: dict[str, Any]) -> str:
    start, end = job.get("start_time"), job.get("end_time")
    if not start:
        return ""
    seconds = ((end or time.time() * 1000) - start) / 1000
    return f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.1f}m"


def _user(job: dict[str, Any]) -> str:
    return (job.get("metadata") or {}).get("user", "")


@jobs_app.command("list")
def list_jobs(address: Address = None, fmt: Format = TableFormat.table,
              mine: Annotated[bool, typer.Option("--mine", help="Only the jobs you submitted from this machine.")] = False,
              ) -> None:
    """Every submitted job, newest first, with who submitted it."""
    from ..submit import connect, submitter

    jobs = connect(address, start=False).list_jobs()
    if mine:
        jobs = [j for j in jobs if _user(j) == submitter()]
    if fmt == "json":
        output.as_json(jobs)
        return
    if not jobs:
        output.info("no jobs of yours yet" if mine else "no jobs yet")
        return
    output.table(
        ["ID", "JOB", "NAME", "STATUS", "USER", "STARTED", "TOOK", "CONFIG"],
        [[j["submission_id"], (j.get("metadata") or {}).get("densenet_pipe_job", ""),
          (j.get("metadata") or {}).get("name", ""),
          j.get("status"), _user(j), _when(j.get("start_time")), _took(j),
          (j.get("metadata") or {}).get("config_digest", "")] for j in jobs],
        align="llllllrl",
    )


@jobs_app.command("status")
def status(job_id: JobId, address: Address = None, fmt: Format = TableFormat.table) -> None:
    """One job's status, timing, entrypoint and the end of its message."""
    from ..submit import connect

    job = connect(address, start=False).job(job_id)
    if fmt == "json":
        output.as_json(job)
        return
    meta = job.get("metadata") or {}
    fields = [
        ("id", job.get("submission_id")), ("status", job.get("status")),
        ("job", meta.get("densenet_pipe_job", "")), ("name", meta.get("name", "")),
        ("user", meta.get("user", "")),
        ("config", meta.get("config_digest", "")),
        ("started", _when(job.get("start_time"))), ("ended", _when(job.get("end_time"))),
        ("took", _took(job)), ("exit code", job.get("driver_exit_code")),
        ("entrypoint", job.get("entrypoint")),
    ]
    for key, value in fields:
        if value not in (None, ""):
            output.result(f"{key + ':':<12}{value}")
    from ..console import strip_ansi

    # Ray keeps the job's last log lines in the message, colours and all.
    message = strip_ansi(job.get("message") or "").strip()
    if message:
        output.result(f"{'message:':<12}{message.splitlines()[0]}")
        for line in message.splitlines()[1:][-15:]:
            output.result(f"  {line}")


@jobs_app.command("logs")
def logs(
    job_id: JobId,
    follow: Annotated[bool, typer.Option("--follow", "-f",
                                         help="Stream until the job ends; exit with its outcome.")] = False,
    address: Address = None,
) -> None:
    """Print a job's output so far, or follow it live with --follow."""
    from .. import submit

    server = submit.connect(address, start=False)
    if not follow:
        text = server.logs(job_id)
        for line in text.splitlines():
            output.result(submit.clean_line(line))
        return
    server.job(job_id)
    raise typer.Exit(submit.follow(server, job_id, output.result, address=address))


@jobs_app.command("stop")
def stop(job_id: JobId, address: Address = None,
         force: Annotated[bool, typer.Option("--force", help="Stop it even when someone else submitted it.")] = False,
         ) -> None:
    """Stop a running job and wait until it has stopped (it gets 30 s to end its W&B runs)."""
    from .. import submit

    server = submit.connect(address, start=False)
    job = server.job(job_id)
    before = job.get("status")
    if before in submit.TERMINAL:
        output.info(f"job {job_id} already ended: {before}")
        return
    # On a shared cluster one token lets anyone stop anything: a job another user (or no
    # one through this CLI) submitted is stopped only when asked for by name and --force.
    owner = _user(job)
    if owner != submit.submitter() and not force:
        by = f"submitted by {owner}" if owner else "not submitted with densenet-pipe"
        raise UserError(f"job {job_id} was {by}, not by you ({submit.submitter()}): pass --force "
                        "to stop it anyway")
    server.stop(job_id)
    after = submit.wait_terminal(server, job_id, timeout=submit.STOP_WAIT_S).get("status")
    if after not in submit.TERMINAL:
        raise UserError(f"job {job_id} is still {after} {submit.STOP_WAIT_S} s after the stop request: "
                        f"check `densenet-pipe jobs status {job_id}`")
    output.info(f"job {job_id} {after.lower()}")
