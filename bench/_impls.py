"""The columns, built on one shape's shared weights: a random bf16 w [n, k] (std 0.02), its NF4 quantization, random
LoRA factors A [r, k] and B [n, r] (B not PEFT's zeros, so no product runs on zeros), and a row's random x [m, k] and
dy [m, n]. fwd runs under torch.no_grad(); fwd+bwd runs the forward with autograd on an x that requires grad, then
y.backward(dy): dx, dA and dB. PEFT adapters are bf16 (autocast_adapter_dtype=False), as qlora_ext's. What each
column runs: bench/README.md.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import zlib

from ._sweep import LORA_ALPHA, kn, path_of

ENV_PATH = "QLORA_EXT_PATH"
DEVICE = "cuda"


def err(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".strip()[:500]


def _torchao():
    for name in ("torchao.dtypes.nf4tensor", "torchao.quantization.quantize_.workflows.nf4.nf4_tensor"):
        with contextlib.suppress(ImportError, AttributeError):
            mod = importlib.import_module(name)
            return mod.to_nf4, mod.linear_nf4
    raise ImportError("torchao with an NF4 tensor is not installed")


def probe(col: str) -> str | None:
    """Why ``col`` cannot run here (an import fails, an unknown path, no compiled kernels), or None."""
    try:
        if col.startswith("qlora_ext"):
            qlora_ext = importlib.import_module("qlora_ext")
            if path_of(col) is not None and path_of(col) not in importlib.import_module("qlora_ext.policy").PATHS:
                return f"qlora_ext.policy.PATHS has no {path_of(col)!r}"
            if path_of(col) is not None and not qlora_ext.has_cuda_kernels():
                return "qlora_ext was built without its CUDA kernels"
        elif col == "torchao":
            _torchao()
        else:
            needs = {"reference": ["qlora_ext.reference"], "bnb_peft": ["peft", "bitsandbytes"], "bf16_peft": ["peft"]}
            for mod in needs.get(col, []):
                importlib.import_module(mod)
    except Exception as e:  # noqa: BLE001  (an import failing is a reason to skip the column, never to stop)
        return err(e)
    return None


def unsupported(col: str, m: int, n: int, mode: str) -> str | None:
    """Why path column ``col`` does not serve this cell on this GPU (qlora_ext.policy.supports), or None."""
    if path_of(col) is None:
        return None
    from qlora_ext import policy

    for forward in (True, False)[: 1 if mode == "fwd" else 2]:
        if not policy.supports(path_of(col), m, forward, n):
            return (f"{path_of(col)} does not serve the {'forward' if forward else 'backward'} at m={m}, n={n}"
                    + (" on this GPU / build" if path_of(col) == "sm90" and forward else ""))
    return None


@contextlib.contextmanager
def forced(path: str | None):
    """qlora_ext.policy.override(path) around a cell; None: auto dispatch, with QLORA_EXT_PATH unset for the cell
    (a QLORA_EXT_PATH in the caller's environment must not turn the auto column into a path)."""
    old = os.environ.pop(ENV_PATH, None)
    try:
        with importlib.import_module("qlora_ext.policy").override(path) if path else contextlib.nullcontext():
            yield
    finally:
        if old is not None:
            os.environ[ENV_PATH] = old


def workspace_mib() -> float | None:
    fn = getattr(importlib.import_module("qlora_ext"), "workspace_bytes", None)
    return fn() / 2**20 if fn else None


class Workspace:
    """One shape's weights, quantized weights and modules, built once and shared by every m and r of the shape,
    and the inputs of the current row (shape, m, r, mode)."""

    def __init__(self, shape: str):
        self.shape, (self.k, self.n) = shape, kn(shape)
        self.objs: dict = {}

    def get(self, key, make):
        if key not in self.objs:
            self.objs[key] = make()
        return self.objs[key]

    def randn(self, size, std, *key):
        import torch

        g = torch.Generator(device=DEVICE).manual_seed(zlib.crc32(repr((self.shape, *key)).encode()))
        return (torch.randn(size, generator=g, device=DEVICE) * std).to(torch.bfloat16)

    def weights(self, r):
        """(w, A, B)"""
        w = self.get("w", lambda: self.randn((self.n, self.k), 0.02, "w"))
        return (w, *self.get(("lora", r), lambda: (self.randn((r, self.k), self.k**-0.5, "A", r),
                                                   self.randn((self.n, r), 0.01, "B", r))))

    def nf4(self):
        """w quantized by qlora_ext.quantize_nf4 (NF4, double quant, blocksize 64)."""
        return self.get("nf4", lambda: importlib.import_module("qlora_ext").quantize_nf4(self.objs["w"], 64, True))

    def inputs(self, cell):
        """x and dy, fresh per row and shared by the row's columns."""
        if self.objs.get("row") != cell.row:
            self.objs.update(row=cell.row, x=None, dy=None)  # free the previous row's first
            self.objs["x"] = self.randn((cell.m, self.k), 1.0, "x", cell.row)
            self.objs["dy"] = self.randn((cell.m, self.n), 1.0, "dy", cell.row) if cell.mode != "fwd" else None
        return self.objs["x"], self.objs["dy"]

    def release(self):
        import torch

        self.objs.clear()
        gc.collect()  # PEFT models hold reference cycles
        torch.cuda.empty_cache()


def _runner(fn, x, dy, mode: str, params):
    """(call, grads): call() returns the tensors to sanity-check; grads are reset to None before timed calls."""
    import torch

    if mode == "fwd":
        def fwd():
            with torch.no_grad():
                return [fn(x)]
        return fwd, []
    xg = x.detach().requires_grad_(True)

    def fwd_bwd():
        y = fn(xg)
        y.backward(dy)
        return [y, xg.grad, *(p.grad for p in params)]
    return fwd_bwd, [xg, *params]


def _peft(base, r, a, b):
    """get_peft_model over a one-layer module, targeting the layer by name as a user would."""
    import torch
    from peft import LoraConfig, get_peft_model

    one = torch.nn.Module()
    one.base = base
    one.forward = lambda t: one.base(t)
    cfg = LoraConfig(r=r, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=["base"], bias="none")
    model = get_peft_model(one, cfg, autocast_adapter_dtype=False)
    layer = model.base_model.model.base
    for p, v in ((layer.lora_A["default"].weight, a), (layer.lora_B["default"].weight, b)):
        p.data = v.clone()
    return model.train()


def bnb_linear4bit(w):
    """bitsandbytes Linear4bit (nf4, double quant, blocksize 64, bf16 compute) quantized by bitsandbytes from w."""
    import bitsandbytes as bnb
    import torch

    lin = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=False, compute_dtype=torch.bfloat16, compress_statistics=True,
                            quant_type="nf4", device="meta")
    lin.weight = bnb.nn.Params4bit(w.detach().clone(), requires_grad=False, compress_statistics=True, quant_type="nf4",
                                   blocksize=64)
    return lin.to(w.device)  # Params4bit.to quantizes


def build(ws: Workspace, cell):
    """(call, grads) of ``cell.column`` on the workspace's weights and the cell's inputs."""
    import torch

    r, mode, col = cell.r, cell.mode, cell.column
    x, dy = ws.inputs(cell)
    w, a, b = ws.weights(r)
    s = LORA_ALPHA / r
    if col == "cublas":
        return (lambda: [torch.mm(x, w.t())] + ([torch.mm(dy, w)] if dy is not None else [])), []
    if col.startswith("qlora_ext"):
        import qlora_ext

        def make():
            mod = qlora_ext.QLoRALinear(ws.nf4(), r=r, lora_alpha=LORA_ALPHA, lora_dropout=0.0)
            mod.lora_A.data, mod.lora_B.data = a.clone(), b.clone()
            return mod.train()

        mod = ws.get(("qlora_ext", r), make)
        return _runner(mod, x, dy, mode, [mod.lora_A, mod.lora_B])
    if col == "reference":
        from qlora_ext import reference as ref

        args = ws.nf4().op_args()

        @torch.no_grad()
        def run():
            y, u = ref.qlora_linear(x, *args, a, b, None, s, 0.0, 0, 64)
            return [y, u] if mode == "fwd" else [y, *ref.qlora_linear_backward(dy, x, u, *args, a, b, s, 0.0, 0, 64)]
        return run, []
    if col in ("bnb_peft", "bf16_peft"):
        def base():
            if col == "bnb_peft":
                return bnb_linear4bit(w)
            lin = torch.nn.Linear(ws.k, ws.n, bias=False, device="meta", dtype=w.dtype)
            lin.weight = torch.nn.Parameter(w, requires_grad=False)  # w itself, no copy
            return lin

        model = ws.get((col, r), lambda: _peft(ws.get(col, base), r, a, b))
        return _runner(model, x, dy, mode, [p for p in model.parameters() if p.requires_grad])
    if col == "torchao":
        import torch.nn.functional as F

        to_nf4, linear_nf4 = _torchao()
        w_ao = ws.get("torchao", lambda: to_nf4(w, block_size=64, scaler_block_size=256))
        la, lb = ws.get(("torchao", r), lambda: (torch.nn.Parameter(a.clone()), torch.nn.Parameter(b.clone())))
        return _runner(lambda t: linear_nf4(t, w_ao) + s * F.linear(F.linear(t, la), lb), x, dy, mode, [la, lb])
    raise ValueError(f"unknown column {col!r}")
