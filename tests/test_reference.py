"""qlora_ext.reference — the spec the CUDA kernels are tested against — checked against float64 math.

Two bounds per output (docs/design.md §7), error = ‖out − ref64‖ / ‖ref64‖:
- ratio rule: err(reference) ≤ 2·err(the same math in PyTorch, in the input dtype) + tiny;
- absolute: err(reference) ≤ 2·eps(dtype). The reference accumulates in fp32 (error ~k·2⁻²⁴, negligible) and
  rounds to the dtype at three points: the output (≤ eps/2 relative), and the saved intermediates u / g and
  dropout(x) (≤ eps/2 each, relative to the term they feed). That sums to ≤ 1.5·eps; 2·eps leaves headroom
  without hiding a real error, which would be of order 1 (wrong term) or far above eps (wrong rounding/scale).
The fp64 reference uses the same dequantized w (exactly representable) and the same dropout mask, so it is the
exact value of the math the reference claims to compute.
"""
import math
import zlib

import pytest
import torch
from conftest import assert_ratio_rule, rel_err

from qlora_ext import reference

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# (m, n, k, r): m = 1 (decode) to 1000, odd n, k not a multiple of 64. m = 1 has few independent rounding errors
# (dB at m = 1 is an outer product), so that case gets a larger r to keep the ratio rule statistically stable.
CASES = [(1, 96, 128, 32), (3, 33, 128, 16), (17, 96, 192, 16), (1000, 65, 96, 32)]
SEED = 1234


def seed_of(*parts):
    """A per-test seed that is stable across runs (Python's str hash is salted per process)."""
    return zlib.crc32(repr(parts).encode())


def case_id(case):
    m, n, k, r = case
    return f"m{m}-n{n}-k{k}-r{r}"


def make_case(m, n, k, r, dtype, seed, bias=True, double_quant=True, blocksize=64):
    """Random layer: NF4 storage of a std-0.05 weight, activations, LoRA factors with both paths of similar size."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05
    w_nf4, absmax, nested_absmax, offset = reference.quantize_nf4(w.to(dtype), blocksize, double_quant)
    nested_code = reference.dynamic_map_signed() if double_quant else None
    storage = (w_nf4, absmax, reference.nf4_code(), nested_absmax, nested_code, offset)
    return {
        "x": torch.randn(m, k, generator=gen).to(dtype),
        "storage": storage,
        "lora_A": (torch.randn(r, k, generator=gen) / math.sqrt(k)).to(dtype),
        "lora_B": (torch.randn(n, r, generator=gen) * 0.2).to(dtype),
        "bias": (torch.randn(n, generator=gen) * 0.1).to(dtype) if bias else None,
        "w": reference.dequantize_nf4(*storage, n, k, blocksize, dtype),
        "blocksize": blocksize,
    }


def lora_scaling(alpha, r, rslora):
    return alpha / math.sqrt(r) if rslora else alpha / r


def keep_scale(p, m, k, seed=SEED):
    """mask/(1-p) as a float64 [m, k] tensor (ones when p == 0)."""
    if p == 0.0:
        return torch.ones(m, k, dtype=torch.float64)
    return reference.dropout_mask(seed, m, k, p).double() / (1.0 - p)


def torch_forward(x, w, lora_A, lora_B, bias, s, drop):
    """The layer as plain PyTorch ops; run in float64 for the reference, in the input dtype for the ratio rule."""
    u = (x * drop.to(x.dtype)) @ lora_A.t()
    y = x @ w.t() + s * (u @ lora_B.t())
    return y + bias if bias is not None else y


def assert_both_bounds(name, ours, same_dtype, ref64):
    assert_ratio_rule(name, ours, same_dtype, ref64)
    eps = torch.finfo(ours.dtype).eps
    assert rel_err(ours, ref64) <= 2 * eps, f"{name}: err {rel_err(ours, ref64):.3e} > 2·eps = {2 * eps:.3e}"


# ---------------------------------------------------------------------------------------------------------------
# forward and backward against float64
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rslora", [False, True], ids=["alpha_over_r", "rslora"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("p", [0.0, 0.1], ids=["no-dropout", "dropout0.1"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_matches_float64(case, dtype, p, bias, rslora):
    m, n, k, r = case
    c = make_case(m, n, k, r, dtype, seed=seed_of(case, dtype, p, bias, rslora), bias=bias)
    s = lora_scaling(32.0, r, rslora)
    y, u = reference.qlora_linear(c["x"], *c["storage"], c["lora_A"], c["lora_B"], c["bias"], s, p, SEED,
                                  c["blocksize"])
    assert y.dtype == dtype and y.shape == (m, n) and u.dtype == dtype and u.shape == (m, r)

    drop = keep_scale(p, m, k)
    args64 = [t.double() if t is not None else None for t in (c["x"], c["w"], c["lora_A"], c["lora_B"], c["bias"])]
    y64 = torch_forward(*args64, s, drop)
    u64 = (args64[0] * drop) @ args64[2].t()
    args_dtype = (c["x"], c["w"], c["lora_A"], c["lora_B"], c["bias"])
    y_same = torch_forward(*args_dtype, s, drop)
    u_same = (c["x"] * drop.to(dtype)) @ c["lora_A"].t()
    assert_both_bounds("y", y, y_same, y64)
    assert_both_bounds("u", u, u_same, u64)


def grads_of(x, w, lora_A, lora_B, bias, s, drop, dy):
    """(dx, dA, dB) by autograd through torch_forward, in the dtype of the given tensors."""
    x, lora_A, lora_B = (t.detach().clone().requires_grad_() for t in (x, lora_A, lora_B))
    torch_forward(x, w, lora_A, lora_B, bias, s, drop).backward(dy)
    return x.grad, lora_A.grad, lora_B.grad


@pytest.mark.parametrize("rslora", [False, True], ids=["alpha_over_r", "rslora"])
@pytest.mark.parametrize("p", [0.0, 0.1], ids=["no-dropout", "dropout0.1"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_backward_matches_float64_autograd(case, dtype, p, rslora):
    m, n, k, r = case
    c = make_case(m, n, k, r, dtype, seed=seed_of(case, dtype, p, rslora, "bwd"))
    s = lora_scaling(16.0, r, rslora)
    dy = torch.randn(m, n, generator=torch.Generator().manual_seed(m + n)).to(dtype)
    _, u = reference.qlora_linear(c["x"], *c["storage"], c["lora_A"], c["lora_B"], c["bias"], s, p, SEED,
                                  c["blocksize"])
    dx, dA, dB = reference.qlora_linear_backward(dy, c["x"], u, *c["storage"], c["lora_A"], c["lora_B"], s, p,
                                                 SEED, c["blocksize"])
    assert (dx.shape, dA.shape, dB.shape) == ((m, k), (r, k), (n, r))
    assert dx.dtype == dA.dtype == dB.dtype == dtype

    drop = keep_scale(p, m, k)
    tensors = (c["x"], c["w"], c["lora_A"], c["lora_B"], c["bias"])
    ref64 = grads_of(*(t.double() for t in tensors), s, drop, dy.double())
    same = grads_of(*tensors, s, drop, dy)
    for name, ours, same_dtype, exact in zip(("dx", "dA", "dB"), (dx, dA, dB), same, ref64):
        assert_both_bounds(name, ours, same_dtype, exact)


def test_three_d_input_is_flattened_rows():
    # The module flattens [batch, seq, k] to m = batch·seq rows; the math is per row, so the result must equal
    # the float64 layer applied to the 3-D tensor (dropout indexes the flattened rows).
    batch, seq, n, k, r, p, s = 2, 5, 40, 64, 8, 0.2, 2.0
    c = make_case(batch * seq, n, k, r, torch.bfloat16, seed=7)
    x3 = c["x"].view(batch, seq, k)
    y, _ = reference.qlora_linear(x3.reshape(-1, k), *c["storage"], c["lora_A"], c["lora_B"], c["bias"], s, p,
                                  SEED, 64)
    drop3 = keep_scale(p, batch * seq, k).view(batch, seq, k)
    y64 = torch_forward(x3.double(), c["w"].double(), c["lora_A"].double(), c["lora_B"].double(),
                        c["bias"].double(), s, drop3)
    y_same = torch_forward(x3, c["w"], c["lora_A"], c["lora_B"], c["bias"], s, drop3)
    assert_both_bounds("y (3-D)", y.view(batch, seq, n), y_same, y64)


@pytest.mark.parametrize("double_quant,blocksize", [(False, 64), (True, 128), (False, 32)],
                         ids=["no-dq-bs64", "dq-bs128", "no-dq-bs32"])
def test_other_storage_formats(double_quant, blocksize):
    m, n, k, r, s = 9, 24, 128, 8, 2.0
    c = make_case(m, n, k, r, torch.float16, seed=blocksize, double_quant=double_quant, blocksize=blocksize)
    y, _ = reference.qlora_linear(c["x"], *c["storage"], c["lora_A"], c["lora_B"], c["bias"], s, 0.0, SEED,
                                  blocksize)
    tensors = (c["x"], c["w"], c["lora_A"], c["lora_B"], c["bias"])
    drop = keep_scale(0.0, m, k)
    y64 = torch_forward(*(t.double() for t in tensors), s, drop)
    assert_both_bounds("y", y, torch_forward(*tensors, s, drop), y64)


def test_fp32_activations_are_accepted():
    c = make_case(4, 16, 64, 4, torch.float32, seed=3)
    y, u = reference.qlora_linear(c["x"], *c["storage"], c["lora_A"], c["lora_B"], c["bias"], 1.0, 0.0, SEED, 64)
    expected = torch_forward(c["x"], c["w"], c["lora_A"], c["lora_B"], c["bias"], 1.0, keep_scale(0.0, 4, 64))
    torch.testing.assert_close(y, expected)  # fp32 against fp32: default fp32 tolerances (1.3e-6 rel)


def test_non_contiguous_inputs_work():
    m, n, k, r, s, p = 6, 32, 64, 8, 2.0, 0.1
    c = make_case(m, n, k, r, torch.bfloat16, seed=13)
    x_t = c["x"].t().contiguous().t()  # same values, column-major
    A_t = c["lora_A"].t().contiguous().t()
    B_t = c["lora_B"].t().contiguous().t()
    assert not (x_t.is_contiguous() or A_t.is_contiguous() or B_t.is_contiguous())
    y, u = reference.qlora_linear(x_t, *c["storage"], A_t, B_t, c["bias"], s, p, SEED, 64)
    y_c, u_c = reference.qlora_linear(c["x"], *c["storage"], c["lora_A"], c["lora_B"], c["bias"], s, p, SEED, 64)
    # Only the fp32 summation order can differ, which moves a result by at most one bf16 rounding step.
    torch.testing.assert_close(y, y_c)
    torch.testing.assert_close(u, u_c)
    grads = reference.qlora_linear_backward(c["x"].new_ones(m, n).t().contiguous().t(), x_t, u, *c["storage"],
                                            A_t, B_t, s, p, SEED, 64)
    grads_c = reference.qlora_linear_backward(c["x"].new_ones(m, n), c["x"], u_c, *c["storage"], c["lora_A"],
                                              c["lora_B"], s, p, SEED, 64)
    for a, b in zip(grads, grads_c):
        torch.testing.assert_close(a, b)


def test_empty_batch_gives_empty_outputs():
    n, k, r = 24, 64, 8
    c = make_case(0, n, k, r, torch.bfloat16, seed=17)
    y, u = reference.qlora_linear(c["x"], *c["storage"], c["lora_A"], c["lora_B"], c["bias"], 2.0, 0.1, SEED, 64)
    assert y.shape == (0, n) and u.shape == (0, r)
    dx, dA, dB = reference.qlora_linear_backward(torch.empty(0, n, dtype=torch.bfloat16), c["x"], u, *c["storage"],
                                                 c["lora_A"], c["lora_B"], 2.0, 0.1, SEED, 64)
    assert dx.shape == (0, k)
    assert torch.equal(dA, torch.zeros(r, k, dtype=torch.bfloat16))  # a sum over zero rows
    assert torch.equal(dB, torch.zeros(n, r, dtype=torch.bfloat16))


# ---------------------------------------------------------------------------------------------------------------
# dropout mask
# ---------------------------------------------------------------------------------------------------------------
def fmix32_int(h):
    """MurmurHash3 fmix32 on Python ints: an independent oracle for the tensor version's 16-bit splitting."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def hash_int(seed, idx):
    """The mask hash of docs/design.md §3, written directly from its text."""
    key = fmix32_int((seed & 0xFFFFFFFF) ^ fmix32_int((((seed >> 32) & 0xFFFFFFFF) + 0x9E3779B9) & 0xFFFFFFFF))
    return fmix32_int(fmix32_int((idx & 0xFFFFFFFF) ^ key) ^ ((idx >> 32) & 0xFFFFFFFF))


@pytest.mark.parametrize("seed", [0, 1, 42, -1, 2**32 + 5, 2**63 - 1, -(2**63)],
                         ids=["0", "1", "42", "-1", "2^32+5", "int64max", "int64min"])
def test_hash_matches_python_int_oracle(seed):
    # Indices straddle 2^32 so that the high word of the counter takes part.
    idx = [0, 1, 2, 12345, 2**31, 2**32 - 1, 2**32, 2**32 + 7, 2**40 + 3, 2**62]
    ours = reference.dropout_hash(seed, torch.tensor(idx, dtype=torch.int64)).tolist()
    assert ours == [hash_int(seed, i) for i in idx]


def test_mask_is_deterministic_and_seed_dependent():
    m, k, p = 64, 256, 0.3
    a, b = reference.dropout_mask(7, m, k, p), reference.dropout_mask(7, m, k, p)
    assert torch.equal(a, b)
    other = reference.dropout_mask(8, m, k, p)
    # Independent masks differ at a fraction 2p(1-p) = 0.42 of the elements; 6 binomial sigmas around it.
    count = m * k
    differ = (a != other).sum().item()
    q = 2 * p * (1 - p)
    assert abs(differ - count * q) <= 6 * math.sqrt(count * q * (1 - q))


def test_mask_rows_do_not_depend_on_m():
    # Counter-based: the backward (and every kernel tile) regenerates the same bits for a row.
    assert torch.equal(reference.dropout_mask(99, 10, 96, 0.5), reference.dropout_mask(99, 37, 96, 0.5)[:10])


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9], ids=lambda p: f"p{p}")
def test_keep_fraction_is_binomial(p):
    m, k = 256, 512
    kept = reference.dropout_mask(SEED + int(p * 100), m, k, p).sum().item()
    count = m * k
    # kept ~ Binomial(count, 1-p) for a good hash; 6 sigmas fail a correct hash with probability ~2e-9.
    assert abs(kept - count * (1 - p)) <= 6 * math.sqrt(count * p * (1 - p))


def test_zero_p_keeps_everything_and_dropout_is_identity():
    assert bool(reference.dropout_mask(5, 8, 64, 0.0).all())
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    assert reference.dropout(x, 5, 0.0) is x


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_dropout_values(dtype):
    p = 0.3
    x = torch.randn(16, 128, generator=torch.Generator().manual_seed(19)).to(dtype)
    out = reference.dropout(x, SEED, p)
    keep = reference.dropout_mask(SEED, 16, 128, p)
    scale = torch.tensor(1.0 / (1.0 - p), dtype=torch.float32)  # fp32(1/(1-p)), per docs/design.md §3
    assert torch.equal(out[keep], (x.float() * scale).to(dtype)[keep])
    assert bool((out[~keep] == 0).all())


# ---------------------------------------------------------------------------------------------------------------
# bad inputs: each error names the tensor, the expectation and what was found
# ---------------------------------------------------------------------------------------------------------------
def forward_args(c, **override):
    args = {"x": c["x"], "lora_A": c["lora_A"], "lora_B": c["lora_B"], "bias": c["bias"], "dropout_p": 0.0,
            "blocksize": c["blocksize"]}
    args.update(override)
    return (args["x"], *c["storage"], args["lora_A"], args["lora_B"], args["bias"], 2.0, args["dropout_p"], SEED,
            args["blocksize"])


@pytest.fixture
def small_case():
    return make_case(4, 16, 64, 8, torch.bfloat16, seed=23)


@pytest.mark.parametrize("override,error,match", [
    (lambda c: {"lora_A": c["lora_A"].float()}, TypeError, r"lora_A: expected dtype torch.bfloat16, got torch.float32"),
    (lambda c: {"lora_B": c["lora_B"].to("meta")}, ValueError, r"lora_B: expected device cpu .*, got meta"),
    (lambda c: {"lora_A": c["lora_A"][:, :-1]}, ValueError, r"lora_A: expected shape \(8, 64\), got \(8, 63\)"),
    (lambda c: {"lora_B": c["lora_B"][:, :-1]}, ValueError, r"lora_B: expected shape \(16, 8\), got \(16, 7\)"),
    (lambda c: {"bias": c["bias"][:-1]}, ValueError, r"bias: expected shape \(16,\), got \(15,\)"),
    (lambda c: {"x": c["x"].view(2, 2, 64)}, ValueError, r"x: expected a 2-D tensor, got shape \(2, 2, 64\)"),
    (lambda c: {"x": c["x"].to(torch.int32)}, TypeError, r"x: expected dtype in .*, got torch.int32"),
    (lambda c: {"dropout_p": 1.0}, ValueError, r"dropout_p: expected 0 <= p < 1, got 1.0"),
    (lambda c: {"blocksize": 96}, ValueError, r"blocksize: expected one of .*, got 96"),
    (lambda c: {"blocksize": 128}, ValueError, r"absmax: expected shape \(8,\), got \(16,\)"),
], ids=["A-dtype", "B-device", "A-shape", "B-shape", "bias-shape", "x-3d", "x-int", "p-1", "bs-invalid",
        "bs-mismatch"])
def test_forward_rejects_bad_inputs(small_case, override, error, match):
    with pytest.raises(error, match=match):
        reference.qlora_linear(*forward_args(small_case, **override(small_case)))


def test_rank_above_min_n_k_is_rejected():
    c = make_case(4, 8, 64, 8, torch.bfloat16, seed=29)
    lora_A = torch.randn(16, 64).to(torch.bfloat16)
    lora_B = torch.randn(8, 16).to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"r=16 exceeds min\(n, k\)=8"):
        reference.qlora_linear(*forward_args(c, lora_A=lora_A, lora_B=lora_B))


def test_backward_rejects_bad_inputs(small_case):
    c = small_case
    _, u = reference.qlora_linear(*forward_args(c))
    dy = torch.randn(4, 16).to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"dy: expected shape \(4, 16\), got \(4, 15\)"):
        reference.qlora_linear_backward(dy[:, :-1], c["x"], u, *c["storage"], c["lora_A"], c["lora_B"], 2.0, 0.0,
                                        SEED, 64)
    with pytest.raises(TypeError, match=r"u: expected dtype torch.bfloat16, got torch.float32"):
        reference.qlora_linear_backward(dy, c["x"], u.float(), *c["storage"], c["lora_A"], c["lora_B"], 2.0, 0.0,
                                        SEED, 64)


def test_dropout_rejects_bad_p():
    with pytest.raises(ValueError, match=r"dropout_p: expected 0 <= p < 1, got -0.1"):
        reference.dropout_mask(0, 4, 4, -0.1)
