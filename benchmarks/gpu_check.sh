#!/usr/bin/env bash
# The one script to run on a GPU machine (fits in 8 minutes on one H200):
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

step build 300 pip install --no-deps --no-build-isolation -v -e .
step info 60 python -m fastinv info
python -c "import nvidia.dali" 2>/dev/null || echo "DALI is not installed here: the DALI GPU path is not checked."

CUDA_TESTS=(tests/test_hinge_loss.py)
for f in tests/test_conditional_batch_norm.py tests/test_spectral_norm.py tests/test_train_gan.py; do
  [ -f "$f" ] && CUDA_TESTS+=("$f")
done
step cuda_tests 240 python -m pytest -q -x -k "cuda" "${CUDA_TESTS[@]}"

BENCHES=()
for f in benchmarks/bench_hinge.py benchmarks/bench_cbn.py benchmarks/bench_spectral_norm.py; do
  [ -f "$f" ] && BENCHES+=("$f")
done
step kernel_bench 300 python -m pytest -q -k "cuda" "${BENCHES[@]}" \
  --benchmark-json="$OUT/bench.json" --benchmark-columns=median

if [ -f benchmarks/bench_train.py ]; then
  step train_bench 180 python -m pytest -q -k "cuda" benchmarks/bench_train.py
fi

echo
echo "=== kernel comparison (copy bandwidth measured in the same run) ==="
sed -n '/fastinv comparison/,/^---/p' "$OUT/kernel_bench.log" | head -n -1
echo
echo "=== summary ($(cat "$OUT/gpu.txt" | tail -1), commit $(cat "$OUT/commit.txt" 2>/dev/null)) ==="
printf '%s\n' "${SUMMARY[@]}"
