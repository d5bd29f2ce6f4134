"""What the bench measures: layer shapes (KxN = in x out: x [m, k] -> y [m, n]), token counts m, ranks r, modes and
columns. Pure Python (no torch): conftest, report, policy and the CPU tests share it."""

from __future__ import annotations

import dataclasses

SHAPES = {
    "4096x4096": "Llama-3-8B q_proj/o_proj",
    "4096x1024": "Llama-3-8B k_proj/v_proj",
    "4096x14336": "Llama-3-8B gate_proj/up_proj",
    "14336x4096": "Llama-3-8B down_proj",
    "8192x8192": "Llama-3-70B q_proj/o_proj",
    "8192x28672": "Llama-3-70B gate_proj/up_proj",
    "28672x8192": "Llama-3-70B down_proj",
}
ALIASES = {"all": list(SHAPES), "8b": list(SHAPES)[:4], "70b": list(SHAPES)[4:]}
M, R, MODES = (1, 16, 128, 2048, 8192, 16384), (16, 64), ("fwd", "fwd+bwd")
QUICK = {"shapes": ("4096x14336",), "m": (16, 2048), "r": (16,), "e2e_layers": 2, "e2e_batch": (2,)}
LORA_ALPHA = 32
PATHS_FALLBACK = ("fused", "decode_gemm", "gemv", "sm90")  # column names while qlora_ext.policy is not importable
BASELINES = ("reference", "bnb_peft", "bf16_peft", "torchao")
E2E_COLUMNS = ("qlora_ext", "bnb_peft", "bf16_peft")
LABELS = {"cublas": "cuBLAS bf16", "reference": "reference (unfused)", "bnb_peft": "bnb+PEFT", "bf16_peft": "bf16+PEFT",
          "torchao": "torchao NF4"}
# The unfused reference runs the layer in fp32: 10-14x cuBLAS above m = 2048, where it alone would take a third of the
# default sweep. The default sweep times it up to this m; naming it in --bench-cols times it at every m.
REFERENCE_MAX_M = 2048
# Cells up to this m (and host-bound cells at any m) are also timed as CUDA-graph replays: there the host's launch
# cost exceeds the GPU work of most columns, so the event timing follows the host's pace and its jitter, not the
# kernels; every column of such a row has a replay, so the row compares GPU time with GPU time.
GRAPH_MAX_M = 128
# Cells whose synchronized call takes at most this long (ms) are replayed too, whatever their host time: in a row
# with host-bound columns the GPU-bound ones (cuBLAS) need a replay for the row to compare GPU time with GPU time.
GRAPH_WALL_MS = 1.0
# The small-m forward target: faster than cuBLAS bf16 (GPU time) at every m up to this.
SMALL_M = 16


def columns(paths) -> tuple[str, ...]:
    return ("cublas", "qlora_ext", *(f"qlora_ext[{p}]" for p in paths), *BASELINES)


def label(col: str) -> str:
    return LABELS.get(col, col)


def path_of(col: str) -> str | None:
    """'qlora_ext[fused]' -> 'fused'; None for the other columns."""
    return col[10:-1] if col.startswith("qlora_ext[") else None


def kn(shape: str) -> tuple[int, int]:
    k, n = shape.split("x")
    return int(k), int(n)


def shape_order(shape: str) -> tuple:
    return (list(SHAPES).index(shape), 0, 0) if shape in SHAPES else (len(SHAPES), *kn(shape))


@dataclasses.dataclass(frozen=True)
class Cell:
    """One timing: a (shape, m, r, mode) row of RESULTS.md and one of its columns."""

    shape: str
    m: int
    r: int
    mode: str
    column: str

    @property
    def row(self) -> str:
        return f"{self.shape}-m{self.m}-r{self.r}-{self.mode}"

    @property
    def id(self) -> str:
        return f"{self.row}-{self.column.replace('[', '-').replace(']', '')}"


def plan(shapes, ms, rs, modes, cols) -> list[Cell]:
    """Run order: one shape at a time (its weights are built once, then freed), then r, m, mode, column."""
    return [Cell(s, m, r, mode, c) for s in shapes for r in rs for m in ms for mode in modes for c in cols]


def parse(text: str, option: str, known=None) -> tuple:
    """A comma-separated option value: positive integers, or names among ``known`` (shapes: KxN or an alias)."""
    toks = [t.strip() for t in text.split(",") if t.strip()]
    try:
        if known is None:
            vals = [int(t) for t in toks]
            assert vals and min(vals) > 0
        elif known == "shapes":
            vals = [v for t in toks for v in (ALIASES.get(t.lower()) or [
                "x".join(str(int(p)) for p in t.lower().replace("->", "x").split("x", 1))])]
            assert vals and all(min(kn(v)) > 0 for v in vals)
        else:
            vals = toks
            assert vals and all(t in known for t in toks)
    except (ValueError, AssertionError):
        want = "positive integers" if known is None else "KxN or 8b/70b/all" if known == "shapes" else ", ".join(known)
        raise ValueError(f"{option}: expected a comma-separated list of {want}, got {text!r}") from None
    return tuple(dict.fromkeys(vals))
