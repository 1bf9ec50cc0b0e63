#!/usr/bin/env bash
# One lent GPU session's measurements, in one go (python3 there has torch; run from the
# repository root; results land in $OUT/results.tgz and are printed):
#   0. correctness first: every edge backend against the reference on the device, float32 and
#      bfloat16, forward and every gradient, at 1x13, 7x9 and 64x64 (scripts/gpu_backend_check.py);
#      a backend that differs is named and left out of every timing: nothing is timed that computes something else;
#   1. the edge kernels' tests on the GPU, their launch knobs, and AFMP's edge stage alone per
#      backend against the measured copy bandwidth (scripts/gpu_edge_check.py);
#   2. which backend `auto` should pick on CUDA: AFMP-Small's training step per backend, eager
#      at 224 and 896, and the candidates compiled at 224 (batch 64, bf16 autocast);
#   3. the targets: AFMP-Small (auto backend) against DeiT-Tiny (SDPA), both compiled, training
#      step, batch 64, bf16, at 64, 224 and 1280 (issue 24's targets: at most 0.6x, 0.5x and
#      0.25x DeiT's time; a model out of memory is a row with oom true).
# Every part has its own time limit, so a slow one cannot take the others with it; the
# whole script stays under about 9.5 minutes (120 + 100 + 2 x 45 + 2 x 60 + 3 x 45 s at most).
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
res=/tmp/gpu_results
mkdir -p "$res"
bench="python3 -m afmp_cli bench --device cuda --batch-size 64 --dtype bfloat16 --warmup 2 --repeats 5"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$res/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$res/gpu.txt"

# 0. correctness of every backend on the device. A backend that differs is named and left
#    out of every timing below (a lease is one shot: the others are still worth timing)
timeout 120 python3 scripts/gpu_backend_check.py --device cuda > "$res/backend_check.log" 2>&1
status=$?
cat "$res/backend_check.log"
failed=$(grep -o "backend '[a-z_]*' differs" "$res/backend_check.log" | cut -d"'" -f2 | sort -u | tr '\n' ' ')
if [ "$status" -ne 0 ] && [ -z "$failed" ]; then
  echo "gpu_backend_check did not finish (exit $status, see above); nothing timed"
  tar czf "$OUT/results.tgz" -C /tmp gpu_results
  exit 1
fi
[ -n "$failed" ] && echo "left out of every timing, they differ from the reference: $failed"
differs() { case " $failed " in *" $1 "*) return 0 ;; esac; return 1; }
# auto on CUDA takes the stencil; where it differs, the targets are timed on the reference
afmp_target=afmp_small
differs stencil && afmp_target=afmp_small@backend=reference

# 1. kernels: tests, knobs, the stage alone (its own budget logic; hard stop at 100 s)
timeout 100 python3 scripts/gpu_edge_check.py --out "$res/edge" --budget-s 90 > "$res/edge.log" 2>&1

# 2. the backend auto should pick: every backend eager (one process per size), then the
#    candidates compiled, one process each (a compile cut off by its limit loses only itself)
for r in 224 896; do
  models=""
  for be in reference gather stencil triton; do
    differs $be || models="$models,afmp_small@backend=$be"
  done
  timeout 45 $bench --models "${models#,}" --resolutions $r --out "$res/eager_$r" > "$res/eager_$r.log" 2>&1
done
for be in stencil reference; do
  differs $be && continue
  timeout 60 $bench --models afmp_small@backend=$be@compile=true --resolutions 224 \
    --out "$res/compiled_${be}_224" > "$res/compiled_${be}_224.log" 2>&1
done

# 3. the targets, compiled, one process per size (a fresh compile cache each)
for r in 64 224 1280; do
  timeout 45 $bench --models $afmp_target@compile=true,deit_tiny_sdpa@compile=true \
    --resolutions $r --out "$res/compiled_$r" > "$res/compiled_$r.log" 2>&1
done

tar czf "$OUT/results.tgz" -C /tmp gpu_results
tail -n 40 "$res/edge.log"
for f in "$res"/*/scaling.csv; do echo "== $f"; cut -d, -f1,2,3,9,11,12,13,14,18,20,22,23 "$f"; done
tail -n 3 "$res"/*.log
