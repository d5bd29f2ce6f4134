"""CUDA implementations of the qlora_ext ops: the compiled kernels, the registry of GEMM paths that
``qlora_ext/policy.py`` chooses from, and the contract check of QLoRALinear's eager fast path.

The compiled kernels are torch ops of their own (``torch.ops.qlora_ext._fused_fwd`` etc.; schemas in
``csrc/ops.cpp``, each registered by its kernel file), loaded by importing ``qlora_ext._C``. They take the NF4
storage as one list ``[w_nf4, absmax, code, nested_absmax, nested_code, offset]``. Each GEMM path is a forward op
and, unless it is forward-only, a backward op, with one signature per direction (``csrc/path_ops.h``); the decode +
cuBLAS path is host C++ as well (``csrc/decode_gemm.cpp``). The custom ops registered here and the layer's eager op
``_linear`` (``csrc/qlora_autograd.cpp``) call the same path ops: one implementation per path. Calls outside the
kernels' contract (fp32 activations, k % 64 != 0, blocksize != 64, r > 128) run the reference twin, with one
warning naming the reason; ``QLORA_EXT_FORCE_REFERENCE=1`` routes every CUDA call to the reference.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import ops, policy, reference

kernels = torch.ops.qlora_ext

try:
    from .. import _C  # noqa: F401  (loading the library registers torch.ops.qlora_ext._fused_fwd & co.)
except ImportError:
    _C = None


def check_path_names(cpp_names: Sequence[str]) -> None:
    """The path table of csrc/qlora_autograd.cpp (``torch.ops.qlora_ext._path_names()``) must list policy.PATHS in
    the same order: the layer passes a path to ``_linear`` as its index there."""
    if tuple(cpp_names) != policy.PATHS:
        raise RuntimeError(f"qlora_ext: the C++ path table (csrc/qlora_autograd.cpp) names {tuple(cpp_names)}, "
                           f"qlora_ext.policy.PATHS names {policy.PATHS}; list the same paths in the same order")


if _C is not None:
    if hasattr(kernels, "_path_names"):
        check_path_names(kernels._path_names())
    else:  # a library built from an older source: its ops are not the ones this Python code calls
        warnings.warn("qlora_ext._C was built from an older source (it has no torch.ops.qlora_ext._path_names): "
                      "rebuild it (see README, 'Install'); until then CUDA tensors run the PyTorch reference.")
        _C = None

# The kernels' contract (csrc/common/checks.h enforces the same limits).
KERNEL_DTYPES = (torch.bfloat16, torch.float16)
KERNEL_BLOCKSIZE = 64
KERNEL_K_MULTIPLE = 64
KERNEL_MAX_R = 128

_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=4)


def has_cuda_kernels() -> bool:
    """True when the package was built with its CUDA kernels."""
    return _C is not None


def _kernels_enabled() -> bool:
    """Whether CUDA tensors may use the compiled kernels (else they use the reference, with one warning)."""
    if os.environ.get("QLORA_EXT_FORCE_REFERENCE", "0") == "1":
        return False
    if _C is None:
        _warn_once("no_C", "qlora_ext was built without its CUDA kernels (QLORA_EXT_SKIP_CUDA=1 or no nvcc at "
                           "build time): CUDA tensors run the PyTorch reference, which is much slower. Rebuild with "
                           "a CUDA toolkit to get the fused kernels (see README, 'Install').")
        return False
    return True


def _gemm_fast_path(x: Tensor, lora_A: Tensor, blocksize: int) -> bool:
    """The kernels' shape/dtype contract; anything else runs the reference with one warning naming the reason."""
    if not _kernels_enabled():
        return False
    k, r = x.shape[1], lora_A.shape[0]
    reason = None
    if x.dtype not in KERNEL_DTYPES:
        reason = f"activations are {x.dtype} (kernels take bfloat16/float16)"
    elif k % KERNEL_K_MULTIPLE != 0:
        reason = f"k={k} is not a multiple of {KERNEL_K_MULTIPLE}"
    elif blocksize != KERNEL_BLOCKSIZE:
        reason = f"blocksize={blocksize} (kernels take {KERNEL_BLOCKSIZE})"
    elif r > KERNEL_MAX_R:
        reason = f"r={r} > {KERNEL_MAX_R}"
    if reason is not None:
        _warn_once(f"gemm:{reason}", f"qlora_ext: {reason}; this layer runs the PyTorch reference on CUDA.")
        return False
    return True


def eager_path_ids(x: Tensor, lora_A: Tensor, blocksize: int, n: int) -> Optional[tuple[int, int]]:
    """(forward, backward) path ids for ``torch.ops.qlora_ext._linear`` when this CUDA call is inside the kernels'
    contract; None otherwise (the call then goes through the custom op, which runs the reference; the reason is
    warned once). x is the [m, k] activation in the compute dtype."""
    if not _gemm_fast_path(x, lora_A, blocksize):
        return None
    m, k = x.shape
    return policy.path_ids(x.device.index, x.dtype, m, n, k)


# --------------------------------------------------------------------------------------------------------------
# The GEMM paths, by op name under torch.ops.qlora_ext (the ops exist only once _C is loaded). Each forward op
# takes (x, w, lora_A, lora_B, bias, scaling, dropout_p, seed) and returns (y, u); each backward op takes
# (dy, x, u, w, lora_A, lora_B, scaling, dropout_p, seed) and returns (dx, dA, dB). x, dy, u, lora_A, lora_B must
# be contiguous; w is the NF4 storage list; seed is a Python int.
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Impl:
    forward: str
    backward: Optional[str]  # None: forward-only (its backward runs "fused")


IMPLS = {
    "fused": Impl("_fused_fwd", "_fused_bwd"),
    "decode_gemm": Impl("_decode_gemm_fwd", "_decode_gemm_bwd"),
    "gemv": Impl("_gemv_fwd", None),
    "sm90": Impl("_sm90_fwd", None),
}
assert tuple(IMPLS) == policy.PATHS, "policy.PATHS and the registry must name the same implementations"
assert {p for p, i in IMPLS.items() if i.backward is None} == set(policy.FORWARD_ONLY)


# --------------------------------------------------------------------------------------------------------------
# Registrations against the schemas of qlora_ext/ops.py.
# --------------------------------------------------------------------------------------------------------------
@ops.quantize_nf4.register_kernel("cuda")
def _(w: Tensor, blocksize: int, double_quant: bool):
    if blocksize == KERNEL_BLOCKSIZE and w.numel() > 0 and _kernels_enabled():
        # The kernel cannot reject NaN/Inf without a host sync; quantizing is a load-time step, so check here.
        reference.check_quantize_input(w, blocksize)
        return kernels._quantize_nf4(w.contiguous(), double_quant)
    w_nf4, absmax, nested_absmax, offset = reference.quantize_nf4(w, blocksize, double_quant)
    return w_nf4, absmax, ops.or_empty(nested_absmax, w), ops.or_empty(offset, w)


@ops.dequantize_nf4.register_kernel("cuda")
def _(w_nf4, absmax, code, nested_absmax, nested_code, offset, n, k, blocksize, dtype):
    if blocksize == KERNEL_BLOCKSIZE and n * k > 0 and _kernels_enabled():
        out = torch.empty((n, k), dtype=dtype, device=w_nf4.device)
        kernels._dequantize_nf4_out([w_nf4, absmax, code, nested_absmax, nested_code, offset], out)
        return out
    return reference.dequantize_nf4(w_nf4, absmax, code, nested_absmax, nested_code, offset, n, k, blocksize, dtype)


@ops.qlora_linear.register_kernel("cuda")
def _(x, w_nf4, absmax, code, nested_absmax, nested_code, offset, lora_A, lora_B, bias, scaling, dropout_p, seed,
      blocksize):
    with ops.autocast_off(x.device):
        if not _gemm_fast_path(x, lora_A, blocksize):
            return reference.qlora_linear(x, w_nf4, absmax, code, nested_absmax, nested_code, offset, lora_A,
                                          lora_B, bias, scaling, dropout_p, ops.seed_int(seed), blocksize)
        (m, k), n = x.shape, lora_B.shape[0]
        path = policy.choose(x.device, x.dtype, m, n, k, forward=True)
        w = [w_nf4, absmax, code, nested_absmax, nested_code, offset]
        return getattr(kernels, IMPLS[path].forward)(x.contiguous(), w, lora_A.contiguous(), lora_B.contiguous(),
                                                     bias, scaling, dropout_p, ops.seed_int(seed))


@ops.qlora_linear_backward.register_kernel("cuda")
def _(dy, x, u, w_nf4, absmax, code, nested_absmax, nested_code, offset, lora_A, lora_B, scaling, dropout_p, seed,
      blocksize):
    with ops.autocast_off(x.device):
        if not _gemm_fast_path(x, lora_A, blocksize):
            return reference.qlora_linear_backward(dy, x, u, w_nf4, absmax, code, nested_absmax, nested_code,
                                                   offset, lora_A, lora_B, scaling, dropout_p, ops.seed_int(seed),
                                                   blocksize)
        (m, k), n = x.shape, lora_B.shape[0]
        path = policy.choose(x.device, x.dtype, m, n, k, forward=False)
        w = [w_nf4, absmax, code, nested_absmax, nested_code, offset]
        return getattr(kernels, IMPLS[path].backward)(dy.contiguous(), x.contiguous(), u.contiguous(), w,
                                                      lora_A.contiguous(), lora_B.contiguous(), scaling, dropout_p,
                                                      ops.seed_int(seed))
