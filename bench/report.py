"""Render a bench run's JSON as markdown (the RESULTS.md format), one PNG plot and the terminal summary.

    python -m bench.report bench/results/<date>-<gpu>.json   # <date>-<gpu>.md and .png beside the JSON, and
                                                             # bench/RESULTS.md when the JSON is a full run
Options: --md PATH, --png PATH or none (no plot; a PNG already beside the JSON is linked), --results-md PATH or none.
Pure Python (matplotlib for the plot); every figure comes from the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

if __package__ in (None, ""):  # python bench/report.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench import _sweep
else:
    from . import _sweep

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RATIOS = [("qlora_ext ÷ bnb+PEFT", "bnb_peft"), ("qlora_ext ÷ cuBLAS", "cublas")]


def load(path) -> dict:
    doc = json.loads(Path(path).read_text())
    return _from_schema_1(doc) if doc.get("schema") == "qlora_ext-bench/1" else doc


def _from_schema_1(d: dict) -> dict:
    """A run recorded by the earlier harness (one timing per cell, no spread or host-bound figures), today's layout."""
    name = {"ours": "qlora_ext"}
    cells = [{"shape": f"{r['k']}x{r['n']}", **{k: r.get(k) for k in ("k", "n", "m", "r", "mode", "reason", "samples")},
              "implementation": name.get(r["impl"], r["impl"]), "median_ms": r.get("ms"),
              "status": r["status"] if r["status"] in ("ok", "error") else "skipped",
              "peak_extra_mib": r.get("peak_extra_MiB")} for r in d["layers"] if not r.get("dropout")]
    e2e = [{**r, "implementation": name.get(r["impl"], r["impl"]), "peak_extra_mib": r.get("peak_extra_MiB"),
            "weights_mib": r.get("weights_MiB")} for r in d.get("e2e", [])]
    c, s = d.get("ceilings") or {}, d.get("sweep", {})
    return {**d, "cells": cells, "e2e": e2e, "gpu": {**d["gpu"], "memory_gib": round(d["gpu"]["memory_MiB"] / 1024, 1)},
            "ceilings": {"bf16_gemm_tflops": c.get("bf16_gemm_8192_tflops"), "copy_tb_s": c.get("copy_tb_per_s")},
            "columns": {name.get(k, k): v.get("reason") for k, v in d.get("impls", {}).items()},
            "run": {"full": s.get("complete") and not s.get("partial"), "complete": s.get("complete"),
                    "command": f"pytest bench/ (the earlier harness, its {s.get('name')} sweep)",
                    "elapsed_s": d.get("durations_s", {}).get("session")},
            "timing": {"layers": "median of CUDA-event times of one do_bench run per cell, 256 MB L2 flush before "
                                 "each timed call (the earlier harness: no repeats, no host-bound test)",
                       "e2e": "median wall time of synchronized training steps after the warm-up steps"}}


def _rows(doc) -> dict:
    """(shape, m, r, mode) -> {implementation: cell}"""
    out: dict = defaultdict(dict)
    for c in doc.get("cells", []):
        out[(c["shape"], c["m"], c["r"], c["mode"])][c["implementation"]] = c
    return out


def _ok(c) -> bool:
    return bool(c) and c.get("status") == "ok" and c.get("median_ms") is not None


def _columns(doc) -> list[str]:
    order = [*((doc.get("run") or {}).get("columns") or []), *_sweep.columns(_sweep.PATHS_FALLBACK)]
    return sorted({c["implementation"] for c in doc.get("cells", [])},
                  key=lambda c: order.index(c) if c in order else len(order))


def _cell(c) -> str:
    if not _ok(c):
        return "error" if c and c["status"] == "error" else "—"
    v = c["median_ms"]
    return (f"{v:.1f}" if v >= 100 else f"{v:.3f}" if v >= 1 else f"{v:.4f}") + (
        "†" if c.get("host_bound") else "") + ("‡" if (c.get("spread") or 0) > 0.1 else "")


def gpu_pair(a, b) -> tuple[float, float]:
    """GPU times of two cells of one row: the graph replays' when both have one (cells at m <= 128, calls of at
    most 1 ms and host-bound cells, whose event timing follows the host's launch pace and its jitter, not the GPU),
    else the event medians."""
    field = "graph_ms" if a.get("graph_ms") is not None and b.get("graph_ms") is not None else "median_ms"
    return a[field], b[field]


def gpu_ratio(a, b) -> float:
    """a ÷ b on GPU time (gpu_pair)."""
    x, y = gpu_pair(a, b)
    return x / y


def versus(ours, other) -> float:
    """qlora_ext ÷ other as the summary judges it: GPU time (gpu_pair); in a row where either is host-bound, the
    ratio of max(host launch time, GPU time): a stream of such calls runs at the pace of the slower of the two."""
    g_o, g_b = gpu_pair(ours, other)
    hb = ours.get("host_bound") or other.get("host_bound")
    if hb and ours.get("host_ms") is not None and other.get("host_ms") is not None:
        return max(ours["host_ms"], g_o) / max(other["host_ms"], g_b)
    return g_o / g_b


def versus_bnb(doc) -> tuple[int, list]:
    """(rows where qlora_ext (auto) <= bnb+PEFT, [(row key, ratio, host-bound) where it is slower]), by versus()."""
    le, slower = 0, []
    for key, row in _rows(doc).items():
        ours, bnb = row.get("qlora_ext"), row.get("bnb_peft")
        if _ok(ours) and _ok(bnb):
            x = versus(ours, bnb)
            if x <= 1.0:
                le += 1
            else:
                slower.append((key, x, ours.get("host_bound") or bnb.get("host_bound")))
    return le, slower


LARGE_M, VS_CUBLAS = 2048, {"fwd": 1.05, "fwd+bwd": 1.10}  # the Hopper kernels' targets against cuBLAS bf16


def versus_cublas(doc) -> dict:
    """mode -> [(row key, qlora_ext ÷ cuBLAS)] over the rows at m >= LARGE_M, on GPU time: the graph replays' where
    both have one (host-bound cells), else the event medians."""
    out = defaultdict(list)
    for key, row in _rows(doc).items():
        ours, cublas = row.get("qlora_ext"), row.get("cublas")
        if key[1] >= LARGE_M and key[3] in VS_CUBLAS and _ok(ours) and _ok(cublas):
            out[key[3]].append((key, gpu_ratio(ours, cublas)))
    return out


def _summary(doc) -> list[str]:
    le, slower = versus_bnb(doc)
    out = [f"qlora_ext (auto dispatch) ≤ bnb+PEFT in **{le} of {le + len(slower)}** cells (GPU time: graph replays "
           f"where both have one; in host-bound rows the slower of it and the host's launch time)"
           + ("; slower (qlora_ext ÷ bnb+PEFT) in:" if slower else ".")]
    for shape in dict.fromkeys(k[0] for k, _, _ in slower):
        out.append(f"  - {shape}: " + ", ".join(f"{k[3]} m={k[1]} r={k[2]} {x:.2f}×{'†' if hb else ''}"
                                                for k, x, hb in slower if k[0] == shape))
    graphs = {k[:3]: g for k, g in _graph_rows(doc).items() if k[3] == "fwd" and k[1] <= _sweep.SMALL_M}
    if graphs:
        slower = [(k, g["qlora_ext"] / g["cublas"]) for k, g in graphs.items() if g["qlora_ext"] > g["cublas"]]
        out.append(f"Small-m forward, GPU time of CUDA-graph replays: qlora_ext ≤ cuBLAS bf16 in "
                   f"{len(graphs) - len(slower)} of {len(graphs)} cells" + (
                       "; slower in: " + ", ".join(f"{k[0]} m={k[1]} r={k[2]} {x:.2f}×" for k, x in slower)
                       if slower else "."))
    for mode, ratios in versus_cublas(doc).items():
        x = sorted(r for _, r in ratios)
        out.append(f"m ≥ {LARGE_M}, {mode}, qlora_ext ÷ cuBLAS bf16 (graph replays where both have one): "
                   f"≤ {VS_CUBLAS[mode]:.2f}× in "
                   f"{sum(r <= VS_CUBLAS[mode] for r in x)} of {len(x)} cells; median {x[len(x) // 2]:.2f}×, "
                   f"worst {x[-1]:.2f}×.")
    timed = [c for c in doc.get("cells", []) if _ok(c)]
    peaks = defaultdict(dict)
    for c in timed:
        if c["implementation"] in ("qlora_ext", "bnb_peft") and c.get("peak_extra_mib") is not None:
            peaks[(c["shape"], c["m"], c["r"], c["mode"])][c["implementation"]] = c["peak_extra_mib"]
    both = [p for p in peaks.values() if len(p) == 2]
    if both:
        ws = max((c.get("workspace_mib") or 0 for c in timed), default=0)
        out.append(f"Memory: qlora_ext's per-call peak ≤ bnb+PEFT's in {sum(p['qlora_ext'] <= p['bnb_peft'] for p in both)}"
                   f" of {len(both)} cells; its workspace (persistent, shared by all layers) reached {ws:,.1f} MiB.")
    per = defaultdict(int)
    for c in timed:
        per[_sweep.label(c["implementation"])] += bool(c.get("host_bound"))
    if any(c.get("host_bound") is None for c in timed):
        return out + ["Host-bound cells: not recorded by this run."]
    out.append(f"Host-bound cells (†): {sum(per.values())} of {len(timed)} timed ("
               + ", ".join(f"{k} {v}" for k, v in per.items() if v) + ").")
    return out + [f"Spread above 10 % (‡): {sum(c.get('spread', 0) > 0.1 for c in timed)} cells."]


def _graph_rows(doc) -> dict:
    """(shape, m, r, mode) -> {implementation: graph ms} for the rows where qlora_ext and cuBLAS have a replay time."""
    out = {}
    for key, row in _rows(doc).items():
        g = {impl: c["graph_ms"] for impl, c in row.items() if _ok(c) and c.get("graph_ms") is not None}
        if "qlora_ext" in g and "cublas" in g:
            out[key] = g
    return out


def _graph_section(doc) -> list[str]:
    graphs = _graph_rows(doc)
    if not graphs:
        return []
    cols = [c for c in _columns(doc) if any(c in g for g in graphs.values())]
    L = ["## Cells under CUDA graphs (small m, short and host-bound calls)", "",
         "ms per call captured in a CUDA graph and replayed (same protocol as the layers): the GPU time of a call "
         "without the host's launch cost, which dominates the event timing of these cells. "
         "— = not captured (reason in the JSON's graph_reason).", "",
         "| shape | m | r | mode | " + " | ".join(map(_sweep.label, cols)) + " | qlora_ext ÷ cuBLAS |",
         "|" + "---|" * (5 + len(cols))]
    for k in sorted(graphs, key=lambda k: (_sweep.shape_order(k[0]), k[3], k[2], k[1])):
        g = graphs[k]
        L.append(f"| {k[0].replace('x', '→')} | {k[1]} | {k[2]} | {k[3]} | "
                 + " | ".join(f"{g[c]:.4f}" if c in g else "—" for c in cols)
                 + f" | {g['qlora_ext'] / g['cublas']:.2f} |")
    return L + [""]


def _rel(path, start) -> str:
    p = Path(os.path.relpath(Path(path).resolve(), Path(start).resolve())).as_posix()
    return Path(path).name if p.startswith("..") else p


def _e2e(doc) -> list[str]:
    rows = doc.get("e2e", [])
    if not rows:
        return []
    r0 = rows[0]
    ours = {r["batch"]: r["tokens_per_s"] for r in rows if r["implementation"] == "qlora_ext" and r.get("tokens_per_s")}
    L = ["## End to end", "",
         f"One training step of a {r0.get('layers')}-layer Llama (hidden {r0.get('hidden', 4096)}, intermediate "
         f"{r0.get('intermediate', 14336)}, {r0.get('heads', 32)}/{r0.get('kv_heads', 8)} heads/kv heads, vocab "
         f"{r0.get('vocab')}), seq {r0.get('seq')}, LoRA r={r0.get('r', 16)} on all linear layers, AdamW; "
         f"{doc.get('timing', {}).get('e2e', '')}. Peak extra: peak memory during the steps above the built model.", "",
         "| implementation | batch | step ms | tokens/s | ÷ qlora_ext tokens/s | peak extra MiB | weights MiB |",
         "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["batch"], _sweep.E2E_COLUMNS.index(r["implementation"]))):
        if r.get("tokens_per_s"):
            rel = f"{r['tokens_per_s'] / ours[r['batch']]:.2f}" if r["batch"] in ours else "—"
            L.append(f"| {_sweep.label(r['implementation'])} | {r['batch']} | {r['step_ms']:.1f} | "
                     f"{r['tokens_per_s']:,.0f} | {rel} | {r['peak_extra_mib']:,.0f} | {r['weights_mib']:,.0f} |")
        else:
            L.append(f"| {_sweep.label(r['implementation'])} | {r['batch']} | {r['status']} | | | | |")
    return L + [""]


def _table(keys, rows, cols, fmt, ratios=()) -> list[str]:
    """Rows (m, r, mode), a column per implementation, then qlora_ext ÷ each of ``ratios``."""
    def ratio(row, b):
        ok = _ok(row.get("qlora_ext")) and _ok(row.get(b))
        return f"{gpu_ratio(row['qlora_ext'], row[b]):.2f}" if ok else "—"

    out = ["| m | r | mode | " + " | ".join([*map(_sweep.label, cols), *(h for h, _ in ratios)]) + " |",
           "|" + "---|" * (3 + len(cols) + len(ratios))]
    return out + [f"| {k[1]} | {k[2]} | {k[3]} | " + " | ".join(
        [*(fmt(rows[k].get(x)) for x in cols), *(ratio(rows[k], b) for _, b in ratios)]) + " |" for k in keys]


def render(doc, json_path, png_path=None, md_dir=BENCH_DIR) -> str:
    gpu, run, t, c = doc.get("gpu", {}), doc.get("run", {}), doc.get("timing", {}), doc.get("ceilings") or {}
    git, cells = doc.get("git") or {}, doc.get("cells", [])
    n = {s: sum(x["status"] == s for x in cells) for s in ("ok", "skipped", "error")}
    L = ["# qlora_ext benchmark results", "",
         f"Generated from `{_rel(json_path, md_dir)}` by `python -m bench.report {_rel(json_path, REPO)}`; do not "
         f"edit by hand. The run: `{run.get('command', '?')}`.", "",
         f"- **GPU**: {gpu.get('name')} (sm {gpu.get('capability')}, {gpu.get('sm_count')} SMs, "
         f"{gpu.get('memory_gib')} GiB)",
         f"- **Date**: {doc.get('timestamp')}" + (f", commit `{git['commit'][:12]}`" if git.get("commit") else "")
         + (" (uncommitted changes)" if git.get("dirty") else ""),
         "- **Versions**: " + ", ".join(f"{k} {v}" for k, v in doc.get("versions", {}).items() if v not in (None, "")),
         f"- **Ceilings measured in this run**: bf16 GEMM 8192³ {c['bf16_gemm_tflops']:.0f} TFLOP/s; device copy "
         f"{c['copy_tb_s']:.2f} TB/s (read + write)" if c.get("copy_tb_s") else f"- **Ceilings**: not measured {c}",
         f"- **Run**: {'the full default sweep' if run.get('full') else 'a partial run'}"
         f"{'' if run.get('complete') else ', INCOMPLETE: not every selected cell ran'}; {len(cells)} layer cells ({n['ok']} timed, "
         f"{n['skipped']} skipped, {n['error']} errors), {len(doc.get('e2e', []))} e2e cells, {run.get('elapsed_s')} s",
         f"- **Layer timing**: {t.get('layers')}." + (f" † host-bound: {t['host_bound']}." if "host_bound" in t else "")
         + (f" ‡: spread ({t['spread']}) above 10 %." if "spread" in t else ""),
         *(f"- Not available here: **{_sweep.label(k)}**: {v}" for k, v in (doc.get("columns") or {}).items() if v),
         "", "## Summary", "", *(x if x.startswith(" ") else f"- {x}" for x in _summary(doc)), "", *_e2e(doc),
         "## Layers", "",
         "ms per call; fwd under `torch.no_grad()`, fwd+bwd = forward with autograd + backward (dx, dA, dB). "
         "`qlora_ext` is the auto dispatch users get, `qlora_ext[p]` one CUDA path forced; — = not run in that cell "
         "(reasons at the end). Ratios are qlora_ext (auto) ÷ the other on GPU time: the CUDA-graph replays' (last "
         "section) where both have one, else the medians shown; below 1, qlora_ext is faster. The summary's "
         "comparison with bnb+PEFT takes in host-bound (†) rows the slower of the host's launch time and the GPU "
         "time, per side: the pace of a stream of such calls.", ""]
    if png_path:
        L += [f"![qlora_ext and bnb+PEFT ÷ cuBLAS vs m]({_rel(png_path, md_dir)})", ""]
    rows, cols = _rows(doc), _columns(doc)
    for shape in sorted({k[0] for k in rows}, key=_sweep.shape_order):
        keys = sorted((k for k in rows if k[0] == shape), key=lambda k: (k[2], _sweep.MODES.index(k[3]), k[1]))
        ws = [x["workspace_mib"] for k in keys for x in rows[k].values() if x.get("workspace_mib") is not None]
        L += [f"### {shape.replace('x', '→')}{' — ' + _sweep.SHAPES[shape] if shape in _sweep.SHAPES else ''}", "",
              *_table(keys, rows, cols, _cell, RATIOS), "",
              "Peak extra MiB per call" + (f" (the qlora_ext workspace, persistent and shared by all layers, is "
                                           f"not counted per call: {max(ws):.1f} MiB after these cells)" if ws else "")
              + ":",
              "",
              *_table(keys, rows, cols, lambda x: f"{x['peak_extra_mib']:.1f}" if _ok(x) else "—"), ""]
    L += _graph_section(doc)
    why = defaultdict(int)
    for x in cells + doc.get("e2e", []):
        if x["status"] != "ok":
            why[(_sweep.label(x["implementation"]), x["status"], " ".join(str(x.get("reason")).split())[:300])] += 1
    if why:
        L += ["## Cells not timed", "", "| column | status | reason | cells |", "|---|---|---|---|",
              *(f"| {k[0]} | {k[1]} | {k[2].replace('|', '/')} | {v} |" for k, v in why.items()), ""]
    return "\n".join(L) + "\n"


def plot(doc, png_path) -> bool:
    """qlora_ext ÷ cuBLAS and bnb+PEFT ÷ cuBLAS vs m, a panel per shape at its smallest r (solid fwd+bwd, dashed
    fwd)."""
    rows = _rows(doc)
    shapes = sorted({k[0] for k, row in rows.items() if _ok(row.get("cublas"))}, key=_sweep.shape_order)
    if not shapes:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ncol = min(4, len(shapes))
    nrow = -(-len(shapes) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4 * ncol, 3.2 * nrow), squeeze=False)
    for ax, shape in zip(axes.flat, shapes):
        r = min(k[2] for k in rows if k[0] == shape)
        for impl, color in (("qlora_ext", "tab:purple"), ("bnb_peft", "tab:red")):
            for mode, style in (("fwd+bwd", "-"), ("fwd", "--")):
                pts = sorted((k[1], row[impl]["median_ms"] / row["cublas"]["median_ms"]) for k, row in rows.items()
                             if k[0] == shape and k[2] == r and k[3] == mode and _ok(row.get(impl))
                             and _ok(row.get("cublas")))
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", ms=3, color=color, label=f"{_sweep.label(impl)} {mode}")
        ax.axhline(1.0, color="k", lw=0.6)
        ax.set(xscale="log", yscale="log", xlabel="m (tokens)", ylabel="ms ÷ cuBLAS bf16",
               xticks=sorted({k[1] for k in rows if k[0] == shape}))
        ax.set_title(f"{shape.replace('x', '→')} r={r}", fontsize=9)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}".lstrip("0.")[:1] in "25" else ""))
        ax.grid(alpha=0.3, which="both")
    for ax in list(axes.flat)[len(shapes):]:
        ax.axis("off")
    fig.legend(*axes.flat[0].get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(f"time ÷ cuBLAS bf16 GEMMs (lower is better), {doc.get('gpu', {}).get('name')}, {doc.get('date')}",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.07 / nrow, 1, 0.95))
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return True


def summary_lines(doc) -> list[str]:
    """The end of `pytest bench/`'s output."""
    cells = doc.get("cells", [])
    errors = [c for c in cells + doc.get("e2e", []) if c["status"] == "error"]
    out = [f"{sum(_ok(c) for c in cells)} layer cells timed, {sum(c['status'] == 'skipped' for c in cells)} skipped, "
           f"{len(errors)} errors; {doc.get('run', {}).get('elapsed_s')} s",
           *(x.replace("**", "") for x in _summary(doc))]
    out += [f"e2e {r['implementation']} batch {r['batch']}: " + (
        f"{r['tokens_per_s']:,.0f} tokens/s, peak extra {r['peak_extra_mib']:,.0f} MiB" if r.get("tokens_per_s")
        else r["status"]) for r in doc.get("e2e", [])]
    return out + [f"error: {c['implementation']} " + (f"{c['shape']} m={c['m']} r={c['r']} {c['mode']}" if "shape" in c
                                                      else f"e2e batch {c['batch']}") + f": {c['reason'][:150]}"
                  for c in errors[:5]]


def write(doc, json_path, md=None, png=None, results_md="auto") -> list[str]:
    """<stem>.md and <stem>.png beside the JSON (or at md / png; png "none": no plot), and bench/RESULTS.md for a
    full run (or at results_md; "none": not). Returns what it wrote."""
    json_path, out, link = Path(json_path), [], None
    if png != "none":
        png = Path(png or json_path.with_suffix(".png"))
        png.parent.mkdir(parents=True, exist_ok=True)
        try:
            if plot(doc, png):
                out.append(str(png))
                link = png
        except Exception as e:  # noqa: BLE001  (matplotlib missing: the markdown is still written)
            out.append(f"(plot not written: {type(e).__name__}: {e})")
    elif json_path.with_suffix(".png").exists():
        link = json_path.with_suffix(".png")
    targets = [Path(md or json_path.with_suffix(".md"))]
    if results_md not in ("auto", "none"):
        targets.append(Path(results_md))
    elif results_md == "auto" and (doc.get("run") or {}).get("full"):
        targets.append(BENCH_DIR / "RESULTS.md")
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(render(doc, json_path, link, target.parent))
        out.append(str(target))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.splitlines()[0])
    ap.add_argument("json", help="a result JSON written by `pytest bench/`")
    ap.add_argument("--md", help="markdown output (default: beside the JSON)")
    ap.add_argument("--png", help="plot output (default: beside the JSON; none: no plot)")
    ap.add_argument("--results-md", default="auto", help="also this RESULTS.md (default: bench/RESULTS.md for a full "
                                                         "run; none: not)")
    a = ap.parse_args(argv)
    for p in write(load(a.json), a.json, a.md, a.png, a.results_md):
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
