"""The qlora_ext operators: schemas, fake (meta) implementations and autograd — what the ops are.

Every op is defined once here with ``torch.library.custom_op`` (namespace ``qlora_ext``). Its default
implementation is the pure-PyTorch twin in ``qlora_ext/reference.py``, so CPU tensors (and CUDA tensors no kernel
covers) run the spec itself. How CUDA runs them — the compiled kernels, the decode + cuBLAS path and the choice
between them — lives in ``qlora_ext/backends/cuda.py`` and ``qlora_ext/policy.py``.

Argument names follow the math of ``reference.py``: x [m, k], the NF4 weight w [n, k] as six storage tensors
(w_nf4, absmax, code, nested_absmax, nested_code, offset; see ``NF4Weight.op_args()``), lora_A [r, k],
lora_B [n, r], s = ``scaling``. ``seed`` is a 0-d int64 CPU tensor so that drawing a fresh dropout seed per step
stays inside a compiled graph instead of becoming a Python constant (which would recompile every step).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from . import reference

__all__ = ["quantize_nf4", "dequantize_nf4", "qlora_linear", "qlora_linear_backward"]

_NESTED_BLOCKSIZE = 256


def seed_int(seed: Tensor) -> int:
    return int(seed.item())


def autocast_off(device: torch.device):
    """The ops compute in their inputs' dtypes by contract (the reference is the spec the kernels match); an
    enclosing autocast region must not re-cast the matmuls inside them (e.g. when backward runs under autocast)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def or_empty(t: Optional[Tensor], like: Tensor) -> Tensor:
    """Custom ops cannot return None: an absent NF4 side tensor travels as an empty float32 tensor."""
    return t if t is not None else torch.empty(0, dtype=torch.float32, device=like.device)


# --------------------------------------------------------------------------------------------------------------
# quantize_nf4
# --------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("qlora_ext::quantize_nf4", mutates_args=())
def quantize_nf4(w: Tensor, blocksize: int, double_quant: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """NF4-quantize w (any float dtype). Returns (w_nf4, absmax, nested_absmax, offset); without double quant
    nested_absmax and offset are empty float32 tensors (custom ops cannot return None). Twin:
    reference.quantize_nf4."""
    w_nf4, absmax, nested_absmax, offset = reference.quantize_nf4(w, blocksize, double_quant)
    return w_nf4, absmax, or_empty(nested_absmax, w), or_empty(offset, w)


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
    with autocast_off(x.device):
        return reference.qlora_linear(x, w_nf4, absmax, code, nested_absmax, nested_code, offset, lora_A, lora_B,
                                      bias, scaling, dropout_p, seed_int(seed), blocksize)


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
    with autocast_off(x.device):
        return reference.qlora_linear_backward(dy, x, u, w_nf4, absmax, code, nested_absmax, nested_code, offset,
                                               lora_A, lora_B, scaling, dropout_p, seed_int(seed), blocksize)


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
