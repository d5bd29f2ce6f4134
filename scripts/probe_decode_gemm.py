"""How to add the LoRA term to a cuBLAS GEMM, and what the whole-weight decode costs: the measurements behind
csrc/decode_gemm.cpp (one GPU, bf16, r = 16; triton's do_bench median with an L2 flush).

Forward variants (all include u = x·Aᵀ):
  after  y = x·Wᵀ, then y.addmm_(u, Bᵀ, alpha=s)          (the LoRA product re-reads and re-writes y)
  beta   y = s·u·Bᵀ, then y.addmm_(x, Wᵀ)                 (cuBLAS reads y as C inside the big GEMM)
  kcat   [x | s·u | 0]·[W | B | 0]ᵀ with K = k + 64       (one GEMM; x copied into a padded buffer)
dx variants: after (dx = dy·W, then dx.addmm_(g, A)) and beta (dx = g·A, then dx.addmm_(dy, W)).
decode: torch.ops.qlora_ext._dequantize_nf4_out of the whole weight (bytes moved / time = achieved bandwidth).

    python scripts/probe_decode_gemm.py            # prints one line per (shape, m) and a JSON line each
"""
import json
import math

import torch
import triton.testing

import qlora_ext

SHAPES = ((4096, 14336), (14336, 4096), (4096, 4096), (8192, 28672))  # (k, n)
MS = (2048, 8192)
R, S = 16, 2.0
dev, dt = "cuda", torch.bfloat16


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def main():
    for k, n in SHAPES:
        w = torch.randn(n, k, device=dev, dtype=dt) * 0.02
        wq = qlora_ext.quantize_nf4(w)
        wl = list(wq.op_args())
        ws = torch.empty(n, k, device=dev, dtype=dt)
        decode_ms = bench(lambda: torch.ops.qlora_ext._dequantize_nf4_out(wl, ws))
        nf4_bytes = sum(t.numel() * t.element_size() for t in wl if t is not None)
        decode_tbs = (nf4_bytes + n * k * 2) / decode_ms / 1e9
        W = ws
        A = torch.randn(R, k, device=dev, dtype=dt) / math.sqrt(k)
        B = torch.randn(n, R, device=dev, dtype=dt) / math.sqrt(R)
        Wcat = torch.zeros(n, k + 64, device=dev, dtype=dt)
        Wcat[:, :k] = W
        Wcat[:, k:k + R] = B
        for m in MS:
            x = torch.randn(m, k, device=dev, dtype=dt)
            dy = torch.randn(m, n, device=dev, dtype=dt)
            xb = torch.zeros(m, k + 64, device=dev, dtype=dt)

            def f_base():
                return x @ W.t()

            def f_after():
                u = x @ A.t()
                y = x @ W.t()
                y.addmm_(u, B.t(), alpha=S)
                return y

            def f_beta():
                u = x @ A.t()
                y = torch.addmm(x.new_empty(m, n), u, B.t(), beta=0, alpha=S)
                y.addmm_(x, W.t())
                return y

            def f_kcat():
                xb[:, :k].copy_(x)
                torch.mm(x, A.t(), out=xb[:, k:k + R]).mul_(S)
                return xb @ Wcat.t()

            def d_base():
                return dy @ W

            def d_after():
                g = dy @ B
                dx = dy @ W
                dx.addmm_(g, A)
                return dx

            def d_beta():
                g = dy @ B
                dx = g @ A
                dx.addmm_(dy, W)
                return dx

            ref = (x.double() @ W.double().t() + S * (x.double() @ A.double().t()) @ B.double().t())
            errs = {name: ((f().double() - ref).norm() / ref.norm()).item()
                    for name, f in (("after", f_after), ("beta", f_beta), ("kcat", f_kcat))}
            t = {name: bench(f) for name, f in (("base", f_base), ("after", f_after), ("beta", f_beta),
                                                 ("kcat", f_kcat), ("dx_base", d_base), ("dx_after", d_after),
                                                 ("dx_beta", d_beta))}
            rec = dict(k=k, n=n, m=m, decode_ms=round(decode_ms, 4), decode_TBps=round(decode_tbs, 2),
                       **{key: round(v, 4) for key, v in t.items()}, err=errs)
            print(f"{k}->{n} m={m}: decode {decode_ms:.4f} ms ({decode_tbs:.2f} TB/s) | fwd base {t['base']:.4f} "
                  f"after x{t['after'] / t['base']:.3f} beta x{t['beta'] / t['base']:.3f} "
                  f"kcat x{t['kcat'] / t['base']:.3f} | dx base {t['dx_base']:.4f} after "
                  f"x{t['dx_after'] / t['dx_base']:.3f} beta x{t['dx_beta'] / t['dx_base']:.3f}")
            print(json.dumps(rec))
        del w, wq, wl, ws, W, Wcat
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
