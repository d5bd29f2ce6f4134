"""QLoRALinear: a frozen NF4 base plus a trainable low-rank adapter, computed by one fused op.

    y = x·wᵀ + s·dropout(x)·lora_Aᵀ·lora_Bᵀ + bias,   s = lora_alpha / r   (rsLoRA: lora_alpha / √r)

The base weight is an NF4Weight (bitsandbytes' format, double quant by default) and never receives a gradient;
lora_A [r, k] and lora_B [n, r] are the only trainable parameters (lora_B starts at zero, so a fresh layer equals
its base). state_dict() writes the base under bitsandbytes' keys (`weight`, `weight.absmax`, ...), so a
checkpoint moves between this layer and bnb's Linear4bit unchanged.

The base's tensors live in the child module `base` (an NF4Storage) as frozen uint8 parameters, so that
DistributedDataParallel leaves them out of gradient reduction and per-step broadcasts, and fully_shard shards
them with the adapters and all-gathers them in their 4-bit form; `weight_nf4` is an NF4Weight view of them.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor, nn

from . import ops  # noqa: F401  (registers torch.ops.qlora_ext.*)
from .backends import cuda
from .nf4 import NF4Storage, NF4Weight, quantize_nf4

__all__ = ["QLoRALinear"]


class QLoRALinear(nn.Module):
    """Linear layer with a frozen NF4 base and a LoRA adapter, forward and backward through fused kernels.

    It computes in the input's dtype, or under autocast, like nn.Linear, in the autocast dtype (the adapters are
    cast to it and stay in their own dtype as parameters).

    Eager CUDA calls inside the kernels' contract go through one C++ op, torch.ops.qlora_ext._linear, whose
    backward is a C++ autograd node (csrc/qlora_autograd.cpp): the layer is host-bound at small m, and this keeps
    Python out of the backward. Every other call (CPU, torch.compile, calls the kernels do not serve) goes through
    the custom op torch.ops.qlora_ext.qlora_linear; both run the same kernels and give the same bits."""

    # False sends eager CUDA calls through the custom op as well (to compare the two routes, e.g.
    # scripts/profile_layer.py); a class attribute, so it can be set per layer or for all of them.
    eager_fast_path: bool = True

    def __init__(self, weight_nf4: NF4Weight, r: int = 16, lora_alpha: float = 32, lora_dropout: float = 0.0,
                 use_rslora: bool = False, bias: Optional[Tensor] = None, init: str = "kaiming",
                 freeze_A: bool = False, dtype: Optional[torch.dtype] = None,
                 init_weight: Optional[Tensor] = None):
        super().__init__()
        n, k = weight_nf4.shape
        # bool is an int subclass: r=True would silently become a rank-1 adapter.
        if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1:
            raise ValueError(f"QLoRALinear: r (the adapter rank) must be a positive int, got {r!r} "
                             f"({type(r).__name__})")
        r = int(r)
        if r > min(n, k):
            raise ValueError(f"QLoRALinear: r={r} exceeds min(n, k)={min(n, k)} for a [{n}, {k}] weight")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"QLoRALinear: lora_dropout must be in [0, 1), got {lora_dropout}")
        self.in_features, self.out_features = k, n
        self.r, self.lora_alpha, self.lora_dropout, self.use_rslora = r, lora_alpha, float(lora_dropout), use_rslora
        self.scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.init = init
        self.base = NF4Storage(weight_nf4)
        dtype = dtype or weight_nf4.dtype
        device = weight_nf4.packed.device
        self.lora_A = nn.Parameter(torch.empty(r, k, dtype=dtype, device=device), requires_grad=not freeze_A)
        self.lora_B = nn.Parameter(torch.zeros(n, r, dtype=dtype, device=device))
        self._init_adapter(init, init_weight)
        if bias is not None:
            bias = nn.Parameter(bias.detach().to(dtype=dtype, device=device).clone(), requires_grad=False)
        self.bias = bias

    # ---- construction ----------------------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 16, lora_alpha: float = 32, lora_dropout: float = 0.0,
                    use_rslora: bool = False, init: str = "kaiming", freeze_A: bool = False,
                    blocksize: int = 64, double_quant: bool = True) -> "QLoRALinear":
        """Quantize `linear.weight` to NF4 (on its device) and attach a fresh adapter."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        weight_nf4 = quantize_nf4(linear.weight.detach(), blocksize=blocksize, double_quant=double_quant)
        # PiSSA/OLoRA decompose the full-precision weight when there is one (QPiSSA's point: the 4-bit base then
        # only carries the residual).
        return cls(weight_nf4, r, lora_alpha, lora_dropout, use_rslora, linear.bias, init, freeze_A,
                   init_weight=linear.weight.detach())

    @classmethod
    def from_bnb(cls, linear4bit: nn.Module, r: int = 16, lora_alpha: float = 32, lora_dropout: float = 0.0,
                 use_rslora: bool = False, init: str = "kaiming", freeze_A: bool = False) -> "QLoRALinear":
        """Take a bitsandbytes Linear4bit (NF4) as it is: no requantization, same packed bytes."""
        quant_state = getattr(linear4bit.weight, "quant_state", None)
        if quant_state is None:
            raise ValueError("from_bnb: the Linear4bit has no quant_state; move it to its device (which quantizes "
                             "it) or load a quantized checkpoint first")
        weight_nf4 = NF4Weight.from_bnb(linear4bit.weight.data, quant_state)
        return cls(weight_nf4, r, lora_alpha, lora_dropout, use_rslora, linear4bit.bias, init, freeze_A)

    @property
    def weight_nf4(self) -> NF4Weight:
        """The frozen base as an NF4Weight (a view of `base`'s parameters, not a copy)."""
        return self.base.weight()

    @weight_nf4.setter
    def weight_nf4(self, weight_nf4: NF4Weight) -> None:
        if tuple(weight_nf4.shape) != (self.out_features, self.in_features):
            raise ValueError(f"QLoRALinear: the NF4 base must be [n, k] = [{self.out_features}, "
                             f"{self.in_features}] for this layer, got {tuple(weight_nf4.shape)}; build a new "
                             f"layer for another shape")
        self.base.set(weight_nf4)

    def _init_adapter(self, init: str, init_weight: Optional[Tensor]) -> None:
        from .init import init_lora
        n, k = self.base.shape
        if init in ("kaiming", "gaussian"):
            # These only need the weight's shape and device: a zero-stride stand-in avoids dequantizing w.
            init_weight = torch.zeros((), device=self.lora_A.device).expand(n, k)
        elif init_weight is None:
            init_weight = self.weight_nf4.dequantize(torch.float32)
        lora_A, lora_B, residual = init_lora(init_weight.float(), self.r, init, scaling=self.scaling)
        with torch.no_grad():
            self.lora_A.copy_(lora_A)
            self.lora_B.copy_(lora_B)
        if residual is not None:  # PiSSA/OLoRA: the base becomes w − s·B·A, requantized
            self.weight_nf4 = quantize_nf4(residual.to(self.weight_nf4.dtype), self.weight_nf4.blocksize,
                                           self.weight_nf4.double_quant)

    # ---- forward ---------------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"QLoRALinear: input must be a torch.Tensor, got {type(x).__name__}; convert it first "
                            f"(e.g. torch.from_numpy(x).to(device))")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"QLoRALinear: input must have at least 1 dim and last dim k={self.in_features} "
                             f"(in_features), got shape {tuple(x.shape)}")
        if x.device != self.lora_A.device:
            raise ValueError(f"QLoRALinear: input is on device {x.device} but the layer is on {self.lora_A.device}")
        lead = x.shape[:-1]
        device_type = x.device.type
        dtype = x.dtype
        # Under autocast, compute like nn.Linear does: in the autocast dtype (on CUDA that is also what the kernels
        # take). The adapters stay fp32 master weights; their gradients come back fp32 through the casts below.
        # (Only cuda and cpu have autocast; asking another device type raises. A name check rather than
        # torch.amp.is_autocast_available keeps the forward traceable by torch.compile on torch 2.11.)
        autocast = device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type)
        if autocast and x.is_floating_point():
            dtype = torch.get_autocast_dtype(device_type)
        x2 = x.reshape(-1, self.in_features).to(dtype)
        p = self.lora_dropout if self.training else 0.0
        lora_A, lora_B = self.lora_A.to(dtype), self.lora_B.to(dtype)
        bias = self.bias.to(dtype) if self.bias is not None else None
        # The eager route is a C++ op without fake kernels: compiled graphs keep the custom op.
        if self.eager_fast_path and x2.is_cuda and not torch.compiler.is_compiling():
            path_ids = cuda.eager_path_ids(x2, lora_A, self.base.blocksize, self.out_features)
            if path_ids is not None:
                # One call into C++, whose autograd node runs the whole backward there. The seed is drawn as the
                # custom op's below is, so torch.manual_seed gives both routes the same dropout masks. Autocast
                # needs no region here: the op computes in its inputs' dtypes (it excludes autocast inside).
                seed = int(torch.randint(0, 2**62, (), dtype=torch.int64)) if p > 0 else 0
                y = torch.ops.qlora_ext._linear(x2, self.base.op_args(), lora_A, lora_B, bias, self.scaling, p,
                                                seed, *path_ids)
                return y.reshape(*lead, self.out_features)
        # A fresh dropout seed per call; drawn as a tensor so a compiled graph keeps drawing new ones.
        seed = torch.randint(0, 2**62, (), dtype=torch.int64) if p > 0 else self._zero_seed()
        args = (x2, *self.base.op_args(), lora_A, lora_B, bias, self.scaling, p, seed, self.base.blocksize)
        if autocast:
            # The inputs are cast already. Autocast must not reach inside the op: its reference implementation
            # computes in fp32 on purpose (the spec the kernels match), and autocast would run those matmuls in
            # the low-precision dtype.
            with torch.autocast(device_type, enabled=False):
                y, _ = torch.ops.qlora_ext.qlora_linear(*args)
        else:
            y, _ = torch.ops.qlora_ext.qlora_linear(*args)
        return y.reshape(*lead, self.out_features)

    @staticmethod
    def _zero_seed() -> Tensor:
        return torch.zeros((), dtype=torch.int64)

    # ---- export ----------------------------------------------------------------------------------------------
    def dequantize(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """The frozen base w [n, k] (bit-exact bnb dequantization)."""
        return self.weight_nf4.dequantize(dtype)

    @torch.no_grad()
    def merge(self, dtype: Optional[torch.dtype] = None) -> nn.Linear:
        """A plain nn.Linear holding dequant(w) + s·lora_B·lora_A (summed in fp32, then cast to `dtype`)."""
        dtype = dtype or self.lora_A.dtype
        w = self.dequantize(torch.float32) + self.scaling * (self.lora_B.float() @ self.lora_A.float())
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, dtype=dtype,
                        device=w.device)
        out.weight.copy_(w.to(dtype))
        if self.bias is not None:
            out.bias.copy_(self.bias.to(dtype))
        return out

    # ---- module plumbing -------------------------------------------------------------------------------------
    # model.half() / model.to(torch.bfloat16) cast the adapters and leave the base as it is: its parameters are
    # uint8 (see NF4Storage), which those casts skip.

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if not self.base.is_sharded:  # sharded, `base` writes its shards under their own names instead
            destination.update(self.weight_nf4.state_dict(prefix=prefix + "weight"))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Only the keys the NF4 format defines are the base's; any other `weight.*` key goes on to the parent,
        # which reports it as unexpected (under strict loading, an error) instead of it being silently dropped.
        known = NF4Weight.state_dict_keys(prefix + "weight")
        base_keys = [key for key in state_dict if key in known]
        if base_keys:
            loaded = NF4Weight.from_state_dict({key: state_dict[key] for key in base_keys}, prefix=prefix + "weight")
            if tuple(loaded.shape) != tuple(self.base.shape):
                error_msgs.append(f"{prefix}weight: NF4 shape {tuple(loaded.shape)} does not match "
                                  f"{tuple(self.base.shape)}")
            else:
                # Whole: the loaded tensors replace the storage; sharded: each rank keeps its slice of them.
                try:
                    self.base.set(loaded.to(self.lora_A.device))
                except RuntimeError as exc:
                    error_msgs.append(f"{prefix}weight: {exc}")
        elif strict and not any(key in state_dict for key in NF4Storage.state_dict_keys(prefix + "base.")):
            # Without bitsandbytes' keys the base may come in NF4Storage's own form (`base.w_nf4`, ...), which
            # `base` loads (and reports missing pieces of) itself.
            missing_keys.append(prefix + "weight")
        rest = {key: value for key, value in state_dict.items() if key not in known}
        # The base keys are consumed above; the parent handles lora_A, lora_B and bias, and reports the rest.
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        base = self.base
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"lora_alpha={self.lora_alpha}, scaling={self.scaling:.4g}, lora_dropout={self.lora_dropout}, "
                f"use_rslora={self.use_rslora}, bias={self.bias is not None}, base=NF4(blocksize={base.blocksize}, "
                f"double_quant={base.double_quant}, dtype={base.weight_dtype}), adapter_dtype={self.lora_A.dtype}")
