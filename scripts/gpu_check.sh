#!/usr/bin/env bash
# One GPU session in one command: build for the local GPU, run the GPU tests, the sanitizers and the benchmarks,
# and leave every log and result under $OUT (bundled into $OUT/gpu_check.tgz, since a device call returns at
# most 8 files). A short table is printed last.
#
#   STAGES="build test sanitize bench" bash scripts/gpu_check.sh      # default: all four
#   STAGES="bench" BENCH_ARGS="--bench-full" bash scripts/gpu_check.sh
#
# Env: OUT (results folder, default ./gpu_out), TORCH_CUDA_ARCH_LIST (default 9.0a), MAX_JOBS (default: all
# cores), PYTEST_ARGS (extra args for the test stage), BENCH_ARGS (extra args for `pytest bench/`).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
LOGS=$OUT/logs
mkdir -p "$LOGS"
STAGES=${STAGES:-build test sanitize bench}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the in-place build: scripts import the tree
[ -f .devdeps/activate.sh ] && source .devdeps/activate.sh
PY=${PYTHON:-python3}
summary=$LOGS/summary.txt
: > "$summary"

stage() {  # stage NAME CMD...: run, log to $LOGS/NAME.log, record status and seconds
  local name=$1; shift
  local t0=$SECONDS
  echo "=== $name: $*" | tee -a "$LOGS/$name.log"
  "$@" >> "$LOGS/$name.log" 2>&1
  local rc=$?
  printf '%-10s rc=%-3s %5ss\n' "$name" "$rc" "$((SECONDS - t0))" | tee -a "$summary"
  return $rc
}

has() { [[ " $STAGES " == *" $1 "* ]]; }

{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv; $PY -c \
  "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } > "$LOGS/env.log" 2>&1

if has build; then
  # In-place build: the tests import the tree itself, and ignored build outputs survive between warm calls.
  stage build $PY setup.py build_ext --inplace
  grep -E "registers|spill|stack" "$LOGS/build.log" > "$LOGS/ptxas.txt" 2>/dev/null
fi
if has test; then
  stage test $PY -m pytest tests -q -rs -p no:cacheprovider --durations=15 ${PYTEST_ARGS:-}
fi
if has sanitize; then
  for tool in memcheck racecheck initcheck; do
    stage "san_$tool" compute-sanitizer --tool "$tool" --error-exitcode 3 $PY scripts/sanitize_kernels.py
  done
fi
if has bench; then
  stage bench $PY -m pytest bench -q -p no:cacheprovider --bench-out "$OUT/bench" ${BENCH_ARGS:-}
fi

tail -n 3 "$LOGS/test.log" 2>/dev/null
grep -E "^(FAILED|ERROR)" "$LOGS/test.log" 2>/dev/null | head -40
grep -hE "ERROR SUMMARY|RACECHECK SUMMARY" "$LOGS"/san_*.log 2>/dev/null
[ -f "$OUT/bench/RESULTS.md" ] && head -c 6000 "$OUT/bench/RESULTS.md"
tar -C "$OUT" -czf "$OUT/gpu_check.tgz" logs $( [ -d "$OUT/bench" ] && echo bench ) && rm -rf "$LOGS" "$OUT/bench"
echo "--- summary"; tar -xzOf "$OUT/gpu_check.tgz" logs/summary.txt
