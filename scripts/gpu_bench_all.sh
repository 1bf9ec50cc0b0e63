#!/usr/bin/env bash
# One lent GPU session's measurements, in one go (python3 there has torch; run from the
# repository root; results land in $OUT/results.tgz and are printed):
#   1. the edge kernels' tests on the GPU, their launch knobs, and AFMP's edge stage alone per
#      backend against the measured copy bandwidth (scripts/gpu_edge_check.py);
#   2. which backend `auto` should pick on CUDA: AFMP-Small's training step per backend, eager
#      and compiled, at 224 and 896 (batch 64, bf16 autocast);
#   3. the targets: AFMP-Small (auto backend) against DeiT-Tiny (SDPA), both compiled, training
#      step, batch 64, bf16, at 224, 896, 1280 and 2048 (16,384 tokens; a model out of
#      memory is a row with oom true).
# Every part has its own time limit, so a slow one cannot take the others with it; the
# whole script stays under about 9 minutes.
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
res=/tmp/gpu_results
mkdir -p "$res"
bench="python3 -m afmp_cli bench --device cuda --batch-size 64 --dtype bfloat16 --warmup 2 --repeats 5"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$res/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$res/gpu.txt"

# 1. kernels: tests, knobs, the stage alone (its own budget logic; hard stop at 200 s)
timeout 200 python3 scripts/gpu_edge_check.py --out "$res/edge" --budget-s 190 > "$res/edge.log" 2>&1

# 2. the backend auto should pick: every backend, eager and compiled (one process per size)
for r in 224 896; do
  models=""
  for be in reference stencil triton; do models="$models,afmp_small@backend=$be,afmp_small@backend=$be@compile=true"; done
  timeout 110 $bench --models "${models#,}" --resolutions $r --out "$res/backends_$r" > "$res/backends_$r.log" 2>&1
done

# 3. the targets, compiled, one process per size (a fresh compile cache each)
for r in 224 896 1280 2048; do
  timeout 55 $bench --models afmp_small@compile=true,deit_tiny_sdpa@compile=true \
    --resolutions $r --out "$res/compiled_$r" > "$res/compiled_$r.log" 2>&1
done

tar czf "$OUT/results.tgz" -C /tmp gpu_results
tail -n 40 "$res/edge.log"
for f in "$res"/*/scaling.csv; do echo "== $f"; cut -d, -f1,2,3,9,11,12,13,14,18,20,22,23 "$f"; done
tail -n 3 "$res"/*.log
