"""Time the Hopper forward op torch.ops.qlora_ext._sm90_fwd (csrc/qlora_fwd_sm90.cu) on the Llama-3 8B/70B linear
shapes, next to the floors it is measured against. One H100/H200, bf16, r = 16, no bias, no dropout, double-quantized
NF4. The columns of a cell are timed interleaved, as the bench times a row (bench/_timing.gpu_times: CUDA events, an
L2 flush and a lead-in call before each timed call, Williams-order rounds, so no column inherits another's clocks).

Columns, per (k -> n, m):
  cublas        x @ Wᵀ on the dequantized bf16 weight (the speed the NF4 GEMM should match)
  decode_gemm   the decode + cuBLAS forward (_decode_gemm_fwd, or qlora_ext.backends.decode_gemm.forward on older
                trees): whole-weight decode, then cuBLAS; the path the sm90 op has to beat
  sm90          the whole op, per (tile, weight layout) variant, chosen with QLORA_EXT_SM90_TILE / _WLAYOUT
  sm90_gemm     the NF4 GEMM kernel alone inside that op (device time of the CUTLASS kernel from torch.profiler, one
                L2 flush before each call), plus sm90_scale / sm90_repack: its per-call scale decode and repack kernels
Every variant's y is also compared with the cuBLAS result plus the LoRA term: fro_rel = ||y - ref|| / ||ref||
(printed, in the JSON). A sanity check, not the correctness test (tests/test_sm90.py applies the ratio rule): the
kernel's weight is rounded twice (bf16 code x bf16 scale), so ~1e-3 is expected in bf16. An elementwise relative
error would be dominated by near-zero outputs.

    python scripts/probe_sm90.py                       # all 7 shapes x m in {2048, 8192, 16384}
    python scripts/probe_sm90.py --shapes 4096x14336 --ms 2048 --out /tmp/p.json
JSON: --out, default $OUT/probe_sm90.json when OUT is set (else no file); a list of records, one per measurement.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: bench/ and qlora_ext/

import qlora_ext  # noqa: E402
from bench import _timing  # noqa: E402

SHAPES = ((4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096), (8192, 8192), (8192, 28672), (28672, 8192))  # (k, n)
MS = (2048, 8192, 16384)
VARIANTS = (("128x256", "stored"), ("128x256", "repacked"), ("128x128", "stored"), ("128x128", "repacked"))
R, S = 16, 2.0
ops = torch.ops.qlora_ext


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="*", help="k x n pairs such as 4096x14336 (default: the 7 Llama shapes)")
    ap.add_argument("--ms", nargs="*", type=int, default=list(MS), help="token counts m")
    ap.add_argument("--profile-calls", type=int, default=10, help="calls profiled for the kernel-only times")
    default_out = os.path.join(os.environ["OUT"], "probe_sm90.json") if os.environ.get("OUT") else None
    ap.add_argument("--out", default=default_out, help="JSON output path (default: $OUT/probe_sm90.json)")
    return ap.parse_args()


def set_variant(tile, wlayout):
    os.environ["QLORA_EXT_SM90_TILE"] = tile
    os.environ["QLORA_EXT_SM90_WLAYOUT"] = wlayout


def variant(tile, wlayout):
    """A context manager factory for gpu_times: the variant's environment around each call (read per call)."""
    @contextlib.contextmanager
    def ctx():
        set_variant(tile, wlayout)
        yield
    return ctx


def decode_gemm_forward():
    """The decode + cuBLAS forward with _fused_fwd's signature, from whichever form this tree has."""
    if hasattr(ops, "_decode_gemm_fwd"):
        return ops._decode_gemm_fwd
    from qlora_ext.backends import decode_gemm
    return decode_gemm.forward


def kernel_times_ms(fn, calls: int) -> dict:
    """Mean device time per call (ms) of each kernel of this file's op, from torch.profiler, with the L2 flushed
    before every call. Keys: gemm (the CUTLASS kernel), scale, repack."""
    flush = torch.empty(_timing.FLUSH_BYTES, dtype=torch.int8, device="cuda")
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            flush.zero_()
            fn()
        torch.cuda.synchronize()
    sums = {"gemm": [], "scale": [], "repack": []}
    for evt in prof.events():
        if evt.device_type != torch.autograd.DeviceType.CUDA:  # kernels only, not the host-side records
            continue
        dev_us, name = evt.device_time_total, evt.name
        if "GemmUniversal" in name:
            sums["gemm"].append(dev_us)
        elif "nf4_scale_kernel" in name:
            sums["scale"].append(dev_us)
        elif "nf4_repack_kernel" in name:
            sums["repack"].append(dev_us)
    return {key: (sum(v) / calls / 1e3 if v else None) for key, v in sums.items()}


def fro_rel(y, ref):
    y64, r64 = y.double(), ref.double()
    if not torch.isfinite(y64).all():
        return float("inf")
    return ((y64 - r64).norm() / r64.norm()).item()


def main():
    args = parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        sys.exit("probe_sm90: needs an H100/H200 (compute capability 9.0)")
    if not torch._C._dispatch_has_kernel_for_dispatch_key("qlora_ext::_sm90_fwd", "CUDA"):
        sys.exit("probe_sm90: qlora_ext._C has no CUDA kernel for _sm90_fwd (build with TORCH_CUDA_ARCH_LIST=9.0a)")
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes] if args.shapes else list(SHAPES)
    dev, dt = "cuda", torch.bfloat16
    decode_fwd = decode_gemm_forward()
    records = []
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "r": R, "scaling": S, "dtype": "bf16",
            "timer": None}

    def record(**kw):
        records.append(kw)
        ratio = f"{kw['ratio_vs_cublas']:.3f}" if kw.get("ratio_vs_cublas") else "-"
        extra = f"  fro_rel {kw['fro_rel']:.2e}" if "fro_rel" in kw else ""
        print(f"{kw['k']:>6}->{kw['n']:<6} m={kw['m']:<6} {kw['column']:<12} {kw.get('tile', ''):<8} "
              f"{kw.get('wlayout', ''):<9} {kw['median_ms']:9.4f} ms  x cuBLAS {ratio}{extra}", flush=True)

    for k, n in shapes:
        g = torch.Generator(device=dev).manual_seed(k * 31 + n)
        wq = qlora_ext.quantize_nf4(torch.randn(n, k, device=dev, generator=g).to(dt) * 0.02)
        w_list = list(wq.op_args())
        W = wq.dequantize(dt)
        A = (torch.randn(R, k, device=dev, generator=g) / math.sqrt(k)).to(dt)
        B = (torch.randn(n, R, device=dev, generator=g) / math.sqrt(R)).to(dt)
        for m in args.ms:
            x = torch.randn(m, k, device=dev, generator=g).to(dt)
            est = 2.0 * m * n * k / 700e12 * 1e3  # ms at ~700 TFLOP/s
            base = dict(k=k, n=n, m=m)
            y_ref = torch.addmm(x @ W.t(), x @ A.t(), B.t(), alpha=S)  # cuBLAS base + the LoRA term
            call = lambda: ops._sm90_fwd(x, w_list, A, B, None, S, 0.0, 0)  # noqa: E731
            errs = {}
            for tile, wlayout in VARIANTS:
                set_variant(tile, wlayout)
                errs[(tile, wlayout)] = fro_rel(call()[0], y_ref)
            times = _timing.gpu_times(
                [(lambda: x @ W.t(), (), est, contextlib.nullcontext),
                 (lambda: decode_fwd(x, w_list, A, B, None, S, 0.0, 0), (), est * 1.1, contextlib.nullcontext)]
                + [(call, (), est * 1.1, variant(tile, wlayout)) for tile, wlayout in VARIANTS])
            for t in times:
                if isinstance(t, BaseException):
                    raise t
            meta["timer"] = times[0]["timer"]
            cublas_ms = times[0]["median_ms"]
            record(**base, column="cublas", median_ms=cublas_ms, ratio_vs_cublas=1.0, spread=times[0]["spread"])
            t = times[1]
            record(**base, column="decode_gemm", median_ms=t["median_ms"], ratio_vs_cublas=t["median_ms"] / cublas_ms,
                   spread=t["spread"])
            for (tile, wlayout), t in zip(VARIANTS, times[2:]):
                set_variant(tile, wlayout)
                var = dict(base, tile=tile, wlayout=wlayout)
                record(**var, column="sm90", median_ms=t["median_ms"], ratio_vs_cublas=t["median_ms"] / cublas_ms,
                       spread=t["spread"], fro_rel=errs[(tile, wlayout)])
                kt = kernel_times_ms(call, args.profile_calls)
                if kt["gemm"] is not None:
                    record(**var, column="sm90_gemm", median_ms=kt["gemm"], ratio_vs_cublas=kt["gemm"] / cublas_ms)
                for key in ("scale", "repack"):
                    if kt[key] is not None:
                        record(**var, column=f"sm90_{key}", median_ms=kt[key], ratio_vs_cublas=None)
            del x, y_ref
        del wq, w_list, W, A, B
        torch.cuda.empty_cache()

    # Summary: per variant, geometric mean of sm90 / cuBLAS and of sm90 / decode_gemm over the cells.
    print("\nsummary (geomean over cells):")
    cells = {(r["k"], r["n"], r["m"]): r for r in records if r["column"] == "decode_gemm"}
    for tile, wlayout in VARIANTS:
        rows = [r for r in records if r["column"] == "sm90" and r["tile"] == tile and r["wlayout"] == wlayout]
        if not rows:
            continue
        vs_cublas = math.exp(statistics.fmean(math.log(r["ratio_vs_cublas"]) for r in rows))
        vs_decode = math.exp(statistics.fmean(math.log(r["median_ms"] / cells[(r["k"], r["n"], r["m"])]["median_ms"])
                                              for r in rows))
        print(f"  sm90 {tile} {wlayout:<9}: x cuBLAS {vs_cublas:.3f}, x decode_gemm {vs_decode:.3f} ({len(rows)} cells)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"meta": meta, "records": records}, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
