"""The decode + cuBLAS path: decode the whole NF4 weight in one launch into a workspace, then one cuBLAS GEMM per
product, with the LoRA terms as skinny cuBLAS GEMMs.

Why it exists: on GPUs where the fused mma.sync kernels reach only a fraction of the tensor-core rate (Hopper:
cuBLAS uses wgmma), decoding W at memory bandwidth and letting cuBLAS do the GEMM is faster at large m. The
decode moves 0.5 B/element in and 2 B/element out (4096x14336: 29 MB + 117 MB, ~34 µs at 4.3 TB/s) — small next
to a GEMM of m >= 2048 rows (~0.3 ms at m = 2048 for that shape).

Workspace: one buffer per (device, dtype, stream), shared by every layer, sized by the largest weight decoded so far
(it grows once per new maximum and is then reused by every call: no weight-sized allocation in the steady
state). Its size is ``workspace_bytes()``; ``release_workspace()`` frees it (the next call allocates again).
Keying by stream keeps two streams from decoding into one buffer at the same time; within one stream the
decode → GEMM order of successive layers is the stream order, so reuse is safe.

Twin (the spec): ``reference.qlora_linear`` / ``qlora_linear_backward``; rounding as the reference within the
ratio rule (fp32 accumulation inside cuBLAS, one rounding per GEMM output).
"""
from __future__ import annotations

import torch
from torch import Tensor

kernels = torch.ops.qlora_ext

_workspaces: dict[tuple[int, torch.dtype, int], Tensor] = {}


def workspace_bytes() -> int:
    """Bytes held by the decode workspaces (all devices, dtypes and streams)."""
    return sum(t.numel() * t.element_size() for t in _workspaces.values())


def release_workspace() -> None:
    """Drop the decode workspaces; their memory returns to PyTorch's caching allocator (torch.cuda.empty_cache()
    hands it back to the driver). The next decode_gemm call allocates a new one."""
    _workspaces.clear()


def _decoded(w: list, n: int, k: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """w decoded to `dtype` as an [n, k] view of the workspace (valid until the next decode on this stream)."""
    key = (device.index if device.index is not None else torch.cuda.current_device(), dtype,
           torch.cuda.current_stream(device).stream_id)
    buf = _workspaces.get(key)
    if buf is None or buf.numel() < n * k:
        _workspaces.pop(key, None)  # free the smaller buffer before allocating the larger one
        buf = _workspaces[key] = torch.empty(n * k, dtype=dtype, device=device)
    out = buf[: n * k].view(n, k)
    kernels._dequantize_nf4_out(w, out)
    return out


def forward(x: Tensor, w: list, lora_A: Tensor, lora_B: Tensor, bias, scaling: float, dropout_p: float,
            seed: int):
    """(y, u): u = dropout(x)·lora_Aᵀ; y = s·u·lora_Bᵀ + bias, then y += x·wᵀ in one cuBLAS GEMM (beta = 1).

    The LoRA term goes in first because cuBLAS then reads it as the GEMM's C operand while the GEMM is
    compute-bound; adding it afterwards re-reads and re-writes y (measured on an H200, 4096→14336: 1.04-1.12×
    the bare GEMM this way, 1.05-1.15× the other; scripts/probe_decode_gemm.py)."""
    (m, k), n = x.shape, lora_B.shape[0]
    x_drop = kernels._lora_dropout(x, dropout_p, seed) if dropout_p > 0 else x
    u = torch.mm(x_drop, lora_A.t())
    if bias is not None:
        y = torch.addmm(bias, u, lora_B.t(), alpha=scaling)
    else:  # beta = 0: the uninitialized y is ignored (no allocation beside y itself)
        y = x.new_empty(m, n).addmm_(u, lora_B.t(), beta=0, alpha=scaling)
    if m > 0:
        y.addmm_(x, _decoded(w, n, k, x.dtype, x.device).t())
    return y, u


def backward(dy: Tensor, x: Tensor, u: Tensor, w: list, lora_A: Tensor, lora_B: Tensor, scaling: float,
             dropout_p: float, seed: int):
    """(dx, dA, dB): g = s·dy·lora_B; dx = dy·w + mask(g·lora_A); dA, dB from one kernel.

    Without dropout the LoRA term is added after the big GEMM (dx.addmm_), which measured 1.03-1.16× the bare
    GEMM against 1.01-1.23× for adding it as C (scripts/probe_decode_gemm.py); with dropout the masked term must
    exist as a tensor anyway, so it is the GEMM's C operand."""
    (m, k), n = x.shape, lora_B.shape[0]
    g = dy.new_empty(m, lora_B.shape[1]).addmm_(dy, lora_B, beta=0, alpha=scaling)
    if m == 0:
        dx = dy.new_zeros(m, k)
    elif dropout_p > 0:
        dx = kernels._lora_dropout(torch.mm(g, lora_A), dropout_p, seed)
        dx.addmm_(dy, _decoded(w, n, k, x.dtype, x.device))
    else:
        dx = torch.mm(dy, _decoded(w, n, k, x.dtype, x.device))
        dx.addmm_(g, lora_A)
    dA, dB = kernels._bwd_ab(dy, x, u, g, scaling, dropout_p, seed)
    return dx, dA, dB
