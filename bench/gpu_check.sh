#!/usr/bin/env bash
# The one script a machine with an NVIDIA GPU runs first (written for a lent H200: torch 2.11,
# Python 3.12, nvcc 13, no network; everything it needs is in this repository). It builds
# ncfast._C in place for sm_90, runs the native tests with their CUDA cases (which must run,
# not skip), compute-sanitizer's memcheck, racecheck and synccheck over bench/sanitize_ops.py,
# the kernel benchmark, bench/bench_scale.py at C=32000, P=4096, and bench/train_overhead.py
# (10 epochs of an SVHN-shaped VGG13 with and without measurement) and bench/online_overhead.py
# (the training step with and without --online-every's measurement). Each step has a time cap;
# the caps add up to less than 12 minutes, and the whole run stops at --budget seconds.
#
#   bash bench/gpu_check.sh                   # every step; results under $OUT
#   bash bench/gpu_check.sh --dry-run         # list the steps, their caps and commands; run nothing
#   bash bench/gpu_check.sh --steps build,tests,memcheck   # a subset, in the order below
#   bash bench/gpu_check.sh --budget 570      # stop starting steps after 570 s (one 600 s call)
#
# OUT defaults to bench/results/gpu. It receives at most 10 files, flat: summary.txt (a line
# per step and a verdict per sanitizer tool), env_build.log, tests.log, sanitizer.log,
# bench.log, kernels_cuda.json, scale_cuda.json, train_overhead_<gpu>_fp32.json,
# online_overhead_cuda.{json,txt}.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
PY="${PYTHON:-python3}"

STEPS=(env build tests memcheck racecheck synccheck kernels scale train online)
declare -A CAP=(
  [env]=10 [build]=140 [tests]=120 [memcheck]=60 [racecheck]=40 [synccheck]=35
  [kernels]=90 [scale]=60 [train]=125 [online]=40
)
declare -A WHAT=(
  [env]="nvidia-smi, nvcc, python and torch versions -> env_build.log"
  [build]="TORCH_CUDA_ARCH_LIST=9.0 FORCE_CUDA=1 NCFAST_REQUIRE_EXTENSION=1 $PY setup.py build_ext --inplace; ncfast info"
  [tests]="pytest tests/test_native.py tests/test_native_cuda.py tests/test_native_arch.py tests/test_native_cuda_emulation.py (CUDA cases must not skip)"
  [memcheck]="compute-sanitizer --tool memcheck (all kernels, no caching allocator) $PY bench/sanitize_ops.py"
  [racecheck]="compute-sanitizer --tool racecheck --kernel-name kns=ncfast $PY bench/sanitize_ops.py"
  [synccheck]="compute-sanitizer --tool synccheck --kernel-name kns=ncfast $PY bench/sanitize_ops.py"
  [kernels]="$PY bench/bench_kernels.py --device cuda (6 cases up to B=65536, P=4096, C=32000) -> kernels_cuda.json"
  [scale]="$PY bench/bench_scale.py --device cuda --cases 32000x4096 (reference and native) -> scale_cuda.json"
  [train]="$PY bench/train_overhead.py --epochs 10 --device cuda (SVHN-shaped VGG13, with and without measurement)"
  [online]="$PY bench/online_overhead.py --device cuda --nets vgg11:1,resnet18:1 --reps 5 (train step with and without --online-every; no host sync in a window) -> online_overhead_cuda.json"
)
KERNEL_CASES=(1024,512,10,float32 8192,512,100,bfloat16 65536,512,10,float32
  8192,2048,1000,bfloat16 65536,2048,1000,bfloat16 1024,4096,32000,bfloat16)

usage() {
  echo "usage: bash bench/gpu_check.sh [--dry-run] [--steps $(IFS=,; echo "${STEPS[*]}")] [--budget SECONDS]"
}

dry_run=0
budget=720
selected=("${STEPS[@]}")
while (($#)); do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --steps)
      [[ $# -ge 2 ]] || { usage >&2; exit 2; }
      IFS=, read -ra wanted <<<"$2"
      for step in "${wanted[@]}"; do
        [[ -n "${CAP[$step]:-}" ]] || { echo "gpu_check: unknown step '$step'" >&2; usage >&2; exit 2; }
      done
      selected=()
      for step in "${STEPS[@]}"; do  # keep the script's order
        for w in "${wanted[@]}"; do [[ "$w" == "$step" ]] && selected+=("$step"); done
      done
      shift ;;
    --budget)
      [[ $# -ge 2 && "$2" =~ ^[0-9]+$ ]] || { echo "gpu_check: --budget needs seconds" >&2; exit 2; }
      budget=$2
      shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "gpu_check: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

if ((dry_run)); then
  total=0
  printf '%-10s %7s  %s\n' step "cap (s)" command
  for step in "${selected[@]}"; do
    printf '%-10s %7d  %s\n' "$step" "${CAP[$step]}" "${WHAT[$step]}"
    total=$((total + CAP[$step]))
  done
  printf '%-10s %7d  (budget %d s; output to %s)\n' total "$total" "$budget" "${OUT:-bench/results/gpu}"
  exit 0
fi

OUT="${OUT:-$ROOT/bench/results/gpu}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
DEADLINE=$((SECONDS + budget))
passed=0
failed=()

note() { echo "[gpu_check +${SECONDS}s] $*" | tee -a "$OUT/summary.txt"; }
cap_for() {  # min(the step's cap, time left in the budget)
  local left=$((DEADLINE - SECONDS))
  ((left > CAP[$1])) && left=${CAP[$1]}
  echo "$left"
}
capped() {  # capped STEP COMMAND...: the command under the step's cap; its exit status
  local cap
  cap=$(cap_for "$1")
  shift
  timeout -k 5 "$cap" "$@"
}

step_env() {
  {
    nvidia-smi || echo "nvidia-smi failed"
    command -v nvcc && nvcc --version
    "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "| torch", torch.__version__, "CUDA", torch.version.cuda, "| GPU:", torch.cuda.get_device_name() if torch.cuda.is_available() else "none", torch.cuda.get_device_capability() if torch.cuda.is_available() else "")'
  } >>"$OUT/env_build.log" 2>&1
  grep -E "^python" "$OUT/env_build.log" | tail -1 | tee -a "$OUT/summary.txt"
  "$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"'
}

step_build() {
  rm -rf build ncfast/_C.*.so
  TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" FORCE_CUDA=1 NCFAST_REQUIRE_EXTENSION=1 \
    MAX_JOBS="${MAX_JOBS:-$(nproc)}" capped build "$PY" setup.py build_ext --inplace \
    >>"$OUT/env_build.log" 2>&1 || { tail -30 "$OUT/env_build.log"; return 1; }
  "$PY" -m ncfast info 2>&1 | tee -a "$OUT/env_build.log" | grep -E "CUDA kernels|^cuda:" |
    tee -a "$OUT/summary.txt"
}

step_tests() {
  NCFAST_REQUIRE_EXTENSION=1 capped tests "$PY" -m pytest -q -rs -p no:cacheprovider \
    tests/test_native.py tests/test_native_cuda.py tests/test_native_arch.py \
    tests/test_native_cuda_emulation.py >"$OUT/tests.log" 2>&1
  local rc=$?
  note "tests: $(tail -1 "$OUT/tests.log")"
  grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -20 | tee -a "$OUT/summary.txt"
  if grep -E "^SKIPPED" "$OUT/tests.log" | grep -qiE "cuda|gpu"; then
    note "CUDA TESTS SKIPPED on a GPU machine:"
    grep -E "^SKIPPED" "$OUT/tests.log" | head -5 | tee -a "$OUT/summary.txt"
    return 1
  fi
  return $rc
}

SANITIZER=""
find_sanitizer() {
  SANITIZER=$(command -v compute-sanitizer || true)
  if [[ -z "$SANITIZER" ]]; then
    SANITIZER=$(ls /usr/local/cuda*/bin/compute-sanitizer /usr/local/cuda*/compute-sanitizer/compute-sanitizer \
      /opt/nvidia/*/compute-sanitizer 2>/dev/null | head -1 || true)
  fi
}

sanitize() {  # sanitize TOOL [FILTER ARGS...]: one verdict line per tool
  local tool=$1 rc summary
  shift
  [[ -n "$SANITIZER" ]] || find_sanitizer
  if [[ -z "$SANITIZER" ]]; then
    note "$tool: NOT RUN (compute-sanitizer not found)"
    return 1
  fi
  echo "===== $tool: $SANITIZER --tool $tool $* $PY bench/sanitize_ops.py" >>"$OUT/sanitizer.log"
  # Without the caching allocator every tensor is its own allocation: memcheck sees the bounds.
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 capped "$tool" "$SANITIZER" --tool "$tool" --error-exitcode 99 \
    --print-limit 20 "$@" "$PY" bench/sanitize_ops.py >>"$OUT/sanitizer.log" 2>&1
  rc=$?
  summary=$(grep -E "(ERROR|RACECHECK) SUMMARY" "$OUT/sanitizer.log" | tail -1 | sed 's/^=* *//')
  if ((rc == 0)) && tail -5 "$OUT/sanitizer.log" | grep -q "match the reference"; then
    note "$tool: PASS (${summary:-no summary line})"
    return 0
  fi
  case $rc in
    99) note "$tool: FAIL, errors found (${summary}); see sanitizer.log" ;;
    124 | 137) note "$tool: TIMEOUT after $(cap_for "$tool") s" ;;
    *) note "$tool: FAIL (exit $rc; ${summary:-the script did not finish}); see sanitizer.log" ;;
  esac
  return 1
}
step_memcheck() { sanitize memcheck; }
step_racecheck() { sanitize racecheck --kernel-name kns=ncfast; }
step_synccheck() { sanitize synccheck --kernel-name kns=ncfast; }

step_kernels() {
  local cases=()
  for c in "${KERNEL_CASES[@]}"; do cases+=(--case "$c"); done
  capped kernels "$PY" bench/bench_kernels.py --device cuda "${cases[@]}" \
    --out "$OUT/kernels_cuda.json" 2>&1 | tee -a "$OUT/bench.log" | tail -12
}

step_scale() {
  capped scale "$PY" bench/bench_scale.py --device cuda --cases 32000x4096 \
    --timeout $(($(cap_for scale) / 2)) --out "$OUT/scale_cuda.json" 2>&1 |
    tee -a "$OUT/bench.log" | tail -6
}

step_train() {
  capped train "$PY" bench/train_overhead.py --epochs 10 --device cuda --results "$OUT" 2>&1 |
    tee -a "$OUT/bench.log" | tail -16
}

step_online() {
  capped online "$PY" bench/online_overhead.py --device cuda --nets vgg11:1,resnet18:1 --reps 5 \
    --results "$OUT" 2>&1 | tee -a "$OUT/bench.log" | tail -6
}

: >"$OUT/summary.txt"
note "repository $ROOT, output $OUT, steps ${selected[*]}, budget ${budget}s"
for step in "${selected[@]}"; do
  if ((DEADLINE - SECONDS < 5)); then
    note "$step: NOT RUN (budget of ${budget}s spent)"
    failed+=("$step")
    continue
  fi
  note "$step (cap $(cap_for "$step") s)"
  start=$SECONDS
  if "step_$step"; then
    passed=$((passed + 1))
    note "$step: ok in $((SECONDS - start)) s"
  else
    failed+=("$step")
    note "$step: FAILED after $((SECONDS - start)) s"
    if [[ "$step" == build || "$step" == env ]]; then
      note "stopping: nothing else can run without a GPU and the extension"
      break
    fi
  fi
done
note "gpu_check: ${passed}/${#selected[@]} steps passed${failed[*]:+; failed: ${failed[*]}} (${SECONDS} s)"
((${#failed[@]} == 0))
