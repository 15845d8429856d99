#!/usr/bin/env bash
# The one script a machine with an NVIDIA GPU runs first: builds ncfast._C for the device's own
# architecture, proves it correct (CUDA tests, four compute-sanitizer tools), measures it
# (kernels, training and online overhead, scale), checks the integrations, the PTX-JIT path and
# the kernel-image fallback, and decides each step by a printed threshold. Written for one lent
# H100/H200 (torch 2.11, Python 3.12, nvcc 13, 16 cores, no network) and one call of <= 300 s.
#
#   bash bench/gpu_check.sh              # every step; results under $OUT
#   bash bench/gpu_check.sh --dry-run    # the steps, their caps and thresholds; runs nothing
#   bash bench/gpu_check.sh --budget 280 # stop starting steps when 280 s are spent
#   bash bench/gpu_check.sh --extra      # the second call (issues 22 and 23's GPU cases), if the
#                                        # device budget allows; --extra --dry-run lists it
#
# The plan (steps, caps, thresholds) and the verdicts live in bench/gpu_check_report.py; this
# script only runs each step's commands under its cap. Steps run in order of value; a step that
# would start with less than MIN_STEP_S seconds of budget left is SKIPPED with the reason, and
# gpu_check.json is rewritten after every step, so a killed run still leaves it whole.
# OUT (default bench/results/gpu) receives at most 3 files: gpu_check.json (docs/gpu_check.md),
# gpu_check.log (everything printed) and gpu_check_details.tar.gz (each step's raw output);
# --extra: gpu_check_extra.json, gpu_check_extra.log, gpu_check_extra_details.tar.gz.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
PY="${PYTHON:-python3}"
REPORT=("$PY" "$ROOT/bench/gpu_check_report.py")
MIN_STEP_S=${GPU_CHECK_MIN_STEP_S:-4}
RESERVE_S=3 # kept back for packing the details at the end

usage() { echo "usage: bash bench/gpu_check.sh [--extra] [--dry-run] [--budget SECONDS]"; }

dry_run=0
budget=300
export GPU_CHECK_STAGE=main # the plan gpu_check_report.py hands out
while (($#)); do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --extra) GPU_CHECK_STAGE=extra ;;
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
  exec "${REPORT[@]}" plan --table --budget "$budget"
fi

OUT="${OUT:-$ROOT/bench/results/gpu}"
mkdir -p "$OUT"
NAME=gpu_check
[[ "$GPU_CHECK_STAGE" == extra ]] && NAME=gpu_check_extra
JSON="$OUT/$NAME.json"
LOG="$OUT/$NAME.log"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
DETAILS="$WORK/${NAME}_details" # packed into one .tar.gz at the end
mkdir -p "$DETAILS"
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
NPROC=$(nproc 2>/dev/null || echo 4)
START=$SECONDS

finish() {
  tar czf "$OUT/${NAME}_details.tar.gz" -C "$WORK" "${NAME}_details" 2>/dev/null ||
    echo "[gpu_check] packing the details failed"
  "${REPORT[@]}" finish --json "$JSON" --elapsed $((SECONDS - START))
  local pid
  for pid in "$WORK"/variant_*.pid; do [[ -f "$pid" ]] && kill "$(cat "$pid")" 2>/dev/null; done
  rm -rf "$WORK"
}
trap 'finish; exit 130' INT TERM

# ------------------------------------------------------------------ steps
# Each writes its raw output under $DETAILS (the judge in gpu_check_report.py reads it there).

device_cc() { # the device's compute capability, e.g. 9.0
  nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' '
}

step_env() {
  "${REPORT[@]}" machine --json "$JSON" --details "$DETAILS" && cat "$DETAILS/env.json" &&
    { nvidia-smi || echo "nvidia-smi failed (torch decides whether a GPU is there)"; }
}

# A lower architecture than the device's (SASS of it does not run there), for the variants.
lower_cc() { case "$1" in 8.0 | 8.6 | 8.7 | 8.9) echo 7.5 ;; *) echo 8.0 ;; esac; }

build_variant() { # build_variant NAME ARCH_LIST: a copy of the tree built in the background
  local dir="$WORK/$1" log="$DETAILS/build_$1.log"
  mkdir -p "$dir"
  tar cf - --exclude=./build --exclude=./.git --exclude=./bench/results \
    --exclude='./ncfast/_C*.so' --exclude="./${OUT#"$ROOT"/}" . | tar xf - -C "$dir"
  # It outlives the build step (its cap does not end it); finish ends its timeout (which passes
  # the signal on to the build) through the pid file.
  (
    cd "$dir" || exit 1
    TORCH_CUDA_ARCH_LIST="$2" FORCE_CUDA=1 NCFAST_REQUIRE_EXTENSION=1 \
      MAX_JOBS=$((NPROC / 2 > 1 ? NPROC / 2 : 1)) timeout 240 "$PY" setup.py build_ext --inplace &
    echo $! >"$WORK/variant_$1.pid"
    if wait $!; then echo "variant $1 built"; else echo "variant $1 failed"; fi
  ) >"$log" 2>&1 &
}

step_build() {
  local cc t0
  cc=$(device_cc)
  [[ -n "$cc" ]] || cc=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
  if [[ "$GPU_CHECK_STAGE" == extra ]] &&
    "$PY" -m ncfast info 2>&1 | grep -E "CUDA kernels: compiled.*sm_${cc/./}" >"$DETAILS/build.log"; then
    echo "reused the main call's build (arch $cc)" | tee -a "$DETAILS/build.log"
    return 0
  fi
  rm -rf build ncfast/_C.*.so
  t0=$SECONDS
  TORCH_CUDA_ARCH_LIST="$cc+PTX" FORCE_CUDA=1 NCFAST_REQUIRE_EXTENSION=1 MAX_JOBS=$NPROC \
    "$PY" setup.py build_ext --inplace >"$DETAILS/build.log" 2>&1 || { tail -30 "$DETAILS/build.log"; return 1; }
  echo "build time: $((SECONDS - t0)) s (MAX_JOBS=$NPROC, arch $cc+PTX)" | tee -a "$DETAILS/build.log"
  grep -E "TORCH_CUDA_ARCH_LIST" "$DETAILS/build.log"
  [[ "$GPU_CHECK_STAGE" == extra ]] && { "$PY" -m ncfast info 2>&1 | tee -a "$DETAILS/build.log" | grep -E "CUDA kernels"; return; }
  # The variants for ptxjit/fallback build in the background while the tests and sanitizers
  # (GPU-bound) run: started after the main build, which has every core to itself.
  build_variant fallback "$(lower_cc "$cc")"
  build_variant ptx "$(lower_cc "$cc")+PTX"
  "$PY" -m ncfast info 2>&1 | tee -a "$DETAILS/build.log" | grep -E "CUDA kernels|cuda:"
}

step_tests() {
  NCFAST_REQUIRE_EXTENSION=1 "$PY" -m pytest -q -rs -p no:cacheprovider -m cuda \
    tests/backend/test_native.py tests/backend/test_native_cuda.py tests/backend/test_native_arch.py tests/backend/test_precision.py \
    >"$DETAILS/tests.log" 2>&1
  local rc=$?
  tail -15 "$DETAILS/tests.log"
  return $rc
}

find_sanitizer() {
  command -v compute-sanitizer ||
    ls /usr/local/cuda*/bin/compute-sanitizer /opt/nvidia/*/compute-sanitizer 2>/dev/null | head -1
}

sanitize() { # sanitize TOOL [FILTER ARGS...]
  local tool=$1 san
  shift
  san=$(find_sanitizer)
  [[ -n "$san" ]] || { echo "compute-sanitizer not found" | tee "$DETAILS/$tool.log"; return 1; }
  # Without the caching allocator every tensor is its own allocation: memcheck sees the bounds.
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$san" --tool "$tool" --error-exitcode 99 --print-limit 20 "$@" \
    "$PY" bench/sanitize_ops.py >"$DETAILS/$tool.log" 2>&1
  local rc=$?
  tail -4 "$DETAILS/$tool.log"
  return $rc
}
step_memcheck() { sanitize memcheck --kernel-name kns=ncfast; }
step_racecheck() { sanitize racecheck --kernel-name kns=ncfast; }
step_initcheck() { sanitize initcheck --kernel-name kns=ncfast; }
step_synccheck() { sanitize synccheck --kernel-name kns=ncfast; }

step_kernels() {
  "$PY" bench/bench_kernels.py --device cuda --repeats 20 --case 1024,512,10,float32 \
    --case 1024,4096,1000,bfloat16 --case 65536,512,10,float32 --out "$DETAILS/kernels.json"
}

step_train() {
  "$PY" bench/train_overhead.py --device cuda --epochs 3 --per-class 600 --test-size 1000 \
    --results "$DETAILS" | tail -8
}

step_online() {
  "$PY" bench/online_overhead.py --device cuda --nets vgg11:1 --reps 5 --results "$DETAILS"
}

step_scale() {
  "$PY" bench/bench_scale.py --device cuda --cases 32000x4096 --backends native \
    --timeout 12 --out "$DETAILS/scale.json" | tail -6
}

step_integrations() { "$PY" bench/gpu_integrations.py | tee "$DETAILS/integrations.log"; }

variant_ready() { # variant_ready NAME: waits (within the step's cap) for its background build
  while ! grep -qs "variant $1 built" "$DETAILS/build_$1.log"; do
    if grep -qs "variant $1 failed" "$DETAILS/build_$1.log"; then
      echo "VERDICT FAIL the $1 variant did not build: $(tail -3 "$DETAILS/build_$1.log")"
      return 1
    fi
    sleep 1
  done
}

step_ptxjit() {
  {
    "$PY" bench/gpu_variant_check.py --save "$DETAILS/sass.json" --label sass
    CUDA_FORCE_PTX_JIT=1 "$PY" bench/gpu_variant_check.py --compare "$DETAILS/sass.json" \
      --label forced-ptx-jit --expect ptx
    variant_ready ptx && PYTHONPATH="$WORK/ptx" "$PY" bench/gpu_variant_check.py \
      --compare "$DETAILS/sass.json" --label ptx-variant --expect ptx
  } 2>&1 | tee "$DETAILS/ptxjit.log"
}

step_fallback() {
  {
    [[ -f "$DETAILS/sass.json" ]] ||
      "$PY" bench/gpu_variant_check.py --save "$DETAILS/sass.json" --label sass
    variant_ready fallback && PYTHONPATH="$WORK/fallback" "$PY" bench/gpu_variant_check.py \
      --compare "$DETAILS/sass.json" --label fallback --expect fallback
  } 2>&1 | tee "$DETAILS/fallback.log"
}

# The extra call's steps (issue 22 item 4, issue 23 item 3).
step_precision() {
  "$PY" bench/bench_precision.py --device cuda --repeats 25 --out "$DETAILS/precision_cuda.json"
}

step_vocab() {
  "$PY" bench/bench_vocab.py --device cuda --tokens 1048576 --nc4-tokens 65536 --out "$DETAILS"
}

step_lmpeer() {
  "$PY" bench/bench_lm_peer.py --device cuda --tokens 262144 --batch-tokens 8192 --out "$DETAILS"
}

# ------------------------------------------------------------------ the run
mapfile -t PLAN < <("${REPORT[@]}" plan)
[[ -f "$JSON" ]] && rm -f "$JSON"
"${REPORT[@]}" init --json "$JSON" --budget "$budget" ||
  { echo "gpu_check: cannot write $JSON"; exit 1; }
blocked="" # why the steps still to come cannot run (no GPU, no build)
for row in "${PLAN[@]}"; do
  IFS=$'\t' read -r step cap command <<<"$row"
  left=$((budget - (SECONDS - START) - RESERVE_S))
  if [[ -n "$blocked" ]]; then
    "${REPORT[@]}" skip "$step" --json "$JSON" --reason "$blocked"
    continue
  fi
  if ((left < MIN_STEP_S)); then
    "${REPORT[@]}" skip "$step" --json "$JSON" --reason "budget of ${budget} s spent ($((SECONDS - START)) s used)"
    continue
  fi
  ((cap > left)) && cap=$left
  echo "===== [gpu_check +$((SECONDS - START))s] $step (cap $cap s)"
  t0=$SECONDS
  if [[ -n "$command" ]]; then
    timeout -k 2 "$cap" bash -c "$command"
  else
    # timeout signals its whole process group: the step's children end with it.
    timeout -k 2 "$cap" bash -c "$(declare -p PY REPORT DETAILS WORK JSON NPROC ROOT OUT GPU_CHECK_STAGE); $(declare -f); step_$step"
  fi
  rc=$?
  "${REPORT[@]}" judge "$step" --json "$JSON" --details "$DETAILS" --rc $rc \
    --seconds $((SECONDS - t0)) --cap "$cap"
  verdict=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["steps"][-1]["verdict"])' "$JSON")
  if [[ "$verdict" != PASS && ("$step" == env || "$step" == build) ]]; then
    blocked="$step failed: nothing after it can run"
  fi
done
finish
"$PY" -c 'import json,sys; sys.exit(json.load(open(sys.argv[1]))["summary"]["verdict"] != "PASS")' "$JSON"
rc=$?
exec 1>&- 2>&- # let tee finish the log before the script returns
wait "$TEE_PID" 2>/dev/null
exit $rc
