"""Render a bench run: JSON (bench/results/<date>-<gpu>.json) -> RESULTS.md + a PNG plot + terminal table.

`pytest bench/` calls this at the end of the session. To redo it elsewhere (e.g. here, where the anchors and
matplotlib are at hand, after copying a device run's JSON into bench/results/):

    python -m bench.report bench/results/2026-12-01-h200.json            # -> bench/RESULTS.md + .png
    python -m bench.report a.json b.json --md out.md --png out.png        # merge runs (e.g. layers + e2e)
    python -m bench.report --floors                                       # the floor tables of bench/NOTES.md

Pure Python; matplotlib only for the plot. Every number in RESULTS.md comes from the JSON or from
bench/_sweep.py's floor formulas -- nothing is typed in.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import defaultdict
from pathlib import Path

if __package__ in (None, ""):  # `python bench/report.py ...`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench import _sweep  # noqa: E402
else:
    from . import _sweep

BENCH_DIR = Path(__file__).resolve().parent
ENV_ANCHORS = "QLORA_BENCH_ANCHORS"
TARGET_R, TARGET_P = 16, 0.0

# ----------------------------------------------------------------------------------------------------------
# Loading


def load(paths) -> dict:
    """One document; several are merged (rows concatenated, later runs win for the same cell)."""
    docs = []
    for p in paths:
        with open(p) as f:
            docs.append(json.load(f))
    if not docs:
        raise ValueError("no result files given")
    doc = dict(docs[0])
    for key in ("layers", "e2e"):
        merged = {}
        for d in docs:
            for row in d.get(key, []):
                merged[row["cell"]] = row
        doc[key] = list(merged.values())
    if len(docs) > 1:
        doc["merged_from"] = [str(p) for p in paths]
    return doc


def find_anchors(explicit: str | os.PathLike | None = None) -> Path | None:
    cands = [explicit, os.environ.get(ENV_ANCHORS), BENCH_DIR.parent.parent / "shared" / "anchors", BENCH_DIR.parent / "shared" / "anchors"]
    for c in cands:
        if c and Path(c).is_dir() and any(Path(c).glob("*.json")):
            return Path(c)
    return None


def load_anchors(directory: Path | None) -> dict:
    """{'layers': [row...], 'e2e': [row...], 'source': str}; anchor layer rows keep impl/how/K/N/M/mode/ms."""
    out = {"layers": [], "e2e": [], "source": None, "meta": {}}
    if directory is None:
        return out
    out["source"] = str(directory)
    for p in sorted(directory.glob("*.json")):
        try:
            data = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        rows = data.get("rows", [])
        if rows and "batch" in rows[0]:
            out["e2e"] += [dict(r, _file=p.name) for r in rows]
            out["meta"]["e2e"] = {k: v for k, v in data.items() if k != "rows"}
        else:
            out["layers"] += [dict(r, _file=p.name) for r in rows if "M" in r]
    return out


# ----------------------------------------------------------------------------------------------------------
# Indexing helpers


def _ok(row) -> bool:
    return row is not None and row.get("status") == "ok" and row.get("ms") is not None


def index_layers(rows) -> dict:
    """case id -> {impl: row}"""
    out: dict = defaultdict(dict)
    for r in rows:
        out[r["case"]][r["impl"]] = r
    return out


def _case_key(r) -> tuple:
    return (r["k"], r["n"], r["r"], r["dropout"], r["m"], r["mode"])


def _lookup(rows_by_key, k, n, r, p, m, mode, impl):
    return rows_by_key.get((k, n, r, p, m, mode), {}).get(impl)


def _by_key(rows) -> dict:
    out: dict = defaultdict(dict)
    for row in rows:
        out[_case_key(row)][row["impl"]] = row
    return out


def _fmt_ms(v) -> str:
    if v is None:
        return "—"
    if v >= 100:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.3f}"
    return f"{v:.4f}"


def _fmt_num(v, fmt: str = ".0f") -> str:
    return "—" if v is None else format(v, fmt)


def _fmt_x(v) -> str:
    return "—" if v is None else f"{v:.2f}×"


def _cell_text(row, ours_ms=None, floor_ms=None) -> str:
    if row is None:
        return "—"
    st = row.get("status")
    if st == "unavailable":
        return "n/a"
    if st == "error":
        return "error¹"
    if st == "skipped":
        return "skipped"
    ms = row["ms"]
    if ours_ms:
        return f"{_fmt_ms(ms)} ({ms / ours_ms:.2f}×)"
    if floor_ms:
        return f"{_fmt_ms(ms)} [{ms / floor_ms:.2f}f]"
    return _fmt_ms(ms)


def _ceilings(doc) -> tuple[float, float, str]:
    c = doc.get("ceilings") or {}
    if c.get("bf16_gemm_8192_tflops") and c.get("copy_tb_per_s"):
        return c["bf16_gemm_8192_tflops"] * 1e12, c["copy_tb_per_s"] * 1e12, "measured this session"
    return _sweep.H200_BF16_FLOPS, _sweep.H200_COPY_BYTES_PER_S, "the project's H200 figures (ARCHITECTURE.md §4)"


# ----------------------------------------------------------------------------------------------------------
# Issue 5's targets


def evaluate_targets(doc) -> list[dict]:
    """Each target of issue 5 against this run (r=16, no dropout, layers 4096x14336 and 8192x28672)."""
    by = _by_key(doc.get("layers", []))
    out = []

    def add(target, shape, m, measured, threshold, better, detail, have):
        if not have:
            verdict = "no data"
        else:
            verdict = "met" if (measured <= threshold if better == "le" else measured >= threshold) else "missed"
        out.append(
            {"target": target, "shape": shape, "m": m, "measured": measured, "threshold": threshold, "verdict": verdict, "detail": detail}
        )

    for sid in _sweep.TARGET_SHAPE_IDS:
        s = _sweep.SHAPE_BY_ID[sid]
        for mode, limit, name in (("fwd", 1.03, "forward ≤ 1.03× cuBLAS GEMM"), ("fwd+bwd", 1.05, "fwd+bwd ≤ 1.05× two-GEMM floor")):
            for m in (2048, 8192, 16384):
                ours = _lookup(by, s.k, s.n, TARGET_R, TARGET_P, m, mode, "ours")
                cub = _lookup(by, s.k, s.n, TARGET_R, TARGET_P, m, mode, "cublas")
                have = _ok(ours) and _ok(cub)
                ratio = ours["ms"] / cub["ms"] if have else None
                det = f"{_fmt_ms(ours['ms'])} vs {_fmt_ms(cub['ms'])} ms" if have else _why_missing(ours, cub)
                add(name, sid, m, ratio, limit, "le", det, have)
        for m, limit in ((16384, 1.25), (2048, 1.8)):
            ours = _lookup(by, s.k, s.n, TARGET_R, TARGET_P, m, "fwd+bwd", "ours")
            bnb = _lookup(by, s.k, s.n, TARGET_R, TARGET_P, m, "fwd+bwd", "bnb_peft")
            have = _ok(ours) and _ok(bnb)
            sp = bnb["ms"] / ours["ms"] if have else None
            det = f"bnb+PEFT {_fmt_ms(bnb['ms'])} / ours {_fmt_ms(ours['ms'])} ms" if have else _why_missing(ours, bnb)
            add(f"fwd+bwd ≥ {limit}× faster than bnb+PEFT", sid, m, sp, limit, "ge", det, have)
        floor = _sweep.nf4_weight_bytes(s.k, s.n) / _sweep.H200_COPY_BYTES_PER_S * 1e3
        for m in (1, 16):
            ours = _lookup(by, s.k, s.n, TARGET_R, TARGET_P, m, "fwd", "ours")
            have = _ok(ours)
            det = f"NF4 byte floor {floor * 1e3:.1f} µs; cuBLAS bf16 " + (
                _fmt_ms(_lookup(by, s.k, s.n, TARGET_R, TARGET_P, m, "fwd", "cublas")["ms"]) + " ms"
                if _ok(_lookup(by, s.k, s.n, TARGET_R, TARGET_P, m, "fwd", "cublas"))
                else "—"
            )
            add("decode forward ≤ 2× NF4 byte floor (ms)", sid, m, ours["ms"] if have else None, 2 * floor, "le", det, have)
    # no weight-sized temporaries: ours' peak over its outputs, at small m (where outputs are tiny)
    worst = None
    for row in doc.get("layers", []):
        if row["impl"] != "ours" or not _ok(row) or row["m"] > 128 or row.get("peak_extra_MiB") is None:
            continue
        k, n, m, r = row["k"], row["n"], row["m"], row["r"]
        outputs = 2 * (m * n + m * r) + (2 * (m * k + r * k + n * r + m * r) if row["mode"] == "fwd+bwd" else 0)
        excess = row["peak_extra_MiB"] - outputs / 2**20
        frac = excess / (2 * n * k / 2**20)
        if worst is None or frac > worst[0]:
            worst = (frac, row, excess)
    if worst is None:
        add("no weight-sized temporaries", "all", "≤128", None, 0.25, "le", "no ours rows at m ≤ 128", False)
    else:
        frac, row, excess = worst
        add(
            "no weight-sized temporaries (peak beyond outputs ÷ bf16 weight size)",
            f"{row['k']}x{row['n']}",
            f"{row['m']} {row['mode']}",
            frac,
            0.25,
            "le",
            f"worst cell: {excess:.1f} MiB beyond outputs; bf16 weight {2 * row['n'] * row['k'] / 2**20:.0f} MiB",
            True,
        )
    return out


def _why_missing(*rows) -> str:
    for r in rows:
        if r is None:
            return "not in this run"
        if r.get("status") != "ok":
            return f"{r['impl']}: {r.get('status')} ({(r.get('reason') or '')[:80]})"
    return "—"


# ----------------------------------------------------------------------------------------------------------
# Anchor comparison

_ANCHOR_IMPL = {("bf16", "peft"): "bf16_peft", ("bnb", "peft"): "bnb_peft", ("ao", "manual"): "torchao", ("bf16", "manual"): "bf16_peft", ("bnb", "manual"): "bnb_peft"}
_ANCHOR_E2E = {"bf16+PEFT": "bf16_peft", "bnb+PEFT": "bnb_peft"}


def anchor_comparison(doc, anchors) -> tuple[list[dict], list[dict]]:
    by = _by_key(doc.get("layers", []))
    layer_out = []
    floors_seen = set()
    for a in anchors["layers"]:
        impl = _ANCHOR_IMPL.get((a.get("impl"), a.get("how")))
        if impl is None:
            continue
        k, n, m, mode = a["K"], a["N"], a["M"], a["mode"]
        ours_row = _lookup(by, k, n, TARGET_R, TARGET_P, m, mode, impl)
        how = "PEFT" if a.get("how") == "peft" else "manual LoRA (no PEFT)"
        if a.get("impl") == "ao":
            how = "manual LoRA"
        layer_out.append(
            {"impl": impl, "shape": f"{k}x{n}", "m": m, "mode": mode, "ms": ours_row["ms"] if _ok(ours_row) else None,
             "anchor_ms": a["ms"], "peak": ours_row.get("peak_extra_MiB") if _ok(ours_row) else None,
             "anchor_peak": a.get("peak_mib"), "source": f"{a['_file']} ({how})"}
        )
        fkey = (k, n, m, mode, a["_file"])
        if a.get("floor_cublas_ms") is not None and fkey not in floors_seen:
            floors_seen.add(fkey)
            cub = _lookup(by, k, n, TARGET_R, TARGET_P, m, mode, "cublas")
            layer_out.append(
                {"impl": "cublas", "shape": f"{k}x{n}", "m": m, "mode": mode, "ms": cub["ms"] if _ok(cub) else None,
                 "anchor_ms": a["floor_cublas_ms"], "peak": None, "anchor_peak": None, "source": f"{a['_file']} (floor_cublas_ms)"}
            )
    layer_out = [r for r in layer_out if r["ms"] is not None]
    e2e_out = []
    what = anchors.get("meta", {}).get("e2e", {}).get("what", "")
    want = {}
    for key, pat in (("layers", r"(\d+) decoder layers"), ("vocab", r"vocab (\d+)"), ("seq", r"seq (\d+)")):
        mt = re.search(pat, what)
        if mt:
            want[key] = int(mt.group(1))
    for a in anchors["e2e"]:
        impl = _ANCHOR_E2E.get(a.get("kind"))
        mine = [r for r in doc.get("e2e", []) if r["impl"] == impl and r["batch"] == a["batch"] and _ok_e2e(r)
                and all(r.get(k) == v for k, v in want.items())]  # the same model only (not --bench-quick's)
        if impl and mine:
            r = mine[0]
            e2e_out.append(
                {"impl": impl, "batch": a["batch"], "tokens_per_s": r["tokens_per_s"], "anchor_tokens_per_s": a["tokens_per_s"],
                 "peak": r.get("peak_extra_MiB"), "anchor_peak": a.get("peak_extra_MiB"), "weights": r.get("weights_MiB"),
                 "anchor_weights": a.get("weights_MiB"), "layers": r["layers"], "vocab": r["vocab"], "source": a["_file"]}
            )
    return layer_out, e2e_out


def _ok_e2e(row) -> bool:
    return row is not None and row.get("status") == "ok" and row.get("tokens_per_s")


# ----------------------------------------------------------------------------------------------------------
# Markdown


def _rel(path: Path, start: Path) -> str:
    try:
        return os.path.relpath(path, start)
    except ValueError:
        return str(path)


def render_markdown(doc, json_path=None, png_path=None, md_path=None, anchors_dir=None) -> str:
    md_dir = Path(md_path).parent if md_path else BENCH_DIR
    L: list[str] = []
    gpu = doc.get("gpu", {})
    ver = doc.get("versions", {})
    sweep = doc.get("sweep", {})
    timing = doc.get("timing", {})
    impls = doc.get("impls", {})
    flops_ps, bytes_ps, ceil_src = _ceilings(doc)

    L.append("# qlora_ext benchmark results")
    L.append("")
    src = f"`{_rel(Path(json_path), md_dir)}`" if json_path else "the run's JSON"
    L.append(f"Generated by `bench/report.py` from {src}; not edited by hand. Regenerate: "
             f"`python -m bench.report {_rel(Path(json_path), Path.cwd()) if json_path else '<json>'}`.")
    L.append("")
    L.append(f"- **GPU**: {gpu.get('name', '?')} (sm {gpu.get('capability', '?')}, {gpu.get('sm_count', '?')} SMs, "
             f"{gpu.get('memory_MiB', '?')} MiB" + (f", driver {gpu['driver']}" if gpu.get("driver") else "") + ")")
    git = doc.get("git") or {}
    L.append(f"- **Date**: {doc.get('timestamp', doc.get('date', '?'))}" + (f"; commit `{git['commit'][:12]}`" + (" (dirty)" if git.get("dirty") else "") if git.get("commit") else ""))
    L.append("- **Versions**: " + ", ".join(f"{k} {v}" for k, v in ver.items() if v) +
             (f"; qlora_ext compiled extension: {'yes' if impls.get('ours', {}).get('compiled_extension') else 'no'}" if "ours" in impls and impls["ours"].get("available") else ""))
    n_layers = len(doc.get("layers", []))
    L.append(f"- **Sweep**: {sweep.get('name', '?')}{' (partial selection)' if sweep.get('partial') else ''}"
             f"{'' if sweep.get('complete', True) else ' — INCOMPLETE (session interrupted or failed early)'}: "
             f"{sweep.get('cases', '?')} layer cases × {len(sweep.get('impls', []))} implementations = {n_layers} cells; "
             f"e2e {len(doc.get('e2e', []))} cells; PEFT adapters {sweep.get('peft_adapter_dtype', '?')}")
    if sweep.get("selection"):
        L.append(f"- **Options**: `{json.dumps(sweep['selection'])}`")
    L.append(f"- **Layer timing**: {timing.get('layers', '?')}; warm-up {timing.get('warmup_ms')} ms, "
             f"rep {timing.get('rep_ms')} ms, ≥ {timing.get('min_samples')} samples.")
    L.append(f"- **E2E timing**: {timing.get('e2e', '?')}.")
    L.append(f"- **TFLOP/s** count {timing.get('tflops_counts', 'frozen GEMM FLOPs')}. **Peak extra**: {timing.get('peak_extra', '?')}.")
    c = doc.get("ceilings") or {}
    if c.get("bf16_gemm_8192_tflops"):
        L.append(f"- **Ceilings measured this session**: bf16 GEMM 8192³ {c['bf16_gemm_8192_tflops']:.0f} TFLOP/s, "
                 f"device copy {c['copy_tb_per_s']:.2f} TB/s (read + write) — anchors: 779 TFLOP/s, 4.27 TB/s. "
                 "Roofline columns use these.")
    else:
        L.append(f"- **Ceilings**: not measured ({c.get('error', 'disabled')}); roofline uses {ceil_src}.")
    d = doc.get("durations_s") or {}
    if d:
        L.append(f"- **Run time**: session {d.get('session')} s (layers {d.get('layers')} s, e2e {d.get('e2e')} s; "
                 f"estimate was {d.get('estimate')} s)")
    L.append("")
    L.append("| implementation | status | notes |")
    L.append("|---|---|---|")
    for name in _sweep.IMPLS:
        info = impls.get(name)
        if info is None:
            continue
        status = "available" if info.get("available") else f"not run: {info.get('reason')}"
        notes = "; ".join(info.get("warnings", [])[:3])
        L.append(f"| {_sweep.IMPL_LABELS[name]} | {status} | {notes} |")
    L.append("")

    # targets
    L.append("## Issue 5 targets (r=16, lora_dropout 0)")
    L.append("")
    fwd_how = ("with autograd recording (--bench-fwd-grad: not a decode measurement)" if sweep.get("fwd_autograd")
               else "under `torch.no_grad()`")
    L.append(f"Mode fwd (decode at m ∈ {{1, 16}}) is timed {fwd_how}; \"two-GEMM floor\" is the cuBLAS "
             "column of the fwd+bwd table (x·wᵀ and dy·w). The byte floor uses 4.27 TB/s as issue 5 does.")
    L.append("")
    L.append("| target | layer | m | measured | threshold | result | detail |")
    L.append("|---|---|---|---|---|---|---|")
    for t in evaluate_targets(doc):
        meas = "—" if t["measured"] is None else (f"{t['measured']:.4f}" if "ms" in t["target"] else f"{t['measured']:.3f}")
        thr = f"{t['threshold']:.4f}" if "ms" in t["target"] else f"{t['threshold']:.2f}"
        mark = {"met": "✅ met", "missed": "❌ missed", "no data": "— no data"}[t["verdict"]]
        L.append(f"| {t['target']} | {t['shape']} | {t['m']} | {meas} | {thr} | {mark} | {t['detail']} |")
    L.append("")

    # anchors
    anchors = load_anchors(find_anchors(anchors_dir))
    L.append("## This harness vs the anchors (same GPU model)")
    L.append("")
    if anchors["source"] is None:
        L.append(f"Anchors not found (looked in ../shared/anchors and ${ENV_ANCHORS}); regenerate this file where they are.")
    else:
        lay, e2e = anchor_comparison(doc, anchors)
        L.append(f"Anchors from `{anchors['source']}`. Ratio = this run ÷ anchor (1.00 = same; issue 4 asks ~±10% for the "
                 "PEFT rows). \"manual LoRA\" anchor rows did not go through PEFT, so at small m, where PEFT's Python "
                 "dominates, they are expected to be faster than this harness's PEFT rows.")
        L.append("")
        if lay:
            def rank(r):  # the comparison issue 4 asks for first: the PEFT paths users take
                src = r["source"]
                return 0 if "(PEFT)" in src else 1 if r["impl"] == "torchao" else 2 if r["impl"] == "cublas" else 3

            for label, sel in (("PEFT rows (bnb+PEFT, bf16+PEFT)", lambda r: rank(r) == 0),
                               ("cuBLAS floor rows", lambda r: rank(r) == 2)):
                ratios = sorted(r["ms"] / r["anchor_ms"] for r in lay if sel(r))
                if ratios:
                    within = sum(abs(x - 1) <= 0.10 for x in ratios)
                    L.append(f"- {label}: ratio {ratios[0]:.2f}–{ratios[-1]:.2f}, median {ratios[len(ratios) // 2]:.2f}; "
                             f"{within} of {len(ratios)} within ±10%.")
            L.append("")
            L.append("| implementation | layer | m | mode | this run ms | anchor ms | ratio | peak MiB (run / anchor) | anchor source |")
            L.append("|---|---|---|---|---|---|---|---|---|")
            for r in sorted(lay, key=lambda r: (rank(r), r["impl"], r["shape"], r["m"], r["mode"])):
                pk = "" if r["peak"] is None or r["anchor_peak"] is None else f"{r['peak']:.1f} / {r['anchor_peak']:.1f}"
                L.append(f"| {_sweep.IMPL_LABELS[r['impl']]} | {r['shape']} | {r['m']} | {r['mode']} | {_fmt_ms(r['ms'])} | "
                         f"{_fmt_ms(r['anchor_ms'])} | {r['ms'] / r['anchor_ms']:.2f} | {pk} | {r['source']} |")
        else:
            L.append("No layer cell of this run matches an anchor case (r=16, dropout 0, same shape, m and mode).")
        L.append("")
        if e2e:
            L.append("| e2e | batch | tokens/s (run) | tokens/s (anchor) | ratio | peak extra MiB (run / anchor) | weights MiB (run / anchor) | model |")
            L.append("|---|---|---|---|---|---|---|---|")
            for r in e2e:
                L.append(f"| {_sweep.E2E_LABELS[r['impl']]} | {r['batch']} | {r['tokens_per_s']:.0f} | {r['anchor_tokens_per_s']:.0f} | "
                         f"{r['tokens_per_s'] / r['anchor_tokens_per_s']:.2f} | {_fmt_num(r['peak'])} / {r['anchor_peak']} | "
                         f"{_fmt_num(r['weights'])} / {r['anchor_weights']} | {r['layers']} layers, vocab {r['vocab']} |")
            L.append("")

    # e2e
    e2e_rows = doc.get("e2e", [])
    if e2e_rows:
        L.append("## End-to-end training step")
        L.append("")
        r0 = e2e_rows[0]
        L.append(f"Llama architecture from `LlamaConfig`, random init: {r0['layers']} decoder layers, hidden {r0['hidden']}, "
                 f"intermediate {r0['intermediate']}, {r0['heads']} heads / {r0['kv_heads']} kv heads, vocab {r0['vocab']}, "
                 f"seq {r0['seq']}, bf16, sdpa; all-linear LoRA r={r0['r']} alpha={r0['lora_alpha']}; step = fwd + loss + "
                 f"bwd + AdamW; median of {r0['timed_steps']} steps after {r0['warmup_steps']} warm-up steps.")
        L.append("")
        L.append("| implementation | batch | step ms | tokens/s | qlora_ext speedup | weights MiB | peak extra MiB | trainable params | notes |")
        L.append("|---|---|---|---|---|---|---|---|---|")
        by_b = defaultdict(dict)
        for r in e2e_rows:
            by_b[r["batch"]][r["impl"]] = r
        for b in sorted(by_b):
            ours = by_b[b].get("ours")
            for impl in _sweep.E2E_IMPLS:
                r = by_b[b].get(impl)
                if r is None:
                    continue
                if not _ok_e2e(r):
                    L.append(f"| {_sweep.E2E_LABELS[impl]} | {b} | {r.get('status')} | | | | | | {(r.get('reason') or '')[:120]} |")
                    continue
                sp = f"{r['step_ms'] / ours['step_ms']:.2f}×" if _ok_e2e(ours) and impl != "ours" else ""
                L.append(f"| {_sweep.E2E_LABELS[impl]} | {b} | {r['step_ms']:.1f} | {r['tokens_per_s']:.0f} | {sp} | "
                         f"{_fmt_num(r.get('weights_MiB'))} | {_fmt_num(r.get('peak_extra_MiB'))} | {r.get('trainable_params', 0):,} "
                         f"({r.get('trainable_dtype', '?')}) | {'; '.join(r.get('notes', [])[:2])} |")
        L.append("")

    # layers
    if png_path:
        L.append(f"![speedup of qlora_ext vs m]({_rel(Path(png_path), md_dir)})")
        L.append("")
    L += _layer_tables(doc, flops_ps, bytes_ps)

    # errors
    errs = [r for r in doc.get("layers", []) + e2e_rows if r.get("status") == "error"]
    if errs:
        L.append("## Errors")
        L.append("")
        L.append("¹ Cells that raised (recorded; the run went on):")
        L.append("")
        L.append("| cell | error |")
        L.append("|---|---|")
        for r in errs:
            L.append(f"| `{r['cell']}` | {(r.get('reason') or '').replace('|', '/').replace(chr(10), ' ')[:300]} |")
        L.append("")
    return "\n".join(L) + "\n"


def _layer_tables(doc, flops_ps, bytes_ps) -> list[str]:
    rows = doc.get("layers", [])
    if not rows:
        return []
    L = ["## Layers", ""]
    L.append("ms = median CUDA-event time of one call. Baseline cells: `ms (n×)` where n× = that baseline's time ÷ "
             "qlora_ext's (the speedup of qlora_ext); when qlora_ext has no number, `ms [n f]` = ÷ the cuBLAS floor. "
             "`÷ floor` = qlora_ext ÷ cuBLAS bf16 GEMM(s) alone. Roofline = Σ per phase max(FLOPs ÷ peak, fewest bytes "
             "÷ bandwidth) for a fused NF4 kernel (bench/NOTES.md).")
    L.append("")
    groups: dict = defaultdict(list)
    for r in rows:
        groups[(r["k"], r["n"], r["r"], r["dropout"])].append(r)
    shape_rank = {(s.k, s.n): i for i, s in enumerate(_sweep.SHAPES)}
    for (k, n, rr, p) in sorted(groups, key=lambda g: (shape_rank.get((g[0], g[1]), 99), g[0], g[1], g[2], g[3])):
        grp = groups[(k, n, rr, p)]
        g0 = grp[0]
        L.append(f"### {g0['model']} {g0['layer']} {k}→{n} — r={rr}, lora_dropout {_sweep.fmt_p(p)}")
        L.append("")
        by = _by_key(grp)
        impls_present = [i for i in _sweep.IMPLS if any(r["impl"] == i for r in grp)]
        baselines = [i for i in _sweep.BASELINES if i in impls_present]
        for mode in _sweep.MODES:
            ms_here = sorted({r["m"] for r in grp if r["mode"] == mode})
            if not ms_here:
                continue
            L.append(f"**{mode}**")
            L.append("")
            head = ["m", "cuBLAS ms (floor)", "qlora_ext ms", "TFLOP/s", "÷ floor", "roofline ms"] + [_sweep.IMPL_LABELS[b] for b in baselines]
            L.append("| " + " | ".join(head) + " |")
            L.append("|" + "---|" * len(head))
            for m in ms_here:
                cell = by.get((k, n, rr, p, m, mode), {})
                cub, ours = cell.get("cublas"), cell.get("ours")
                floor = cub["ms"] if _ok(cub) else None
                ours_ms = ours["ms"] if _ok(ours) else None
                roof = _sweep.roofline_ms(k, n, m, rr, mode, flops_ps, bytes_ps)["ms"]
                vals = [
                    str(m),
                    _cell_text(cub),
                    _cell_text(ours),
                    f"{ours['tflops']:.0f}" if ours_ms else "—",
                    _fmt_x(ours_ms / floor) if ours_ms and floor else "—",
                    _fmt_ms(roof),
                ] + [_cell_text(cell.get(b), ours_ms, floor) for b in baselines]
                L.append("| " + " | ".join(vals) + " |")
            L.append("")
        # memory (fwd+bwd)
        ms_fb = sorted({r["m"] for r in grp if r["mode"] == "fwd+bwd"})
        if ms_fb:
            L.append("**peak extra MiB, fwd+bwd** (outputs and gradients included)")
            L.append("")
            head = ["m"] + [_sweep.IMPL_LABELS[i] for i in impls_present]
            L.append("| " + " | ".join(head) + " |")
            L.append("|" + "---|" * len(head))
            for m in ms_fb:
                cell = by.get((k, n, rr, p, m, "fwd+bwd"), {})
                vals = [str(m)]
                for i in impls_present:
                    r = cell.get(i)
                    vals.append(f"{r['peak_extra_MiB']:.1f}" if _ok(r) and r.get("peak_extra_MiB") is not None else _cell_text(r))
                L.append("| " + " | ".join(vals) + " |")
            L.append("")
    return L


# ----------------------------------------------------------------------------------------------------------
# Plot


def write_plot(doc, png_path) -> str | None:
    """Speedup of qlora_ext over each baseline vs m, one panel per layer shape (r=16, no dropout preferred);
    solid = fwd+bwd, dashed = fwd. Without qlora_ext numbers: each implementation's fraction of the cuBLAS floor."""
    rows = [r for r in doc.get("layers", []) if _ok(r)]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({(r["k"], r["n"]) for r in rows}, key=lambda s: next((i for i, x in enumerate(_sweep.SHAPES) if (x.k, x.n) == s), 99))
    have_ours = any(r["impl"] == "ours" for r in rows)
    ncol = min(4, len(shapes))
    nrow = (len(shapes) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.4 * nrow), squeeze=False)
    colors = {"cublas": "black", "reference": "tab:gray", "bnb_peft": "tab:red", "bf16_peft": "tab:blue", "torchao": "tab:green", "ours": "tab:purple"}
    from matplotlib.lines import Line2D
    from matplotlib.ticker import (
        FixedLocator,
        FuncFormatter,
        NullFormatter,
        NullLocator,
    )

    lines = _sweep.BASELINES + ("cublas",) if have_ours else ("ours",) + _sweep.BASELINES
    used = set()
    for ax, (k, n) in zip(axes.flat, shapes):
        here = [r for r in rows if (r["k"], r["n"]) == (k, n)]
        rp = (TARGET_R, TARGET_P) if any((r["r"], r["dropout"]) == (TARGET_R, TARGET_P) for r in here) else (here[0]["r"], here[0]["dropout"])
        here = [r for r in here if (r["r"], r["dropout"]) == rp]
        by = _by_key(here)
        ms_all = sorted({r["m"] for r in here})
        for impl in lines:
            for mode, style in (("fwd+bwd", "-"), ("fwd", "--")):
                xs, ys = [], []
                for m in ms_all:
                    cell = by.get((k, n, rp[0], rp[1], m, mode), {})
                    a, ref = cell.get(impl), cell.get("ours" if have_ours else "cublas")
                    if _ok(a) and _ok(ref):
                        xs.append(m)
                        ys.append(a["ms"] / ref["ms"] if have_ours else ref["ms"] / a["ms"])
                if xs:
                    ax.plot(xs, ys, style, marker="o", ms=3, color=colors[impl])
                    used.add(impl)
        ax.axhline(1.0, color="k", lw=0.6)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(FixedLocator(ms_all))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{int(v)}"))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        lo, hi = ax.get_ylim()  # label minor ticks only when the panel spans less than a decade
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}") if hi / lo < 10 else NullFormatter())
        ax.set_title(f"{k}→{n} (r={rp[0]}, p={_sweep.fmt_p(rp[1])})", fontsize=9)
        ax.set_xlabel("m (tokens)", fontsize=8)
        ax.set_ylabel("baseline ms ÷ qlora_ext ms" if have_ours else "cuBLAS ms ÷ impl ms", fontsize=8)
        ax.tick_params(which="both", labelsize=7)
        ax.grid(alpha=0.3, which="both")
    for ax in list(axes.flat)[len(shapes):]:
        ax.axis("off")
    handles = [Line2D([], [], color=colors[i], marker="o", ms=3, label=_sweep.IMPL_LABELS[i]) for i in lines if i in used]
    handles += [Line2D([], [], color="k", ls="-", label="fwd+bwd"), Line2D([], [], color="k", ls="--", label="fwd")]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, frameon=False)
    gpu = doc.get("gpu", {}).get("name", "")
    fig.suptitle(
        (f"qlora_ext speedup vs m — {gpu}, {doc.get('date', '')} (> 1: qlora_ext faster; cuBLAS line: distance to the floor)"
         if have_ours else f"fraction of the cuBLAS floor vs m — {gpu}, {doc.get('date', '')} (no qlora_ext numbers in this run)"),
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.06 / nrow, 1, 0.95))
    Path(png_path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return str(png_path)


# ----------------------------------------------------------------------------------------------------------
# Terminal


def terminal_table(layer_rows, e2e_rows) -> list[str]:
    out = []
    if layer_rows:
        by = index_layers(layer_rows)
        impls = [i for i in _sweep.IMPLS if any(r["impl"] == i for r in layer_rows)]
        w0 = max(len("case"), *(len(c) for c in by))
        out.append("median ms (CUDA events, L2 flushed); [n] = ÷ cuBLAS floor; n/a = not installed; ERR = error")
        out.append("case".ljust(w0) + "".join(f"{i:>18}" for i in impls))
        for case, cell in by.items():
            cub = cell.get("cublas")
            floor = cub["ms"] if _ok(cub) else None
            parts = []
            for i in impls:
                r = cell.get(i)
                if r is None:
                    parts.append("")
                elif _ok(r):
                    parts.append(f"{_fmt_ms(r['ms'])} [{r['ms'] / floor:.2f}]" if floor and i != "cublas" else _fmt_ms(r["ms"]))
                else:
                    parts.append({"unavailable": "n/a", "error": "ERR", "skipped": "skip"}.get(r["status"], "?"))
            out.append(case.ljust(w0) + "".join(f"{p:>18}" for p in parts))
    if e2e_rows:
        out.append("")
        out.append(f"{'e2e':<22}{'step ms':>10}{'tokens/s':>12}{'peak MiB':>10}  status")
        for r in e2e_rows:
            if _ok_e2e(r):
                out.append(f"{r['cell']:<22}{r['step_ms']:>10.1f}{r['tokens_per_s']:>12.0f}{_fmt_num(r.get('peak_extra_MiB')):>10}  ok")
            else:
                out.append(f"{r['cell']:<22}{'':>32}  {r['status']}: {(r.get('reason') or '')[:80]}")
    return out


# ----------------------------------------------------------------------------------------------------------
# Floors for bench/NOTES.md


def _g(v: float) -> str:
    """3 significant digits, no exponent: 0.0336, 4.29, 481, 1,924."""
    if v >= 1000:
        return f"{v:,.0f}"
    if v >= 100:
        return f"{v:.0f}"
    return f"{v:.3g}"


def floors_markdown(shapes=_sweep.SHAPES, ms=_sweep.M_ALL, r: int = 16) -> str:
    F, B = _sweep.H200_BF16_FLOPS, _sweep.H200_COPY_BYTES_PER_S
    L = [f"Ceilings: {F / 1e12:.0f} TFLOP/s bf16 dense, {B / 1e12:.2f} TB/s (measured H200 figures). r = {r}, bf16 "
         "activations, NF4 weight with double quant (blocksize 64)."]
    L.append("")
    L.append("| layer k→n | NF4 weight MB | NF4 byte floor µs | bf16 weight MB | bf16 byte floor µs |")
    L.append("|---|---|---|---|---|")
    for s in shapes:
        w = _sweep.nf4_weight_bytes(s.k, s.n)
        L.append(f"| {s.model} {s.layer} {s.k}→{s.n} | {w / 1e6:.2f} | {w / B * 1e6:.2f} | {2 * s.k * s.n / 1e6:.1f} | {2 * s.k * s.n / B * 1e6:.2f} |")
    L.append("")
    L.append("| layer k→n | m | mode | GEMM GFLOP | LoRA GFLOP | fewest bytes MB | compute µs | memory µs | floor µs (bound) | cuBLAS-GEMM floor µs |")
    L.append("|---|---|---|---|---|---|---|---|---|---|")
    for s in shapes:
        for m in ms:
            for mode in _sweep.MODES:
                fl = _sweep.layer_flops(s.k, s.n, m, r, mode)
                by = _sweep.layer_bytes(s.k, s.n, m, r, mode)
                rf = _sweep.roofline_ms(s.k, s.n, m, r, mode, F, B)
                bound = "/".join(sorted(set(rf["bound"].values())))
                L.append(
                    f"| {s.k}→{s.n} | {m} | {mode} | {_g(fl['frozen'] / 1e9)} | {_g(fl['lora'] / 1e9)} | {_g(by['total'] / 1e6)} | "
                    f"{_g(rf['compute_ms'] * 1e3)} | {_g(rf['memory_ms'] * 1e3)} | {_g(rf['ms'] * 1e3)} ({bound}) | "
                    f"{_g(_sweep.gemm_floor_ms(s.k, s.n, m, mode, F, B) * 1e3)} |"
                )
    return "\n".join(L) + "\n"


# ----------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("json", nargs="*", help="result JSON file(s) written by `pytest bench/`")
    ap.add_argument("--md", help="markdown output (default: bench/RESULTS.md)")
    ap.add_argument("--png", help="plot output (default: beside the first JSON, same stem)")
    ap.add_argument("--anchors", help=f"anchors directory (default: ${ENV_ANCHORS} or ../shared/anchors)")
    ap.add_argument("--floors", action="store_true", help="print the floor tables for bench/NOTES.md and exit")
    ap.add_argument("--table", action="store_true", help="also print the terminal table")
    a = ap.parse_args(argv)
    if a.floors:
        sys.stdout.write(floors_markdown())
        return 0
    if not a.json:
        ap.error("give at least one result JSON (or --floors)")
    doc = load(a.json)
    first = Path(a.json[0])
    png = Path(a.png) if a.png else first.with_suffix(".png")
    md = Path(a.md) if a.md else BENCH_DIR / "RESULTS.md"
    try:
        wrote_png = write_plot(doc, png)
    except ImportError as e:
        print(f"plot not written: {e}", file=sys.stderr)
        wrote_png = None
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(render_markdown(doc, json_path=first, png_path=wrote_png, md_path=md, anchors_dir=a.anchors))
    print(f"wrote {md}" + (f" and {wrote_png}" if wrote_png else ""))
    if a.table:
        print("\n".join(terminal_table(doc.get("layers", []), doc.get("e2e", []))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
