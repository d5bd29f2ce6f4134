"""LoRA initializers (PEFT's `init_lora_weights`), each a function of the frozen base weight.

Every initializer takes w [n, k] (the dequantized base, any float dtype) and the rank r, and returns
(lora_A [r, k], lora_B [n, r], residual), all float32 on w's device (the caller casts to its parameter dtype):

- kaiming, gaussian: B = 0, so the adapter starts at zero and the base is kept: residual is None.
- pissa, olora: A and B start on directions of w itself (its top singular vectors / the leading columns of
  its QR factors). For the layer to still compute w at step 0, the base must become
  residual = w − s·B·A [n, k] (float32), which the caller requantizes to NF4 as the new frozen base. Quantizing
  the residual rather than w is the point of QPiSSA: its largest directions now live in the full-precision
  adapter, so the 4-bit base carries less signal and loses less to rounding.

The formulas are PEFT's (peft/tuners/lora/layer.py, `reset_lora_parameters`, `pissa_init`, `olora_init`), so an
adapter trained from any of these starts exactly where a PEFT adapter with the same `init_lora_weights` would.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor, nn

__all__ = ["init_lora", "kaiming", "gaussian", "pissa", "olora", "method_from_peft", "peft_value"]

InitResult = tuple[Tensor, Tensor, Optional[Tensor]]

_PISSA_NITER_PREFIX = "pissa_niter_"


def _check_weight(weight: Tensor, r: int) -> tuple[int, int]:
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"init: weight must be a 2-D float tensor [n, k], got {weight.dtype} {tuple(weight.shape)}")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:  # bool is an int subclass: True is no rank
        raise ValueError(f"init: r must be a positive int, got {r!r}")
    n, k = weight.shape
    return n, k


def kaiming(weight: Tensor, r: int, generator: Optional[torch.Generator] = None) -> InitResult:
    """PEFT's default (init_lora_weights=True): A ~ kaiming_uniform(a=√5), i.e. U(−1/√k, 1/√k) like nn.Linear's
    own weight init; B = 0."""
    n, k = _check_weight(weight, r)
    lora_A = torch.empty(r, k, dtype=torch.float32, device=weight.device)
    nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5), generator=generator)
    return lora_A, torch.zeros(n, r, dtype=torch.float32, device=weight.device), None


def gaussian(weight: Tensor, r: int, generator: Optional[torch.Generator] = None) -> InitResult:
    """PEFT's "gaussian": A ~ N(0, σ²) with σ = 1/r (PEFT's std, so the variance is 1/r²); B = 0."""
    n, k = _check_weight(weight, r)
    lora_A = torch.empty(r, k, dtype=torch.float32, device=weight.device)
    nn.init.normal_(lora_A, std=1.0 / r, generator=generator)
    return lora_A, torch.zeros(n, r, dtype=torch.float32, device=weight.device), None


def _check_decomposable(weight: Tensor, r: int, scaling: float) -> Tensor:
    n, k = _check_weight(weight, r)
    if r > min(n, k):
        raise ValueError(f"init: r={r} exceeds min(n, k)={min(n, k)} of the [{n}, {k}] weight")
    if not scaling > 0:
        raise ValueError(f"init: scaling must be > 0, got {scaling!r}")
    return weight.to(torch.float32)


def pissa(weight: Tensor, r: int, scaling: float, niter: Optional[int] = None) -> InitResult:
    """PiSSA: w = U·diag(S)·Vᵀ; B = U_r·diag(√(S_r/s)), A = diag(√(S_r/s))·V_rᵀ, so s·B·A is the best rank-r
    approximation of w and residual = w − s·B·A holds the remaining singular values.

    niter=None runs the exact SVD (O(n·k·min(n, k)): seconds per large layer on a GPU, much longer on a CPU);
    an int runs torch.svd_lowrank with that many subspace iterations (PEFT's "pissa_niter_N"), which is fast but
    randomized, drawing from the global RNG."""
    w = _check_decomposable(weight, r, scaling)
    if niter is None:
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        U_r, S_r, Vh_r = U[:, :r], S[:r], Vh[:r]
    else:
        U_r, S_r, V_r = torch.svd_lowrank(w, q=r, niter=niter)
        Vh_r = V_r.T
    sqrt_s = torch.sqrt(S_r / scaling)
    lora_A = (sqrt_s[:, None] * Vh_r).contiguous()
    lora_B = (U_r * sqrt_s[None, :]).contiguous()
    return lora_A, lora_B, w - scaling * (lora_B @ lora_A)


def olora(weight: Tensor, r: int, scaling: float) -> InitResult:
    """OLoRA: w = Q·R (reduced QR); B = Q[:, :r] (orthonormal columns), A = R[:r]; residual = w − s·B·A.

    As in PEFT, s multiplies the subtracted term but is not folded into A and B, so for s ≠ 1 the adapter starts
    at s times the leading QR component rather than at it."""
    w = _check_decomposable(weight, r, scaling)
    Q, R = torch.linalg.qr(w)
    lora_A, lora_B = R[:r].contiguous(), Q[:, :r].contiguous()
    return lora_A, lora_B, w - scaling * (lora_B @ lora_A)


def init_lora(weight: Tensor, r: int, method: str, generator: Optional[torch.Generator] = None, *,
              scaling: Optional[float] = None) -> InitResult:
    """Dispatch on `method` ("kaiming", "gaussian", "pissa", "pissa_niter_<N>", "olora"); see the module docstring
    for what is returned. `generator` seeds the random inits (kaiming, gaussian). `scaling` (the layer's s) is
    required by pissa and olora, whose residual w − s·B·A depends on it."""
    if not isinstance(method, str):
        raise ValueError(f"init_lora: method must be a string, got {method!r}")
    if method == "kaiming":
        return kaiming(weight, r, generator)
    if method == "gaussian":
        return gaussian(weight, r, generator)
    if method == "olora" or method == "pissa" or method.startswith(_PISSA_NITER_PREFIX):
        if scaling is None:
            raise ValueError(f"init_lora: method {method!r} needs the layer's scaling (its residual is w − s·B·A)")
        if method == "olora":
            return olora(weight, r, scaling)
        if method == "pissa":
            return pissa(weight, r, scaling)
        niter = method[len(_PISSA_NITER_PREFIX):]
        if not niter.isdigit():
            raise ValueError(f"init_lora: {method!r} must end in a number of iterations, e.g. 'pissa_niter_16'")
        return pissa(weight, r, scaling, niter=int(niter))
    raise ValueError(f"init_lora: unknown method {method!r}; expected one of 'kaiming', 'gaussian', 'pissa', "
                     f"'pissa_niter_<N>', 'olora'")


def method_from_peft(init_lora_weights: Union[bool, str]) -> str:
    """Map PEFT's `init_lora_weights` value to an init_lora method (True is PEFT's name for kaiming)."""
    if init_lora_weights is True:
        return "kaiming"
    if isinstance(init_lora_weights, str) and (
            init_lora_weights in ("gaussian", "pissa", "olora") or init_lora_weights.startswith(_PISSA_NITER_PREFIX)):
        return init_lora_weights
    raise ValueError(f"init_lora_weights={init_lora_weights!r} is not supported by qlora_ext; use True (kaiming), "
                     f"'gaussian', 'pissa', 'pissa_niter_<N>' or 'olora'")


def peft_value(method: str) -> Union[bool, str]:
    """The inverse of method_from_peft, for writing adapter_config.json."""
    return True if method == "kaiming" else method
