"""One console for a sweep: every trial's lines reach the user through the sweep's driver.

    with TrialLines.printing():        # in the sweep driver, around `tuner.fit()`
        ...
    say = trial_say("trial_3f2a1_00002")   # in a trial's rank 0: "trial_3f2a1_00002: ..."

A line a trial's process prints reaches the job log through Ray's log forwarding, which has
no order across processes: a trial's first lines came after the sweep's table, and a trial
the scheduler stopped could lose its last ones. Here a trial sends each line to one actor of
the sweep job (calls from one process run in the order sent), and the driver prints them,
taking the last ones before its table.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from typing import Callable, Iterator

# How often the driver prints what the trials sent, and how long it waits for the actor.
POLL_S = 0.5
DRAIN_S = 5.0


def _actor_name() -> str:
    import ray

    # One per sweep job: its trials run in the job, so they find it by the job's id.
    return f"sweep-lines-{ray.get_runtime_context().get_job_id()}"


class TrialLines:
    """The actor: lines in the order each trial sent them, until the driver takes them."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def say(self, line: str) -> None:
        self.lines.append(line)

    def take(self) -> list[str]:
        taken, self.lines = self.lines, []
        return taken

    @classmethod
    @contextlib.contextmanager
    def printing(cls, out: Callable[[str], None] | None = None) -> Iterator[None]:
        """Start the actor and print what trials send until the block ends, then the rest."""
        import ray

        show = out or (lambda line: print(line, flush=True))
        handle = ray.remote(num_cpus=0, max_restarts=0)(cls).options(name=_actor_name()).remote()
        stop = threading.Event()

        def drain() -> None:
            for line in ray.get(handle.take.remote(), timeout=DRAIN_S):
                show(line)

        def poll() -> None:
            while not stop.wait(POLL_S):
                with contextlib.suppress(Exception):
                    drain()

        poller = threading.Thread(target=poll, name="trial-lines", daemon=True)
        poller.start()
        try:
            yield
        finally:
            # Bounded: a stopped sweep has 30 s to end its trials' W&B runs after this.
            stop.set()
            poller.join(timeout=DRAIN_S)
            with contextlib.suppress(Exception):
                drain()
            with contextlib.suppress(Exception):
                ray.kill(handle)


def trial_say(trial: str) -> Callable[[str], None]:
    """A trial's `say`: its lines, named by the trial, through the sweep driver; printed
    here when there is no sweep driver to send them to."""

    def here(line: str) -> None:
        sys.stdout.write(f"{trial}: {line}\n")
        sys.stdout.flush()

    try:
        import ray

        handle = ray.get_actor(_actor_name())
    except Exception:  # noqa: BLE001 - no sweep driver's actor: not in a sweep job
        return here

    def send(line: str) -> None:
        try:
            handle.say.remote(f"{trial}: {line}")
        except Exception:  # noqa: BLE001 - the driver is gone; the job log still gets it
            here(line)

    return send
