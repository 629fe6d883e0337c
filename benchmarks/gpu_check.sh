#!/usr/bin/env bash
# The GPU check in one command: sets up .venv (README's `make setup`), then runs
# benchmarks/gpu_check.py with these arguments. At most about 8 minutes on one H100/H200-class
# GPU; without a GPU it runs the CPU-safe parts and prints what it did not run.
set -euo pipefail
cd "$(dirname "$0")/.."
make -s setup >/dev/null
exec .venv/bin/python benchmarks/gpu_check.py "$@"
