"""The same fine-tune through qlora_ext and through bitsandbytes + PEFT, side by side: one loss plot, one table.

    python scripts/finetune_compare.py --out examples/results --tag 2026-12-01-h200    # GPU defaults: 200 steps
    python scripts/finetune_compare.py --out /tmp/cmp -- --steps 5                      # extra finetune.py args

Each backend runs examples/finetune.py in its own process (so each peak-memory number is that backend's alone)
with the same model, weights, data order and adapter initialization (finetune.py builds both from --seed). The
outputs are <out>/<tag>-finetune.json (both runs' per-step losses and summaries, plus the comparison),
<tag>-finetune.png (both loss curves) and <tag>-finetune.md (tokens/s, peak memory, final losses). Everything in
them is read from the two runs' --log-json files; nothing is typed in.

The two runs differ in how the base GEMM rounds (bitsandbytes dequantizes to bf16 and calls cuBLAS; qlora_ext
runs its own kernels), so their losses agree to bf16 rounding, not bit for bit: the table reports the largest
relative difference of the per-step losses and of the mean of the last 10 steps.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FINETUNE = ROOT / "examples" / "finetune.py"
BACKENDS = ("qlora_ext", "bnb-peft")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for <tag>-finetune.{json,png,md}")
    p.add_argument("--tag", default="finetune-compare", help="file name prefix, e.g. 2026-12-01-h200")
    p.add_argument("finetune_args", nargs="*", help="passed to examples/finetune.py (after --)")
    return p.parse_args()


def run(backend: str, log_json: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, str(FINETUNE), "--backend", backend, "--log-json", str(log_json), *extra]
    print("$", " ".join(cmd), flush=True)
    # The checkout first on the path: the script runs the tree it sits in (an installed qlora_ext or not).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    subprocess.run(cmd, check=True, env=env)
    return json.loads(log_json.read_text())


def compare(runs: dict[str, dict]) -> dict:
    a, b = (runs[name]["losses"] for name in BACKENDS)
    steps = min(len(a), len(b))
    rel = [abs(x - y) / abs(y) for x, y in zip(a[:steps], b[:steps])]
    final = {name: runs[name]["final_loss"] for name in BACKENDS}
    return {
        "steps": steps,
        "max_rel_loss_diff": max(rel),
        "final_loss_rel_diff": abs(final["qlora_ext"] - final["bnb-peft"]) / abs(final["bnb-peft"]),
        "tokens_per_s_ratio": runs["qlora_ext"]["tokens_per_s"] / runs["bnb-peft"]["tokens_per_s"],
    }


def plot(runs: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, style in zip(BACKENDS, ("-", "--")):
        s = runs[name]
        ax.plot(range(1, len(s["losses"]) + 1), s["losses"], style,
                label=f"{name}: {s['tokens_per_s']:,.0f} tok/s, peak {s['peak_mem_mib'] or 0:,.0f} MiB")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (bytes, nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(runs: dict[str, dict], cmp: dict) -> str:
    s0 = runs["qlora_ext"]
    lines = [
        f"# Fine-tune, qlora_ext vs bitsandbytes + PEFT ({s0['device']}, {s0['dtype']})",
        "",
        f"Model: {s0['layers']} Llama decoder layers at width {s0['hidden']}, all linears NF4 + LoRA r={s0['r']}; "
        f"batch {s0['batch']} × seq {s0['seq']}; {s0['steps']} steps, same weights, data order and adapter init. "
        "Written by scripts/finetune_compare.py.",
        "",
        "| backend | tokens/s | peak memory MiB | first loss | final loss (last 10) | val loss |",
        "|---|---|---|---|---|---|",
    ]
    for name in BACKENDS:
        s = runs[name]
        peak = f"{s['peak_mem_mib']:,.0f}" if s["peak_mem_mib"] is not None else "—"
        lines.append(f"| {name} | {s['tokens_per_s']:,.0f} | {peak} | {s['first_loss']:.4f} | "
                     f"{s['final_loss']:.4f} | {s['val_loss']:.4f} |")
    lines += ["", f"qlora_ext ÷ bnb+PEFT tokens/s: {cmp['tokens_per_s_ratio']:.3f}. Largest per-step relative loss "
              f"difference: {cmp['max_rel_loss_diff']:.2e}; final loss: {cmp['final_loss_rel_diff']:.2e}.", ""]
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    runs = {name: run(name, args.out / f"{args.tag}-finetune-{name}.json", args.finetune_args) for name in BACKENDS}
    cmp = compare(runs)
    stem = args.out / f"{args.tag}-finetune"
    stem.with_suffix(".json").write_text(json.dumps({"runs": runs, "comparison": cmp}, indent=1))
    for name in BACKENDS:  # folded into the combined file
        (args.out / f"{args.tag}-finetune-{name}.json").unlink()
    plot(runs, stem.with_suffix(".png"), f"{runs['qlora_ext']['steps']} steps, same init and data")
    md = table(runs, cmp)
    stem.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
