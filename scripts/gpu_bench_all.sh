#!/usr/bin/env bash
# One lent GPU session's measurements, in one go, inside one `run` call of at most 600 s
# (python3 there has torch; run from the repository root; results land in
# $OUT/results.tgz and are printed). In order of what matters, each part with its own time
# limit, and every part after the first cut to what is left of DEADLINE_S (default 570 s):
#   0. correctness first: every edge backend against the reference on the device, float32 and
#      bfloat16, forward and every gradient, at 1x13, 7x9 and 64x64, the stage and then each
#      backend's whole layer (scripts/gpu_backend_check.py; the stage alone took about 70 s on
#      an H200, the layers are new: 240 s allowed). A backend that differs is named and left out of every timing:
#      nothing is timed that computes something else;
#   1. the targets: AFMP-Small (auto backend) against DeiT-Tiny (SDPA), both compiled, training
#      step, batch 64, bf16, at 224, 64 and 1280 (issue 24's targets: at most 0.5x, 0.6x and
#      0.25x DeiT's time; a model out of memory is a row with oom true);
#   2. what `--compile auto` should take on CUDA: the whole training step (AdamW included) at
#      the mnist5k grid and AFMP-Small at 64², eager, compiled and as CUDA graphs
#      (scripts/gpu_train_modes.py);
#   3. which backend `auto` should pick on CUDA: AFMP-Small's training step per backend, eager,
#      at 224 (batch 64, bf16 autocast).
# On 2026-12-04 an H200 lease showed what preparing costs: four eager backends at 224 did not
# finish in 45 s, nor a compiled stencil AFMP-Small in 60 s, while a compiled reference
# AFMP-Small did (docs/results.md, "Backends checked on a GPU"); the bench now logs each
# model's building, counting and compiling time. The edge kernels' own checks
# (scripts/gpu_edge_check.py, about 6 minutes) need a lease of their own.
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
deadline=${DEADLINE_S:-570}
res=/tmp/gpu_results
mkdir -p "$res"
bench="python3 -m afmp_cli bench --device cuda --batch-size 64 --dtype bfloat16 --warmup 2 --repeats 5"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$res/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$res/gpu.txt"
git rev-parse --short HEAD 2>/dev/null | tee -a "$res/gpu.txt"

# at most $1 seconds, and never past the deadline (with 10 s left to pack the results)
limit() { local left=$((deadline - SECONDS - 10)); echo $(( left < $1 ? (left > 0 ? left : 1) : $1 )); }

# 0. correctness of every backend on the device
timeout 240 python3 scripts/gpu_backend_check.py --device cuda > "$res/backend_check.log" 2>&1
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

# 1. the targets, compiled, one process per size (a fresh compile cache each)
for r in 224 64 1280; do
  timeout "$(limit 150)" $bench --models $afmp_target@compile=true,deit_tiny_sdpa@compile=true \
    --resolutions $r --out "$res/compiled_$r" > "$res/compiled_$r.log" 2>&1
done

# 2. the compile modes of the training step
timeout "$(limit 200)" python3 scripts/gpu_train_modes.py --device cuda --shapes tiny-7x7-mnist5k,small-64px \
  > "$res/train_modes.log" 2>&1

# 3. the backend auto should pick: every backend that agreed, eager, one process
models=""
for be in reference gather stencil triton; do
  differs $be || models="$models,afmp_small@backend=$be"
done
timeout "$(limit 150)" $bench --models "${models#,}" --resolutions 224 --out "$res/eager_224" \
  > "$res/eager_224.log" 2>&1

tar czf "$OUT/results.tgz" -C /tmp gpu_results
for f in "$res"/*/scaling.csv; do echo "== $f"; cut -d, -f1,2,3,9,11,12,13,14,18,20,22,23 "$f"; done
cat "$res/train_modes.log"
tail -n 6 "$res"/*.log
