"""The qlora_ext operators: schemas, dispatch, fake (meta) implementations and autograd.

Every op is defined once here with `torch.library.custom_op` (namespace ``qlora_ext``). Its default
implementation is the pure-PyTorch twin in ``qlora_ext/reference.py`` (so CPU tensors, and CUDA tensors where
no kernel applies, run the spec itself); the CUDA implementation calls the compiled kernels in ``qlora_ext._C``
when the inputs are on their fast path. ``QLORA_EXT_FORCE_REFERENCE=1`` routes everything to the reference.

Argument order and names follow ARCHITECTURE.md §1/§3 and are the same in the reference and the C++ wrappers:
On the CUDA side each GEMM op has two implementations (``QLORA_EXT_PATH`` picks one; default ``auto``):
``fused`` — the portable mma.sync kernels that decode NF4 inside the GEMM mainloop (forward in one launch,
backward in two); ``decode_gemm`` — NF4 decoded one L2-sized slab of rows at a time into a reusable buffer and
multiplied by cuBLAS (never a weight-sized temporary), with the LoRA terms as skinny cuBLAS GEMMs and the
dropout mask from the same counter hash. ``gemv`` — an experimental split-k decode
kernel for the forward at m <= 32 (opt-in only, not yet validated on a GPU). ``auto`` takes decode_gemm on
Hopper for m >= 4096, where the mma.sync kernels reach only a quarter of
the tensor-core rate of cuBLAS's wgmma kernels, and the fused kernels otherwise: below that the slab loop's
host overhead (~1 ms per layer call, measured on an H200) costs more than the fused kernels lose
(bench/NOTES.md has the measurements).

The NF4 weight travels as six tensors (w_nf4, absmax, code, nested_absmax, nested_code, offset), see
``NF4Weight.op_args()``. ``seed`` is a 0-d int64 CPU tensor so that drawing a fresh dropout seed per step stays
inside a compiled graph instead of becoming a Python constant (which would recompile every step).
"""
from __future__ import annotations

import os
import warnings
from typing import Optional

import torch
from torch import Tensor

from . import reference

try:
    from . import _C  # compiled kernels; absent when built with QLORA_EXT_SKIP_CUDA=1 or without nvcc
except ImportError:
    _C = None

__all__ = ["quantize_nf4", "dequantize_nf4", "qlora_linear", "qlora_linear_backward", "has_cuda_kernels"]

# Fast-path limits of the compiled kernels (csrc/common/checks.h enforces the same ones).
_KERNEL_DTYPES = (torch.bfloat16, torch.float16)
_KERNEL_BLOCKSIZE = 64
_KERNEL_K_MULTIPLE = 64
_KERNEL_MAX_R = 128
_NESTED_BLOCKSIZE = 256

_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


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
    k, r = x.shape[1], lora_A.shape[0]
    reason = None
    if x.dtype not in _KERNEL_DTYPES:
        reason = f"activations are {x.dtype} (kernels take bfloat16/float16)"
    elif k % _KERNEL_K_MULTIPLE != 0:
        reason = f"k={k} is not a multiple of {_KERNEL_K_MULTIPLE}"
    elif blocksize != _KERNEL_BLOCKSIZE:
        reason = f"blocksize={blocksize} (kernels take {_KERNEL_BLOCKSIZE})"
    elif r > _KERNEL_MAX_R:
        reason = f"r={r} > {_KERNEL_MAX_R}"
    if reason is not None:
        _warn_once(f"gemm:{reason}", f"qlora_ext: {reason}; this layer runs the PyTorch reference on CUDA.")
        return False
    return True


_PATHS = ("auto", "fused", "decode_gemm", "gemv")
# Rows of w decoded per cuBLAS call: ~4M elements (8 MiB in bf16) stays resident in the 50-60 MB L2 of an
# A100/H100/H200 between the decode and the GEMM that reads it. A multiple of 256 rows keeps each slab's first
# NF4 block at a nested-absmax group boundary (256 rows · k/64 blocks per row, k % 64 == 0), so slabs of the
# storage tensors are valid NF4 storage on their own.
_SLAB_ELEMS = 4 * 2**20
_SLAB_ROW_MULTIPLE = 256
# H200, 4096→14336 fwd: decode_gemm 1.18 ms vs fused 1.32 ms at m=2048 (fwd+bwd 3.46 vs 3.19), but 1.59 ms vs
# cuBLAS 1.38 ms at m=8192 where the fused kernel is ~4x cuBLAS: the crossover lies between, at about 4096.
_DECODE_GEMM_MIN_M = 4096
_GEMV_MAX_M = 32


def _cuda_path(x: Tensor, forward: bool) -> str:
    """Which CUDA implementation runs this call: QLORA_EXT_PATH, or the measured policy under "auto".

    "gemv" (the split-k decode kernel for 1 <= m <= 32, forward only) is opt-in and experimental: it compiles
    and has GPU tests, but has not yet been run on a GPU; calls it does not cover take the fused kernels."""
    path = os.environ.get("QLORA_EXT_PATH", "auto")
    if path not in _PATHS:
        raise ValueError(f"QLORA_EXT_PATH must be one of {_PATHS}, got {path!r}")
    if path == "gemv":
        return "gemv" if forward and 1 <= x.shape[0] <= _GEMV_MAX_M else "fused"
    if path != "auto":
        return path
    if x.shape[0] >= _DECODE_GEMM_MIN_M and torch.cuda.get_device_capability(x.device) >= (9, 0):
        return "decode_gemm"
    return "fused"


def _decoded_slabs(w_nf4, absmax, code, nested_absmax, nested_code, offset, n, k, dtype):
    """Yield (n0, n1, w[n0:n1] decoded to dtype) slab by slab; only one slab is alive at a time."""
    rows = max(_SLAB_ROW_MULTIPLE, _SLAB_ELEMS // k // _SLAB_ROW_MULTIPLE * _SLAB_ROW_MULTIPLE)
    blocks_per_row = k // _KERNEL_BLOCKSIZE
    for n0 in range(0, n, rows):
        n1 = min(n, n0 + rows)
        b0, b1 = n0 * blocks_per_row, n1 * blocks_per_row
        nested = None
        if nested_absmax is not None:
            nested = nested_absmax[b0 // _NESTED_BLOCKSIZE: -(-b1 // _NESTED_BLOCKSIZE)]
        yield n0, n1, _C.dequantize_nf4_cuda(w_nf4[n0 * k // 2: n1 * k // 2], absmax[b0:b1], code, nested,
                                             nested_code, offset, n1 - n0, k, _KERNEL_BLOCKSIZE, dtype)


def _decode_gemm_forward(x, w_nf4, absmax, code, nested_absmax, nested_code, offset, lora_A, lora_B, bias,
                         scaling, dropout_p, seed):
    m, k = x.shape
    n = lora_B.shape[0]
    x_drop = _C.lora_dropout_cuda(x, dropout_p, seed) if dropout_p > 0 else x
    u = x_drop @ lora_A.t()
    # y starts as s·u·lora_Bᵀ + bias (beta=0 ignores the uninitialized input), then each slab adds x·w_slabᵀ.
    y = torch.addmm(bias if bias is not None else x.new_empty(m, n), u, lora_B.t(),
                    beta=1 if bias is not None else 0, alpha=scaling)
    if m > 0:
        for n0, n1, w_slab in _decoded_slabs(w_nf4, absmax, code, nested_absmax, nested_code, offset, n, k,
                                             x.dtype):
            y[:, n0:n1].addmm_(x, w_slab.t())
            del w_slab  # free the slab before the next one is decoded: one slab alive at a time
    return y, u


def _decode_gemm_backward(dy, x, u, w_nf4, absmax, code, nested_absmax, nested_code, offset, lora_A, lora_B,
                          scaling, dropout_p, seed):
    m, k = x.shape
    n = lora_B.shape[0]
    g = torch.addmm(dy.new_empty(m, lora_B.shape[1]), dy, lora_B, beta=0, alpha=scaling)
    lora_dx = g @ lora_A
    if dropout_p > 0:
        lora_dx = _C.lora_dropout_cuda(lora_dx, dropout_p, seed)
    # dx sums over n, slab by slab: accumulate in fp32 (cuBLAS's bf16-in/fp32-out GEMM) and round once at the end,
    # as the fused kernel does; rounding after every slab tripled the error at n = 14336 (14 slabs).
    dx32 = lora_dx.float()
    if m > 0:
        for n0, n1, w_slab in _decoded_slabs(w_nf4, absmax, code, nested_absmax, nested_code, offset, n, k,
                                             x.dtype):
            torch.ops.aten.addmm.dtype_out(dx32, dy[:, n0:n1], w_slab, torch.float32, out=dx32)
            del w_slab
    dA, dB = _C.qlora_bwd_ab_cuda(dy, x, u, g, scaling, dropout_p, seed)
    return dx32.to(x.dtype), dA, dB


def _seed_int(seed: Tensor) -> int:
    return int(seed.item())


# --------------------------------------------------------------------------------------------------------------
# quantize_nf4
# --------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("qlora_ext::quantize_nf4", mutates_args=())
def quantize_nf4(w: Tensor, blocksize: int, double_quant: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """NF4-quantize w (any float dtype). Returns (w_nf4, absmax, nested_absmax, offset); without double quant
    nested_absmax and offset are empty float32 tensors (custom ops cannot return None). Twin:
    reference.quantize_nf4."""
    w_nf4, absmax, nested_absmax, offset = reference.quantize_nf4(w, blocksize, double_quant)
    return w_nf4, absmax, _or_empty(nested_absmax, w), _or_empty(offset, w)


def _or_empty(t: Optional[Tensor], like: Tensor) -> Tensor:
    return t if t is not None else torch.empty(0, dtype=torch.float32, device=like.device)


@quantize_nf4.register_kernel("cuda")
def _(w: Tensor, blocksize: int, double_quant: bool):
    if blocksize == _KERNEL_BLOCKSIZE and w.numel() > 0 and _kernels_enabled():
        # The kernel cannot reject NaN/Inf without a host sync; quantizing is a load-time step, so check here.
        reference.check_quantize_input(w, blocksize)
        w_nf4, absmax, nested_absmax, offset = _C.quantize_nf4_cuda(w.contiguous(), blocksize, double_quant)
        return w_nf4, absmax, _or_empty(nested_absmax, w), _or_empty(offset, w)
    w_nf4, absmax, nested_absmax, offset = reference.quantize_nf4(w, blocksize, double_quant)
    return w_nf4, absmax, _or_empty(nested_absmax, w), _or_empty(offset, w)


@quantize_nf4.register_fake
def _(w: Tensor, blocksize: int, double_quant: bool):
    numel = w.numel()
    nblocks = -(-numel // blocksize)
    w_nf4 = w.new_empty((numel + 1) // 2, dtype=torch.uint8)
    if not double_quant:
        return w_nf4, w.new_empty(nblocks, dtype=torch.float32), w.new_empty(0, dtype=torch.float32), \
            w.new_empty(0, dtype=torch.float32)
    return (w_nf4, w.new_empty(nblocks, dtype=torch.uint8),
            w.new_empty(-(-nblocks // _NESTED_BLOCKSIZE), dtype=torch.float32), w.new_empty((), dtype=torch.float32))


# --------------------------------------------------------------------------------------------------------------
# dequantize_nf4
# --------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("qlora_ext::dequantize_nf4", mutates_args=())
def dequantize_nf4(w_nf4: Tensor, absmax: Tensor, code: Tensor, nested_absmax: Optional[Tensor],
                   nested_code: Optional[Tensor], offset: Optional[Tensor], n: int, k: int, blocksize: int,
                   dtype: torch.dtype) -> Tensor:
    """w [n, k] in `dtype`, bit-exact with bitsandbytes' dequantize_4bit. Twin: reference.dequantize_nf4."""
    return reference.dequantize_nf4(w_nf4, absmax, code, nested_absmax, nested_code, offset, n, k, blocksize, dtype)


@dequantize_nf4.register_kernel("cuda")
def _(w_nf4, absmax, code, nested_absmax, nested_code, offset, n, k, blocksize, dtype):
    if blocksize == _KERNEL_BLOCKSIZE and n * k > 0 and _kernels_enabled():
        return _C.dequantize_nf4_cuda(w_nf4, absmax, code, nested_absmax, nested_code, offset, n, k, blocksize,
                                      dtype)
    return reference.dequantize_nf4(w_nf4, absmax, code, nested_absmax, nested_code, offset, n, k, blocksize, dtype)


@dequantize_nf4.register_fake
def _(w_nf4, absmax, code, nested_absmax, nested_code, offset, n, k, blocksize, dtype):
    return w_nf4.new_empty((n, k), dtype=dtype)


# --------------------------------------------------------------------------------------------------------------
# qlora_linear (forward) and qlora_linear_backward
# --------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("qlora_ext::qlora_linear", mutates_args=())
def qlora_linear(x: Tensor, w_nf4: Tensor, absmax: Tensor, code: Tensor, nested_absmax: Optional[Tensor],
                 nested_code: Optional[Tensor], offset: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                 bias: Optional[Tensor], scaling: float, dropout_p: float, seed: Tensor,
                 blocksize: int) -> tuple[Tensor, Tensor]:
    """(y, u): y = x·wᵀ + s·u·lora_Bᵀ + bias, u = dropout(x)·lora_Aᵀ (saved for backward).
    x [m, k]; lora_A [r, k]; lora_B [n, r]; seed: 0-d int64 CPU tensor. Twin: reference.qlora_linear."""
    return reference.qlora_linear(x, w_nf4, absmax, code, nested_absmax, nested_code, offset, lora_A, lora_B, bias,
                                  scaling, dropout_p, _seed_int(seed), blocksize)


@qlora_linear.register_kernel("cuda")
def _(x, w_nf4, absmax, code, nested_absmax, nested_code, offset, lora_A, lora_B, bias, scaling, dropout_p, seed,
      blocksize):
    if _kernels_enabled() and _gemm_fast_path(x, lora_A, blocksize):
        path = _cuda_path(x, forward=True)
        if path == "gemv":
            return _C.qlora_gemv_cuda(x.contiguous(), w_nf4, absmax, code, nested_absmax, nested_code, offset,
                                      lora_A.contiguous(), lora_B.contiguous(), bias, scaling, dropout_p,
                                      _seed_int(seed), blocksize)
        if path == "decode_gemm":
            return _decode_gemm_forward(x.contiguous(), w_nf4, absmax, code, nested_absmax, nested_code, offset,
                                        lora_A, lora_B, bias, scaling, dropout_p, _seed_int(seed))
        return _C.qlora_fwd_cuda(x.contiguous(), w_nf4, absmax, code, nested_absmax, nested_code, offset,
                                 lora_A.contiguous(), lora_B.contiguous(), bias, scaling, dropout_p,
                                 _seed_int(seed), blocksize)
    return reference.qlora_linear(x, w_nf4, absmax, code, nested_absmax, nested_code, offset, lora_A, lora_B, bias,
                                  scaling, dropout_p, _seed_int(seed), blocksize)


@qlora_linear.register_fake
def _(x, w_nf4, absmax, code, nested_absmax, nested_code, offset, lora_A, lora_B, bias, scaling, dropout_p, seed,
      blocksize):
    m, n, r = x.shape[0], lora_B.shape[0], lora_A.shape[0]
    return x.new_empty((m, n)), x.new_empty((m, r))


@torch.library.custom_op("qlora_ext::qlora_linear_backward", mutates_args=())
def qlora_linear_backward(dy: Tensor, x: Tensor, u: Tensor, w_nf4: Tensor, absmax: Tensor, code: Tensor,
                          nested_absmax: Optional[Tensor], nested_code: Optional[Tensor], offset: Optional[Tensor],
                          lora_A: Tensor, lora_B: Tensor, scaling: float, dropout_p: float, seed: Tensor,
                          blocksize: int) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dA, dB) of qlora_linear for upstream gradient dy [m, n]; w is never materialized on the CUDA path.
    Twin: reference.qlora_linear_backward."""
    return reference.qlora_linear_backward(dy, x, u, w_nf4, absmax, code, nested_absmax, nested_code, offset,
                                           lora_A, lora_B, scaling, dropout_p, _seed_int(seed), blocksize)


@qlora_linear_backward.register_kernel("cuda")
def _(dy, x, u, w_nf4, absmax, code, nested_absmax, nested_code, offset, lora_A, lora_B, scaling, dropout_p, seed,
      blocksize):
    if _kernels_enabled() and _gemm_fast_path(x, lora_A, blocksize):
        # Two launches (ARCHITECTURE §4): dx and g = s·dy·lora_B from one kernel, then dA and dB from one kernel.
        dy, x, u = dy.contiguous(), x.contiguous(), u.contiguous()
        if _cuda_path(x, forward=False) == "decode_gemm":
            return _decode_gemm_backward(dy, x, u, w_nf4, absmax, code, nested_absmax, nested_code, offset,
                                         lora_A, lora_B, scaling, dropout_p, _seed_int(seed))
        dx, g = _C.qlora_bwd_dx_cuda(dy, w_nf4, absmax, code, nested_absmax, nested_code, offset,
                                     lora_A.contiguous(), lora_B.contiguous(), scaling, dropout_p, _seed_int(seed),
                                     blocksize)
        dA, dB = _C.qlora_bwd_ab_cuda(dy, x, u, g, scaling, dropout_p, _seed_int(seed))
        return dx, dA, dB
    return reference.qlora_linear_backward(dy, x, u, w_nf4, absmax, code, nested_absmax, nested_code, offset,
                                           lora_A, lora_B, scaling, dropout_p, _seed_int(seed), blocksize)


@qlora_linear_backward.register_fake
def _(dy, x, u, w_nf4, absmax, code, nested_absmax, nested_code, offset, lora_A, lora_B, scaling, dropout_p, seed,
      blocksize):
    return torch.empty_like(x), torch.empty_like(lora_A), torch.empty_like(lora_B)


# Autograd: w is frozen (no dw); u is an auxiliary output saved for backward, not differentiable.
_N_FWD_INPUTS = 14


def _setup_context(ctx, inputs, output):
    (x, w_nf4, absmax, code, nested_absmax, nested_code, offset, lora_A, lora_B, bias, scaling, dropout_p, seed,
     blocksize) = inputs
    _, u = output
    ctx.mark_non_differentiable(u)
    ctx.save_for_backward(x, u, w_nf4, absmax, code, nested_absmax, nested_code, offset, lora_A, lora_B, seed)
    ctx.scaling, ctx.dropout_p, ctx.blocksize = scaling, dropout_p, blocksize
    ctx.bias_needs_grad = bias is not None and bias.requires_grad


def _backward(ctx, dy, du):
    x, u, w_nf4, absmax, code, nested_absmax, nested_code, offset, lora_A, lora_B, seed = ctx.saved_tensors
    dx, dA, dB = torch.ops.qlora_ext.qlora_linear_backward(
        dy, x, u, w_nf4, absmax, code, nested_absmax, nested_code, offset, lora_A, lora_B, ctx.scaling,
        ctx.dropout_p, seed, ctx.blocksize)
    dbias = dy.sum(0) if ctx.bias_needs_grad else None
    grads = [None] * _N_FWD_INPUTS
    grads[0], grads[7], grads[8], grads[9] = dx, dA, dB, dbias
    return tuple(grads)


qlora_linear.register_autograd(_backward, setup_context=_setup_context)
