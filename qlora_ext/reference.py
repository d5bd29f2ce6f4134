"""Pure-PyTorch specification of every qlora_ext op (any device; fp16 / bf16 / fp32).

The CUDA kernels are tested against this file, so the rules below are exact, not approximate.
Facts were read from bitsandbytes 0.50.2 (Python backends + csrc/) and checked bit for bit against
the installed package's CPU ``quantize_4bit`` / ``dequantize_4bit`` (tests/test_nf4_format.py).

NF4 quantization rule (``quantize_nf4``)
----------------------------------------
Blocks of ``blocksize`` elements run over the flattened row-major weight (N = n*k elements,
nblocks = ceil(N / blocksize)); the last block may be partial.

1. ``x = fp32(w)`` (exact for fp16 / bf16).  ``absmax[b] = max |x|`` over block b (fp32, exact).
2. Normalise, all in fp32 with IEEE round-to-nearest-even:
     full blocks:           ``v = x * fp32(1.0f / max(absmax[b], 1e-38f))``   (reciprocal, then multiply)
     the partial last block: ``v = x / max(absmax[b], 1e-38f)``               (true division)
   (bnb's CPU backend does exactly this; its CUDA kernel multiplies by the reciprocal in the partial block
   too. The two differ only when the quotient lands within one ulp of a threshold; we follow the CPU
   backend because that is what can be verified here.)  bnb then clamps v to [-1, 1]; the clamp never
   changes a code because every threshold lies strictly inside (-1, 1).
3. ``nibble = #{ i in 0..14 : v > t[i] }`` with ``t[i] = fp32(NF4[i] + NF4[i+1]) * 0.5`` (exact halving).
   Strict ``>``: a value exactly on a threshold takes the LOWER code. These 15 thresholds are bit-identical
   to the literals of bnb's CUDA ``dQuantizeNF4`` decision tree.
4. All-zero block: the 1e-38 clamp makes v = 0, so every nibble is 7 (code 0.0) and the block dequantizes
   to +0.0. A full block stores absmax = 0; a partial last block stores the clamped value fp32(1e-38)
   (bnb's CPU backend clamps before storing only there). bnb's CUDA kernel instead computes 0 * inf = NaN
   and stores nibble 0 (dequantizing to -0.0); we follow the CPU backend.
5. Packing: byte j = (nibble[2j] << 4) | nibble[2j+1]. When N is odd the missing last nibble is 7
   (bnb pads v with 0.0 before coding).

Double quantization (``double_quant=True``; bnb ``compress_statistics=True``)
------------------------------------------------------------------------------
6. ``offset = absmax.mean()`` (fp32 torch mean; its reduction order is implementation-defined, which is
   why "same offset" is part of the bit-exactness contract).  ``a = fp32(absmax - offset)``.
7. Groups of 256 consecutive blocks (flattened block index; a group may span rows):
   ``nested_absmax[g] = max |a|`` over the group (fp32).  ``v = a * fp32(1.0f / nested_absmax[g])``
   (reciprocal then multiply, also in a partial last group; an all-equal group gives 0 * inf = NaN).
8. The 8-bit code of v is the one bnb's CUDA ``dQuantize<0>`` returns against ``dynamic_map_signed()``
   (``nested_code``): a 7-step bisection starting at pivot 127 (``v > code[pivot]`` moves up by 64, 32, ...,
   1, otherwise down) ending at pivot p; then
     if ``v > code[p]``: code p+1 when ``v > fp32(code[p] + code[p+1]) * 0.5`` else p   (tie -> p, lower)
     else:               code p-1 when ``v < fp32(code[p-1] + code[p]) * 0.5`` else p   (tie -> p, upper)
   (code[-1] reads as code[0].) This is the nearest code. p is always even (127 ± 64 ± ... ± 2 is odd, the
   last ±1 makes it even), so on an exact midpoint between codes i and i+1 the EVEN index wins.
   NaN compares false everywhere and gets code 0.
   Note: bnb 0.50.2's *CPU* backend does NOT do this; it looks v up in a 65536-bin table built from the
   same midpoints, which picks a non-nearest code for about 1% of the values (and never one of the seven
   codes with |code| < 1e-5: 0.0 becomes code 131 = +2.1e-5). Our rule equals bnb on CUDA, where checkpoints are
   made, and is the exact nearest code; tests check that wherever bnb CPU disagrees, ours is nearer.

Dequantization (``dequantize_nf4``), bit-exact with bnb's dequantize_4bit, no FMA contraction:
   ``scale[b] = fp32(fp32(nested_code[absmax[b]] * nested_absmax[b >> 8]) + offset)``  (double quant)
   ``scale[b] = absmax[b]``                                                          (no double quant)
   ``w = out_dtype(fp32(NF4[nibble] * scale[b]))``  (round to nearest even).

Dropout mask: the counter hash of docs/design.md §3, evaluated in int64 tensor arithmetic (32x32-bit products
are split into 16-bit halves so no intermediate reaches 2^63), over chunks of rows so that the int64
temporaries stay small (each element's bit depends on its index alone, not on the chunking).

LoRA math (docs/design.md §1), s = ``scaling``, p = ``dropout_p``, d(x) = ``dropout(x, seed, p)``:
   u = d(x)·Aᵀ;  y = x·wᵀ + s·u·Bᵀ + bias;  g = s·dy·B;  dx = dy·w + (g·A) ⊙ mask/(1-p);
   dA = gᵀ·d(x);  dB = s·dyᵀ·u.
Products accumulate in fp32 and round to x.dtype once; u and g are rounded to x.dtype before they are
reused (the kernels feed them to tensor cores in that dtype).
"""

from __future__ import annotations

import math

import torch

NF4_CODE = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]

VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Smallest divisor used when normalising by absmax; bnb clamps with the same constant, which is what turns
# an all-zero block into code 7 instead of 0 * inf = NaN.
_ABSMAX_FLOOR = 1e-38
_U32 = 0xFFFFFFFF


def nf4_code(device=None) -> torch.Tensor:
    """The 16-entry NF4 codebook (bnb's quant_map), fp32, index = nibble."""
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


def dynamic_map_signed(device=None) -> torch.Tensor:
    """bnb's ``create_dynamic_map(signed=True)``: 256 sorted fp32 values used for the nested absmax code.

    Decade i (i = 0..6) holds 2**i values 10**(i-6) * midpoints of ``linspace(0.1, 1, 2**i + 1)`` and their
    negatives; with 0 and 1.0 that makes 2 * 127 + 2 = 256. The arithmetic is done in fp32 tensors, the way
    bnb does it, so the values are identical bit for bit.
    """
    values = [0.0, 1.0]
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        decade = (10 ** (i - 6)) * means
        values += decade.tolist() + (-decade).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32, device=device)


# ----------------------------------------------------------------------------------------------------------
# validation helpers: every message names the tensor, what was expected and what was found
# ----------------------------------------------------------------------------------------------------------


def _check_tensor(name, t, *, dtype=None, dtypes=None, ndim=None, shape=None, device=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype}, got {t.dtype}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {list(dtypes)}, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected device {device} (same as the first input), got {t.device}")


def _check_blocksize(blocksize):
    if blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"blocksize: expected one of {VALID_BLOCKSIZES}, got {blocksize}")


def _check_dropout_p(dropout_p):
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p: expected 0 <= p < 1, got {dropout_p}")


def check_nf4_storage(w_nf4, absmax, code, nested_absmax, nested_code, offset, n, k, blocksize, device):
    """Shapes/dtypes of the NF4 storage tensors for an [n, k] weight (docs/design.md §2)."""
    _check_blocksize(blocksize)
    if n < 1 or k < 1:
        raise ValueError(f"n, k: expected both >= 1, got n={n}, k={k}")
    nblocks = -(-n * k // blocksize)
    _check_tensor("w_nf4", w_nf4, dtype=torch.uint8, shape=((n * k + 1) // 2,), device=device)
    _check_tensor("code", code, dtype=torch.float32, shape=(16,), device=device)
    nested = [t is not None for t in (nested_absmax, nested_code, offset)]
    if any(nested) and not all(nested):
        raise ValueError(
            "nested_absmax, nested_code, offset: expected all three (double quant) or none, got "
            f"{['None' if t is None else 'tensor' for t in (nested_absmax, nested_code, offset)]}"
        )
    if all(nested):
        _check_tensor("absmax", absmax, dtype=torch.uint8, shape=(nblocks,), device=device)
        ngroups = -(-nblocks // NESTED_BLOCKSIZE)
        _check_tensor("nested_absmax", nested_absmax, dtype=torch.float32, shape=(ngroups,), device=device)
        _check_tensor("nested_code", nested_code, dtype=torch.float32, shape=(256,), device=device)
        _check_tensor("offset", offset, dtype=torch.float32, shape=(), device=device)
    else:
        _check_tensor("absmax", absmax, dtype=torch.float32, shape=(nblocks,), device=device)


# ----------------------------------------------------------------------------------------------------------
# NF4 quantize / dequantize
# ----------------------------------------------------------------------------------------------------------


def _normalize_blocks(values: torch.Tensor, blocksize: int, floor: float, tail_divides: bool):
    """Blockwise absmax and normalised values (rule steps 1-2 and 7). values: fp32 1-D.

    Returns (absmax fp32 [nblocks], v fp32 [N]). Divisors are clamped to ``floor`` (0.0: no clamp, as in bnb's
    nested quantization); tail_divides selects true division for a partial last block.
    """
    count = values.numel()
    full = count - count % blocksize
    head = values[:full].view(-1, blocksize)
    absmax = head.abs().amax(dim=1)
    v = (head * (1.0 / absmax.clamp(min=floor)).unsqueeze(1)).reshape(-1)
    if full < count:
        tail = values[full:]
        tail_absmax = tail.abs().amax().clamp(min=floor)  # bnb stores the clamped value for a partial block
        tail_v = tail / tail_absmax if tail_divides else tail * (1.0 / tail_absmax)
        absmax = torch.cat([absmax, tail_absmax.unsqueeze(0)])
        v = torch.cat([v, tail_v])
    return absmax, v


def nested_code_index(v: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rule step 8: bnb CUDA dQuantize<0> over a sorted 256-entry table. v: fp32; returns int64 indices."""
    pivot = torch.full_like(v, 127, dtype=torch.int64)
    for step in (64, 32, 16, 8, 4, 2, 1):
        pivot = torch.where(v > table[pivot], pivot + step, pivot - step)
    at = table[pivot]
    above = v > at
    mid_up = (table[pivot + 1] + at) * 0.5  # pivot <= 254, so pivot + 1 is in range
    mid_down = (table[(pivot - 1).clamp(min=0)] + at) * 0.5
    go_up = above & (v > mid_up)
    go_down = ~above & (v < mid_down) & (pivot > 0)  # below code[0] (v = -1.0) stays at 0
    return pivot + go_up.long() - go_down.long()


def check_quantize_input(w: torch.Tensor, blocksize: int) -> None:
    """Errors for quantize_nf4's inputs (shared by every device path, so CUDA raises the same messages)."""
    _check_tensor("w", w, dtypes=FLOAT_DTYPES, ndim=2)
    _check_blocksize(blocksize)
    if w.numel() == 0:
        raise ValueError(f"w: expected a non-empty weight, got shape {tuple(w.shape)}")
    nonfinite = int((~torch.isfinite(w)).sum())
    if nonfinite:
        raise ValueError(f"w: expected finite values, found {nonfinite} non-finite (NaN/Inf) value(s)")


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True):
    """NF4-quantize a [n, k] weight per the rule in the module docstring.

    Returns (w_nf4 uint8 [(n*k+1)//2], absmax, nested_absmax | None, offset | None) where absmax is
    uint8 [nblocks] with double quant and fp32 [nblocks] without; nested_absmax fp32 [ceil(nblocks/256)],
    offset fp32 0-d. The codebooks are ``nf4_code()`` and ``dynamic_map_signed()``.
    """
    check_quantize_input(w, blocksize)
    flat = w.reshape(-1).float()
    absmax, v = _normalize_blocks(flat, blocksize, _ABSMAX_FLOOR, tail_divides=True)
    if v.numel() % 2:
        v = torch.nn.functional.pad(v, (0, 1))  # the pad 0.0 codes to nibble 7, as in bnb
    code = nf4_code(w.device)
    thresholds = (code[:-1] + code[1:]) / 2
    nibbles = torch.bucketize(v, thresholds, out_int32=True).to(torch.uint8)  # count of thresholds < v
    w_nf4 = (nibbles[0::2] << 4) | nibbles[1::2]
    if not double_quant:
        return w_nf4, absmax, None, None

    offset = absmax.mean()
    nested_absmax, v8 = _normalize_blocks(absmax - offset, NESTED_BLOCKSIZE, 0.0, tail_divides=False)
    absmax_q = nested_code_index(v8, dynamic_map_signed(w.device)).to(torch.uint8)
    return w_nf4, absmax_q, nested_absmax, offset


def block_scales(absmax, nested_absmax=None, nested_code=None, offset=None) -> torch.Tensor:
    """fp32 [nblocks] per-block scale, in bnb's rounding order (module docstring, dequantization)."""
    if nested_absmax is None:
        return absmax
    group = torch.arange(absmax.numel(), device=absmax.device) // NESTED_BLOCKSIZE
    return nested_code[absmax.int()] * nested_absmax[group] + offset  # two kernels, two roundings: no FMA


def dequantize_nf4(w_nf4, absmax, code, nested_absmax, nested_code, offset, n, k, blocksize, dtype):
    """Dequantize NF4 storage to a [n, k] tensor of ``dtype``, bit-exact with bnb's dequantize_4bit."""
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype: expected one of {list(FLOAT_DTYPES)}, got {dtype}")
    check_nf4_storage(w_nf4, absmax, code, nested_absmax, nested_code, offset, n, k, blocksize, w_nf4.device)
    count = n * k
    nibbles = torch.stack([w_nf4 >> 4, w_nf4 & 0xF], dim=1).reshape(-1)[:count].int()
    scale = block_scales(absmax, nested_absmax, nested_code, offset)
    nblocks = scale.numel()
    values = torch.nn.functional.pad(code[nibbles], (0, nblocks * blocksize - count))
    values = values.view(nblocks, blocksize) * scale.unsqueeze(1)
    return values.reshape(-1)[:count].to(dtype).view(n, k)


# ----------------------------------------------------------------------------------------------------------
# dropout mask: counter-based hash (docs/design.md §3), int64 arithmetic that never overflows
# ----------------------------------------------------------------------------------------------------------


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    """(h * c) mod 2^32 for h in [0, 2^32): 16-bit halves keep every product below 2^32."""
    h_lo, h_hi = h & 0xFFFF, h >> 16
    c_lo, c_hi = c & 0xFFFF, c >> 16
    cross = (h_hi * c_lo + h_lo * c_hi) & 0xFFFF
    return (h_lo * c_lo + (cross << 16)) & _U32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finalizer on int64 tensors holding uint32 values."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def _dropout_threshold(p: float) -> int:
    return min(math.floor(p * 2**32), 2**32 - 1)


# Elements hashed per step. The hash runs in int64 with several live temporaries; over the whole [m, k] at once
# they would take 8 bytes per element each (+2.5 GB at 8192 x 4096), while row chunks of ~256K elements keep them
# at a few MB. The mask bits do not depend on the chunking: each element's hash depends on its index alone.
_DROPOUT_CHUNK_ELEMS = 2**18


def _dropout_key(seed: int) -> int:
    """The per-seed key mixed into every element hash."""
    seed = int(seed)
    seed_hi = torch.tensor((seed >> 32) & _U32, dtype=torch.int64)
    return int(_fmix32(torch.tensor(seed & _U32, dtype=torch.int64) ^ _fmix32((seed_hi + 0x9E3779B9) & _U32)))


def _keyed_hash(key: int, idx: torch.Tensor) -> torch.Tensor:
    return _fmix32(_fmix32((idx & _U32) ^ key) ^ (idx >> 32))


def dropout_hash(seed: int, idx: torch.Tensor) -> torch.Tensor:
    """The uint32 hash (as int64) of element index idx = row * k + col (int64 tensor, >= 0) under ``seed``."""
    return _keyed_hash(_dropout_key(seed), idx)


def _row_chunks(m: int, k: int):
    """(row0, row1) ranges covering rows 0..m, each of at most _DROPOUT_CHUNK_ELEMS elements (one row at least)."""
    rows = max(1, _DROPOUT_CHUNK_ELEMS // max(k, 1))
    for row0 in range(0, m, rows):
        yield row0, min(m, row0 + rows)


def _keep_rows(key: int, threshold: int, row0: int, row1: int, k: int, device) -> torch.Tensor:
    """bool [row1 - row0, k]: rows row0..row1 of the keep mask."""
    idx = torch.arange(row0 * k, row1 * k, dtype=torch.int64, device=device)  # = row * k + col, row-major
    return (_keyed_hash(key, idx) >= threshold).view(row1 - row0, k)


def dropout_mask(seed: int, m: int, k: int, p: float, device=None) -> torch.Tensor:
    """bool [m, k]: True where dropout keeps x[row, col]. Same bits as the CUDA kernels' mask.

    Built row chunk by row chunk: nothing larger than the mask itself (1 byte per element) is allocated."""
    _check_dropout_p(p)
    if m < 0 or k < 0:
        raise ValueError(f"m, k: expected both >= 0, got m={m}, k={k}")
    key, threshold = _dropout_key(seed), _dropout_threshold(p)
    mask = torch.empty(m, k, dtype=torch.bool, device=device)
    for row0, row1 in _row_chunks(m, k):
        mask[row0:row1] = _keep_rows(key, threshold, row0, row1, k, device)
    return mask


def _keep_scale(p: float) -> float:
    """fp32(1/(1-p)): computed in double on the host, rounded once to fp32."""
    return float(torch.tensor(1.0 / (1.0 - p), dtype=torch.float32))


def dropout(x: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    """x ⊙ mask / (1-p) as out_dtype(fp32(x) * fp32(1/(1-p))), zero where the mask drops. x: [m, k].

    Computed row chunk by row chunk into the output, so the only allocation of x's size is the result."""
    _check_tensor("x", x, dtypes=FLOAT_DTYPES, ndim=2)
    _check_dropout_p(p)
    if p == 0.0:
        return x
    m, k = x.shape
    key, threshold, scale = _dropout_key(seed), _dropout_threshold(p), _keep_scale(p)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    out = torch.empty((m, k), dtype=x.dtype, device=x.device)
    for row0, row1 in _row_chunks(m, k):
        keep = _keep_rows(key, threshold, row0, row1, k, x.device)
        out[row0:row1] = torch.where(keep, (x[row0:row1].float() * scale).to(x.dtype), zero)
    return out


# ----------------------------------------------------------------------------------------------------------
# fused QLoRA linear: forward and explicit backward
# ----------------------------------------------------------------------------------------------------------


def _check_lora(x, lora_A, lora_B):
    """Common checks for the LoRA factors against x [m, k]; returns (m, n, k, r)."""
    m, k = x.shape
    _check_tensor("lora_A", lora_A, dtype=x.dtype, ndim=2, device=x.device)
    r = lora_A.shape[0]
    _check_tensor("lora_A", lora_A, shape=(r, k))
    _check_tensor("lora_B", lora_B, dtype=x.dtype, ndim=2, device=x.device)
    n = lora_B.shape[0]
    _check_tensor("lora_B", lora_B, shape=(n, r))
    if r < 1:
        raise ValueError(f"r: expected r >= 1, got r={r}")
    if n < 1 or k < 1:
        raise ValueError(f"n, k: expected both >= 1, got n={n}, k={k}")
    if r > min(n, k):
        raise ValueError(f"r={r} exceeds min(n, k)={min(n, k)}")
    return m, n, k, r


def qlora_linear(
    x, w_nf4, absmax, code, nested_absmax, nested_code, offset, lora_A, lora_B, bias, scaling, dropout_p, seed,
    blocksize,
):
    """Forward: (y [m, n], u [m, r]) in x.dtype; u = dropout(x)·lora_Aᵀ, y = x·wᵀ + s·u·lora_Bᵀ + bias."""
    _check_tensor("x", x, dtypes=FLOAT_DTYPES, ndim=2)
    m, n, k, r = _check_lora(x, lora_A, lora_B)
    if bias is not None:
        _check_tensor("bias", bias, dtype=x.dtype, shape=(n,), device=x.device)
    _check_dropout_p(dropout_p)
    check_nf4_storage(w_nf4, absmax, code, nested_absmax, nested_code, offset, n, k, blocksize, x.device)

    w = dequantize_nf4(w_nf4, absmax, code, nested_absmax, nested_code, offset, n, k, blocksize, x.dtype)
    x_drop = dropout(x, seed, dropout_p)
    u = (x_drop.float() @ lora_A.float().t()).to(x.dtype)
    y = x.float() @ w.float().t() + scaling * (u.float() @ lora_B.float().t())
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype), u


def qlora_linear_backward(
    dy, x, u, w_nf4, absmax, code, nested_absmax, nested_code, offset, lora_A, lora_B, scaling, dropout_p, seed,
    blocksize,
):
    """Backward: (dx [m, k], dA [r, k], dB [n, r]) in x.dtype, by the explicit formulas of the module docstring."""
    _check_tensor("x", x, dtypes=FLOAT_DTYPES, ndim=2)
    m, n, k, r = _check_lora(x, lora_A, lora_B)
    _check_tensor("dy", dy, dtype=x.dtype, shape=(m, n), device=x.device)
    _check_tensor("u", u, dtype=x.dtype, shape=(m, r), device=x.device)
    _check_dropout_p(dropout_p)
    check_nf4_storage(w_nf4, absmax, code, nested_absmax, nested_code, offset, n, k, blocksize, x.device)

    w = dequantize_nf4(w_nf4, absmax, code, nested_absmax, nested_code, offset, n, k, blocksize, x.dtype)
    dy32 = dy.float()
    g = (scaling * (dy32 @ lora_B.float())).to(x.dtype)
    lora_dx = g.float() @ lora_A.float()
    if dropout_p > 0.0:
        keep = dropout_mask(seed, m, k, dropout_p, x.device)
        lora_dx = torch.where(keep, lora_dx * _keep_scale(dropout_p), torch.zeros((), device=x.device))
    dx = dy32 @ w.float() + lora_dx
    dA = g.float().t() @ dropout(x, seed, dropout_p).float()
    dB = scaling * (dy32.t() @ u.float())
    return dx.to(x.dtype), dA.to(x.dtype), dB.to(x.dtype)
