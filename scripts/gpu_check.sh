#!/usr/bin/env bash
# One GPU check in one command: build in place for the local GPU, run the GPU tests, compute-sanitizer over every
# kernel, the decode + cuBLAS probe and the benchmarks; every log and result lands under $OUT (bundled into
# $OUT/gpu_check.tgz) and a short table is printed last.
#
#   STAGES="build test sanitize probe bench" bash scripts/gpu_check.sh      # default: all five
#   STAGES="build bench" BENCH_ARGS="-m layer --bench-shapes 4096x14336" bash scripts/gpu_check.sh
#   STAGES="build ncu" NCU_KERNELS=gemv NCU_ARGS="--path gemv --cells 4096x4096:1 --calls 1" bash scripts/gpu_check.sh
#
# Env: OUT (results folder, default ./gpu_out), TORCH_CUDA_ARCH_LIST (default 9.0a), MAX_JOBS (default: all
# cores), PYTEST_ARGS (extra args for the test stage), SAN_TOOLS (sanitizer tools besides initcheck, default
# "memcheck racecheck synccheck"; empty: initcheck only), BENCH_ARGS (extra args for `pytest bench/`),
# STAGE_TIMEOUT (seconds per stage, default none: a stage that runs over is stopped and the rest still runs and is
# bundled).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
LOGS=$OUT/logs
mkdir -p "$LOGS"
STAGES=${STAGES:-build test sanitize probe bench}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the in-place build: scripts import the tree
PY=${PYTHON:-python3}
summary=$LOGS/summary.txt
: > "$summary"

stage() {  # stage NAME CMD...: run, log to $LOGS/NAME.log, record status and seconds
  local name=$1; shift
  local t0=$SECONDS
  echo "=== $name: $*" | tee -a "$LOGS/$name.log"
  timeout "${STAGE_TIMEOUT:-0}" "$@" >> "$LOGS/$name.log" 2>&1
  local rc=$?
  printf '%-16s rc=%-3s %5ss\n' "$name" "$rc" "$((SECONDS - t0))" | tee -a "$summary"
  return $rc
}

has() { [[ " $STAGES " == *" $1 "* ]]; }

{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv; $PY -c \
  "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } > "$LOGS/env.log" 2>&1

if has build; then
  stage build $PY setup.py build_ext --inplace
  grep -E "registers|spill|stack frame" "$LOGS/build.log" > "$LOGS/ptxas.txt" 2>/dev/null
fi
if has test; then
  stage test $PY -m pytest tests -q -rs -p no:cacheprovider --durations=15 ${PYTEST_ARGS:-}
fi
if has sanitize; then
  for tool in ${SAN_TOOLS-memcheck racecheck synccheck}; do
    stage "san_$tool" compute-sanitizer --tool "$tool" --print-limit 20 --error-exitcode 3 \
      $PY scripts/sanitize_kernels.py
  done
  # initcheck over every kernel of the run, torch's and cuBLAS's included. Its kernel-name filter is no way to
  # scope it: a filtered-out kernel's stores go untracked too, so the tensors torch.randn wrote read as
  # uninitialized to our kernels. The tool does not see some of cuBLAS's stores either: the control (no code of
  # ours: a cuBLAS product read by a torch kernel) shows it. The gate (san_initcheck_gate) is therefore
  # scripts/initcheck_gate.py: every report must be a read of a tensor that a cuBLAS call wrote last, by the
  # address ranges sanitize_kernels.py prints per configuration; anything else fails.
  stage san_initcheck compute-sanitizer --tool initcheck --print-limit 100000 \
    --show-backtrace device $PY scripts/sanitize_kernels.py
  stage san_initcheck_cublas compute-sanitizer --tool initcheck --print-limit 20 \
    $PY scripts/sanitize_kernels.py --cublas-control
  stage san_initcheck_gate $PY scripts/initcheck_gate.py "$LOGS/san_initcheck.log" \
    --control "$LOGS/san_initcheck_cublas.log"
fi
if has probe; then
  stage probe $PY scripts/probe_decode_gemm.py
  if $PY -c "import sys, torch; sys.exit(torch.cuda.get_device_capability() != (9, 0))" 2>/dev/null; then
    stage probe_sm90 $PY scripts/probe_sm90.py --out "$LOGS/probe_sm90.json"
  fi
fi
if has profile; then  # not in the default stages: host-side cost of one layer call, per implementation
  stage profile $PY scripts/profile_layer.py
fi
if has ncu; then  # not in the default stages: Nsight Compute over the kernels of chosen cells (scripts/kernel_cells.py)
  # NCU_KERNELS: a kernel-name regex; NCU_ARGS: kernel_cells.py's arguments. Every matching launch is profiled,
  # the warm-up call's too (keep --calls small); kernel_cells.py's per-cell lines tell the cells apart.
  stage ncu ncu --clock-control none --kernel-name "regex:${NCU_KERNELS:-gemv}" \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section LaunchStats --section Occupancy \
    --section WarpStateStats --section SchedulerStats \
    $PY scripts/kernel_cells.py ${NCU_ARGS:---path gemv --cells 4096x1024:1 4096x4096:1 4096x4096:16 14336x4096:16 --calls 1}
fi
if has bench; then
  stage bench $PY -m pytest bench -q -p no:cacheprovider --bench-out "$OUT/bench" ${BENCH_ARGS:-}
fi

tail -n 3 "$LOGS/test.log" 2>/dev/null
grep -E "^(FAILED|ERROR)" "$LOGS/test.log" 2>/dev/null | head -40
grep -HE "ERROR SUMMARY|RACECHECK SUMMARY|sanitize_kernels: (all|cublas control ran)" "$LOGS"/san_*.log 2>/dev/null
tail -n 12 "$LOGS/san_initcheck_gate.log" 2>/dev/null
grep -vE '^\{' "$LOGS/probe.log" 2>/dev/null
grep -A12 "^summary" "$LOGS/probe_sm90.log" 2>/dev/null
grep -E "^===|Self CPU time total" "$LOGS/profile.log" 2>/dev/null
grep -E "^kernel_cells:|^  [a-z_].*\(|Duration|Memory Throughput|Compute \(SM\) Throughput|Achieved Occupancy|Registers Per" \
  "$LOGS/ncu.log" 2>/dev/null | head -120
[ -f "$LOGS/bench.log" ] && tail -n 40 "$LOGS/bench.log"
tar -C "$OUT" -czf "$OUT/gpu_check.tgz" logs $( [ -d "$OUT/bench" ] && echo bench ) && rm -rf "$LOGS" "$OUT/bench"
echo "--- summary"; tar -xzOf "$OUT/gpu_check.tgz" logs/summary.txt
