#!/usr/bin/env bash
# The one script to run on a GPU machine (each step has a time limit; all of them together
# stay under 8.5 minutes on one H200; FULL=1 adds the slower training/data benchmarks):
#   build fastinv._C there -> CUDA tests -> kernel benchmarks -> a short training run,
# then prints a summary table last. Results (logs, benchmark JSON) go to $OUT (default
# /tmp/gpu_check). The GPU image may have another torch (2.11) and no DALI/no registry:
# we install with --no-deps and say so when DALI is missing.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export FASTINV_BENCH_ROUNDS=${FASTINV_BENCH_ROUNDS:-20}
declare -a SUMMARY

step() {  # step NAME TIMEOUT_S CMD...
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  echo "=== $name ==="
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 40 "$OUT/$name.log"
  SUMMARY+=("$(printf '%-22s rc=%-4s %4ss' "$name" "$rc" "$(( $(date +%s) - t0 ))")")
  return 0
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
git rev-parse --short HEAD > "$OUT/commit.txt" 2>/dev/null || true

step build 180 pip install --no-deps --no-build-isolation -v -e .
step info 20 python -m fastinv info
python -c "import nvidia.dali" 2>/dev/null || echo "DALI is not installed here: the DALI GPU path is not checked (its tests skip)."

# CUDA versions of the op, model and trainer tests (each op file carries them; they skip on CPU).
step cuda_tests 100 python -m pytest -q -x -k "cuda" \
  tests/test_hinge_loss.py tests/test_conditional_batch_norm.py tests/test_spectral_norm.py \
  tests/test_spectral_norm_modules.py tests/test_train_gan.py tests/test_data_loader.py

# Kernel benchmarks: reference-eager vs torch.compile vs fastinv, GB/s and % of copy bandwidth.
step kernel_bench 150 python -m pytest -q -k "cuda" \
  benchmarks/bench_hinge.py benchmarks/bench_cbn.py benchmarks/bench_spectral_norm.py \
  --benchmark-json="$OUT/bench.json" --benchmark-columns=median

# A short training run at BigGAN-128 sizes (random-init ResNet-50 classifier, synthetic data).
step train_run 60 python -m fastinv train imagenet-128 --classifier.random_init=true \
  --data.synthetic_n=2048 --data.batch_size=64 --run.steps=30 --optim.ema_start=10 \
  --run.log_every=10 --run.image_every=30 --run.ckpt_every=30 --run.progress=false \
  --run.out_dir="$OUT/train_128"

# Training throughput (images/s) per implementation; slow to compile, so opt-in.
if [ "${FULL:-0}" = 1 ]; then
  step train_bench 300 python benchmarks/bench_train.py --device cuda --steps 10 --warmup 3 \
    --impls reference-eager,torch-eager,fastinv,torch.compile
  step data_bench 180 python benchmarks/bench_data.py --device cuda --backends pil,dali --n 256 --workers 8 --epochs 1
fi

echo
echo "=== kernel comparison (copy bandwidth measured in the same run) ==="
sed -n '/fastinv comparison/,/^---/p' "$OUT/kernel_bench.log" | head -n -1
echo
echo "=== summary ($(cat "$OUT/gpu.txt" | tail -1), commit $(cat "$OUT/commit.txt" 2>/dev/null)) ==="
printf '%s\n' "${SUMMARY[@]}"
