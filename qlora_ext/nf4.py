"""NF4Weight: a frozen [n, k] weight in bitsandbytes' NF4 format (optionally double-quantized), and quantize_nf4.

NF4Storage holds the same tensors inside a module (QLoRALinear.base), as frozen uint8 parameters, so that
DistributedDataParallel and fully_shard see them (see its docstring).

The tensors are bnb's, byte for byte (format and rounding rules: qlora_ext/reference.py), so a bnb Linear4bit,
an HF "bnb-4bit" checkpoint and an NF4Weight convert into each other without requantization:

    packed         uint8 ((n*k+1)//2, 1)   bnb's shape; element 2j in the high nibble of byte j
    absmax         uint8 [nblocks] (double quant) or float32 [nblocks]
    code           float32 [16]            NF4 codebook (bnb: quant_map)
    nested_absmax  float32 [ceil(nblocks/256)] or None
    nested_code    float32 [256] or None   signed dynamic map (bnb: nested_quant_map)
    offset         float32 0-d or None     mean of the fp32 absmax, subtracted before the nested quantization
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from . import reference

QUANT_TYPE = "nf4"
_QUANT_STATE_KEY = "quant_state.bitsandbytes__nf4"


def _op(name: str):
    """torch.ops.qlora_ext.<name> once qlora_ext.ops has registered it (CUDA kernels), else the reference twin."""
    namespace = torch.ops.qlora_ext
    return getattr(namespace, name) if hasattr(namespace, name) else getattr(reference, name)


def _dtype_name(dtype: torch.dtype) -> str:
    """bnb's spelling in the serialized quant state: "float16", "bfloat16", "float32"."""
    return str(dtype).removeprefix("torch.")


@dataclass(eq=False)
class NF4Weight:
    """A frozen NF4 weight of logical shape ``shape`` = (n, k), originally of dtype ``dtype``."""

    packed: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    nested_absmax: Optional[torch.Tensor]
    nested_code: Optional[torch.Tensor]
    offset: Optional[torch.Tensor]
    shape: tuple
    dtype: torch.dtype
    blocksize: int

    def __post_init__(self):
        self.shape = tuple(int(d) for d in self.shape)
        if len(self.shape) != 2:
            raise ValueError(f"shape: expected (n, k), got {self.shape}")
        if self.dtype not in reference.FLOAT_DTYPES:
            raise TypeError(f"dtype: expected one of {list(reference.FLOAT_DTYPES)}, got {self.dtype}")
        n, k = self.shape
        if not isinstance(self.packed, torch.Tensor) or tuple(self.packed.shape) != ((n * k + 1) // 2, 1):
            got = tuple(self.packed.shape) if isinstance(self.packed, torch.Tensor) else type(self.packed).__name__
            raise ValueError(f"packed: expected shape {((n * k + 1) // 2, 1)} (bnb's layout), got {got}")
        reference.check_nf4_storage(*self.op_args(), n, k, self.blocksize, self.packed.device)

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def op_args(self):
        """The six storage tensors in op order: (w_nf4 1-D, absmax, code, nested_absmax, nested_code, offset)."""
        return self.packed.view(-1), self.absmax, self.code, self.nested_absmax, self.nested_code, self.offset

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """[n, k] tensor of ``dtype`` (default: the original weight dtype), bit-exact with bnb's dequantize_4bit."""
        n, k = self.shape
        return _op("dequantize_nf4")(*self.op_args(), n, k, self.blocksize, dtype or self.dtype)

    def to(self, device) -> "NF4Weight":
        """A copy on ``device``; dtypes never change (the codes are bytes, the scales fp32)."""
        if isinstance(device, torch.dtype):
            raise TypeError(f"NF4Weight.to takes a device, got the dtype {device}: the NF4 storage has fixed dtypes "
                            f"(uint8 codes, fp32 scales). For {device} values call dequantize({device}); for a "
                            f"QLoRALinear, layer.to({device}) casts its adapters and keeps this base as it is")

        def move(t):
            return None if t is None else t.to(device)

        return NF4Weight(move(self.packed), move(self.absmax), move(self.code), move(self.nested_absmax),
                         move(self.nested_code), move(self.offset), self.shape, self.dtype, self.blocksize)

    # ---- bitsandbytes interchange -----------------------------------------------------------------------------
    @staticmethod
    def state_dict_keys(prefix: str = "weight") -> frozenset:
        """Every key state_dict(prefix) can write (with and without double quant): the keys that belong to the
        base, so that a loader can tell them from keys that belong to nothing."""
        suffixes = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", _QUANT_STATE_KEY)
        return frozenset([prefix] + [f"{prefix}.{suffix}" for suffix in suffixes])

    def _quant_state_json(self) -> dict:
        """The non-tensor quant-state items, in the key order bnb's QuantState.as_dict writes them."""
        items = {
            "quant_type": QUANT_TYPE,
            "blocksize": self.blocksize,
            "dtype": _dtype_name(self.dtype),
            "shape": list(self.shape),
        }
        if self.double_quant:
            items.update({
                "nested_blocksize": reference.NESTED_BLOCKSIZE,
                "nested_dtype": _dtype_name(torch.float32),
                "nested_offset": self.offset.item(),
            })
        return items

    def state_dict(self, prefix: str = "weight") -> dict:
        """The keys and tensors bnb's Linear4bit.state_dict writes for its weight (HF "bnb-4bit" checkpoints).

        The codebooks are cloned, as bnb does, so that no two entries share storage (safetensors refuses that).
        """
        out = {prefix: self.packed, f"{prefix}.absmax": self.absmax, f"{prefix}.quant_map": self.code.clone()}
        if self.double_quant:
            out[f"{prefix}.nested_absmax"] = self.nested_absmax
            out[f"{prefix}.nested_quant_map"] = self.nested_code.clone()
        payload = json.dumps(self._quant_state_json()).encode("utf-8")
        out[f"{prefix}.{_QUANT_STATE_KEY}"] = torch.tensor(list(payload), dtype=torch.uint8)
        return out

    @classmethod
    def from_state_dict(cls, sd: dict, prefix: str = "weight") -> "NF4Weight":
        """Inverse of state_dict (also reads bnb Linear4bit / HF bnb-4bit state dicts). No requantization."""
        key = f"{prefix}.{_QUANT_STATE_KEY}"
        if key not in sd:
            raise KeyError(f"{key}: missing; expected a bitsandbytes NF4 state dict (keys under '{prefix}.')")
        meta = json.loads(bytes(sd[key].cpu().to(torch.uint8).tolist()).decode("utf-8"))
        if meta.get("quant_type") != QUANT_TYPE:
            raise ValueError(f"{key}: expected quant_type 'nf4', got {meta.get('quant_type')!r}")
        nested = "nested_offset" in meta
        if nested and meta["nested_blocksize"] != reference.NESTED_BLOCKSIZE:
            raise ValueError(f"{key}: expected nested_blocksize {reference.NESTED_BLOCKSIZE}, "
                             f"got {meta['nested_blocksize']}")
        packed = sd[prefix]
        return cls(
            packed=_as_bnb_packed(packed, meta["shape"]),
            absmax=sd[f"{prefix}.absmax"],
            code=sd[f"{prefix}.quant_map"],
            nested_absmax=sd[f"{prefix}.nested_absmax"] if nested else None,
            nested_code=sd[f"{prefix}.nested_quant_map"] if nested else None,
            offset=torch.tensor(float(meta["nested_offset"]), dtype=torch.float32, device=packed.device)
            if nested else None,
            shape=meta["shape"],
            dtype=getattr(torch, meta["dtype"]),
            blocksize=int(meta["blocksize"]),
        )

    @classmethod
    def from_bnb(cls, packed: torch.Tensor, quant_state) -> "NF4Weight":
        """Wrap a bnb NF4 weight (Params4bit.data, its QuantState) as it is: the same tensors, no requantization."""
        if getattr(quant_state, "packing_format_for_cpu", False):
            raise ValueError("quant_state: this Linear4bit repacked its weight for CPU inference (absmax rounded to "
                             "bfloat16, lossy); take the weight from a freshly loaded or quantized Linear4bit")
        if quant_state.quant_type != QUANT_TYPE:
            raise ValueError(f"quant_state.quant_type: expected 'nf4', got {quant_state.quant_type!r}")
        state2 = quant_state.state2 if quant_state.nested else None
        if state2 is not None and state2.blocksize != reference.NESTED_BLOCKSIZE:
            raise ValueError(f"quant_state.state2.blocksize: expected {reference.NESTED_BLOCKSIZE}, "
                             f"got {state2.blocksize}")
        return cls(
            packed=_as_bnb_packed(packed, quant_state.shape),
            absmax=quant_state.absmax,
            code=quant_state.code,
            nested_absmax=None if state2 is None else state2.absmax,
            nested_code=None if state2 is None else state2.code,
            offset=None if state2 is None else quant_state.offset.to(torch.float32).reshape(()),
            shape=tuple(quant_state.shape),
            dtype=quant_state.dtype,
            blocksize=quant_state.blocksize,
        )

    def to_bnb(self):
        """(packed, bitsandbytes.functional.QuantState) sharing this weight's tensors."""
        try:
            from bitsandbytes.functional import QuantState
        except ImportError as exc:
            raise ImportError("NF4Weight.to_bnb needs bitsandbytes (pip install bitsandbytes)") from exc
        state2 = None
        if self.double_quant:
            state2 = QuantState(absmax=self.nested_absmax, code=self.nested_code,
                                blocksize=reference.NESTED_BLOCKSIZE, dtype=torch.float32)
        quant_state = QuantState(absmax=self.absmax, shape=torch.Size(self.shape), code=self.code,
                                 blocksize=self.blocksize, quant_type=QUANT_TYPE, dtype=self.dtype,
                                 offset=self.offset, state2=state2)
        return self.packed, quant_state

    def __repr__(self) -> str:
        n, k = self.shape
        return (f"NF4Weight(shape=({n}, {k}), dtype={self.dtype}, blocksize={self.blocksize}, "
                f"double_quant={self.double_quant}, device={self.device})")


def _as_bnb_packed(packed: torch.Tensor, shape) -> torch.Tensor:
    """bnb's packed bytes as uint8 ((n*k+1)//2, 1); bnb may store them in another dtype (quant_storage)."""
    n, k = (int(d) for d in shape)
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"packed: expected a torch.Tensor, got {type(packed).__name__}")
    as_bytes = packed.reshape(-1)
    if as_bytes.dtype != torch.uint8:
        as_bytes = as_bytes.contiguous().view(torch.uint8)
    if as_bytes.numel() != (n * k + 1) // 2:
        raise ValueError(f"packed: expected {(n * k + 1) // 2} bytes for shape ({n}, {k}), got {as_bytes.numel()}")
    return as_bytes.view(-1, 1)


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize a [n, k] weight to NF4 on its device (bnb's format and rounding, see qlora_ext/reference.py)."""
    # The storage is frozen data: quantizing a Parameter must not tie it to the Parameter's autograd graph (a
    # layer built on it could not backward, and deepcopy refuses non-leaf tensors).
    w = w.detach()
    reference.check_quantize_input(w, blocksize)
    w_nf4, absmax, nested_absmax, offset = _op("quantize_nf4")(w, blocksize, double_quant)
    nested_code = reference.dynamic_map_signed(w.device) if double_quant else None
    if not double_quant:  # the op returns empty tensors there (custom ops cannot return None)
        nested_absmax = offset = None
    return NF4Weight(w_nf4.view(-1, 1), absmax, reference.nf4_code(w.device), nested_absmax, nested_code, offset,
                     tuple(w.shape), w.dtype, blocksize)


# ---- NF4Storage: the storage as module state -------------------------------------------------------------------
# The six storage tensors in op order; fp32 ones are held as their bytes (see NF4Storage).
_STORAGE_NAMES = ("w_nf4", "absmax", "code", "nested_absmax", "nested_code", "offset")


def _is_dtensor(t) -> bool:
    """Whether t is a DTensor, i.e. a shard that fully_shard registered in place of the whole tensor. Looked up
    among the loaded modules (no DTensor exists before torch.distributed.tensor is imported): importing it here
    would add most of a second to `import qlora_ext`."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def _as_rows_of_bytes(t: torch.Tensor) -> torch.Tensor:
    """An fp32 tensor's bytes as uint8 [numel, 4], one row per value (a view where t is contiguous)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).view(-1, 4)


STORAGE_DTYPES = (torch.uint8, torch.bfloat16, torch.float16, torch.float32)


def _as_storage(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 rows [N, B] (B = 1 or 4 bytes) as rows of `dtype`: [N, B / size] where the size divides B (a view),
    else (1-byte rows, 2- or 4-byte dtype) the bytes padded to whole elements, one element per row (a copy)."""
    size = torch.empty((), dtype=dtype).element_size()
    if rows.shape[1] % size == 0:
        return rows.view(dtype)
    flat = rows.reshape(-1)
    padded = flat.new_zeros(-(-flat.numel() // size) * size)
    padded[: flat.numel()] = flat
    return padded.view(dtype).view(-1, 1)


class NF4Storage(nn.Module):
    """The storage of an NF4Weight as frozen parameters of bytes (requires_grad=False), in op order (shapes for
    the default storage dtype, uint8):

        w_nf4          uint8 ((n*k+1)//2, 1)  the packed codes (NF4Weight.packed)
        absmax         uint8 [nblocks]        with double quant; without it the fp32 absmax as bytes [nblocks, 4]
        code           uint8 [16, 4]          the fp32 codebook as bytes, one row per value
        nested_absmax  uint8 [ngroups, 4]     fp32 as bytes; None without double quant
        nested_code    uint8 [256, 4]         fp32 as bytes; None without double quant
        offset         uint8 [1, 4]           the fp32 0-d offset as bytes; None without double quant

    Why parameters: DistributedDataParallel broadcasts buffers before every forward (broadcast_buffers=True) but
    parameters only once, when it wraps the model, and buckets gradients only for parameters that require them;
    fully_shard shards parameters (dim 0) and all-gathers them per group for forward and backward; Module.to()
    and state-dict machinery see them. Why uint8 only: fully_shard all-gathers them as they are, in their 4-bit
    form, and MixedPrecisionPolicy(param_dtype=...), model.half() and model.to(dtype) cast floating-point tensors
    only; fp32 values become rows of 4 bytes, so that dim-0 sharding never splits one. op_args() views the bytes
    as the op's tensors (no copy).

    Storage dtype (`storage_dtype`, default uint8; set_storage_dtype() changes it): the same bytes may be held as
    bfloat16, float16 or float32 elements instead, for torch releases whose fully_shard cannot hold an integer
    parameter (it creates its sharded parameters with requires_grad=True before resetting it, which only floating
    dtypes allow; torch 2.11 and older). The bytes are then grouped into elements of that dtype (1-byte rows padded
    to whole elements); nothing is converted. A floating storage must equal the MixedPrecisionPolicy's param_dtype
    (equal dtypes are not cast; any other would turn the bytes into numbers): op_args() refuses a storage that
    arrives in another dtype. Model-level casts (model.half(), .to(dtype)) never touch it (see _apply).

    state_dict: while whole, nothing here; the owning QLoRALinear writes bitsandbytes' keys (`weight`,
    `weight.absmax`, ...). While sharded by fully_shard, the parameters under their own names, as DTensor shards,
    which is what torch.distributed.checkpoint saves, loads and gathers (bitsandbytes' serialized quant state
    needs whole tensors). bitsandbytes' keys load into whole and sharded layers (each rank keeps its slice); this
    form loads as DTensors (torch.distributed.checkpoint, set_model_state_dict) or, gathered whole, into a whole
    layer.
    """

    def __init__(self, weight: NF4Weight, storage_dtype: torch.dtype = torch.uint8):
        super().__init__()
        self.storage_dtype = torch.uint8
        self.set(weight)
        if storage_dtype != torch.uint8:
            self.set_storage_dtype(storage_dtype)

    def set_storage_dtype(self, dtype: torch.dtype) -> None:
        """Hold the same bytes as `dtype` elements (see the class docstring); only while whole."""
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"NF4Storage: storage dtype must be one of {STORAGE_DTYPES}, got {dtype}")
        if self.is_sharded:
            raise RuntimeError("NF4Storage.set_storage_dtype: the base is sharded by fully_shard; set the storage "
                               "dtype before calling fully_shard")
        weight = self.weight()
        self.storage_dtype = dtype
        self.set(weight)

    def set(self, weight: NF4Weight) -> None:
        """Hold `weight`'s tensors (shared, not copied) in place of the current ones. While sharded, copy this
        rank's slice of them into the shards instead (no communication: `weight` is whole on every rank)."""
        double_quant = weight.double_quant
        rows = (weight.packed.detach(),
                weight.absmax.detach().view(-1, 1) if double_quant else _as_rows_of_bytes(weight.absmax),
                _as_rows_of_bytes(weight.code),
                *((_as_rows_of_bytes(t) if t is not None else None)
                  for t in (weight.nested_absmax, weight.nested_code, weight.offset)))
        tensors = tuple(None if t is None else _as_storage(t, self.storage_dtype) for t in rows)
        if "w_nf4" in self._parameters and self.is_sharded:
            self._copy_into_shards(tensors)
        else:
            for name, t in zip(_STORAGE_NAMES, tensors):
                self.register_parameter(name, None if t is None else nn.Parameter(t, requires_grad=False))
        self.shape, self.weight_dtype, self.blocksize = tuple(weight.shape), weight.dtype, weight.blocksize

    @torch.no_grad()
    def _copy_into_shards(self, tensors) -> None:
        from torch.distributed.tensor import distribute_tensor

        params = [getattr(self, name) for name in _STORAGE_NAMES]
        if any((p is None) != (t is None) or (t is not None and tuple(p.shape) != tuple(t.shape))
               for p, t in zip(params, tensors)):
            raise RuntimeError("NF4Storage.set: the NF4 base is sharded by fully_shard, so it takes a weight of the "
                               "same layout only (shape, blocksize, double quant); load a base of another layout "
                               "before calling fully_shard")
        for param, t in zip(params, tensors):
            if param is not None:
                # src_data_rank=None: every rank cuts its own slice, as fully_shard cut the shards.
                local = distribute_tensor(t.to(param.device), param.device_mesh, param.placements,
                                          src_data_rank=None).to_local()
                param.to_local().copy_(local)

    @staticmethod
    def state_dict_keys(prefix: str = "") -> tuple:
        """The keys of this form of the base (written while sharded)."""
        return tuple(prefix + name for name in _STORAGE_NAMES)

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def is_sharded(self) -> bool:
        return _is_dtensor(self.w_nf4)

    def op_args(self) -> tuple:
        """The six storage tensors as the ops take them (views of the parameters): (w_nf4 1-D, absmax, code,
        nested_absmax, nested_code, offset), as NF4Weight.op_args()."""
        if self.is_sharded:
            raise RuntimeError(
                "QLoRALinear: its NF4 base is sharded by fully_shard (each rank holds a slice of the bytes); run the "
                "layer through the forward of the fully_shard module that holds it (which all-gathers the base), "
                "or call .unshard() on that module first and .reshard() after")

        if self.w_nf4.dtype != self.storage_dtype:  # a cast (policy, .to) converts every storage tensor alike
            raise RuntimeError(
                f"QLoRALinear: its NF4 storage is held as {self.storage_dtype} but arrived as {self.w_nf4.dtype}: "
                f"something cast the packed bytes (e.g. a fully_shard MixedPrecisionPolicy whose param_dtype differs "
                f"from the storage dtype). Call qlora_ext.distributed.set_storage_dtype(model, param_dtype) before "
                f"fully_shard.")

        def floats(t, shape):
            return None if t is None else t.view(torch.float32).view(shape)

        def nbytes(t, count):  # the first `count` bytes (the rest is padding to whole storage elements)
            flat = t.view(-1) if t.dtype == torch.uint8 else t.view(torch.uint8).view(-1)
            return flat if flat.numel() == count else flat[:count]

        double_quant = self.nested_absmax is not None
        n, k = self.shape
        return (nbytes(self.w_nf4, (n * k + 1) // 2),
                nbytes(self.absmax, -(-n * k // self.blocksize)) if double_quant else floats(self.absmax, (-1,)),
                floats(self.code, (16,)),
                floats(self.nested_absmax, (-1,)),
                floats(self.nested_code, (256,)),
                floats(self.offset, ()))

    def weight(self) -> NF4Weight:
        """An NF4Weight over the current storage (shared, not copied)."""
        w_nf4, *rest = (None if t is None else t.detach() for t in self.op_args())
        return NF4Weight(w_nf4.view(-1, 1), *rest, self.shape, self.weight_dtype, self.blocksize)

    def nbytes(self) -> tuple[int, int]:
        """(bytes this process holds, bytes of the whole storage): equal unless sharded."""
        local = whole = 0
        for param in self.parameters(recurse=False):
            shard = param.to_local() if _is_dtensor(param) else param
            local += shard.numel() * shard.element_size()
            whole += param.numel() * param.element_size()
        return local, whole

    # ---- module plumbing -------------------------------------------------------------------------------------
    def _apply(self, fn, recurse=True):
        # The bytes follow device moves only: every built-in cast skips uint8 except Module.type(dtype), and a
        # cast would turn codes and scale bytes into numbers.
        def device_only(t):
            out = fn(t)
            return out if out.dtype == t.dtype else t.to(out.device)

        return super()._apply(device_only, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.is_sharded:
            super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # This form only when the state dict has it (sharded, or gathered from sharded); otherwise the owner reads
        # bitsandbytes' keys, and reports the base missing if neither form is there.
        if any(key in state_dict for key in self.state_dict_keys(prefix)):
            # Whole tensors written under another storage dtype hold the same bytes: regroup them into this one's.
            # (Shards, DTensors, load in the dtype they were sharded with.)
            for name in _STORAGE_NAMES:
                t = state_dict.get(prefix + name)
                if t is not None and not _is_dtensor(t) and t.dtype != self.storage_dtype:
                    state_dict[prefix + name] = _as_storage(self._byte_rows(name, t), self.storage_dtype)
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                          unexpected_keys, error_msgs)

    def _byte_rows(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """The uint8 rows of storage tensor `name` from `t` of any storage dtype: 1-byte rows (w_nf4, double-quant
        absmax) without the padding to whole elements, else 4-byte rows (fp32 values)."""
        raw = t.detach().contiguous().view(torch.uint8).reshape(-1)
        n, k = self.shape
        if name == "w_nf4":
            return raw[: (n * k + 1) // 2].view(-1, 1)
        if name == "absmax" and self.double_quant:
            return raw[: -(-n * k // self.blocksize)].view(-1, 1)
        return raw.view(-1, 4)

    def extra_repr(self) -> str:
        n, k = self.shape
        return (f"shape=({n}, {k}), dtype={self.weight_dtype}, blocksize={self.blocksize}, "
                f"double_quant={self.double_quant}, sharded={self.is_sharded}")
