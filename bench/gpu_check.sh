#!/usr/bin/env bash
# One-shot check of the CUDA kernels on a machine with an NVIDIA GPU (written for a lent H200:
# torch 2.11, Python 3.12, nvcc 13): builds ncfast._C in place for sm_90, runs the native tests
# (CUDA cases included) and the kernel benchmark on the GPU, and leaves every log and the JSON
# under $OUT (default bench/results/gpu). Finishes within ~8 minutes (each step has a deadline).
#
#   bash bench/gpu_check.sh                  # from anywhere; OUT=/some/dir to choose the output
#
# Files written (at most 8, flat): env.txt, build.log, tests.log, bench.log, kernels_cuda.json,
# gram_schemes.log, summary.txt.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
OUT="${OUT:-$ROOT/bench/results/gpu}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
DEADLINE=$((SECONDS + ${GPU_CHECK_SECONDS:-470}))
status=0

remaining() {  # seconds left for a step: min(cap, time to the deadline)
  local left=$((DEADLINE - SECONDS))
  ((left > $1)) && left=$1
  ((left < 1)) && left=1
  echo "$left"
}
note() { echo "[gpu_check $(date +%H:%M:%S) +${SECONDS}s] $*" | tee -a "$OUT/summary.txt"; }

: >"$OUT/summary.txt"
note "repository $ROOT, output $OUT"
{
  nvidia-smi || echo "nvidia-smi failed"
  command -v nvcc && nvcc --version
  "$PY" -c 'import sys, torch; print("python", sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available()); print(torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")'
} >"$OUT/env.txt" 2>&1
grep -E "^(torch|python)|H[0-9]+|A[0-9]+" "$OUT/env.txt" | head -5 | tee -a "$OUT/summary.txt"

# 1. Build in place for sm_90 only (the default list adds sm_80 and PTX: slower to build).
note "building ncfast._C (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0})"
rm -rf build ncfast/_C.*.so
if TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" FORCE_CUDA=1 NCFAST_REQUIRE_EXTENSION=1 \
  MAX_JOBS="${MAX_JOBS:-$(nproc)}" timeout "$(remaining 240)" \
  "$PY" setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
  note "build ok"
else
  note "BUILD FAILED (tail of build.log follows)"
  tail -40 "$OUT/build.log"
  exit 1
fi
"$PY" -m ncfast info 2>&1 | tee -a "$OUT/env.txt" | tee -a "$OUT/summary.txt"

# 2. Tests: the native ops on CPU and CUDA (CUDA cases must run, not skip) and the kernel
# emulation.
note "tests"
if NCFAST_REQUIRE_EXTENSION=1 timeout "$(remaining 150)" "$PY" -m pytest -q -rs \
  -p no:cacheprovider tests/test_native.py tests/test_native_cuda_emulation.py \
  >"$OUT/tests.log" 2>&1; then
  note "tests passed: $(tail -1 "$OUT/tests.log")"
else
  status=1
  note "TESTS FAILED: $(tail -1 "$OUT/tests.log")"
  grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -20 | tee -a "$OUT/summary.txt"
fi
if grep -q "SKIPPED.*CUDA" "$OUT/tests.log"; then
  status=1
  note "CUDA TESTS WERE SKIPPED:"
  grep "SKIPPED" "$OUT/tests.log" | head -5 | tee -a "$OUT/summary.txt"
fi

# 3. The kernel benchmark on the GPU (the issue's grid), then the two Gram schemes at the
# acceptance size B=65536, P=512 (the default picks panels there).
note "benchmark"
if timeout "$(remaining 200)" "$PY" bench/bench_kernels.py --device cuda \
  --out "$OUT/kernels_cuda.json" >"$OUT/bench.log" 2>&1; then
  note "benchmark ok"
else
  status=1
  note "BENCHMARK FAILED OR TIMED OUT (partial log in bench.log)"
fi
for scheme in full panels; do
  NCFAST_GRAM=$scheme timeout "$(remaining 40)" "$PY" bench/bench_kernels.py --device cuda \
    --case 65536,512,10,float32 --case 1024,512,10,float32 \
    --out "/tmp/ncfast_gram_$scheme.json" >>"$OUT/gram_schemes.log" 2>&1 ||
    note "gram scheme $scheme run failed"
  echo "(NCFAST_GRAM=$scheme)" >>"$OUT/gram_schemes.log"
done

cat "$OUT/bench.log"
echo
cat "$OUT/gram_schemes.log"
note "done (status $status) in ${SECONDS}s"
exit $status
