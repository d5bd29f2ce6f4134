"""The decode workspace of the decode + cuBLAS path (public as qlora_ext.workspace_bytes / release_workspace).

The path itself is C++: csrc/decode_gemm.cpp (ops ``_decode_gemm_fwd`` / ``_decode_gemm_bwd``), which decodes the
whole NF4 weight into one buffer per (device, dtype, stream), shared by every layer and sized by the largest weight
decoded so far. These functions read and free that buffer; without the CUDA kernels there is none.
"""
from __future__ import annotations

import torch

from . import cuda


def workspace_bytes() -> int:
    """Bytes held by the decode workspaces (all devices, dtypes and streams)."""
    return torch.ops.qlora_ext._workspace_bytes() if cuda.has_cuda_kernels() else 0


def release_workspace() -> None:
    """Drop the decode workspaces; their memory returns to PyTorch's caching allocator (torch.cuda.empty_cache()
    hands it back to the driver). The next decode_gemm call allocates a new one."""
    if cuda.has_cuda_kernels():
        torch.ops.qlora_ext._release_workspace()
