#!/usr/bin/env bash
# The demo command: set up (once; see scripts/setup_env.sh) and run the fine-tune example,
# `python examples/finetune.py`, with the checkout's venv. Extra arguments go to finetune.py (--help lists them).
#
#   bash scripts/demo.sh                  # GPU: 4 layers at width 2048, bf16, 200 steps; CPU: a tiny model, < 1 min
#   bash scripts/demo.sh --steps 5
#   bash scripts/demo.sh --setup-only     # set up, run nothing
#
# Knobs: see README "Quickstart" (VENV, PYTHON, TORCH_INDEX_URL, CUDA_HOME, TORCH_CUDA_ARCH_LIST, MAX_JOBS, ...).
set -euo pipefail
# shellcheck source=scripts/setup_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
qlora_setup examples
[ "${1:-}" != --setup-only ] || exit 0
cd "$QLORA_ROOT"
echo "[demo] python examples/finetune.py $*"
exec python examples/finetune.py "$@"
