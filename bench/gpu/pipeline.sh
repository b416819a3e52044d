#!/usr/bin/env bash
# The series at GPU scale: `effcifar pipeline --preset gpu` on the decoded CIFAR-10 (all 50,000 training images),
# timed by bench/pipeline.py: each stage's seconds and result, and the final table, in $OUT_DIR/pipeline.md; the
# run's settings, results.json and report (without its model files) in $OUT_DIR/pipeline/. Reads .cache/gpu/ as bench/gpu/run.sh does (cifar10_jpeg.npz, wheels).
# CALL_LIMIT_S=N stops the pipeline in time to return what it wrote (a stopped run still tabulates its finished stages).
# CPU dry run (synthetic data, the tests' tiny settings over the preset): TINY=1 bash bench/gpu/pipeline.sh
set -euo pipefail
source "$(dirname "$0")/env.sh"
RUN=$GPU_CACHE/pipeline-gpu
rm -rf "$RUN" "$RUN.log"
if [ "${TINY:-0}" = 1 ]; then
  ARGS=(--dataset synthetic --config tests/data/pipeline_tiny.yaml --set device=cpu)
else
  ARGS=(--dataset cifar10 --set "data_dir=$GPU_CACHE/work/cifar10.npz")
fi
LIMIT=()
[ "${CALL_LIMIT_S:-0}" -gt 0 ] && LIMIT=(timeout $((CALL_LIMIT_S - SECONDS - 15)))
status=0
"${LIMIT[@]}" "$PYTHON" bench/pipeline.py --preset gpu "${ARGS[@]}" --out "$RUN" >"$OUT_DIR/pipeline.md" 2>&1 || status=$?
if [ "$status" != 0 ]; then  # stopped or failed: the stages that finished, and the log's end
  echo "the pipeline stopped (exit $status, 124: CALL_LIMIT_S) after $SECONDS s; its stages so far:" >>"$OUT_DIR/pipeline.md"
  "$PYTHON" bench/pipeline.py --table-only --out "$RUN" >>"$OUT_DIR/pipeline.md" 2>&1 || true
fi
cat "$OUT_DIR/pipeline.md"
tail -n 40 "$RUN.log" >"$OUT_DIR/pipeline-log.txt" 2>/dev/null || true
mkdir -p "$OUT_DIR/pipeline"
for f in pipeline.yaml results.json report; do
  if [ -e "$RUN/$f" ]; then cp -r "$RUN/$f" "$OUT_DIR/pipeline/"; fi
done
exit "$status"
