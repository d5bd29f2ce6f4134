#!/usr/bin/env bash
# The set-up shared by scripts/demo.sh and scripts/test.sh: a venv, torch, ninja, qlora_ext built from this checkout
# (with nvcc when a CUDA toolkit is found) and one extra of pyproject.toml. Idempotent: every step records a stamp
# in $VENV/.qlora_ext/ after it succeeds, and is skipped while its inputs are unchanged; a step that fails leaves
# no stamp, so the next run redoes it. Sourced by those scripts (`qlora_setup EXTRA`), or run on its own:
#
#   bash scripts/setup_env.sh test          # set up for the tests, run nothing
#
# Knobs (environment): VENV (default <checkout>/.venv), PYTHON (interpreter the venv is made from, default python3),
# TORCH_INDEX_URL (pip index for torch; default PyPI, or download.pytorch.org/whl/cuXY when PyPI's torch does not
# match the toolkit's CUDA major version), CUDA_HOME, TORCH_CUDA_ARCH_LIST, MAX_JOBS, NVCC_THREADS,
# QLORA_EXT_SKIP_CUDA, CUTLASS_DIR (all as in README "Install from source"), QLORA_SETUP_VERBOSE=1 (stream pip's and
# nvcc's output instead of only logging it), PIP_CONSTRAINT (pip's own: pin versions, e.g. torch==2.14.1).
#
# The package is installed in editable mode with its extension built in place (qlora_ext/_C*.so), so the checkout's
# ./qlora_ext is the installed package: `pytest tests`, `python -m pytest` and `python examples/...` all import the
# same code, and Python edits take effect without reinstalling. C++/CUDA edits (csrc/, setup.py) trigger a rebuild.

QLORA_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)

_say() { echo "[setup] $*"; }
_die() { echo "[setup] ERROR: $*" >&2; exit 1; }

# _step NAME MSG: start a step (one line; completed by _done).
_step() {
  _STEP=$1 _STEP_T0=$SECONDS
  if [ "${QLORA_SETUP_VERBOSE:-0}" = 1 ]; then echo "[setup] $1: $2 ..."; else printf '[setup] %s: %s ... ' "$1" "$2"; fi
}
_done() {
  local dt=$((SECONDS - _STEP_T0))
  if [ "${QLORA_SETUP_VERBOSE:-0}" = 1 ]; then echo "[setup] $_STEP: ${1:-done} (${dt} s)"; else echo "${1:-done} (${dt} s)"; fi
}
_skip() { echo "[setup] $1: $2 (skipped: up to date)"; }

# _run LOG CMD...: run CMD with its output in LOG (and on the terminal with QLORA_SETUP_VERBOSE=1).
_run() {
  local log=$1; shift
  if [ "${QLORA_SETUP_VERBOSE:-0}" = 1 ]; then "$@" 2>&1 | tee "$log"; return "${PIPESTATUS[0]}"; fi
  "$@" > "$log" 2>&1
}
# _fail LOG MSG: a failed step: the end of its log, where the whole log is, and what to do.
_fail() {
  echo "FAILED"
  if [ "${QLORA_SETUP_VERBOSE:-0}" != 1 ] && [ -f "$1" ]; then
    echo "----- last lines of $1 -----" >&2; tail -n 25 "$1" >&2; echo "-----" >&2
  fi
  _die "$2 (full log: $1)"
}

_sha() { sha256sum | cut -c1-16; }
_stamp_ok() { [ -f "$QLORA_STAMPS/$1" ] && [ "$(cat "$QLORA_STAMPS/$1")" = "$2" ]; }
_stamp_write() { printf '%s' "$2" > "$QLORA_STAMPS/$1.tmp" && mv "$QLORA_STAMPS/$1.tmp" "$QLORA_STAMPS/$1"; }
_py() { "$VENV/bin/python" "$@"; }
_pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }
_torch_version() { _py -c "import importlib.metadata as m; print(m.version('torch'))" 2>/dev/null; }
_constraints_sha() { for f in ${PIP_CONSTRAINT:-}; do cat "$f" 2>/dev/null; done | _sha; }

# The CUDA toolkit: $CUDA_HOME, else /usr/local/cuda, else the toolkit around a real nvcc on PATH. A toolkit root has
# bin/nvcc and include/cuda_runtime.h (the nvcc on PATH may be a wrapper script outside any toolkit).
_find_toolkit() {
  QLORA_TOOLKIT="" QLORA_TOOLKIT_VERSION=""
  if [ "${QLORA_EXT_SKIP_CUDA:-0}" = 1 ]; then return; fi
  local cand
  if [ -n "${CUDA_HOME:-}" ]; then
    [ -x "$CUDA_HOME/bin/nvcc" ] && [ -f "$CUDA_HOME/include/cuda_runtime.h" ] \
      || _die "CUDA_HOME=$CUDA_HOME is not a CUDA toolkit root (needs bin/nvcc and include/cuda_runtime.h). Point it at the toolkit, or unset it, or set QLORA_EXT_SKIP_CUDA=1 to install without kernels."
    cand=$CUDA_HOME
  elif [ -x /usr/local/cuda/bin/nvcc ] && [ -f /usr/local/cuda/include/cuda_runtime.h ]; then
    cand=/usr/local/cuda
  elif command -v nvcc > /dev/null; then
    cand=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
    [ -f "$cand/include/cuda_runtime.h" ] || cand=""
  fi
  [ -n "${cand:-}" ] || return 0
  QLORA_TOOLKIT=$cand
  QLORA_TOOLKIT_VERSION=$("$cand/bin/nvcc" --version | sed -n 's/.*release \([0-9]*\.[0-9]*\).*/\1/p')
  [ -n "$QLORA_TOOLKIT_VERSION" ] || _die "$cand/bin/nvcc --version printed no release number; is the toolkit broken?"
}

# GPUs the driver shows (one line per GPU), without starting Python.
_gpu_list() { if command -v nvidia-smi > /dev/null; then nvidia-smi -L 2>/dev/null | sed 's/ (UUID.*//'; fi; }

_setup_venv() {
  local base_py=${PYTHON:-python3} pyver key
  command -v "$base_py" > /dev/null || _die "no $base_py on PATH: install Python 3.10+ or set PYTHON=/path/to/python3"
  pyver=$("$base_py" -c 'import sys; print("%d.%d" % sys.version_info[:2])') || _die "$base_py does not run"
  "$base_py" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || _die "$base_py is Python $pyver; qlora_ext needs 3.10+: set PYTHON=/path/to/python3.10-or-newer"
  mkdir -p "$VENV"
  VENV=$(cd "$VENV" && pwd -P)
  QLORA_STAMPS=$VENV/.qlora_ext
  QLORA_LOGS=$QLORA_STAMPS/logs
  key="python $pyver at $VENV"
  if [ -f "$VENV/pyvenv.cfg" ]; then
    if _stamp_ok venv "$key" && _py -c '' 2>/dev/null; then
      _skip venv "$VENV (Python $pyver)"; return
    fi
    if [ ! -f "$QLORA_STAMPS/created" ]; then  # a venv someone else made: use it as it is, never delete it
      _py -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null \
        || _die "$VENV exists but is not a working Python 3.10+ venv. Remove it, or set VENV=<another path>."
      mkdir -p "$QLORA_LOGS"; _stamp_write venv "$key"
      _say "venv: using the existing $VENV ($(_py -c 'import sys; print(sys.version.split()[0])'))"; return
    fi
    _say "venv: $VENV was made for another Python or path; recreating it"
    rm -rf "$VENV"; mkdir -p "$VENV"
  fi
  # Flag it as ours before creating it, so a half-made venv is recognized (and recreated) next time.
  mkdir -p "$QLORA_LOGS"; : > "$QLORA_STAMPS/created"
  _step venv "creating $VENV with $base_py (Python $pyver)"
  _run "$QLORA_LOGS/venv.log" "$base_py" -m venv "$VENV" \
    || _fail "$QLORA_LOGS/venv.log" "could not create a venv with $base_py: install its venv module (Debian/Ubuntu: apt install python3-venv) or set PYTHON=<another python3.10+>"
  _stamp_write venv "$key"
  _done
}

_setup_tools() {
  local reqs=("pip>=21.3" "setuptools>=64" wheel ninja numpy) key
  key="${reqs[*]} | constraints $(_constraints_sha)"
  if _stamp_ok tools "$key"; then _skip tools "${reqs[*]}"; return; fi
  _step tools "pip install ${reqs[*]}"
  _run "$QLORA_LOGS/tools.log" _pip install "${reqs[@]}" \
    || _fail "$QLORA_LOGS/tools.log" "pip could not install the build tools; check the network / pip's index settings"
  _stamp_write tools "$key"
  _done
}

# torch whose CUDA major version is the toolkit's: PyPI's default first (or TORCH_INDEX_URL's); when it does not match
# the toolkit and no index was named, download.pytorch.org's build for the toolkit's version.
_setup_torch() {
  local index=${TORCH_INDEX_URL:-} tk_major=${QLORA_TOOLKIT_VERSION%%.*} key installed cuda log=$QLORA_LOGS/torch.log
  key="index ${index:-PyPI} | toolkit ${QLORA_TOOLKIT_VERSION:-none} | constraints $(_constraints_sha)"
  installed=$(_torch_version || true)
  if [ -n "$installed" ] && _stamp_ok torch "$key | torch $installed"; then _skip torch "torch $installed"; return; fi
  rm -f "$QLORA_STAMPS/torch"
  _step torch "pip install torch from ${index:-PyPI}"
  _run "$log" _pip install ${index:+--index-url "$index"} torch \
    || _fail "$log" "pip could not install torch${index:+ from $index}; check the network, or set TORCH_INDEX_URL to a PyTorch wheel index"
  cuda=$(_py -c 'import torch; print(torch.version.cuda or "")' 2>> "$log") \
    || _fail "$log" "torch was installed but does not import"
  if [ -n "$QLORA_TOOLKIT" ] && [ -n "$cuda" ] && [ "${cuda%%.*}" != "$tk_major" ]; then
    local cu_index="https://download.pytorch.org/whl/cu${QLORA_TOOLKIT_VERSION/./}"
    local fix="set TORCH_INDEX_URL to a PyTorch index with a CUDA $tk_major build (https://download.pytorch.org/whl/cu${tk_major}X), or CUDA_HOME to a CUDA ${cuda%%.*} toolkit, or QLORA_EXT_SKIP_CUDA=1 to install without kernels"
    [ -z "$index" ] || _fail "$log" "torch from $index is built for CUDA $cuda but the toolkit $QLORA_TOOLKIT is CUDA $QLORA_TOOLKIT_VERSION: $fix"
    echo "torch from PyPI is built for CUDA $cuda, the toolkit is $QLORA_TOOLKIT_VERSION; trying $cu_index" | tee -a "$log" > /dev/null
    _run "$log.cu" _pip install --index-url "$cu_index" --force-reinstall --no-deps torch \
      && _run "$log.cu2" _pip install --index-url "$cu_index" torch \
      || _fail "$log.cu" "torch from PyPI is built for CUDA $cuda and $cu_index has no torch for this machine: $fix"
    cuda=$(_py -c 'import torch; print(torch.version.cuda or "")') || _fail "$log.cu" "torch from $cu_index does not import"
  fi
  installed=$(_torch_version)
  _stamp_write torch "$key | torch $installed"
  _done "torch $installed (CUDA ${cuda:-none: CPU build})"
}

# The checkout registered with pip as an editable install (pure Python here; the kernels are the build step's).
_editable_here() {  # is it this checkout the venv imports? (someone may have run `pip install .` since)
  _py - "$QLORA_ROOT" <<'EOF' 2>/dev/null
import importlib.metadata as m, json, sys, pathlib
d = json.loads(m.distribution("qlora_ext").read_text("direct_url.json") or "{}")
ok = d.get("dir_info", {}).get("editable") and d.get("url") == pathlib.Path(sys.argv[1]).as_uri()
sys.exit(0 if ok else 1)
EOF
}
_setup_install() {
  local key log=$QLORA_LOGS/install.log
  key="$QLORA_ROOT | $(_sha < "$QLORA_ROOT/pyproject.toml")"
  if _stamp_ok install "$key" && _editable_here; then _skip install "qlora_ext, editable, from $QLORA_ROOT"; return; fi
  rm -f "$QLORA_STAMPS/install"
  _step install "pip install -e . (registers the checkout; QLORA_EXT_SKIP_CUDA=1 here, the kernels are built next)"
  ( cd "$QLORA_ROOT" && QLORA_EXT_SKIP_CUDA=1 _run "$log" _pip install --no-build-isolation --no-deps -e . ) \
    || _fail "$log" "pip could not install the checkout in editable mode"
  _editable_here || _fail "$log" "pip did not register the editable install of $QLORA_ROOT"
  _stamp_write install "$key"
  _done
}

# The CUTLASS/CuTe headers of the sm_90a units (csrc/*_sm90.cu): the nvidia-cutlass wheel, pinned, installed when the
# kernels are built with nvcc and CUTLASS_DIR names no checkout. Only its headers are used (setup.py finds
# cutlass_library/source/include without importing the package), hence --no-deps: none of its Python dependencies
# (cuda-python, scipy, ...) is needed. Its own step before the build, not an extra: pip would build the extension first.
QLORA_CUTLASS_PIN="nvidia-cutlass==4.2.0.0"
_cutlass_version() { _py -c "import importlib.metadata as m; print(m.version('nvidia-cutlass'))" 2>/dev/null; }
_setup_cutlass() {
  local key installed log=$QLORA_LOGS/cutlass.log
  if [ "${QLORA_EXT_SKIP_CUDA:-0}" = 1 ] || [ -z "$QLORA_TOOLKIT" ] || [ -n "${CUTLASS_DIR:-}" ]; then return 0; fi
  _py -c 'import sys, torch; sys.exit(torch.version.cuda is None)' 2>/dev/null || return 0  # CPU torch: no nvcc build
  key="$QLORA_CUTLASS_PIN | constraints $(_constraints_sha)"
  installed=$(_cutlass_version || true)
  if [ "$installed" = "${QLORA_CUTLASS_PIN##*==}" ] && _stamp_ok cutlass "$key"; then
    _skip cutlass "nvidia-cutlass $installed (headers only)"; return 0
  fi
  rm -f "$QLORA_STAMPS/cutlass"
  _step cutlass "pip install --no-deps $QLORA_CUTLASS_PIN (CUTLASS/CuTe headers of the sm_90a units)"
  _run "$log" _pip install --no-deps "$QLORA_CUTLASS_PIN" \
    || _fail "$log" "pip could not install $QLORA_CUTLASS_PIN; check the network / pip's index settings, or set CUTLASS_DIR to a CUTLASS 4.2 checkout"
  _stamp_write cutlass "$key"
  _done "nvidia-cutlass $(_cutlass_version)"
}

# Everything the build reads, plus the build's settings: a change in any of them means a rebuild.
_build_key() {
  {
    (cd "$QLORA_ROOT" && find csrc -type f ! -name "*.md" | LC_ALL=C sort | xargs sha256sum && sha256sum setup.py)
    echo "root $QLORA_ROOT | torch $(_torch_version) | toolkit ${QLORA_TOOLKIT:-none} ${QLORA_TOOLKIT_VERSION:-}"
    echo "arch ${TORCH_CUDA_ARCH_LIST-<default>} | gpus $(_gpu_list | tr '\n' ';') | skip ${QLORA_EXT_SKIP_CUDA:-0}"
    echo "cutlass ${CUTLASS_DIR:-} | nvidia-cutlass $(_cutlass_version || true)"
  } | _sha
}
_so_path() { _py -c "import sysconfig; print('$QLORA_ROOT/qlora_ext/_C' + sysconfig.get_config_var('EXT_SUFFIX'))"; }
_so_sha() { if [ -f "$1" ]; then _sha < "$1"; else echo none; fi; }

# The CUDA extension, compiled in place (qlora_ext/_C*.so) by `setup.py build_ext --inplace`, its objects kept in
# the venv so that a change to one kernel file recompiles that file only (ninja).
_setup_build() {
  local key so log=$QLORA_LOGS/build.log kernels="" archs="" jobs="" what torch_cuda built err
  key=$(_build_key)
  so=$(_so_path)
  if [ -f "$QLORA_STAMPS/build" ] && [ "$(sed -n 1p "$QLORA_STAMPS/build")" = "$key" ] \
     && [ "$(sed -n 2p "$QLORA_STAMPS/build")" = "$(_so_sha "$so")" ]; then
    _skip build "qlora_ext $(sed -n 3p "$QLORA_STAMPS/build")"; return
  fi
  rm -f "$QLORA_STAMPS/build"  # from here on the old build is not trusted, whatever happens
  torch_cuda=$(_py -c 'import torch; print(torch.version.cuda or "")') || _die "torch does not import in $VENV"
  if [ "${QLORA_EXT_SKIP_CUDA:-0}" = 1 ]; then
    what="QLORA_EXT_SKIP_CUDA=1"
  elif [ -z "$QLORA_TOOLKIT" ]; then
    what="no CUDA toolkit found: set CUDA_HOME to build the kernels"
  elif [ -z "$torch_cuda" ]; then
    what="torch is a CPU build"
  else
    kernels=1
    if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ] && [ -n "$(_gpu_list)" ]; then
      if _py -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
        archs=native
      else
        _say "build: nvidia-smi lists a GPU but torch cannot use it (driver older than CUDA $torch_cuda?); building for the default archs"
      fi
    fi
    archs=${TORCH_CUDA_ARCH_LIST:-$archs}
    # setup.py's rule: at most one job per core and per ~4 GiB of available memory (each nvcc can take that).
    jobs=${MAX_JOBS:-$(awk -v c="$(nproc)" -v t="${NVCC_THREADS:-1}" \
      '/MemAvailable/ {j = int($2 / 1048576 / 4 / t); if (j > c) j = c; if (j < 1) j = 1; print j}' /proc/meminfo)}
  fi
  if [ -n "$kernels" ]; then
    _step build "setup.py build_ext --inplace (nvcc $QLORA_TOOLKIT_VERSION from $QLORA_TOOLKIT, archs ${archs:-default}, MAX_JOBS=$jobs; minutes)"
    (
      cd "$QLORA_ROOT" || exit 1
      export CUDA_HOME=$QLORA_TOOLKIT MAX_JOBS=$jobs PATH=$VENV/bin:$PATH  # PATH: ninja
      if [ -n "$archs" ]; then export TORCH_CUDA_ARCH_LIST=$archs; fi
      # --force: setuptools would skip the extension when only a header changed; ninja still recompiles only
      # what changed.
      _run "$log" _py setup.py build_ext --inplace --force \
        --build-temp "$QLORA_STAMPS/build-temp" --build-lib "$QLORA_STAMPS/build-lib"
    ) || _fail "$log" "compiling qlora_ext._C failed. If nvcc was killed, set MAX_JOBS=1; for a CUDA version mismatch see README 'Install from source'; QLORA_EXT_SKIP_CUDA=1 installs without kernels"
  else
    _step build "no CUDA kernels ($what)"
    # An in-place library from an earlier build would still be loaded, and this build has none.
    if [ -f "$so" ]; then rm -f "$so"; printf '(removed %s, left by an earlier build) ' "$so"; fi
  fi
  # The package must import, with its kernels exactly when they were built (a silent fallback to pure Python
  # must not pass). Imported from outside the checkout: what any script run with this venv gets.
  err=$(cd "$VENV" && _py -c "
import sys, qlora_ext
if qlora_ext.has_cuda_kernels() != bool('$kernels'):
    import qlora_ext._C  # raises the reason the library does not load
    sys.exit('qlora_ext._C loads but was expected not to exist')
" 2>&1) || _fail "$log" "qlora_ext is not usable after the build: $(echo "$err" | tail -n 1)"
  if [ -n "$kernels" ]; then
    built="with CUDA kernels for $(sed -n 's/.*compiling qlora_ext._C for \([^ ]*\) .*/\1/p' "$log" | tail -n 1)"
  else
    built="without CUDA kernels ($what)"
  fi
  printf '%s\n%s\n%s\n' "$key" "$(_so_sha "$so")" "$built" > "$QLORA_STAMPS/build.tmp" \
    && mv "$QLORA_STAMPS/build.tmp" "$QLORA_STAMPS/build"
  _done "$built"
}

# The package's dependencies plus one extra, from pyproject.toml, with the installed torch held where it is.
_setup_extra() {
  local extra=$1 reqs key torch_v log list
  reqs=$(_py - "$QLORA_ROOT/pyproject.toml" "$extra" <<'EOF'
import sys
try:
    import tomllib
except ImportError:  # Python 3.10
    from pip._vendor import tomli as tomllib
with open(sys.argv[1], "rb") as f:
    project = tomllib.load(f)["project"]
extra = project.get("optional-dependencies", {}).get(sys.argv[2])
if extra is None:
    sys.exit(f"pyproject.toml has no [{sys.argv[2]}] extra")
print("\n".join(dict.fromkeys(project.get("dependencies", []) + extra)))
EOF
) || _die "could not read the [$extra] extra from pyproject.toml"
  torch_v=$(_torch_version)
  log=$QLORA_LOGS/extra-$extra.log
  list=$(echo "$reqs" | paste -sd ' ')
  key="$list | torch $torch_v | constraints $(_constraints_sha)"
  if _stamp_ok "extra-$extra" "$key"; then _skip "[$extra]" "$list"; return; fi
  rm -f "$QLORA_STAMPS/extra-$extra"
  _step "[$extra]" "pip install $list"
  echo "torch==$torch_v" > "$QLORA_STAMPS/torch-pin.txt"
  local args=()
  while IFS= read -r r; do args+=("$r"); done <<< "$reqs"
  _run "$log" _pip install -c "$QLORA_STAMPS/torch-pin.txt" "${args[@]}" \
    || _fail "$log" "pip could not install the [$extra] extra next to torch $torch_v (if it needs another torch, pin one with PIP_CONSTRAINT and rerun)"
  _stamp_write "extra-$extra" "$key"
  _done
}

# qlora_setup EXTRA: the whole set-up, then the venv activated in this shell.
qlora_setup() {
  local extra=$1 t0=$SECONDS
  VENV=${VENV:-$QLORA_ROOT/.venv}
  export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
  _setup_venv
  # One set-up at a time per venv (a demo and a test run started together would otherwise race).
  if command -v flock > /dev/null; then
    exec 9> "$QLORA_STAMPS/lock"
    flock -n 9 || { _say "waiting for another set-up of $VENV to finish"; flock 9; }
  fi
  _find_toolkit
  _setup_tools
  _setup_torch
  _setup_extra "$extra"  # before the build's check: importing qlora_ext needs its dependencies
  _setup_install
  _setup_cutlass  # before the build: the sm_90a units include CUTLASS
  _setup_build
  [ -z "${QLORA_TOOLKIT}" ] || export CUDA_HOME=$QLORA_TOOLKIT
  export VIRTUAL_ENV=$VENV PATH=$VENV/bin:$PATH
  hash -r
  exec 9>&-  # release the lock: what runs next is not set-up
  _say "ready in $((SECONDS - t0)) s: $VENV, torch $(_torch_version), qlora_ext $(sed -n 3p "$QLORA_STAMPS/build")"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then  # run, not sourced
  set -uo pipefail
  [ $# = 1 ] || { echo "usage: bash scripts/setup_env.sh EXTRA   (test, examples or bench: an extra of pyproject.toml)" >&2; exit 2; }
  qlora_setup "$1"
fi
