"""Nodes of the local cluster found from the processes they run, for tests that lose one."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from pipeline import local_cluster


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def same_node(pid: int, other: int) -> bool:
    """Whether two Ray worker processes run under the same raylet."""
    return parent(pid) == parent(other)


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        kids = children(todo.pop())
        out += kids
        todo += kids
    return out


def kill_node_running(pid: int) -> local_cluster.Node | None:
    """SIGKILLs the whole worker node whose raylet runs Ray worker `pid`, as a machine lost
    would be: our `ray start` of it and everything under it (raylet, workers, agents, and the
    log monitor, which is `ray start`'s child, not the raylet's: left alive, it went on
    forwarding the lines of the node that replaced this one, in the same folder, a second
    time). Returns that node, or None (killing nothing) when `pid` runs on the head node."""
    raylet = parent(pid)
    nodes = {n.pid: n for n in local_cluster.running().nodes if n.role != "head"}
    node = nodes.get(parent(raylet))
    if node is None:
        return None
    for p in [node.pid, *descendants(node.pid)]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass  # a short-lived process of the node that ended on its own
    return node


def wait_until_gone(server, node_id: str, timeout: float = 120.0) -> None:
    """Until the job server no longer lists `node_id` alive. Ray marks a killed node dead
    only after its health checks fail (seconds); the tests after one that killed a node must
    not meet it as a node to schedule on."""
    deadline = time.monotonic() + timeout
    while any(n.get("node_id") == node_id and n.get("state") == "ALIVE" for n in server.nodes()):
        assert time.monotonic() < deadline, f"Ray still lists the killed node {node_id[:8]} alive"
        time.sleep(0.5)
