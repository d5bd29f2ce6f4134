"""What the bench suite measures: layer shapes, the sweeps, implementations, floors and a cost model.

Pure Python (no torch), so the report generator and the self-test use it on any machine.
Names follow ARCHITECTURE.md §1: a layer maps x [m, k] to y [m, n]; LoRA rank r; lora_dropout p.
A shape is written ``KxN`` = in_features x out_features (``4096x14336`` is Llama-3-8B's gate/up projection).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

# Ceilings measured on the project's H200 (ARCHITECTURE.md §4, ../shared/anchors): an 8192^3 bf16 cuBLAS GEMM
# and a large device-to-device copy counting bytes read + written. The suite re-measures both each session and
# the report prefers the session's own numbers; these are the fallback for offline floor tables.
H200_BF16_FLOPS = 779e12
H200_COPY_BYTES_PER_S = 4.27e12

LORA_ALPHA = 32  # the anchors' alpha; s = alpha / r (only a constant in the math, irrelevant to speed)
NF4_BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256


@dataclasses.dataclass(frozen=True)
class Shape:
    model: str  # "llama3-8b"
    layer: str  # which projections have this shape
    k: int  # in_features
    n: int  # out_features

    @property
    def id(self) -> str:
        return f"{self.k}x{self.n}"


SHAPES: tuple[Shape, ...] = (
    Shape("llama3-8b", "q_proj/o_proj", 4096, 4096),
    Shape("llama3-8b", "k_proj/v_proj", 4096, 1024),
    Shape("llama3-8b", "gate_proj/up_proj", 4096, 14336),
    Shape("llama3-8b", "down_proj", 14336, 4096),
    Shape("llama3-70b", "q_proj/o_proj", 8192, 8192),
    Shape("llama3-70b", "gate_proj/up_proj", 8192, 28672),
    Shape("llama3-70b", "down_proj", 28672, 8192),
)
SHAPE_BY_ID = {s.id: s for s in SHAPES}
TARGET_SHAPE_IDS = ("4096x14336", "8192x28672")  # issue 5's target layers
SHAPE_ALIASES = {
    "all": [s.id for s in SHAPES],
    "8b": [s.id for s in SHAPES if s.model == "llama3-8b"],
    "70b": [s.id for s in SHAPES if s.model == "llama3-70b"],
    "targets": list(TARGET_SHAPE_IDS),
}

M_ALL = (1, 16, 128, 2048, 8192, 16384)
R_ALL = (16, 64)
DROPOUT_ALL = (0.0, 0.05)
MODES = ("fwd", "fwd+bwd")

# Implementations, in the order they run inside a case (cuBLAS first: it is every other cell's floor).
IMPLS: tuple[str, ...] = ("cublas", "ours", "reference", "bnb_peft", "bf16_peft", "torchao")
IMPL_LABELS = {
    "cublas": "cuBLAS bf16 (floor)",
    "ours": "qlora_ext",
    "reference": "reference (unfused)",
    "bnb_peft": "bnb+PEFT",
    "bf16_peft": "bf16+PEFT",
    "torchao": "torchao NF4",
}
BASELINES = ("reference", "bnb_peft", "bf16_peft", "torchao")  # what "ours" is compared against

E2E_IMPLS: tuple[str, ...] = ("ours", "bnb_peft", "bf16_peft")
E2E_LABELS = {"ours": "qlora_ext", "bnb_peft": "bnb+PEFT", "bf16_peft": "bf16+PEFT"}


def fmt_p(p: float) -> str:
    return "0" if p == 0 else f"{p:g}"


@dataclasses.dataclass(frozen=True)
class Case:
    """One layer configuration; every implementation runs it on the same weights and inputs."""

    shape: Shape
    m: int
    r: int
    dropout: float
    mode: str  # "fwd" (no autograd) or "fwd+bwd" (forward with autograd + backward(dy))

    @property
    def id(self) -> str:
        return f"{self.shape.id}-m{self.m}-r{self.r}-p{fmt_p(self.dropout)}-{self.mode}"

    @property
    def group(self) -> tuple:
        """Cases sharing a group share the quantized weights and LoRA modules."""
        return (self.shape.id, self.r, self.dropout)

    def cell_id(self, impl: str) -> str:
        return f"{self.id}-{impl}"


@dataclasses.dataclass(frozen=True)
class Block:
    shapes: tuple[str, ...]
    ms: tuple[int, ...]
    rs: tuple[int, ...]
    dropouts: tuple[float, ...]
    modes: tuple[str, ...]

    def cases(self) -> list[Case]:
        return [
            Case(SHAPE_BY_ID[s], m, r, p, mode)
            for s in self.shapes
            for r in self.rs
            for p in self.dropouts
            for m in self.ms
            for mode in self.modes
        ]


@dataclasses.dataclass(frozen=True)
class E2ESweep:
    batches: tuple[int, ...] = (2, 8)
    seq: int = 2048
    layers: int = 4
    vocab: int = 32000  # as the anchors' e2e json (Llama-3's 128256 only adds a bigger lm_head / loss)
    hidden: int = 4096  # Llama-3-8B width
    intermediate: int = 14336
    heads: int = 32
    kv_heads: int = 8
    warmup_steps: int = 3  # the anchors time steps 4-10: 3 warm-up steps, median of the next 7
    timed_steps: int = 7
    r: int = 16
    lora_alpha: int = 32


@dataclasses.dataclass(frozen=True)
class Sweep:
    name: str
    blocks: tuple[Block, ...]  # blocks[0] is the primary block; selection options override its axes
    e2e: E2ESweep
    warmup_ms: float = 25.0  # triton.testing.do_bench defaults, as the anchors were measured
    rep_ms: float = 100.0
    min_samples: int = 10  # large cases get at least this many timed runs (do_bench alone would give ~3)

    def cases(self) -> list[Case]:
        return order_cases(c for b in self.blocks for c in b.cases())


_ALL_SHAPES = tuple(s.id for s in SHAPES)
QUICK = Sweep(
    "quick",
    (Block(("4096x14336",), (16, 2048), (16,), (0.0,), MODES),),
    E2ESweep(batches=(2,), layers=2, warmup_steps=2, timed_steps=3),
    warmup_ms=10.0,
    rep_ms=25.0,
    min_samples=5,
)
DEFAULT = Sweep(
    "default",
    (
        # every shape and m at the anchors' configuration (r=16, no dropout): the main tables and the plot
        Block(_ALL_SHAPES, M_ALL, (16,), (0.0,), MODES),
        # issue 5's target layers at the larger rank, and with dropout on (training with lora_dropout)
        Block(TARGET_SHAPE_IDS, M_ALL, (64,), (0.0,), MODES),
        Block(TARGET_SHAPE_IDS, M_ALL, (16,), (0.05,), ("fwd+bwd",)),
    ),
    E2ESweep(),
)
FULL = Sweep("full", (Block(_ALL_SHAPES, M_ALL, R_ALL, DROPOUT_ALL, MODES),), E2ESweep())
SWEEPS = {s.name: s for s in (QUICK, DEFAULT, FULL)}


def order_cases(cases: Iterable[Case]) -> list[Case]:
    """Dedupe and order so that one shape's cases are contiguous (its weights are built once, then freed)
    and, inside a shape, one (r, dropout) group's cases are contiguous (its LoRA modules are built once)."""
    shape_rank = {s.id: i for i, s in enumerate(SHAPES)}
    uniq = {c.id: c for c in cases}
    return sorted(
        uniq.values(),
        key=lambda c: (shape_rank.get(c.shape.id, 99), c.shape.id, c.r, c.dropout, c.m, MODES.index(c.mode)),
    )


# ----------------------------------------------------------------------------------------------------------
# Parsing of the selection options (conftest.py); each raises ValueError with a message naming the option.


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.replace(";", ",").split(",") if t.strip()]


def parse_shapes(text: str) -> tuple[str, ...]:
    out: list[str] = []
    for tok in _split(text):
        t = tok.lower().replace("->", "x").replace("→", "x").replace(":", "x")
        if t in SHAPE_ALIASES:
            out += SHAPE_ALIASES[t]
        elif t in SHAPE_BY_ID:
            out.append(t)
        else:
            parts = t.split("x")
            if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
                raise ValueError(
                    f"--bench-shapes: {tok!r} is not KxN (in x out, e.g. 4096x14336) nor one of {sorted(SHAPE_ALIASES)}"
                )
            out.append(f"{int(parts[0])}x{int(parts[1])}")
    return tuple(dict.fromkeys(out))


def shape_for(shape_id: str) -> Shape:
    if shape_id in SHAPE_BY_ID:
        return SHAPE_BY_ID[shape_id]
    k, n = (int(v) for v in shape_id.split("x"))
    return Shape("custom", "custom", k, n)


def parse_ints(text: str, option: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(t) for t in _split(text))
    except ValueError:
        raise ValueError(f"{option}: expected comma-separated integers, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise ValueError(f"{option}: expected positive integers, got {text!r}")
    return tuple(dict.fromkeys(vals))


def parse_floats(text: str, option: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(t) for t in _split(text))
    except ValueError:
        raise ValueError(f"{option}: expected comma-separated numbers, got {text!r}") from None
    if not vals or any(not 0.0 <= v < 1.0 for v in vals):
        raise ValueError(f"{option}: expected dropout probabilities in [0, 1), got {text!r}")
    return tuple(dict.fromkeys(vals))


def parse_modes(text: str) -> tuple[str, ...]:
    alias = {"fwd": "fwd", "fwd+bwd": "fwd+bwd", "fwdbwd": "fwd+bwd", "train": "fwd+bwd", "bwd": "fwd+bwd"}
    out = []
    for tok in _split(text):
        if tok.lower() not in alias:
            raise ValueError(f"--bench-modes: {tok!r} is not one of fwd, fwd+bwd")
        out.append(alias[tok.lower()])
    return tuple(dict.fromkeys(out))


def parse_impls(text: str, known: Sequence[str] = IMPLS, option: str = "--bench-impls") -> tuple[str, ...]:
    out = []
    for tok in _split(text):
        if tok not in known:
            raise ValueError(f"{option}: {tok!r} is not one of {', '.join(known)}")
        out.append(tok)
    return tuple(dict.fromkeys(out))


def select(
    base: Sweep,
    shapes: tuple[str, ...] | None = None,
    ms: tuple[int, ...] | None = None,
    rs: tuple[int, ...] | None = None,
    dropouts: tuple[float, ...] | None = None,
    modes: tuple[str, ...] | None = None,
) -> list[Case]:
    """The base sweep's cases, or -- when any axis is given -- one block: the given axes, the others taken
    from the base sweep's primary block. So ``--bench-m 16384`` runs m=16384 on the base sweep's shapes."""
    if all(v is None for v in (shapes, ms, rs, dropouts, modes)):
        return base.cases()
    b = base.blocks[0]
    shape_ids = shapes or b.shapes
    cases = [
        Case(shape_for(s), m, r, p, mode)
        for s in shape_ids
        for r in (rs or b.rs)
        for p in (dropouts if dropouts is not None else b.dropouts)
        for m in (ms or b.ms)
        for mode in (modes or b.modes)
    ]
    return order_cases(cases)


# ----------------------------------------------------------------------------------------------------------
# Floors (METHOD.md: count the FLOPs and the fewest bytes; the larger time is the floor).


def nf4_weight_bytes(k: int, n: int, blocksize: int = NF4_BLOCKSIZE, double_quant: bool = True) -> int:
    """Bytes of the stored NF4 weight: packed nibbles + absmax (+ nested absmax, code maps, offset)."""
    numel = k * n
    nblocks = math.ceil(numel / blocksize)
    packed = (numel + 1) // 2
    if double_quant:
        return packed + nblocks + 4 * math.ceil(nblocks / NESTED_BLOCKSIZE) + 16 * 4 + 256 * 4 + 4
    return packed + 4 * nblocks + 16 * 4


def layer_flops(k: int, n: int, m: int, r: int, mode: str) -> dict:
    """FLOPs of one call. 'frozen' = the base GEMMs (2mnk forward, +2mnk for dx = dy.w), the convention the
    anchors' TFLOP/s use; 'lora' = the rank-r products (u = x.A^T, u.B^T; g = dy.B, g.A, dA, dB)."""
    frozen = 2 * m * n * k
    lora = 2 * m * r * (k + n)
    if mode == "fwd+bwd":
        frozen *= 2
        lora += 4 * m * r * (k + n)
    return {"frozen": frozen, "lora": lora, "total": frozen + lora}


def layer_bytes(k: int, n: int, m: int, r: int, mode: str, act_bytes: int = 2) -> dict:
    """Fewest DRAM bytes of a fused implementation, per phase (each input read once, each output written once).
    forward : read x, NF4 w, A, B; write y (+ u [m, r] when training, saved for backward)
    backward: read dy, x (for dA), u, NF4 w, A, B; write dx, dA, dB.
    The NF4 weight is read once per phase: a phase is a separate launch after an L2 flush in the benchmark."""
    w = nf4_weight_bytes(k, n)
    ab = act_bytes * r * (k + n)
    fwd = act_bytes * m * k + w + ab + act_bytes * m * n
    phases = {"fwd": fwd}
    if mode == "fwd+bwd":
        phases["fwd"] = fwd + act_bytes * m * r
        phases["bwd"] = act_bytes * (m * n + m * k + m * r) + w + ab + act_bytes * (m * k + r * k + n * r)
    return {"nf4_weight": w, "phases": phases, "total": sum(phases.values())}


def roofline_ms(
    k: int, n: int, m: int, r: int, mode: str, flops_per_s: float = H200_BF16_FLOPS, bytes_per_s: float = H200_COPY_BYTES_PER_S
) -> dict:
    """Floor time: per phase max(FLOPs / peak, bytes / bandwidth), summed over the phases."""
    fl = layer_flops(k, n, m, r, mode)
    by = layer_bytes(k, n, m, r, mode)
    phase_flops = {"fwd": 2 * m * n * k + 2 * m * r * (k + n)}
    if mode == "fwd+bwd":
        phase_flops["bwd"] = 2 * m * n * k + 4 * m * r * (k + n)
    total = 0.0
    bound = {}
    for ph, b in by["phases"].items():
        t_c = phase_flops[ph] / flops_per_s
        t_m = b / bytes_per_s
        total += max(t_c, t_m)
        bound[ph] = "compute" if t_c >= t_m else "memory"
    return {
        "ms": total * 1e3,
        "compute_ms": fl["total"] / flops_per_s * 1e3,
        "memory_ms": by["total"] / bytes_per_s * 1e3,
        "bound": bound,
        "nf4_byte_floor_ms": by["nf4_weight"] / bytes_per_s * 1e3,
    }


def gemm_floor_ms(k: int, n: int, m: int, mode: str, flops_per_s: float = H200_BF16_FLOPS, bytes_per_s: float = H200_COPY_BYTES_PER_S) -> float:
    """Floor of the bf16 GEMM(s) the cuBLAS column times: y = x.w^T (and dx = dy.w): per GEMM
    max(2mnk / peak, (bf16 w + operands + result) / bandwidth)."""
    t = max(2 * m * n * k / flops_per_s, 2 * (n * k + m * k + m * n) / bytes_per_s)
    return (2 * t if mode == "fwd+bwd" else t) * 1e3


# ----------------------------------------------------------------------------------------------------------
# Cost model: how long a selection takes on an H200 (printed in the pytest header; sizes the default sweep).

# Host-side time of one call when the GPU work is tiny (from the anchors at m=16, 4096x14336: PEFT layers are
# launch-bound), in ms, and a multiplier on the cuBLAS time for the GPU work at large m.
_COST = {
    "cublas": ((0.012, 0.025), 1.0),
    "ours": ((0.03, 0.08), 1.15),
    "reference": ((0.25, 0.6), 1.6),
    "bnb_peft": ((0.34, 1.36), 1.3),
    "bf16_peft": ((0.08, 0.73), 1.25),
    "torchao": ((0.96, 1.93), 1.5),
}
_FLUSH_MS = 0.065  # zeroing do_bench's 256 MB L2-flush buffer at ~4 TB/s
_CELL_OVERHEAD_S = 0.06  # pytest item, sanity run, peak-memory run bookkeeping
_SHAPE_SETUP_S = 2.5  # random weights, bnb / torchao / qlora_ext quantization, module builds
_GROUP_SETUP_S = 0.4  # per (shape, r, dropout): PEFT wrappers and QLoRALinear
_SESSION_S = 20.0  # imports (transformers/peft/bnb/triton), CUDA context, ceilings
_CUBLAS_EFF = 0.8  # achieved fraction of the 8192^3 rate (anchors: 0.87-0.91 at m >= 2048; kept low: a budget)


def estimate_run_ms(case: Case, impl: str) -> float:
    s = case.shape
    host, mult = _COST[impl]
    gpu = gemm_floor_ms(s.k, s.n, case.m, case.mode, H200_BF16_FLOPS * _CUBLAS_EFF) * mult
    return max(host[case.mode == "fwd+bwd"], gpu)


def estimate_cell_seconds(case: Case, impl: str, sweep: Sweep) -> float:
    t = estimate_run_ms(case, impl)
    per = t + _FLUSH_MS
    n_rep = max(sweep.min_samples, sweep.rep_ms / per)
    ms = 5 * per + max(sweep.warmup_ms, t) + n_rep * per + 4 * t  # do_bench estimate/warm-up/reps; 4 own runs
    return ms / 1e3 + _CELL_OVERHEAD_S


def estimate_e2e_seconds(e2e: E2ESweep, impls: Sequence[str]) -> float:
    # measured anchors: 45 ms/step at batch 2, 170 ms at batch 8 (4 layers); build + quantize ~1.5 s a layer
    step_s = {b: 0.0225 * b * e2e.layers / 4 * e2e.seq / 2048 + 0.005 for b in e2e.batches}
    per_impl = 1.5 + 1.5 * e2e.layers + sum((e2e.warmup_steps + e2e.timed_steps + 1) * t for t in step_s.values())
    return per_impl * len(impls)


def estimate_seconds(cases: Sequence[Case], impls: Sequence[str], sweep: Sweep, e2e_impls: Sequence[str] = ()) -> dict:
    layer = sum(estimate_cell_seconds(c, i, sweep) for c in cases for i in impls)
    setup = _SHAPE_SETUP_S * len({c.shape.id for c in cases}) + _GROUP_SETUP_S * len({c.group for c in cases})
    e2e = estimate_e2e_seconds(sweep.e2e, e2e_impls) if e2e_impls else 0.0
    return {"layers_s": layer, "setup_s": setup, "e2e_s": e2e, "session_s": _SESSION_S, "total_s": layer + setup + e2e + _SESSION_S}
