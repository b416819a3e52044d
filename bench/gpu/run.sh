#!/usr/bin/env bash
# One run on a GPU machine: our airbench recipe, its variants and the public airbench94 (airbench==0.1.8), x5 each,
# interleaved, and our resnet9 24-epoch recipe x5 on the same decoded CIFAR-10; prints a table (docs/benchmarks.md).
# Reads only files copied beforehand into the ignored folder .cache/gpu/ (GPU_CACHE):
#   cifar10_jpeg.npz        a copy of ../shared/data/cifar10_jpeg.npz (decoded here, with Pillow)
#   airbench-0.1.8.tar.gz   pip download --no-deps --no-binary=:all: airbench==0.1.8 (unpacked, imported from there)
#   wheels/*.whl            optional: packages the GPU machine lacks (installed with --no-index)
# CALL_LIMIT_S=N stops the comparison in time to return its log. PROFILE=1 first profiles one run of each recipe
# (tables in $OUT_DIR/profile). SMOKE=1 first runs bench/gpu/smoke.sh (every command at tiny settings on CUDA, SMOKE_DEVICE=cpu here).
# CPU dry run of the pieces that need no CUDA: bash bench/gpu/run.sh --device cpu --tiny
set -euo pipefail
source "$(dirname "$0")/env.sh"
if [ "${SMOKE:-0}" = 1 ]; then  # the CUDA smoke of every command first (bench/gpu/smoke.sh), on the same data
  OUT=$OUT_DIR bash bench/gpu/smoke.sh "$GPU_CACHE/work/cifar10.npz" "${SMOKE_DEVICE:-cuda}"
fi
if [ "${PROFILE:-0}" = 1 ]; then  # one profiled run of each recipe first (bench/gpu/profile_recipes.py): $OUT_DIR/profile
  # at most PROFILE_LIMIT_S (4 minutes), so that the comparison still runs if it stalls
  timeout "${PROFILE_LIMIT_S:-240}" "$PYTHON" bench/gpu/profile_recipes.py --pack "$GPU_CACHE/cifar10_jpeg.npz" --reference "$GPU_CACHE/airbench-0.1.8.tar.gz" \
    --work "$GPU_CACHE/work" --out "$OUT_DIR/profile" "$@" 2>&1 | tee "$OUT_DIR/profile.txt" || true
fi
# CALL_LIMIT_S: the time limit of the whole run; the comparison is stopped 15 s before it, so the log comes back.
LIMIT=()
[ "${CALL_LIMIT_S:-0}" -gt 0 ] && LIMIT=(timeout $((CALL_LIMIT_S - SECONDS - 15)))
status=0
"${LIMIT[@]}" "$PYTHON" bench/gpu/compare.py --pack "$GPU_CACHE/cifar10_jpeg.npz" --reference "$GPU_CACHE/airbench-0.1.8.tar.gz" \
  --work "$GPU_CACHE/work" --out "$GPU_CACHE/runs" "$@" 2>&1 | tee "$OUT_DIR/log.txt" || status=$?
cp "$GPU_CACHE/runs/table.json" "$OUT_DIR/table.json" 2>/dev/null || true  # the rows so far when stopped
exit "$status"
