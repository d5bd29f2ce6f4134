"""The layer implementations the suite compares, all built from the same bf16 weight w [n, k], the same LoRA
factors lora_A [r, k] / lora_B [n, r] and the same inputs x [m, k] / dy [m, n] of a case.

    cublas     y = x.w^T (fwd); plus dx = dy.w (fwd+bwd): the bf16 GEMM(s) alone, the floor
    ours       qlora_ext.QLoRALinear.from_linear(...) called as a module (autograd for fwd+bwd): the contract API
    reference  qlora_ext.reference.qlora_linear / qlora_linear_backward called directly (unfused PyTorch)
    bnb_peft   bitsandbytes Linear4bit (nf4, double quant, bf16 compute) + get_peft_model(LoraConfig(...))
    bf16_peft  frozen bf16 nn.Linear + get_peft_model(LoraConfig(...)): the 16-bit ceiling
    torchao    torchao.dtypes.nf4tensor.to_nf4 + linear_nf4, LoRA written out by hand

Mode "fwd" runs under torch.no_grad() (inference / decode; --bench-fwd-grad: with autograd recording, as the
forward half of a training step); "fwd+bwd" runs the forward with autograd on an x that requires grad, then
backward(dy) -- dx is part of the work, as in any layer that is not the first.
Modules stay in train() mode, so lora_dropout (when > 0) is applied in both modes.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import zlib
from collections.abc import Callable

from . import _sweep

REFERENCE_SEED = 1234  # dropout seed handed to the reference ops (counter-based mask: any value is as fast)


class Unavailable(Exception):
    """The implementation cannot run here (package missing, API absent); the message is the reason."""


@dataclasses.dataclass
class Prepared:
    run: Callable[[], list]  # one call; returns the tensors to sanity-check (y, then dx, dA, dB for fwd+bwd)
    grads: list  # leaves whose .grad is reset before each timed call
    notes: list[str] = dataclasses.field(default_factory=list)


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".strip()


def _version(mod_name: str) -> str | None:
    try:
        mod = importlib.import_module(mod_name)
    except Exception:
        return None
    return str(getattr(mod, "__version__", "unknown"))


def probe() -> dict[str, dict]:
    """Which implementations can run here, and why not. Never raises."""
    out: dict[str, dict] = {}

    def check(name: str, fn: Callable[[], dict | None]):
        try:
            detail = fn() or {}
            out[name] = {"available": True, "reason": None, **detail}
        except Exception as e:  # any import-time failure is a reason to skip that column, not to stop
            out[name] = {"available": False, "reason": _err(e)}

    def cublas():
        import torch

        if not torch.cuda.is_available():
            raise Unavailable("CUDA is not available")

    def ours():
        import qlora_ext

        if not hasattr(qlora_ext, "QLoRALinear"):
            raise Unavailable("qlora_ext has no QLoRALinear yet (package incomplete)")
        has = getattr(qlora_ext, "has_cuda_kernels", None)
        compiled = bool(has()) if callable(has) else importlib.util.find_spec("qlora_ext._C") is not None
        return {"compiled_extension": compiled}

    def reference():
        from qlora_ext import reference as ref

        missing = [f for f in ("qlora_linear", "qlora_linear_backward") if not hasattr(ref, f)]
        if missing:
            raise Unavailable(f"qlora_ext.reference lacks {', '.join(missing)}")

    def bnb_peft():
        import bitsandbytes as bnb
        import peft  # noqa: F401

        if not hasattr(bnb.nn, "Linear4bit"):
            raise Unavailable("bitsandbytes has no nn.Linear4bit")

    def bf16_peft():
        import peft  # noqa: F401

    def torchao():
        return {"module": _torchao_nf4()[2]}

    for name, fn in (
        ("cublas", cublas),
        ("ours", ours),
        ("reference", reference),
        ("bnb_peft", bnb_peft),
        ("bf16_peft", bf16_peft),
        ("torchao", torchao),
    ):
        check(name, fn)
    return out


def versions() -> dict:
    import platform

    import torch

    v = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        v["cudnn"] = str(torch.backends.cudnn.version())
    except Exception:  # no cuDNN on this machine: the suite does not use it
        v["cudnn"] = None
    for name, mod in (
        ("triton", "triton"),
        ("bitsandbytes", "bitsandbytes"),
        ("peft", "peft"),
        ("torchao", "torchao"),
        ("transformers", "transformers"),
        ("pytest_benchmark", "pytest_benchmark"),
        ("qlora_ext", "qlora_ext"),
    ):
        v[name] = _version(mod)
    return v


# ----------------------------------------------------------------------------------------------------------
# Shared state: one shape's weights and modules live while its cases run, then are freed together.


def _seed(*key) -> int:
    return zlib.crc32(repr(key).encode())


class Workspace:
    def __init__(self, device: str = "cuda", dtype=None, adapter_dtype: str = "bf16", fwd_grad: bool = False):
        import torch

        self.device = torch.device(device)
        self.dtype = dtype or torch.bfloat16
        self.adapter_dtype = adapter_dtype  # dtype of PEFT's lora_A/lora_B: "bf16" (as ours) or "fp32" (PEFT's default)
        self.fwd_grad = fwd_grad  # mode "fwd" records autograd (training forward) instead of running under no_grad
        self.shape_id: str | None = None
        self.objs: dict = {}
        self._inputs_key = None
        self._inputs: dict = {}

    def _randn(self, shape, seed: int, std: float):
        import torch

        g = torch.Generator(device=self.device).manual_seed(seed)
        return (torch.randn(shape, generator=g, device=self.device, dtype=torch.float32) * std).to(self.dtype)

    def enter(self, shape: _sweep.Shape) -> None:
        """Switch to ``shape``, freeing the previous shape's weights, modules and inputs."""
        if shape.id == self.shape_id:
            return
        self.release()
        self.shape_id = shape.id

    def release(self) -> None:
        import gc

        import torch

        self.objs.clear()
        self._inputs.clear()
        self._inputs_key = None
        self.shape_id = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def get(self, key, factory: Callable[[], object]):
        if key not in self.objs:
            self.objs[key] = factory()
        return self.objs[key]

    def weight(self, shape: _sweep.Shape):
        """The frozen base weight w [n, k] (bf16, std 0.02 like Llama's init; never zeros)."""
        return self.get("w", lambda: self._randn((shape.n, shape.k), _seed("w", shape.id), 0.02))

    def lora(self, shape: _sweep.Shape, r: int):
        """lora_A [r, k], lora_B [n, r]: random (not PEFT's zero B) so no GEMM runs on zeros."""

        def make():
            a = self._randn((r, shape.k), _seed("A", shape.id, r), shape.k**-0.5)
            b = self._randn((shape.n, r), _seed("B", shape.id, r), 0.01)
            return a, b

        return self.get(("lora", r), make)

    def inputs(self, case: _sweep.Case, need_dy: bool):
        """x [m, k] and dy [m, n], fresh per (shape, m, r, dropout); shared by every impl and both modes."""
        key = (case.shape.id, case.m, case.r, case.dropout)
        if key != self._inputs_key:
            self._inputs.clear()
            self._inputs_key = key
            self._inputs["x"] = self._randn((case.m, case.shape.k), _seed("x", *key), 1.0)
        if need_dy and "dy" not in self._inputs:
            self._inputs["dy"] = self._randn((case.m, case.shape.n), _seed("dy", *key), 1.0)
        return self._inputs["x"], self._inputs.get("dy")


def _frozen_linear(w):
    """nn.Linear whose weight *is* w (no copy), frozen, no bias."""
    from torch import nn

    n, k = w.shape
    lin = nn.Linear(k, n, bias=False, device="meta", dtype=w.dtype)
    lin.weight = nn.Parameter(w, requires_grad=False)
    return lin


def _copy_lora(dst_a, dst_b, a, b) -> None:
    import torch

    with torch.no_grad():
        dst_a.copy_(a.to(dst_a.dtype))
        dst_b.copy_(b.to(dst_b.dtype))


def _forward_runner(fn, x, fwd_grad: bool) -> Prepared:
    """Mode fwd: fn(x) under no_grad, or -- with fwd_grad -- recording autograd on an x that requires grad
    (the forward half of a training step; the graph is dropped after each call)."""
    import torch

    if fwd_grad:
        xg = x.detach().requires_grad_(True)
        return Prepared(lambda: [fn(xg)], [], ["fwd with autograd"])

    def run_fwd():
        with torch.no_grad():
            return [fn(x)]

    return Prepared(run_fwd, [])


def _module_runner(mod, x, dy, mode: str, fwd_grad: bool = False) -> Prepared:
    """fwd: no-grad call; fwd+bwd: autograd call on an x that requires grad, then backward(dy)."""
    params = [p for p in mod.parameters() if p.requires_grad]
    if mode == "fwd":
        return _forward_runner(mod, x, fwd_grad)
    xg = x.detach().requires_grad_(True)

    def run_fwd_bwd():
        y = mod(xg)
        y.backward(dy)
        return [y, xg.grad] + [p.grad for p in params]

    return Prepared(run_fwd_bwd, [xg] + params)


# ----------------------------------------------------------------------------------------------------------
# Builders: (workspace, case) -> Prepared. They raise Unavailable when the package is missing.


def build_cublas(ws: Workspace, case: _sweep.Case) -> Prepared:
    import torch

    w = ws.weight(case.shape)
    x, dy = ws.inputs(case, need_dy=case.mode == "fwd+bwd")
    wt = w.t()  # a view: cuBLAS reads w [n, k] transposed, no copy
    if case.mode == "fwd":
        return Prepared(lambda: [torch.mm(x, wt)], [])
    return Prepared(lambda: [torch.mm(x, wt), torch.mm(dy, w)], [])


def build_ours(ws: Workspace, case: _sweep.Case) -> Prepared:
    try:
        import qlora_ext

        QLoRALinear = qlora_ext.QLoRALinear
    except (ImportError, AttributeError) as e:
        raise Unavailable(_err(e)) from e
    w = ws.weight(case.shape)
    a, b = ws.lora(case.shape, case.r)

    def make():
        mod = QLoRALinear.from_linear(
            _frozen_linear(w), r=case.r, lora_alpha=_sweep.LORA_ALPHA, lora_dropout=case.dropout
        )
        _copy_lora(mod.lora_A, mod.lora_B, a, b)
        return mod.train()

    mod = ws.get(("ours", case.group), make)
    x, dy = ws.inputs(case, need_dy=case.mode == "fwd+bwd")
    prep = _module_runner(mod, x, dy, case.mode, ws.fwd_grad)
    prep.notes.append(f"lora params {mod.lora_A.dtype}".replace("torch.", ""))
    return prep


def _reference_nf4_args(w):
    """(w_nf4, absmax, code, nested_absmax, nested_code, offset) of w, double-quantized, blocksize 64."""
    import qlora_ext
    from qlora_ext import reference as ref

    quantize = getattr(qlora_ext, "quantize_nf4", None)
    if quantize is not None:
        return tuple(quantize(w, blocksize=_sweep.NF4_BLOCKSIZE, double_quant=True).op_args()), "qlora_ext.quantize_nf4"
    w_nf4, absmax, nested_absmax, offset = ref.quantize_nf4(w, blocksize=_sweep.NF4_BLOCKSIZE, double_quant=True)
    code = ref.nf4_code(device=w.device)
    nested_code = ref.dynamic_map_signed(device=w.device)
    return (w_nf4, absmax, code, nested_absmax, nested_code, offset), "reference.quantize_nf4"


def build_reference(ws: Workspace, case: _sweep.Case) -> Prepared:
    import torch

    try:
        from qlora_ext import reference as ref

        qlora_linear, qlora_linear_backward = ref.qlora_linear, ref.qlora_linear_backward
    except (ImportError, AttributeError) as e:
        raise Unavailable(_err(e)) from e
    w = ws.weight(case.shape)
    args, how = ws.get("reference_nf4", lambda: _reference_nf4_args(w))
    a, b = ws.lora(case.shape, case.r)
    x, dy = ws.inputs(case, need_dy=case.mode == "fwd+bwd")
    s = _sweep.LORA_ALPHA / case.r
    p = case.dropout
    bs = _sweep.NF4_BLOCKSIZE

    if case.mode == "fwd":

        def run_fwd():
            with torch.no_grad():
                return list(qlora_linear(x, *args, a, b, None, s, p, REFERENCE_SEED, bs))

        return Prepared(run_fwd, [], [f"weights from {how}"])

    def run_fwd_bwd():
        with torch.no_grad():
            y, u = qlora_linear(x, *args, a, b, None, s, p, REFERENCE_SEED, bs)
            dx, da, db = qlora_linear_backward(dy, x, u, *args, a, b, s, p, REFERENCE_SEED, bs)
        return [y, dx, da, db]

    return Prepared(run_fwd_bwd, [], [f"weights from {how}"])


def _peft_wrap(base, case: _sweep.Case, a, b, adapter_dtype: str):
    """get_peft_model over a one-layer module, as a user targets a layer by name."""
    import torch
    from peft import LoraConfig, get_peft_model
    from torch import nn

    class OneLayer(nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.base = layer

        def forward(self, x):
            return self.base(x)

    cfg = LoraConfig(
        r=case.r, lora_alpha=_sweep.LORA_ALPHA, lora_dropout=case.dropout, target_modules=["base"], bias="none"
    )
    # PEFT's default (autocast_adapter_dtype=True) keeps adapters in fp32 and casts x to fp32 for them;
    # "bf16" keeps them in the compute dtype, as ours and the anchors' bf16 layers.
    try:
        model = get_peft_model(OneLayer(base), cfg, autocast_adapter_dtype=adapter_dtype == "fp32")
    except TypeError:  # a PEFT without the argument
        model = get_peft_model(OneLayer(base), cfg)
    want = torch.float32 if adapter_dtype == "fp32" else torch.bfloat16
    for p in model.parameters():
        if p.requires_grad and p.dtype != want:
            p.data = p.data.to(want)
    layer = model.base_model.model.base
    _copy_lora(layer.lora_A["default"].weight, layer.lora_B["default"].weight, a, b)
    return model.train()


def _bnb_linear4bit(w):
    """bnb.nn.Linear4bit(nf4, double quant, bf16 compute, blocksize 64) quantized by bitsandbytes from w."""
    import bitsandbytes as bnb
    import torch

    n, k = w.shape
    lin = bnb.nn.Linear4bit(
        k, n, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4", device="meta"
    )
    lin.weight = bnb.nn.Params4bit(
        w.detach().clone(), requires_grad=False, compress_statistics=True, quant_type="nf4", blocksize=64
    )
    return lin.to(w.device)  # Params4bit.to quantizes (bitsandbytes' own quantize_4bit)


def build_bnb_peft(ws: Workspace, case: _sweep.Case) -> Prepared:
    try:
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401
    except ImportError as e:
        raise Unavailable(_err(e)) from e
    w = ws.weight(case.shape)
    a, b = ws.lora(case.shape, case.r)
    lin4 = ws.get("bnb_linear4bit", lambda: _bnb_linear4bit(w))
    model = ws.get(("bnb_peft", case.group), lambda: _peft_wrap(lin4, case, a, b, ws.adapter_dtype))
    x, dy = ws.inputs(case, need_dy=case.mode == "fwd+bwd")
    prep = _module_runner(model, x, dy, case.mode, ws.fwd_grad)
    prep.notes.append(f"PEFT layer {type(model.base_model.model.base).__module__}.{type(model.base_model.model.base).__name__}")
    prep.notes.append(f"adapters {ws.adapter_dtype}")
    return prep


def build_bf16_peft(ws: Workspace, case: _sweep.Case) -> Prepared:
    try:
        import peft  # noqa: F401
    except ImportError as e:
        raise Unavailable(_err(e)) from e
    w = ws.weight(case.shape)
    a, b = ws.lora(case.shape, case.r)
    model = ws.get(("bf16_peft", case.group), lambda: _peft_wrap(_frozen_linear(w), case, a, b, ws.adapter_dtype))
    x, dy = ws.inputs(case, need_dy=case.mode == "fwd+bwd")
    prep = _module_runner(model, x, dy, case.mode, ws.fwd_grad)
    prep.notes.append(f"adapters {ws.adapter_dtype}")
    return prep


_TORCHAO_NF4_MODULES = (
    "torchao.dtypes.nf4tensor",  # older torchao
    "torchao.quantization.quantize_.workflows.nf4.nf4_tensor",  # where 0.18 (the anchors' version) keeps it
)


def _torchao_nf4():
    """(to_nf4, linear_nf4, module name) from whichever torchao layout is installed."""
    errors = []
    for name in _TORCHAO_NF4_MODULES:
        try:
            mod = importlib.import_module(name)
            return mod.to_nf4, mod.linear_nf4, name
        except (ImportError, AttributeError) as e:
            errors.append(_err(e))
    raise Unavailable("; ".join(dict.fromkeys(errors)))


def build_torchao(ws: Workspace, case: _sweep.Case) -> Prepared:
    import torch.nn.functional as F
    from torch import nn

    to_nf4, linear_nf4, _ = _torchao_nf4()
    w = ws.weight(case.shape)
    a, b = ws.lora(case.shape, case.r)
    w_ao = ws.get("torchao_nf4", lambda: to_nf4(w, block_size=64, scaler_block_size=256))

    def make():
        return nn.Parameter(a.clone()), nn.Parameter(b.clone())

    lora_a, lora_b = ws.get(("torchao_lora", case.group), make)
    s = _sweep.LORA_ALPHA / case.r
    p = case.dropout
    x, dy = ws.inputs(case, need_dy=case.mode == "fwd+bwd")

    def forward(inp):
        h = F.dropout(inp, p, training=True) if p > 0 else inp
        return linear_nf4(inp, w_ao) + s * F.linear(F.linear(h, lora_a), lora_b)

    if case.mode == "fwd":
        return _forward_runner(forward, x, ws.fwd_grad)
    xg = x.detach().requires_grad_(True)

    def run_fwd_bwd():
        y = forward(xg)
        y.backward(dy)
        return [y, xg.grad, lora_a.grad, lora_b.grad]

    return Prepared(run_fwd_bwd, [xg, lora_a, lora_b])


BUILDERS: dict[str, Callable[[Workspace, _sweep.Case], Prepared]] = {
    "cublas": build_cublas,
    "ours": build_ours,
    "reference": build_reference,
    "bnb_peft": build_bnb_peft,
    "bf16_peft": build_bf16_peft,
    "torchao": build_torchao,
}
