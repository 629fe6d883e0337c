"""Run a small function once on each alive node of the cluster, from a job's driver.

    for node, result in on_each_node(fn, arg, min_cpus=2): ...

Each call is a Ray task pinned to its node (no CPU asked, so it runs beside whatever holds the
node's CPUs), in the job's runtime environment: it sees what the job's workers will see
(their environment, credentials and local disk). A UserError raised on a node comes back as
that UserError, one line; anything else as Ray raised it.
"""

from __future__ import annotations

from typing import Any, Callable

from .errors import UserError


def worker_nodes(min_cpus: float = 0.0) -> list[str]:
    """Ids of the alive nodes with at least `min_cpus` CPUs (and some): where workers can go."""
    import ray

    return [n["NodeID"] for n in ray.nodes()
            if n.get("Alive") and n["Resources"].get("CPU", 0) >= max(min_cpus, 1e-9)]


def on_each_node(fn: Callable[..., Any], *args: Any, min_cpus: float = 0.0) -> list[tuple[str, Any]]:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = worker_nodes(min_cpus)
    # Retried on OSError: a node can be deleting the job's code package, left by an earlier
    # job with the same contents, just as this task starts (seen as FileNotFoundError on one of
    # our own modules); the retry gets a fresh copy. A UserError is an answer, never retried.
    task = ray.remote(num_cpus=0, max_retries=2, retry_exceptions=[OSError])(fn)
    refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(*args)
            for node in nodes]
    # Every task is awaited before the first failure is raised: a failed task nobody gets is
    # printed later by Ray as an "Unhandled error" with its traceback.
    results, failures = [], []
    for node, ref in zip(nodes, refs):
        try:
            results.append((node, ray.get(ref)))
        except ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            failures.append(UserError(f"node {node[:8]}: {cause}") if isinstance(cause, UserError) else e)
    if failures:
        raise failures[0]
    return results
