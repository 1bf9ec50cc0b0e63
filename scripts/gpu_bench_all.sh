#!/usr/bin/env bash
# The session's GPU measurements in one go (a lent machine; python3 there has torch):
#   afmp bench on AFMP-Small against DeiT-Tiny (eager and compiled, bf16, batch 64, training step),
#   the sequence models' scaling, and the results packed into $OUT/results.tgz.
# Each part has its own time limit, so a slow one cannot take the others with it.
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
res=/tmp/gpu_results
mkdir -p "$res"
bench="python3 -m afmp.cli bench --device cuda --batch-size 64 --dtype bfloat16 --warmup 2 --repeats 5"  # timeout needs a command, not a function
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$res/gpu.txt"

timeout 100 $bench --models afmp_small,deit_tiny_sdpa,deit_tiny_unfused \
  --resolutions 64,224,448,896,1280 --out "$res/eager" > "$res/eager.log" 2>&1
for r in 224 896 1280 448 64; do
  timeout 95 $bench --models afmp_small@compile=true,deit_tiny_sdpa@compile=true \
    --resolutions $r --out "$res/compiled_$r" > "$res/compiled_$r.log" 2>&1
done
[ "${SKIP_TEXT:-0}" = 1 ] || timeout 70 python3 -m afmp.cli bench --device cuda --models diffusion_text,transformer_text_matched \
  --seq-lengths 512,1024,4096,16384 --batch-size 16 --dtype bfloat16 --warmup 2 --repeats 5 \
  --out "$res/text" > "$res/text.log" 2>&1

tar czf "$OUT/results.tgz" -C /tmp gpu_results
for f in "$res"/*/scaling.csv; do echo "== $f"; cut -d, -f1,2,3,9,11,12,13,14,18,20,22,23 "$f"; done
tail -n 3 "$res"/*.log
