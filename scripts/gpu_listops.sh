#!/usr/bin/env bash
# ListOps in LRA's own setting on a lent GPU (run from the repository root; python3 there
# has torch): lengths 500-2,000, LRA's generator and seed, both sequence models under one
# recipe, the same as the CPU recipe of docs/results.md ("ListOps on a CPU").
#   1. generate the files (single-threaded Python: the slow part, so it has its own limit;
#      TRAIN examples, default LRA's 96,000);
#   2. print the majority-class and root-operator baselines (what a model must beat);
#   3. train transformer_text_matched, then diffusion_text, EPOCHS epochs each, batch 32,
#      bf16 autocast, each under its own time limit.
# Results land in $OUT/listops.tgz and the epoch lines are printed.
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
TRAIN=${TRAIN:-96000}
EPOCHS=${EPOCHS:-3}
res=/tmp/listops_results
data=/tmp/listops_lra
mkdir -p "$res"
afmp="python3 -m afmp_cli"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$res/gpu.txt"

timeout 240 $afmp listops generate --out "$data" --train "$TRAIN" --val 2000 --test 2000 \
  --min-length 500 --max-length 2000 > "$res/generate.log" 2>&1
cat "$res/generate.log"
$afmp listops baselines --data-dir "$data" | tee "$res/baselines.txt"

recipe="--dataset listops --data-dir $data --epochs $EPOCHS --batch-size 32 --lr 1e-3 --warmup-epochs 0.5 --weight-decay 0.05 --device cuda"
timeout 200 $afmp train --model transformer_text_matched $recipe --out "$res/transformer" > "$res/transformer.log" 2>&1
timeout 120 $afmp train --model diffusion_text $recipe --out "$res/diffusion" > "$res/diffusion.log" 2>&1

tar czf "$OUT/listops.tgz" -C /tmp listops_results
grep -h "epoch\|best val" "$res/transformer.log" "$res/diffusion.log"
