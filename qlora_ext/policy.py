"""Which CUDA implementation serves a ``qlora_linear`` call: one measured table, looked up once per key.

The implementations themselves live in ``qlora_ext/backends/cuda.py`` (a registry keyed by the names in
``PATHS``) and, for the layer's eager calls, in the path table of ``csrc/qlora_autograd.cpp``, which takes a path as
its index in ``PATHS`` (``path_ids``); this module only decides. The decision is a pure function of (compute
capability, dtype, shape class, m) and of the direction (forward / backward), read from ``policy_table.json`` next
to this file. That table is written by ``python -m bench.policy <sweep.json>`` from a ``pytest bench/`` run and
names the run it came from, so every choice it makes can be traced to a measurement. ``QLORA_EXT_PATH=<name>`` (or
``override(name)``) forces one implementation, for tests, sanitizers and benchmarks; it is an override, not part of
the policy.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch

# The CUDA implementations of the GEMM ops (the one place their names are defined; the C++ path table of
# csrc/qlora_autograd.cpp lists them in this order, and qlora_ext/backends/cuda.py checks that at import):
#   fused        portable mma.sync kernels (sm80+): NF4 decoded in the GEMM mainloop, forward in one launch,
#                backward in two (dx + g; dA + dB). No dequantized weight anywhere.
#   decode_gemm  the whole NF4 weight decoded in one launch into a workspace shared by all layers, then one
#                cuBLAS GEMM per product and the LoRA terms as skinny cuBLAS GEMMs.
#   gemv         split-k decode kernel for the forward at 1 <= m <= GEMV_MAX_M (u on cuBLAS first).
#   sm90         Hopper only (compute capability 9.0, built with 9.0a): the NF4 GEMM on CUTLASS's TMA + wgmma
#                mixed-input mainloop, the LoRA products on cuBLAS; forward only, n % 8 == 0.
# A forward-only path (FORWARD_ONLY) never serves a backward: the table's bwd column names another path, and a
# forced one falls back to "fused" there.
PATHS = ("fused", "decode_gemm", "gemv", "sm90")
FORWARD_ONLY = ("gemv", "sm90")
AUTO = "auto"
ENV_VAR = "QLORA_EXT_PATH"
GEMV_MAX_M = 32
TABLE_FILE = Path(__file__).with_name("policy_table.json")


def shape_class(n: int, k: int) -> str:
    """Coarse weight-shape class of the table: small weights (<= 32M elements: Llama-3-8B q/k/v/o) behave
    differently from large ones, and among large ones expanding (n >= k: gate/up) from reducing (down) layers."""
    if n * k <= 2**25:
        return "small"
    return "expand" if n >= k else "reduce"


def supports(path: str, m: int, forward: bool, n: int, device_index: Optional[int] = None) -> bool:
    """Whether implementation `path` can serve a call with m rows and n output features on CUDA device
    `device_index` (None: the current one) at all, independent of speed."""
    if path in FORWARD_ONLY and not forward:
        return False
    if path == "gemv":
        return 1 <= m <= GEMV_MAX_M
    if path == "sm90":
        if n % 8 != 0 or not _sm90_built() or not torch.cuda.is_available():
            return False
        return _device_cc(torch.cuda.current_device() if device_index is None else device_index) == "9.0"
    return path in PATHS


@functools.cache
def _sm90_built() -> bool:
    """Whether qlora_ext._C has the sm_90a units (built with 9.0a in TORCH_CUDA_ARCH_LIST)."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("qlora_ext::_sm90_fwd", "CUDA")
    except RuntimeError:  # no _C, or an _C without the op's schema
        return False


@dataclass(frozen=True)
class Rule:
    cc: str               # "9.0", or "*" for GPUs the table was not measured on
    dtype: str            # "bfloat16" / "float16" / "*"
    shape_class: str      # see shape_class()
    m_max: Optional[int]  # rule covers m <= m_max (None: no upper bound); rules are tried in m_max order
    fwd: str
    bwd: str
    why: str = ""


@functools.cache
def table() -> tuple[Rule, ...]:
    """The rules of policy_table.json, validated, sorted by m_max (open-ended last)."""
    data = json.loads(TABLE_FILE.read_text())
    rules = []
    for row in data["rules"]:
        rule = Rule(**row)
        for direction, path in (("fwd", rule.fwd), ("bwd", rule.bwd)):
            if path not in PATHS or (direction == "bwd" and path in FORWARD_ONLY):
                raise ValueError(f"{TABLE_FILE.name}: rule {row} names {direction} path {path!r}; expected one of "
                                 f"{PATHS} ({', '.join(FORWARD_ONLY)}: forward only). Regenerate it with "
                                 "`python -m bench.policy`.")
        rules.append(rule)
    return tuple(sorted(rules, key=lambda r: (r.m_max is None, r.m_max or 0)))


@functools.lru_cache(maxsize=None)
def _device_cc(index: int) -> str:
    major, minor = torch.cuda.get_device_capability(index)
    return f"{major}.{minor}"


@functools.lru_cache(maxsize=4096)
def _lookup(cc: str, dtype: str, cls: str, m: int) -> tuple[str, str]:
    """(fwd path, bwd path) of the first matching rule; rules for this exact cc win over cc "*" rules."""
    for want_cc in (cc, "*"):
        for rule in table():
            if (rule.cc == want_cc and rule.dtype in (dtype, "*") and rule.shape_class == cls
                    and (rule.m_max is None or m <= rule.m_max)):
                return rule.fwd, rule.bwd
    return "fused", "fused"  # the table has no row for this key: the portable kernels serve every call


_forced: Optional[str] = None


def forced_path() -> Optional[str]:
    """The implementation forced by override() or QLORA_EXT_PATH, or None for the measured policy."""
    path = _forced if _forced is not None else os.environ.get(ENV_VAR, AUTO)
    if path == AUTO:
        return None
    if path not in PATHS:
        raise ValueError(f"{ENV_VAR} must be one of {(AUTO,) + PATHS}, got {path!r}")
    return path


@contextlib.contextmanager
def override(path: str) -> Iterator[None]:
    """Force implementation `path` inside the block ("auto": the measured policy), whatever QLORA_EXT_PATH says."""
    global _forced
    if path != AUTO and path not in PATHS:
        raise ValueError(f"override: path must be one of {(AUTO,) + PATHS}, got {path!r}")
    previous, _forced = _forced, path
    try:
        yield
    finally:
        _forced = previous


def choose(device: torch.device, dtype: torch.dtype, m: int, n: int, k: int, forward: bool) -> str:
    """The implementation that serves one call of the forward (forward=True) or backward op."""
    return _choose(forced_path(), device.index, dtype, m, n, k, forward)


def path_ids(device_index: int, dtype: torch.dtype, m: int, n: int, k: int) -> tuple[int, int]:
    """(forward, backward) implementation of one call as indices into PATHS, the path ids of
    torch.ops.qlora_ext._linear: both are chosen when the forward runs (m is known then). Cached per key, so that
    the per-call cost is one dictionary lookup; override() and QLORA_EXT_PATH still apply (they are part of the
    key)."""
    return _path_ids(forced_path(), device_index, dtype, m, n, k)


@functools.lru_cache(maxsize=4096)
def _path_ids(forced: Optional[str], device_index: int, dtype: torch.dtype, m: int, n: int,
              k: int) -> tuple[int, int]:
    return (PATHS.index(_choose(forced, device_index, dtype, m, n, k, forward=True)),
            PATHS.index(_choose(forced, device_index, dtype, m, n, k, forward=False)))


def _choose(forced: Optional[str], device_index: Optional[int], dtype: torch.dtype, m: int, n: int, k: int,
            forward: bool) -> str:
    if forced is not None:
        # A forced path that cannot serve this call (gemv outside its m range, or a backward) falls back to
        # the portable kernels rather than failing: forcing gemv must still let a training step run.
        return forced if supports(forced, m, forward, n, device_index) else "fused"
    if device_index is None:  # torch.device("cuda"): the current device
        device_index = torch.cuda.current_device()
    # The measured GPU's rule first; if its path cannot serve the call (sm90 without the 9.0a build, n % 8 != 0),
    # the rule for unmeasured GPUs, which names portable paths only; the portable kernels last.
    for cc in (_device_cc(device_index), "*"):
        fwd, bwd = _lookup(cc, str(dtype).removeprefix("torch."), shape_class(n, k), m)
        path = fwd if forward else bwd
        if supports(path, m, forward, n, device_index):
            return path
    return "fused"
