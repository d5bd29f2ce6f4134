"""Multi-GPU check of examples/finetune.py: one GPU, then DDP and FSDP2 over N GPUs, on the e2e model (4 decoder
layers at Llama-3-8B width: hidden 4096, MLP 14336, 32 heads, 8 KV heads), 50 steps each, the same global batch.

    python scripts/multigpu_check.py                       # 2 GPUs; writes $OUT/multigpu_check.json
    python scripts/multigpu_check.py --nproc 4 --out runs  # 4 GPUs, into ./runs
    python scripts/multigpu_check.py --device cpu --steps 5  # the script itself, on CPUs (gloo, the tiny model)

For each mode the JSON holds the per-step losses, tokens/s (global), peak memory per GPU and the NF4 bytes each
rank holds, plus the comparisons: the largest relative loss difference to the one-GPU run and the fraction of the
NF4 storage each FSDP rank holds. bf16 runs: one GPU and DDP train bf16 adapters; FSDP keeps fp32 master adapters
(MixedPrecisionPolicy: bf16 compute, fp32 gradient reduction), so its losses drift from the others by bf16
rounding, not by more. Each run's output is in <out>/<mode>.log. Exit status 1 if a run fails or a check misses
its bound (printed).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FINETUNE = ROOT / "examples" / "finetune.py"
E2E_MODEL = ["--layers", "4", "--hidden", "4096", "--intermediate", "14336", "--heads", "32", "--kv-heads", "8"]
# bf16 runs of the same job differ by rounding only: the mean of the last 10 losses must agree to this.
FINAL_LOSS_RTOL = 0.02
# Each FSDP rank holds 1/N of every storage tensor, plus at most one padded row of each.
NF4_FRACTION_SLACK = 0.01


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=2, help="GPUs for DDP and FSDP")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cpu: finetune.py's CPU model in fp32 over gloo, to check this script without GPUs")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences per step)")
    p.add_argument("--seq", type=int, help="bytes per sequence (default: 512; 128 with --device cpu)")
    p.add_argument("--modes", default="single,ddp,fsdp,fsdp-ckpt",
                   help="comma-separated: single, ddp, fsdp, fsdp-ckpt (FSDP with activation checkpointing)")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "multigpu_out")),
                   help="output folder (default: $OUT, else ./multigpu_out)")
    return p.parse_args()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(mode: str, args: argparse.Namespace, log_json: Path) -> list[str]:
    model = E2E_MODEL if args.device == "cuda" else []
    job = [str(FINETUNE), *model, "--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq),
           "--log-json", str(log_json), "--device", args.device]
    if mode == "single":
        return [sys.executable, *job[:-1], "cuda:0" if args.device == "cuda" else "cpu"]
    parallel = {"ddp": ["--parallel", "ddp"], "fsdp": ["--parallel", "fsdp"],
                "fsdp-ckpt": ["--parallel", "fsdp", "--grad-ckpt"]}[mode]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}", *job, *parallel]


def main() -> int:
    args = parse_args()
    args.seq = args.seq or (512 if args.device == "cuda" else 128)
    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, TQDM_DISABLE="1", HF_HUB_OFFLINE="1")
    # The qlora_ext this Python imports (the installed one, with its compiled kernels), else the checkout's.
    spec = importlib.util.find_spec("qlora_ext")
    package_root = str(Path(spec.origin).parents[1]) if spec is not None and spec.origin else str(ROOT)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    results, failures = {}, []
    for mode in args.modes.split(","):
        log_json = args.out / f"{mode}.json"
        cmd = command(mode, args, log_json)
        print(f"[{mode}] {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        with open(args.out / f"{mode}.log", "w", encoding="utf-8") as log:
            rc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
        if rc != 0 or not log_json.exists():
            failures.append(f"{mode}: exit status {rc} (see {args.out / f'{mode}.log'})")
            continue
        run = json.loads(log_json.read_text())
        run["wall_s"] = time.perf_counter() - t0
        results[mode] = run
        print(f"[{mode}] final loss {run['final_loss']:.4f}, {run['tokens_per_s']:,.0f} tokens/s, peak memory per "
              f"GPU {run.get('peak_mem_mib_per_rank') or [run['peak_mem_mib']]} MiB", flush=True)

    checks = {}
    single = results.get("single")
    for mode, run in results.items():
        if mode == "single":
            continue
        if single is not None:
            diffs = [abs(a - b) / abs(b) for a, b in zip(run["losses"], single["losses"])]
            checks[f"{mode}_max_rel_loss_diff"] = max(diffs)
            final = abs(run["final_loss"] - single["final_loss"]) / abs(single["final_loss"])
            checks[f"{mode}_final_loss_rel_diff"] = final
            if final > FINAL_LOSS_RTOL:
                failures.append(f"{mode}: mean of the last 10 losses differs from one GPU by {final:.3%} "
                                f"(bound {FINAL_LOSS_RTOL:.0%})")
        fractions = [b / run["nf4_bytes_whole"] for b in run["nf4_bytes_per_rank"]]
        checks[f"{mode}_nf4_fraction_per_rank"] = fractions
        expected = 1.0 / run["world_size"] if mode.startswith("fsdp") else 1.0
        if any(abs(f - expected) > NF4_FRACTION_SLACK for f in fractions):
            failures.append(f"{mode}: ranks hold {fractions} of the NF4 storage, expected {expected:.3f} each")
    summary = {"nproc": args.nproc, "steps": args.steps, "batch": args.batch, "seq": args.seq,
               "model": " ".join(E2E_MODEL) if args.device == "cuda" else "finetune.py CPU defaults",
               "device": args.device, "runs": results, "checks": checks, "failures": failures}
    path = args.out / "multigpu_check.json"
    path.write_text(json.dumps(summary, indent=1))
    print(json.dumps(checks, indent=1))
    for failure in failures:
        print(f"FAILED {failure}")
    print(f"wrote {path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
