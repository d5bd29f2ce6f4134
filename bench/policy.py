"""The dispatch table qlora_ext.policy loads, generated from a measured sweep with the qlora_ext[<path>] columns:

    python -m bench.policy bench/results/<date>-<gpu>.json [more.json ...] [--out qlora_ext/policy_table.json]

Several JSONs (parts of one sweep run as separate commands, on the same GPU) are read as one sweep.

shape_class(n, k) = "small" if n*k <= 2**25, else "expand" if n >= k, else "reduce". For the measured m values m_1 <
... < m_j, bucket i covers m <= floor(sqrt(m_i * m_(i+1))), the last one any larger m (m_max null). Figures are GPU
times: CUDA-graph replays where the sweep has one for every path and bnb+PEFT (m <= 128, calls <= 1 ms, host-bound
cells), else the event medians. Per (shape_class, bucket) the forward path is the one slower than bnb+PEFT in the
fewest of the class's measured cells at m_i (shapes and ranks), and among those the one whose worst ratio to the
fastest path is smallest (fwd cells). The backward path is chosen the same way on the fwd+bwd cells of the paths
that have a backward (gemv has none): comparing whole fwd+bwd times, not a difference of two noisy figures. A
backward cell where every candidate is host-bound measures Python overhead, not the GPU work the path adds to a
training step (in a model, one layer's host work overlaps the GPU work of the layers before it), so a bucket whose
cells are all host- bound takes the backward choice of the nearest bucket (in log m) that has GPU-bound evidence,
and its "why" says so. A path with an error or no figure in a cell of the group is not a candidate. Then every
measured cell is checked: the chosen paths must not be slower than bnb+PEFT, and each cell where they are is
printed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CLASSES = ("small", "expand", "reduce")
NO_BACKWARD = ("gemv", "sm90")  # qlora_ext.policy.FORWARD_ONLY
CC_SPECIFIC = ("sm90",)  # paths of one compute capability: the "*" rows (unmeasured GPUs) choose without them


def shape_class(n: int, k: int) -> str:
    return "small" if n * k <= 2**25 else ("expand" if n >= k else "reduce")


def buckets(ms) -> list[tuple[int, int | None]]:
    """[(measured m, m_max)]: geometric midpoints between neighbours, the last bucket open-ended."""
    ms = sorted(set(ms))
    return [(m, math.isqrt(m * ms[i + 1]) if i + 1 < len(ms) else None) for i, m in enumerate(ms)]


def _phase(fig: dict, phase: str) -> float | None:
    """The figure a phase is judged by: fwd: the fwd time; bwd: the whole fwd+bwd time."""
    return fig.get("fwd" if phase == "fwd" else "fwd+bwd")


def _collect(doc):
    """({(shape, k, n, m, r): {implementation: {mode: ms}}}, {(key, implementation) that errored}, paths).

    The figures are GPU times as bench.report judges them: in a (cell, mode) where every qlora_ext[<path>] and
    bnb+PEFT have a CUDA-graph replay time (cells at m <= 128, calls of at most 1 ms and host-bound cells,
    whose event timing follows the host's launch pace), the replay times; else the event medians."""
    figs: dict = defaultdict(lambda: defaultdict(dict))
    graphs: dict = defaultdict(dict)
    errors, paths = set(), []
    for c in doc["cells"]:
        key, impl = (c["shape"], c["k"], c["n"], c["m"], c["r"]), c["implementation"]
        if impl.startswith("qlora_ext[") and impl[10:-1] not in paths:
            paths.append(impl[10:-1])
        if c["status"] == "ok" and c.get("median_ms") is not None:
            figs[key][impl][c["mode"]] = c["median_ms"]
            if c.get("host_bound"):
                HOST_BOUND.add((key, impl, c["mode"]))
            if c.get("graph_ms") is not None:
                graphs[(key, c["mode"])][impl] = c["graph_ms"]
        elif c["status"] == "error":
            errors.add((key, impl))
    for (key, mode), g in graphs.items():
        judged = [i for i in figs[key] if mode in figs[key][i] and (i.startswith("qlora_ext[") or i == "bnb_peft")]
        if judged and all(i in g for i in judged):
            for i in judged:
                figs[key][i][mode] = g[i]
                HOST_BOUND.discard((key, i, mode))  # the replay measured the GPU work
    return figs, errors, paths


HOST_BOUND: set = set()  # (key, implementation, mode) of the cells the sweep flagged host-bound


def _choose(figs, errors, keys, paths, phase):
    """(chosen path, why) for one group of cells."""
    cand = [p for p in paths if not (phase == "bwd" and p in NO_BACKWARD)
            and all((k, f"qlora_ext[{p}]") not in errors
                    and _phase(figs[k].get(f"qlora_ext[{p}]", {}), phase) is not None for k in keys)]
    if not cand:  # qlora_ext.policy takes path names only: the portable kernels, and the why says so
        return "fused", f"{phase} fused: no path measured in every cell (not measured: the portable kernels)"
    if phase == "bwd":  # judge on the cells where some candidate's GPU work shows (see the module docstring)
        mode = "fwd+bwd"
        keys = [k for k in keys if not all((k, f"qlora_ext[{p}]", mode) in HOST_BOUND for p in cand)]
        if not keys:
            return None, "host-bound"
    t = {k: {p: _phase(figs[k][f"qlora_ext[{p}]"], phase) for p in cand} for k in keys}
    worst = {p: max(t[k][p] / min(t[k].values()) for k in keys) for p in cand}
    bnb_t = {k: _phase(figs[k].get("bnb_peft", {}), phase) for k in keys}
    loses = {p: sum(bnb_t[k] is not None and t[k][p] > bnb_t[k] for k in keys) for p in cand}
    ranked = sorted(cand, key=lambda p: (loses[p], worst[p], sum(t[k][p] for k in keys), paths.index(p)))
    best = ranked[0]
    k = max(keys, key=lambda k: (k[1] * k[2], -k[4]))  # the example: the largest shape, the smallest r
    nxt = ranked[1] if len(ranked) > 1 else None
    bnb = _phase(figs[k].get("bnb_peft", {}), phase)
    return best, (f"{phase} {best} {t[k][best]:.3f}" + (f" vs {nxt} {t[k][nxt]:.3f}" if nxt else "") + " ms"
                  + (f", bnb+PEFT {bnb:.3f}" if bnb is not None else "") + f" ({k[0]} r{k[4]}; worst "
                  + f"{worst[best]:.2f}x best" + (f" vs {worst[nxt]:.2f}x" if nxt else "")
                  + f" over {len(keys)} cells)")


def _check(figs, choice) -> list[str]:
    """Every measured cell where the chosen paths are slower than bnb+PEFT."""
    bad = []
    for key in sorted(figs, key=lambda k: (k[1] * k[2], k[0], k[4], k[3])):
        fwd_p, bwd_p = choice.get((shape_class(key[2], key[1]), key[3]), (None, None))
        bnb, f = figs[key].get("bnb_peft", {}), figs[key].get(f"qlora_ext[{fwd_p}]", {})
        b = figs[key].get(f"qlora_ext[{bwd_p}]", {})
        ours = {"fwd": f.get("fwd")}
        if fwd_p == bwd_p and "fwd+bwd" in f:
            ours["fwd+bwd"] = f["fwd+bwd"]
        elif "fwd" in f and "fwd" in b and "fwd+bwd" in b:  # mixed pair: estimate, fwd of one + bwd of the other
            ours["fwd+bwd"] = f["fwd"] + max(b["fwd+bwd"] - b["fwd"], 0.0)
        for mode, t in ours.items():
            if t is not None and mode in bnb and t > bnb[mode]:
                paths = fwd_p if mode == "fwd" else f"{fwd_p}/{bwd_p}"
                bad.append(f"{key[0]} m={key[3]} r={key[4]} {mode}: {t:.4f} ms ({paths}) vs bnb+PEFT "
                           f"{bnb[mode]:.4f} ms ({t / bnb[mode]:.2f}x)")
    return bad


def _rules(figs, errors, measured, paths, cc) -> tuple[list[dict], dict, list[str]]:
    """(rules for compute capability cc, {(class, m): (fwd, bwd)}, warnings), choosing among ``paths``."""
    rules, choice, warn = [], {}, []
    for cls in CLASSES:
        group = []
        for m, m_max in buckets(k[3] for k in measured):
            keys = [k for k in measured if k[3] == m and shape_class(k[2], k[1]) == cls]
            if keys:
                group.append((m, m_max, _choose(figs, errors, keys, paths, "fwd"),
                              _choose(figs, errors, keys, paths, "bwd")))
        decided = [(m, bwd) for m, _, _, bwd in group if bwd[0] is not None]
        for m, m_max, (fwd, why_f), (bwd, why_b) in group:
            if bwd is None:  # all host-bound: the nearest bucket (log m) with GPU-bound evidence, larger m on ties
                if not decided:
                    bwd, why_b = "fused", "bwd fused: every backward cell of this class is host-bound"
                else:
                    m2, (bwd, _) = min(decided, key=lambda d: (abs(math.log(d[0] / m)), -d[0]))
                    why_b = f"bwd {bwd}: every cell at m={m} is host-bound; taken from m={m2}"
            warn += [f"{cls} m={m}: {w}" for w in (why_f, why_b) if "not measured" in w]
            rules.append({"cc": cc, "dtype": "*", "shape_class": cls, "m_max": m_max, "fwd": fwd, "bwd": bwd,
                          "why": f"{why_f}; {why_b}"})
            choice[(cls, m)] = (fwd, bwd)
    return rules, choice, warn


def generate(doc) -> tuple[list[dict], list[str], list[str]]:
    """(rules, violations, warnings): the measured GPU's rules, then the "*" rules for GPUs never measured (the
    same choice among the paths every GPU has)."""
    figs, errors, paths = _collect(doc)
    measured = [k for k in figs if any(i.startswith("qlora_ext[") for i in figs[k])]
    cc = str(doc.get("gpu", {}).get("capability", "?"))
    rules, choice, warn = _rules(figs, errors, measured, paths, cc)
    portable = [p for p in paths if p not in CC_SPECIFIC]
    if portable == paths:
        rules += [{**r, "cc": "*"} for r in rules]
    else:
        rules += _rules(figs, errors, measured, portable, "*")[0]
    return rules, _check(figs, choice), warn


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(prog="python -m bench.policy", description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="+", help="sweep JSON(s) written by `pytest bench/` with the qlora_ext[<path>] "
                    "columns")
    ap.add_argument("--out", default=str(REPO / "qlora_ext" / "policy_table.json"),
                    help="default: qlora_ext/policy_table.json")
    a = ap.parse_args(argv)
    docs = [json.loads(Path(j).read_text()) for j in a.json]
    gpus = {(d.get("gpu", {}).get("name"), str(d.get("gpu", {}).get("capability"))) for d in docs}
    if len(gpus) > 1:
        print(f"bench.policy: the JSONs come from different GPUs {sorted(gpus)}: one table per GPU", file=sys.stderr)
        return 1
    doc = {**docs[0], "cells": [c for d in docs for c in d["cells"]]}
    rules, bad, warn = generate(doc)
    if not rules:
        print(f"bench.policy: {a.json} has no qlora_ext[<path>] figures: nothing to choose from", file=sys.stderr)
        return 1
    srcs = [os.path.relpath(Path(j).resolve(), REPO) for j in a.json]
    gpu = doc.get("gpu", {})
    table = {
        "source": " ".join(s if not s.startswith("..") else j for s, j in zip(srcs, a.json)),
        "gpu": gpu.get("name", "?"),
        "generated": datetime.date.today().isoformat(),
        "command": "python -m bench.policy " + " ".join(map(shlex.quote, argv)),
        "note": (f"Generated by bench/policy.py from a sweep measured on {gpu.get('name')} "
                 f"(cc {gpu.get('capability')}); "
                 "do not edit. shape_class(n, k): small if n*k <= 2**25, else expand if n >= k, else reduce; a rule "
                 "covers m <= m_max (null: any larger m). fwd/bwd: the path slower than bnb+PEFT in the fewest measured "
                 "cells, then with the smallest worst-case ratio to the fastest path over the measured shapes and ranks "
                 "(bwd: fwd+bwd times). cc '*' rows, for GPUs never measured, make the same choice among the paths "
                 "every GPU has (not sm90); dtype '*': fp16 runs the same kernels and bytes as bf16. "
                 f"Cells where these choices are slower than bnb+PEFT: {len(bad)}."),
        "rules": rules,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(table, indent=2) + "\n")
    for r in rules[: len(rules) // 2]:
        m_max = r["m_max"] if r["m_max"] is not None else "inf"
        print(f"{r['shape_class']:>6} m<={m_max:<6} fwd {r['fwd']:<12} bwd {r['bwd']:<12} {r['why']}")
    for w in warn:
        print(f"bench.policy: WARNING {w}", file=sys.stderr)
    if bad:
        print(f"\n!!! bench.policy: the chosen paths are SLOWER than bnb+PEFT in {len(bad)} measured cells:",
              file=sys.stderr)
        for line in bad:
            print(f"!!!   {line}", file=sys.stderr)
    print(f"wrote {a.out} ({len(rules)} rules)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
