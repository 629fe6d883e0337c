"""How long from typing a `densenet-pipe` command to the job's first line of output.

    .venv/bin/python benchmarks/submit_overhead.py [--repeats 5]

Runs everything as subprocesses, the way a user does, against a fresh embedded cluster in a
temporary folder (the project's own .cluster/ is left alone), and prints one table:

- `--help`, against `python -c pass` (interpreter start-up);
- warm: `densenet-pipe doctor --quick` with the cluster up, until the job prints its first
  line, against a bare `ray job submit` of the same project printing one line, and against
  running `python -m jobs.doctor` locally (no Ray job at all);
- cold: the same command with no cluster yet, so it includes starting one.

Targets: `--help` within 0.5 s, warm submission to first output within 3 s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline import local_cluster  # noqa: E402

BIN = Path(sys.executable).parent
CLI = [str(BIN / "densenet-pipe")]


def until_line(cmd: list[str], marker: str, env: dict[str, str], cwd: Path = ROOT) -> float:
    """Seconds from starting `cmd` to the first stdout line containing `marker`."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    seen = None
    for line in proc.stdout:
        if seen is None and marker in line:
            seen = time.perf_counter() - start
    proc.wait()
    if seen is None:
        raise RuntimeError(f"{' '.join(cmd)} never printed {marker!r} (exit {proc.returncode})")
    return seen


def wall(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    folder = Path(tempfile.mkdtemp(prefix="dp-bench-", dir="/tmp"))
    env = {**os.environ, local_cluster.CLUSTER_DIR_ENV: str(folder)}
    env.pop("RAY_ADDRESS", None)
    config = folder / "doctor.json"
    config.write_text(json.dumps({"quick": True}))
    rows = []
    try:
        pass_s = [wall([sys.executable, "-c", "pass"], env) for _ in range(args.repeats)]
        help_s = [wall(CLI + ["--help"], env) for _ in range(args.repeats)]
        rows.append(("densenet-pipe --help", help_s, "python -c pass", pass_s, 0.5))

        doctor = CLI + ["doctor", "--quick"]
        # No cluster yet: the command starts the embedded one, which the warm runs reuse.
        cold = [until_line(doctor, "doctor: started", env)]
        cluster = local_cluster.running(folder)
        ray_env = {**env, "RAY_ADDRESS": cluster.dashboard_url, "RAY_AUTH_MODE": "token",
                   "RAY_AUTH_TOKEN_PATH": cluster.token_path}
        bare = [str(BIN / "ray"), "job", "submit", "--working-dir", str(ROOT), "--",
                "python", "-c", "print('bare: started', flush=True)"]
        local = [sys.executable, "-m", "jobs.doctor", "--config", str(config)]
        warm, bare_s, local_s = [], [], []
        for _ in range(args.repeats):
            warm.append(until_line(doctor, "doctor: started", env))
            bare_s.append(until_line(bare, "bare: started", ray_env))
            local_s.append(until_line(local, "doctor: started", env))
        rows.append(("warm: densenet-pipe doctor --quick", warm, "ray job submit (same project)",
                     bare_s, 3.0))
        rows.append(("warm: densenet-pipe doctor --quick", warm, "python -m jobs.doctor (local)",
                     local_s, 3.0))
        subprocess.run(CLI + ["cluster", "down"], env=env, check=True, capture_output=True)
        cold.append(until_line(doctor, "doctor: started", env))
        rows.append(("cold: densenet-pipe doctor --quick", cold, "warm (same command)", warm, None))
    finally:
        subprocess.run(CLI + ["cluster", "down"], env=env, capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)

    print(f"{'measured (median s)':<38}{'s':>7}  {'baseline':<32}{'s':>7}{'ratio':>8}  target")
    for name, values, base_name, base, target in rows:
        m, b = statistics.median(values), statistics.median(base)
        verdict = "" if target is None else f"<= {target:g} s {'ok' if m <= target else 'MISSED'}"
        print(f"{name:<38}{m:>7.2f}  {base_name:<32}{b:>7.2f}{m / b:>7.1f}x  {verdict}")
    print(f"(repeats: {args.repeats}; cold: {len(cold)} runs; 1-min load average "
          f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after, on {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
