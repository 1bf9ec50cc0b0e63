#!/usr/bin/env bash
# One lent GPU session's measurements, in one go (python3 there has torch; run from the
# repository root; results land in $OUT/results.tgz and are printed):
#   0. correctness first: every edge backend against the reference on the device, float32 and
#      bfloat16, forward and every gradient, at 1x13, 7x9 and 64x64 (scripts/gpu_backend_check.py);
#      the script stops there if one differs: nothing is timed that computes something else;
#   1. the edge kernels' tests on the GPU, their launch knobs, and AFMP's edge stage alone per
#      backend against the measured copy bandwidth (scripts/gpu_edge_check.py);
#   2. which backend `auto` should pick on CUDA: AFMP-Small's training step per backend, eager
#      and compiled, at 224 and 896 (batch 64, bf16 autocast);
#   3. the targets: AFMP-Small (auto backend) against DeiT-Tiny (SDPA), both compiled, training
#      step, batch 64, bf16, at 64, 224 and 1280 (issue 24's targets: at most 0.6x, 0.5x and
#      0.25x DeiT's time; a model out of memory is a row with oom true).
# Every part has its own time limit, so a slow one cannot take the others with it; the
# whole script stays under about 9.5 minutes (120 + 150 + 2 x 90 + 3 x 45 s at most).
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
res=/tmp/gpu_results
mkdir -p "$res"
bench="python3 -m afmp_cli bench --device cuda --batch-size 64 --dtype bfloat16 --warmup 2 --repeats 5"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$res/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$res/gpu.txt"

# 0. correctness of every backend on the device; a backend that differs stops the run
timeout 120 python3 scripts/gpu_backend_check.py --device cuda > "$res/backend_check.log" 2>&1
status=$?
cat "$res/backend_check.log"
if [ "$status" -ne 0 ]; then
  echo "gpu_backend_check failed: a backend differs from the reference on this GPU (see above); nothing timed"
  tar czf "$OUT/results.tgz" -C /tmp gpu_results
  exit 1
fi

# 1. kernels: tests, knobs, the stage alone (its own budget logic; hard stop at 150 s)
timeout 150 python3 scripts/gpu_edge_check.py --out "$res/edge" --budget-s 140 > "$res/edge.log" 2>&1

# 2. the backend auto should pick: every backend, eager and compiled (one process per size)
for r in 224 896; do
  models=""
  for be in reference gather stencil triton; do models="$models,afmp_small@backend=$be,afmp_small@backend=$be@compile=true"; done
  timeout 90 $bench --models "${models#,}" --resolutions $r --out "$res/backends_$r" > "$res/backends_$r.log" 2>&1
done

# 3. the targets, compiled, one process per size (a fresh compile cache each)
for r in 64 224 1280; do
  timeout 45 $bench --models afmp_small@compile=true,deit_tiny_sdpa@compile=true \
    --resolutions $r --out "$res/compiled_$r" > "$res/compiled_$r.log" 2>&1
done

tar czf "$OUT/results.tgz" -C /tmp gpu_results
tail -n 40 "$res/edge.log"
for f in "$res"/*/scaling.csv; do echo "== $f"; cut -d, -f1,2,3,9,11,12,13,14,18,20,22,23 "$f"; done
tail -n 3 "$res"/*.log
