#!/usr/bin/env bash
# `make demo`: the whole pipeline end to end on the embedded default.
# A 2-node local Ray cluster, a synthetic dataset made on the fly, W&B offline, then:
# prepare -> train (DDP across both nodes) -> evaluate -> predict -> export -> a small
# growth-rate/depth sweep.
# Everything it writes lives under demo/ (cluster state in demo/cluster); the cluster is
# stopped at the end, even on failure.
set -euo pipefail
cd "$(dirname "$0")/.."
DP=.venv/bin/densenet-pipe
OUT=demo
export DENSENET_PIPE_CLUSTER_DIR=$PWD/$OUT/cluster
unset RAY_ADDRESS
STAMP=$(date +%Y%m%d-%H%M%S)
STORE=$OUT/stores/synthetic-$STAMP
RUN=demo-$STAMP

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
cleanup() { step "cluster down"; "$DP" cluster down || true; }
trap cleanup EXIT

step "the model zoo"
"$DP" models

step "a 2-node local Ray cluster (1 CPU a node)"
"$DP" cluster up --nodes 2 --cpus-per-node 1
"$DP" cluster status

step "prepare: a learnable synthetic 32x32 dataset into an FFCV store (a Ray job)"
"$DP" prepare synthetic --size 2000 --val-size 500 --classes 10 --noise 1.0 --out "$STORE"

step "train: DenseNet (two-block) with DDP across both nodes, W&B offline (a Ray job)"
"$DP" train densenet_simple --recipe smoke --data "$STORE" --nodes 2 --epochs 4 \
  --storage "$OUT/runs" --name "$RUN" --wandb offline

step "evaluate the final checkpoint, with flip test-time augmentation (a Ray job)"
"$DP" evaluate "$OUT/runs/$RUN" --data "$STORE" --tta flip

step "predict: the store's val split on Ray Data (2 actors), then export to ONNX with a parity check"
"$DP" predict "$OUT/runs/$RUN" "$STORE" --actors 2 --top-k 3 --format csv --out "$OUT/predictions-$STAMP.csv"
head -4 "$OUT/predictions-$STAMP.csv"
"$DP" export "$OUT/runs/$RUN" --format onnx --out "$OUT/$RUN.onnx" --wandb off

step "sweep: growth rate x depth of DenseNet-BC with ASHA (a Ray Tune job)"
"$DP" sweep densenet_bc --data "$STORE" --growth-rate 4,8 --depth 10,16 --recipe smoke \
  --epochs 3 --batch-size 32 --storage "$OUT/sweeps" --name "sweep-$STAMP" --wandb offline

step "what the run left behind"
python3 - "$OUT/runs/$RUN" <<'PY'
import json, sys, pathlib
run = pathlib.Path(sys.argv[1])
history = json.loads((run / "history.json").read_text())
print("val top-1 error by epoch:", " -> ".join(f"{h['val_top1_error']:.3f}" for h in history))
print("checkpoints:", ", ".join(sorted(p.name for p in run.glob("epoch-*"))))
print("curves:", run / "curves.png")
print("W&B offline run:", ", ".join(str(p) for p in (run / "wandb").glob("offline-run-*")))
PY
echo "sweep results: $OUT/sweeps/sweep-$STAMP/results.csv and val_error_vs_params_macs.png"
