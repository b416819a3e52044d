#!/usr/bin/env bash
# One call on a lent GPU for architecture ranking (docs/benchmarks.md), two jobs at once on the one GPU:
#  truth: the seed space's ground truth — SAMPLE subnets stratified over FLOPs, each trained standalone with
#         2 seeds for TRUTH_EPOCHS epochs (`nas-eval --repeats 2 --workers WORKERS`) at the quick preset's
#         widths on SUBSET images; its table.json ranks any seed-space supernet later (`nas-eval --table`).
#         (nas-eval needs a supernet run: a 1-epoch one is trained first; its own ranking is not the point.)
#  macro: a NAS-Bench-Macro supernet on the whole training set but the 5,000 held out, MACRO_EPOCHS epochs,
#         with the fields in MACRO_SET (e.g. "--sampling sandwich --distill"), then ranked on 300 table
#         architectures (`nas-eval --table nas-bench-macro`).
# Each job runs under its own time limit (TRUTH_LIMIT, MACRO_LIMIT seconds); logs and results come back under $OUT.
# Needs the carried .cache/gpu (cifar10_jpeg.npz, wheels/ with Optuna's; see docs/benchmarks.md).
# CPU dry run: DEVICE=cpu SUBSET=2000 SAMPLE=4 TRUTH_EPOCHS=1 MACRO_EPOCHS=1 MACRO_SUBSET=1000 WORKERS=2 TABLE_SAMPLE=5 \
#   TRUTH_LIMIT=900 MACRO_LIMIT=900 bash bench/gpu/ranking.sh
set -uo pipefail
source "$(dirname "$0")/env.sh"
NPZ=$PWD/$GPU_CACHE/work/cifar10.npz
W=$GPU_CACHE/ranking
rm -rf "$W" && mkdir -p "$W"
export NPZ W PYTHON DEVICE=${DEVICE:-cuda} SUBSET=${SUBSET:-20000} SAMPLE=${SAMPLE:-24} TRUTH_EPOCHS=${TRUTH_EPOCHS:-20} \
  WORKERS=${WORKERS:-8} MACRO_EPOCHS=${MACRO_EPOCHS:-50} MACRO_SUBSET=${MACRO_SUBSET:-0} MACRO_SET=${MACRO_SET:-} \
  TABLE_SAMPLE=${TABLE_SAMPLE:-300}

truth() {
  "$PYTHON" -m effcifar supernet train --dataset cifar10 --data-dir "$NPZ" --subset "$SUBSET" --holdout 5000 \
    --prep 16 --layer1 32 --layer2 64 --layer3 128 --epochs 1 --panel-random 0 --device "$DEVICE" --quiet \
    --out "$W/seed-supernet" &&
  "$PYTHON" -m effcifar nas-eval "$W/seed-supernet" --sample "$SAMPLE" --epochs "$TRUTH_EPOCHS" --repeats 2 \
    --workers "$WORKERS" --device "$DEVICE" --out "$W/truth"
}
macro() {
  # shellcheck disable=SC2086  # MACRO_SET is a list of options
  "$PYTHON" -m effcifar supernet train --space nas-bench-macro --dataset cifar10 --data-dir "$NPZ" \
    --subset "$MACRO_SUBSET" --holdout 5000 --epochs "$MACRO_EPOCHS" --panel-random 0 --device "$DEVICE" --quiet \
    $MACRO_SET --out "$W/macro" &&
  "$PYTHON" -m effcifar nas-eval "$W/macro" --table nas-bench-macro --sample "$TABLE_SAMPLE" --device "$DEVICE"
}
export -f truth macro
timeout "${TRUTH_LIMIT:-240}" bash -c truth > "$OUT_DIR/truth.log" 2>&1 &
timeout "${MACRO_LIMIT:-240}" bash -c macro > "$OUT_DIR/macro.log" 2>&1 &
wait
for file in truth/table.json truth/ranking.json macro/logs.tsv macro/summary.json macro/nas_eval_table/ranking.json; do
  [ -f "$W/$file" ] && cp "$W/$file" "$OUT_DIR/${file//\//_}"
done
tail -n 4 "$OUT_DIR/truth.log" "$OUT_DIR/macro.log"
ls "$OUT_DIR"
