#!/usr/bin/env bash
# One run on a GPU machine for architecture ranking (docs/research/): three jobs at once on the one GPU.
#  truth:    the seed space's ground truth — SAMPLE subnets stratified over FLOPs, each trained standalone with
#            2 seeds for TRUTH_EPOCHS epochs (`nas-eval --repeats 2 --workers WORKERS`) at the quick preset's
#            widths on SUBSET images; its table.json ranks any seed-space supernet later (`nas-eval --table`).
#            (nas-eval needs a supernet run: a 1-epoch one is trained first; its own ranking is not the point.)
#            Beside it, a default (sandwich) supernet per SEED_EPOCHS entry on the same split, each then ranked
#            against that truth (`nas-eval --table truth/table.json --sample 0`).
#  ablation: bench/nas_bench_macro.py for each variant in ABLATION (NAME:FIELD=VALUE,...) in LANES parallel
#            lanes, all at one small equal budget (10,000 images, 10 epochs, LR 0.025, batch 128; ABLATION_SET
#            adds options), each ranked on the same 100 table architectures by loss. A multi-path step averages
#            its K paths' gradients; the variants of K paths that were measured when they were summed (K x the
#            step) keep that update with LR x K and weight decay / K (fair K=3, sandwich K=4). The 2026-11 ablation's
#            canonical-paths, distillation, batch-statistics and few-shot variants need a commit before 2026-12-07
#            (those switches were removed from the product; docs/research/README.md).
#  macro:    bench/nas_bench_macro.py for each variant in MACRO, one lane each: a NAS-Bench-Macro supernet on the
#            whole training set but the 2,000 held out, MACRO_EPOCHS epochs (MACRO_SET adds options), ranked on
#            TABLE_SAMPLE table architectures by loss, then searched under the table's 30 M and 50 M FLOPs (regret,
#            3 evolution seeds) — the larger-budget measurement of the chosen recipe.
# JOBS picks the jobs (default all three); SMOKE=1 first starts bench/gpu/smoke.sh beside them.
# Each job runs under LIMIT seconds; everything written is packed into $OUT/ranking.tar.gz (and summary.txt).
# Needs .cache/gpu copied beforehand (cifar10_jpeg.npz, wheels/ with Optuna's; see bench/gpu/README.md).
# CPU dry run: DEVICE=cpu SUBSET=2000 SAMPLE=4 TRUTH_EPOCHS=1 WORKERS=2 SEED_EPOCHS=1 MACRO_EPOCHS=1 MACRO_SUBSET=1000
#   TABLE_SAMPLE=5 ABLATION_SET="--set subset=1000 --set epochs=2 --sample 5" LIMIT=1500 bash bench/research/gpu_ranking.sh
set -uo pipefail
for job in ${JOBS:-}; do  # a misspelt job is a usage error before anything is decoded or removed
  case $job in truth | ablation | macro) ;; *) echo "gpu_ranking.sh: JOBS: unknown job '$job' (expected truth, ablation or macro)" >&2; exit 2 ;; esac
done
source "$(dirname "$0")/../gpu/env.sh"
NPZ=$PWD/$GPU_CACHE/work/cifar10.npz
W=$GPU_CACHE/ranking
rm -rf "$W" && mkdir -p "$W"
export NPZ W PYTHON DEVICE=${DEVICE:-cuda} SUBSET=${SUBSET:-20000} SAMPLE=${SAMPLE:-24} TRUTH_EPOCHS=${TRUTH_EPOCHS:-20} \
  WORKERS=${WORKERS:-4} SEED_EPOCHS=${SEED_EPOCHS:-30} MACRO_EPOCHS=${MACRO_EPOCHS:-50} MACRO_SUBSET=${MACRO_SUBSET:-0} MACRO_SET=${MACRO_SET:-} \
  TABLE_SAMPLE=${TABLE_SAMPLE:-300} ABLATION_SET=${ABLATION_SET:-} LANES=${LANES:-5} \
  MACRO=${MACRO:-"sandwich:sampling=sandwich,peak_lr=0.1,base_wd=0.000125"} \
  ABLATION=${ABLATION:-"uniform:sampling=uniform uniform-lr0125:sampling=uniform,peak_lr=0.0125
    fair:sampling=fair,peak_lr=0.075,base_wd=0.00016667 sandwich:sampling=sandwich,peak_lr=0.1,base_wd=0.000125
    wd1e-4:sampling=uniform,base_wd=0.0001"}

truth() {
  local seed_run=(--dataset cifar10 --data-dir "$NPZ" --subset "$SUBSET" --holdout 5000 --prep 16 --layer1 32 --layer2 64
    --layer3 128 --panel-random 0 --device "$DEVICE" --quiet) epochs
  { "$PYTHON" -m effcifar supernet train "${seed_run[@]}" --epochs 1 --out "$W/seed-supernet" &&
    "$PYTHON" -m effcifar nas-eval "$W/seed-supernet" --sample "$SAMPLE" --epochs "$TRUTH_EPOCHS" --repeats 2 \
      --workers "$WORKERS" --device "$DEVICE" --out "$W/truth"; } &
  for epochs in $SEED_EPOCHS; do
    "$PYTHON" -m effcifar supernet train "${seed_run[@]}" --epochs "$epochs" --out "$W/seed-sandwich-$epochs" &
  done
  wait
  for epochs in $SEED_EPOCHS; do
    "$PYTHON" -m effcifar nas-eval "$W/seed-sandwich-$epochs" --table "$W/truth/table.json" --sample 0 --device "$DEVICE"
  done
}
macro() {  # each variant in its own lane
  local variant
  for variant in $MACRO; do
    # shellcheck disable=SC2086  # MACRO_SET is a list of options
    EFFCIFAR_DATA=$NPZ "$PYTHON" bench/nas_bench_macro.py --out "$W/macro/${variant%%:*}" --variant "$variant" \
      --sample "$TABLE_SAMPLE" --eval-images 1000 --set subset="$MACRO_SUBSET" --set epochs="$MACRO_EPOCHS" \
      --set device="$DEVICE" $MACRO_SET --regret --seeds 3 --evaluations 100 --population 20 \
      > "$W/macro-${variant%%:*}.log" 2>&1 &
  done
  wait
}
ablation() {  # the variants in LANES parallel lanes, each lane's variants one after another
  local variants=($ABLATION) lane
  for ((lane = 0; lane < LANES; lane++)); do
    for ((i = lane; i < ${#variants[@]}; i += LANES)); do
      variant=${variants[i]}
      # shellcheck disable=SC2086  # ABLATION_SET is a list of options
      EFFCIFAR_DATA=$NPZ "$PYTHON" bench/nas_bench_macro.py --out "$W/ablation/${variant%%:*}" --variant "$variant" \
        --sample 100 --eval-images 1000 --set batch_size=128 --set epochs=10 --set warmup_epochs=1 \
        --set peak_lr=0.025 --set device="$DEVICE" $ABLATION_SET > "$W/ablation-${variant%%:*}.log" 2>&1
    done &
  done
  wait
}
export -f truth macro ablation
if [ "${SMOKE:-0}" = 1 ]; then  # the CUDA smoke of every command (bench/gpu/smoke.sh), beside the jobs
  OUT=$OUT_DIR bash bench/gpu/smoke.sh "$NPZ" "$DEVICE" > "$W/smoke.log" 2>&1 &
fi
for job in ${JOBS:-truth ablation macro}; do
  timeout "${LIMIT:-270}" bash -c $job > "$W/$job.log" 2>&1 &
done
wait
# Two files come back (the device returns at most 8): every result and log in one tarball, and the logs' tails.
tar czf "$OUT_DIR/ranking.tar.gz" -C "$W" --exclude='*.pt' --exclude='*.npz' --exclude='*/checkpoints' .
tail -n 3 "$W"/*.log | tee "$OUT_DIR/summary.txt"
