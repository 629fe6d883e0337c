"""What a user reads of a job while following it: our lines, our results and real errors.

    keep = ConsoleFilter()
    for line in job_lines:
        for shown in keep(line):    # none for Ray's, Tune's or W&B's own chatter
            print(shown)

Ray prefixes every actor's output with `(ClassName pid=N, ip=...)` and colours it; Train's
controller, Tune's status tables and W&B all write to the same stream. Training workers'
own lines lose the prefix; a worker's traceback shrinks to its last line (the exception);
everything else of Ray's is dropped. `--verbose` shows the stream as it is, and
`densenet-pipe jobs logs ID` always does.
"""

from __future__ import annotations

import re

_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?")
_REPEATED = re.compile(r"\s*\[repeated \d+x across cluster\].*$")
_PREFIX = re.compile(r"^\((?P<who>[A-Za-z_][\w.:-]*|pid=\w+)(?: pid=\w+)?(?:, ip=[\w.:-]+)?\)\s?")
# The processes whose lines are ours: the training workers, the sweep trials that train in
# their own process (pipeline/tune/sweep.py), the W&B recorders and the tasks that stage a
# store on each node before a job's work starts (pipeline/data/staging.py: minutes of
# download for a large store, silent otherwise). A prepare's node writers are left out: a
# line a node every 5 s; the driver tells a line a piece instead.
_OURS = {"RayTrainWorker", "trial", "Recorder", "_stage_here"}
_RAY_LOG = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d[,.]\d+\s+(INFO|DEBUG)\b|\[\d{4}-\d\d-\d\d )")
_RAY_MESSAGES = re.compile(
    r"^(Setting up process group|Checkpoint successfully created|Reporting training result|"
    r"Moving model to device|Wrapping provided model|Running entrypoint for job|"
    r"Trial status:|Current time:|Logical resource usage:|Current best trial:|View detailed results here|"
    r"To visualize your results|\s*tensorboard --logdir|Trial \S+ (started|completed|finished|"
    r"errored|terminated)|Training (started|finished)|wandb:|[╭╰│├┌└─]|\(raylet\)|"
    r"\S+ (dir|storage): |Done\. [\d.]+s$)")
_EXCEPTION = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(Error|Exception|Diverged|Interrupt|Exit)\b:?")


def strip_ansi(text: str) -> str:
    """Without terminal escape sequences (colours, titles, cursor moves)."""
    return _ANSI.sub("", text)


class ConsoleFilter:
    """Callable: a raw job line -> the line to show, or None."""

    def __init__(self) -> None:
        # Sources inside a traceback: only its exception line is shown.
        self.in_traceback: set[str] = set()
        self.ignored: set[str] = set()
        self.last = ""

    def __call__(self, line: str) -> list[str]:
        """The lines to show for one raw line: none or the line. Blank lines are never shown:
        ours print none, and the ones that frame Tune's and W&B's messages come on stderr,
        which reaches the log in no fixed order with stdout, so one can land between two of
        ours (seen in a fresh-clone run, between a trial's last line and the sweep table)."""
        shown = self._keep(line)
        return [] if shown is None or not shown.strip() else [shown]

    def _keep(self, line: str) -> str | None:
        line = _REPEATED.sub("", strip_ansi(line)).rstrip()
        match = _PREFIX.match(line)
        who = match.group("who") if match else ""
        text = line[match.end():] if match else line
        if not match and line[:1].isspace() and self.last not in ("", *_OURS):
            return None  # the rest of a multi-line message from Ray
        self.last = who
        if text.startswith(("warning: ", "error: ")):
            return text
        if who and who not in _OURS:
            if text.startswith("[FailurePolicy] RETRY"):
                return "Ray Train: a worker failed; restarting the worker group from the latest checkpoint"
            return None
        if text.startswith(("Traceback (most recent call last)", "Error in training function")):
            self.in_traceback.add(who)
            return None
        if text.startswith("Exception ignored in"):
            # Python's own word that it went on (a trial stopped by the scheduler meets
            # Ray's SIGTERM handler mid-cleanup): neither the traceback nor its exception.
            self.in_traceback.add(who)
            self.ignored.add(who)
            return None
        if who in self.in_traceback:
            if _EXCEPTION.match(text):
                self.in_traceback.discard(who)
                if who in self.ignored:
                    self.ignored.discard(who)
                    return None
                return f"worker error: {text}" if who else text
            return None
        if not text.strip() and who:
            return None
        if _RAY_LOG.match(text) or _RAY_MESSAGES.match(text.lstrip()):
            return None
        return text


class WholeLines:
    """A job driver's stdout/stderr: each thread's text reaches the log a whole line at a time.

    `print(line)` is two writes, the text and its newline, and a driver prints from several
    threads (ours, and Ray's, which forwards every worker's and actor's lines): between the
    two, another thread's line lands, and a user reads `...2.0 s(Recorder pid=9) wandb: ...`
    and then a blank line. Text up to each newline is held per thread and written under one
    lock; `flush` writes what a thread holds.
    """

    def __init__(self, out) -> None:
        import threading

        self._out = out
        self._lock = threading.Lock()
        self._held = threading.local()

    def write(self, text: str) -> int:
        held = getattr(self._held, "text", "") + text
        cut = held.rfind("\n") + 1
        self._held.text = held[cut:]
        if cut:
            with self._lock:
                self._out.write(held[:cut])
        return len(text)

    def flush(self) -> None:
        rest, self._held.text = getattr(self._held, "text", ""), ""
        with self._lock:
            if rest:
                self._out.write(rest)
            self._out.flush()

    def __getattr__(self, name: str):
        return getattr(self._out, name)
