"""The workspace of the CUDA paths (public as qlora_ext.workspace_bytes / release_workspace).

The paths are C++: csrc/workspace.cpp holds the scratch buffers (one per device, dtype and use, owned by the last
stream that asked for it, shared by every layer and sized by the largest request so far): the decoded weight of the
decode + cuBLAS path (ops ``_decode_gemm_fwd`` / ``_decode_gemm_bwd``; the size of the largest bf16/fp16 weight),
the split-k partial sums of the small-m path (``_gemv_fwd``; a few MiB) and the Hopper path's block scales and
repacked NF4 bytes (``_sm90_fwd``; about half a byte per weight of the largest layer), and the fused backward's
split partial sums (``_fused_bwd_dx`` at small m). These functions read and free them; without the CUDA kernels
there are none.
"""
from __future__ import annotations

import torch

from . import cuda


def workspace_bytes() -> int:
    """Bytes held by the workspace of the CUDA paths (all devices and dtypes: one buffer per device, dtype and use)."""
    return torch.ops.qlora_ext._workspace_bytes() if cuda.has_cuda_kernels() else 0


def release_workspace() -> None:
    """Drop the workspace buffers; their memory returns to PyTorch's caching allocator (torch.cuda.empty_cache()
    hands it back to the driver). The next call that needs one allocates it again."""
    if cuda.has_cuda_kernels():
        torch.ops.qlora_ext._release_workspace()
