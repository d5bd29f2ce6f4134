#!/usr/bin/env bash
# The test command: set up (once; see scripts/setup_env.sh) and run the README's test command, `pytest tests -q`,
# from the checkout's root with its venv. Extra arguments go to pytest (e.g. -k nf4, -x).
#
#   bash scripts/test.sh
#   bash scripts/test.sh --setup-only     # set up, run no tests
#
# The package is installed from this checkout in editable mode with its extension built in place, so the tests
# import ./qlora_ext, with the compiled qlora_ext._C beside it: the same code whichever way Python is started.
# Knobs: see README "Quickstart" (VENV, PYTHON, TORCH_INDEX_URL, CUDA_HOME, TORCH_CUDA_ARCH_LIST, MAX_JOBS, ...).
set -euo pipefail
# shellcheck source=scripts/setup_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
qlora_setup test
[ "${1:-}" != --setup-only ] || exit 0
cd "$QLORA_ROOT"
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}  # as in CI: tests never reach for a model hub
echo "[test] pytest tests -q $*"
exec pytest tests -q "$@"
