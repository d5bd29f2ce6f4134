"""qlora_ext: QLoRA layers whose NF4 decode, frozen GEMM and LoRA path run as fused CUDA kernels.

    y = x·wᵀ + s·(dropout(x)·lora_Aᵀ)·lora_Bᵀ + bias,   w stored as bitsandbytes NF4 (double-quantized absmax)

Public API: quantize_nf4 / NF4Weight (the format), QLoRALinear (the layer), the torch.library ops under
torch.ops.qlora_ext (schemas in qlora_ext.ops, CUDA implementations in qlora_ext.backends.cuda, the choice between
them in qlora_ext.policy), the PEFT-style model helpers (apply, adapters, merge), multi-GPU helpers
(qlora_ext.distributed: adapters saved from DDP/FSDP2 runs), and the decode workspace of the decode + cuBLAS path
(workspace_bytes, release_workspace).
"""
from . import distributed, ops, policy, reference
from .backends.cuda import has_cuda_kernels
from .backends.decode_gemm import release_workspace, workspace_bytes
from .nf4 import NF4Storage, NF4Weight, quantize_nf4
from .nn import QLoRALinear
from .peft_compat import apply, load_adapter, lora_plus_param_groups, merge_and_unload, save_adapter

__version__ = "0.1.0"

__all__ = ["NF4Weight", "NF4Storage", "QLoRALinear", "quantize_nf4", "has_cuda_kernels", "apply", "save_adapter",
           "load_adapter", "lora_plus_param_groups", "merge_and_unload", "workspace_bytes", "release_workspace",
           "distributed", "ops", "policy", "reference", "__version__"]
