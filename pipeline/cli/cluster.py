"""`densenet-pipe cluster up | status | down` (the embedded local cluster) and `doctor`.

`up --nodes N` on a machine gives one head and N-1 worker nodes, each its own raylet, so
`--nodes` means the same on a laptop as on a real cluster; `up` again with a larger N adds
nodes, with a smaller N it changes nothing (`down` first). `status` works for any cluster
(`--address`); `down` stops exactly the processes `up` started.
"""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer

from ..errors import UserError
from . import app, output
from .options import Address, Detach, Format, TableFormat, StopOnInterrupt

cluster_app = typer.Typer(name="cluster", no_args_is_help=True,
                          help="The embedded local Ray cluster: up, status, down.")
app.add_typer(cluster_app)


@cluster_app.command("up")
def up(
    nodes: Annotated[int, typer.Option(help="Nodes in all: one head and N-1 worker nodes.")] = 1,
    cpus_per_node: Annotated[Optional[float], typer.Option(
        help="CPUs each node offers Ray (default: every CPU of this machine).")] = None,
    gpus_per_node: Annotated[Optional[int], typer.Option(
        help="GPUs per node, each node its own devices (default: all on the head).")] = None,
) -> None:
    """Start the local Ray cluster, or grow the running one to --nodes nodes.

    Prints the job server's address on stdout. Its state, token and logs are in .cluster/.
    """
    from .. import local_cluster

    cluster, started = local_cluster.up(nodes, cpus_per_node, gpus_per_node, note=output.info)
    have = len(cluster.alive())
    if (cpus_per_node is not None or gpus_per_node is not None) and have > started:
        output.info(f"--cpus-per-node and --gpus-per-node shape the nodes this call starts; the "
                    f"{have - started} running keep theirs (`densenet-pipe cluster status` lists them)")
    if started == 0:
        output.info(f"the local cluster is already up with {have} node(s)"
                    + (f" (asked for {nodes}: `densenet-pipe cluster down` first to shrink it)"
                       if nodes < have else ""))
    else:
        output.info(f"the local cluster is up: {have} node(s), this call started {started}")
    output.result(cluster.dashboard_url)


@cluster_app.command("token")
def token() -> None:
    """Make the token for a remote cluster's token auth (once), and print where it is.

    The configs in cluster/ copy this file to every node; the CLI sends it to --address.
    """
    import os
    import secrets

    from ..submit import user_token_file

    path = user_token_file()
    if path.exists():
        output.info("the token already exists; every cluster made from cluster/ uses it")
    else:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
        output.info("made a new token (0600); `ray up cluster/aws.yaml` copies it to every node")
    output.result(str(path))


@cluster_app.command("down")
def down() -> None:
    """Stop the local cluster: exactly the processes `cluster up` started, nothing else."""
    from .. import local_cluster

    if local_cluster.load() is None:
        output.info("no local cluster is up")
        return
    stopped = local_cluster.down()
    output.info(f"stopped the local cluster ({len(stopped)} processes)")


def _gib(value: float | None) -> str:
    return f"{value / 1024**3:.1f}" if value else ""


@cluster_app.command("status")
def status(address: Address = None, fmt: Format = TableFormat.table) -> None:
    """Nodes with their CPUs, GPUs and memory, and the jobs that are running."""
    from ..submit import TERMINAL, connect

    server = connect(address, start=False)
    nodes = server.nodes()
    alive = [n for n in nodes if n.get("state") == "ALIVE"]
    running = [j for j in server.list_jobs() if j.get("status") not in TERMINAL]
    if fmt == "json":
        output.as_json({"address": server.address, "nodes": nodes, "running_jobs": running,
                        "local": None if server.local is None else {
                            "dir": server.local.dir,
                            "pids": [n.pid for n in server.local.alive()]}})
        return
    output.result(f"cluster {server.address}: {len(alive)} node(s) alive"
                  + (f", {len(nodes) - len(alive)} dead" if len(nodes) > len(alive) else ""))
    rows: list[list[Any]] = []
    for n in sorted(alive, key=lambda n: (not n.get("is_head_node"), n["node_id"])):
        res = n.get("resources_total") or {}
        rows.append([n["node_id"][:8], n.get("node_ip"), "head" if n.get("is_head_node") else "worker",
                     f"{res.get('CPU', 0):g}", f"{res.get('GPU', 0):g}",
                     _gib(res.get("memory")), _gib(res.get("object_store_memory"))])
    output.table(["NODE", "IP", "ROLE", "CPUS", "GPUS", "MEM GiB", "OBJ GiB"], rows,
                 align="lllrrrr")
    if running:
        output.result("")
        output.table(["JOB", "STATUS", "ENTRYPOINT"],
                     [[j["submission_id"], j.get("status"), j.get("entrypoint", "")[:60]]
                      for j in running], align="lll")
    else:
        output.result("no running jobs")
    if server.local is not None:
        output.info(f"local cluster: state and logs in {server.local.dir}")


@app.command("doctor")
def doctor(
    burn_in: Annotated[float, typer.Option(
        help="Also multiply matrices this many seconds per node and report TFLOPS.")] = 0.0,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the slowest node.")] = 300.0,
    quick: Annotated[bool, typer.Option(
        "--quick", help="Only check that every node runs tasks; skip the training imports.")] = False,
    address: Address = None,
    detach: Detach = False,
    stop_on_interrupt: StopOnInterrupt = False,
) -> None:
    """Check every node of the cluster: imports, versions, CPUs, GPUs, memory and bf16."""
    from ..submit import run_job

    if burn_in < 0 or timeout <= 0:
        raise UserError("--burn-in must be >= 0 and --timeout > 0 seconds")
    code = run_job("doctor", {"burn_in_s": burn_in, "timeout_s": timeout, "quick": quick}, address=address,
                   detach=detach, stop_on_interrupt=stop_on_interrupt)
    raise typer.Exit(code)
