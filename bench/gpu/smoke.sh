#!/usr/bin/env bash
# A short CUDA smoke of every command on real CIFAR-10 (train, hpo with 2 workers, supernet train, search,
# pipeline at tiny settings), each under its own time limit; one line per command, full output in smoke.log.
#   bash bench/gpu/smoke.sh DECODED_NPZ [DEVICE]      (DEVICE: cuda by default; cpu for a dry run here)
# bench/gpu/run.sh calls it before the benchmark when SMOKE=1.
set -uo pipefail
cd "$(dirname "$0")/../.."
NPZ=$(realpath "$1")
DEVICE=${2:-cuda}
IMAGES=${SMOKE_IMAGES:-10000}  # training images of the train run; the others use half (SMOKE_IMAGES=1000 for a CPU dry run)
GPU_CACHE=${GPU_CACHE:-.cache/gpu}
OUT_DIR=${OUT:-$GPU_CACHE/out}
WORK=$GPU_CACHE/smoke
LOG=$OUT_DIR/smoke.log
rm -rf "$WORK" && mkdir -p "$WORK" "$OUT_DIR" && : >"$LOG"
PY=${PYTHON:-python3}
COMMON=(--dataset cifar10 --data-dir "$NPZ" --device "$DEVICE")
NARROW=(--prep 16 --layer1 32 --layer2 64 --layer3 128 --batch-size 256)
cat >"$WORK/base.yaml" <<EOF
dataset: cifar10
data_dir: $NPZ
device: $DEVICE
subset: $((IMAGES / 2))
holdout: $((IMAGES / 10))
epochs: 2
batch_size: 256
peak_epoch: 0.5
EOF
cat >"$WORK/space.json" <<EOF
{"peak_lr": {"_type": "loguniform", "_value": [0.05, 1.0]}, "cutout": {"_type": "choice", "_value": [0, 8]}}
EOF

step() {  # step NAME LIMIT_S COMMAND...: run it, one summary line, its output appended to smoke.log
  local name=$1 limit=$2 start rc
  shift 2
  start=$EPOCHREALTIME
  echo "===== $name: $*" >>"$LOG"
  timeout "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  awk -v n="$name" -v rc="$rc" -v s="$start" -v e="$EPOCHREALTIME" \
    'BEGIN { printf "smoke %-10s rc %3d  %6.1f s\n", n, rc, e - s }' | tee -a "$LOG"
}

step train 60 $PY -m effcifar train "${COMMON[@]}" "${NARROW[@]}" --subset "$IMAGES" --epochs 2 --peak-epoch 0.5 \
  --out "$WORK/train"
step hpo 100 $PY -m effcifar hpo run --space "$WORK/space.json" --base "$WORK/base.yaml" --trials 4 --workers 2 \
  --seed 0 --out "$WORK/hpo"
step hpo-status 20 $PY -m effcifar hpo status "$WORK/hpo"
step supernet 60 $PY -m effcifar supernet train "${COMMON[@]}" "${NARROW[@]}" --subset "$((IMAGES / 2))" --holdout "$((IMAGES / 10))" \
  --epochs 2 --panel-random 2 --bn-batches 2 --quiet --out "$WORK/supernet"
step search 60 $PY -m effcifar search "$WORK/supernet" --trials 12 --population 6 --parents 3 --mutations 2 \
  --crossovers 2 --max-flops 3e7 --device "$DEVICE" --quiet --out "$WORK/search"
step pipeline 120 $PY -m effcifar pipeline --config tests/data/pipeline_tiny.yaml --set dataset=cifar10 \
  --set "data_dir=$NPZ" --set "device=$DEVICE" --set threads=0 --quiet --out "$WORK/pipeline"
$PY - "$WORK" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys
from pathlib import Path
work = Path(sys.argv[1])
for name in ("train/summary.json", "pipeline/results.json"):
    path = work / name
    print(name, json.dumps(json.loads(path.read_text()), default=str)[:600] if path.is_file() else "missing")
EOF
