"""Multi-process training of models converted by qlora_ext.apply, with PyTorch's own engines.

Nothing here communicates on its own account: DistributedDataParallel and fully_shard (FSDP2) move the data;
these helpers read what they hold and gather the adapters with DTensor.full_tensor().

DDP    DistributedDataParallel(model) as it is. The NF4 storage of every QLoRALinear (its child `base`) are frozen
       uint8 parameters: DDP broadcasts them once, when it wraps the model, and never per step (what
       broadcast_buffers=True broadcasts before each forward is buffers), and it reduces the gradients of the
       trainable parameters (the adapters) only.
FSDP2  set_storage_dtype(model, storage_dtype_for_fully_shard(param_dtype)), then fully_shard(decoder_layer,
       mesh=..., mp_policy=...) for each decoder layer, then fully_shard(model). Every rank keeps 1/N (dim 0, padded)
       of each storage tensor; each layer's forward and backward all-gather its storage as it is, i.e. in its 4-bit
       form, and free it after. MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
       casts the floating-point parameters only, so the adapters compute in bf16 and reduce in fp32 while the
       storage stays bytes: uint8 where this torch's fully_shard takes integer parameters, else the bytes held as
       param_dtype elements, which the policy does not cast (equal dtypes). With fp32 adapters
       (layer.to(torch.float32) before sharding) they are the fp32 master weights.
       While sharded, layer.weight_nf4 and anything built on it (dequantize, merge) needs the whole base: call
       .unshard() on the fully_shard module that holds the layer first. The model's state_dict() then holds the
       storage as DTensor shards under their own names (`...q_proj.base.w_nf4`, ...), which
       torch.distributed.checkpoint saves and loads; bitsandbytes' keys are written by whole layers only, and
       load into whole and sharded layers alike (each rank keeps its slice).

save_adapter writes the same PEFT-format files from any of these as qlora_ext.save_adapter from one process.
"""
from __future__ import annotations

import functools
import inspect
import json
import os
from typing import Any, Optional, Union

import torch
from safetensors.torch import save_file
from torch import nn

from . import peft_compat
from .nf4 import NF4Storage, _is_dtensor

__all__ = ["nf4_bytes", "save_adapter", "gather_parameters", "set_storage_dtype", "storage_dtype_for_fully_shard"]


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside a DistributedDataParallel wrapper (fully_shard keeps the module itself)."""
    from torch.nn.parallel import DistributedDataParallel
    return model.module if isinstance(model, DistributedDataParallel) else model


def _storages(model: nn.Module) -> dict[str, NF4Storage]:
    return {name: module for name, module in _unwrap(model).named_modules() if isinstance(module, NF4Storage)}


def _is_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _rank() -> int:
    return torch.distributed.get_rank() if _is_initialized() else 0


@functools.cache
def _fully_shard_takes_integer_parameters() -> bool:
    """Whether this torch's fully_shard can shard a frozen integer parameter. Older releases create the sharded
    parameter with requires_grad=True and reset it after, which raises for integer dtypes (torch 2.11 and older);
    the fixed code passes requires_grad at creation. Read from the source; when it cannot be read, assume not."""
    try:
        from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam
        source = inspect.getsource(FSDPParam._init_sharded_param)
    except (ImportError, AttributeError, OSError, TypeError):
        return False
    return "requires_grad=param.requires_grad" in source


def storage_dtype_for_fully_shard(param_dtype: Optional[torch.dtype] = None) -> torch.dtype:
    """The NF4 storage dtype to shard with fully_shard under a MixedPrecisionPolicy of `param_dtype` (None: no
    policy, pass the adapters' dtype): uint8 where fully_shard takes integer parameters, else `param_dtype`, which
    the policy then leaves uncast."""
    if _fully_shard_takes_integer_parameters():
        return torch.uint8
    if param_dtype is None or not param_dtype.is_floating_point:
        raise ValueError("storage_dtype_for_fully_shard: this torch's fully_shard cannot hold integer parameters; "
                         "pass the MixedPrecisionPolicy's param_dtype (or the adapters' dtype without a policy)")
    return param_dtype


def set_storage_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    """Hold every QLoRALinear base of `model` as `dtype` elements (the same bytes; see NF4Storage). Call it before
    fully_shard, with storage_dtype_for_fully_shard(param_dtype). All layers or none: the dtype is checked first."""
    from .nf4 import STORAGE_DTYPES
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"set_storage_dtype: dtype must be one of {STORAGE_DTYPES}, got {dtype}")
    storages = _storages(model)
    sharded = [name for name, storage in storages.items() if storage.is_sharded]
    if sharded:
        raise RuntimeError(f"set_storage_dtype: {sharded[0]} is already sharded by fully_shard; call it before")
    for storage in storages.values():
        storage.set_storage_dtype(dtype)


def nf4_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of NF4 storage this process holds, bytes of the whole model's NF4 storage). Under fully_shard the
    first is about 1/N of the second (each storage tensor is split along dim 0, the last shards padded); under
    DDP or in one process they are equal."""
    local = whole = 0
    for storage in _storages(model).values():
        storage_local, storage_whole = storage.nbytes()
        local += storage_local
        whole += storage_whole
    return local, whole


def save_adapter(model: nn.Module, path: Union[str, os.PathLike], config: Any = None) -> None:
    """qlora_ext.save_adapter for a model trained by several processes: rank 0 writes `path` (PEFT's format, the
    same files a one-process run writes); every rank must call it, and it returns when the files are written.

    model: the model under fully_shard, a DistributedDataParallel around it, or a plain model.
    config: as for qlora_ext.save_adapter; default: the one apply() recorded on the model.
    """
    model = _unwrap(model)
    if not any(_is_dtensor(param) for param in model.parameters()):
        # Every rank holds the whole adapters (DDP, one process): the one-process writer, on one rank.
        if _rank() == 0:
            peft_compat.save_adapter(model, path, config)
    else:
        spec = (peft_compat._resolve_spec(config, {}) if config is not None
                else getattr(model, "qlora_ext_config", None))
        if spec is None:
            raise ValueError("save_adapter: the model carries no adapter config (it was not made by qlora_ext.apply "
                             "or load_adapter); pass config=")
        # PEFT's file key -> our parameter name: exactly the tensors qlora_ext.save_adapter writes, gathered.
        layout = peft_compat._adapter_layout(model, peft_compat._qlora_modules(model), spec.bias)
        if not layout:
            raise ValueError("save_adapter: the model has no QLoRALinear layer")
        tensors = gather_parameters(model, sorted(set(layout.values())))
        if tensors is not None:
            os.makedirs(path, exist_ok=True)
            save_file({key: tensors[name] for key, name in layout.items()},
                      os.path.join(path, peft_compat.ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
            with open(os.path.join(path, peft_compat.ADAPTER_CONFIG_NAME), "w", encoding="utf-8") as f:
                json.dump(peft_compat._peft_config_dict(spec, model), f, indent=2, sort_keys=True)
    if _is_initialized():
        torch.distributed.barrier()  # the files are complete for every rank that reads them next


@torch.no_grad()
def gather_parameters(model: nn.Module, names: list[str]) -> Optional[dict[str, torch.Tensor]]:
    """The named parameters of `model`, whole, contiguous and on the CPU: a dict on rank 0, None elsewhere.

    A parameter sharded by fully_shard is gathered with DTensor.full_tensor(), one at a time (so at most one whole
    parameter is on the device at once): every rank must call this with the same names in the same order.
    """
    model = _unwrap(model)
    rank = _rank()
    out = {}
    for name in names:
        param = model.get_parameter(name).detach()
        whole = param.full_tensor() if _is_dtensor(param) else param
        if rank == 0:
            out[name] = whole.cpu().contiguous().clone()
    return out if rank == 0 else None
