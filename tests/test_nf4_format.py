"""The NF4 format is bitsandbytes', byte for byte (CPU; bnb-dependent tests skip when bnb is missing).

Contract (docs/design.md §2): (1) same weights -> same packed codes and fp32 absmax as bnb; (2) given bnb's
quant state, our dequant equals bnb's dequantize_4bit bit for bit (bnb's scalar CPU kernel alone rounds exact fp16
ties away from zero: see assert_dequant_equals_bnb); (3) given the same offset, the same double-quant bytes — with
one documented exception: bnb 0.50.2's CPU backend codes (absmax - offset) through a 65536-bin lookup table that
sometimes picks a non-nearest code, while its CUDA kernel (and our rule) picks the nearest; there we require ours
to be the nearer one (see qlora_ext/reference.py, rule step 8).
"""
import copy
import json

import pytest
import torch

from qlora_ext import reference
from qlora_ext.nf4 import NF4Weight, quantize_nf4

FLOAT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
QUANT_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4")


@pytest.fixture
def bnb():
    return pytest.importorskip("bitsandbytes", reason="bitsandbytes is needed to compare against bnb itself")


@pytest.fixture
def eager_bnb(bnb):
    """bnb wraps its PyTorch fallback dequant (odd k, blocksize >= 2048 on AVX-512) in torch.compile; run it
    eagerly: the same arithmetic without ~10 s of compilation per dtype."""
    with torch.compiler.set_stance("force_eager"):
        yield bnb


def make_weight(n, k, dtype, seed, zero_block=None, blocksize=64):
    """Random weight (std 0.05, like a trained layer) with block `zero_block` (flattened index) set to zero."""
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=gen) * 0.05).to(dtype)
    if zero_block is not None:
        w.view(-1)[zero_block * blocksize:(zero_block + 1) * blocksize] = 0
    return w


def bits(t):
    """Bit pattern of a float tensor, so that -0.0 != +0.0 and NaN payloads count."""
    return t.contiguous().view({4: torch.int32, 2: torch.int16}[t.element_size()])


def bnb_quantize(bnb, w, blocksize, double_quant):
    return bnb.functional.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")


def bnb_dequantize(bnb, packed, state, dtype):
    """bnb's dequantize_4bit to `dtype` (bnb takes the output dtype from the quant state; `state` is left as is)."""
    state = copy.copy(state)
    state.dtype = dtype
    return bnb.functional.dequantize_4bit(packed, state, quant_type="nf4")


def assert_dequant_equals_bnb(bnb, weight, packed, state):
    """Contract (2): our dequant of bnb's (packed, state) equals bnb's dequantize_4bit, on the tensors' device.

    bnb's fp32 output, fp32(code * scale), is the same on every bnb backend, and ours must equal it bit for bit.
    The cast to state.dtype is round-to-nearest-even in ours and in bnb's CUDA kernel, AVX-512 CPU kernel and
    PyTorch path, but bnb 0.50.2's scalar CPU kernel (the one every CUDA build of bnb runs on the CPU, and the CPU
    build runs without AVX-512) converts fp32 -> fp16 by adding half an ulp and truncating: an exact tie goes
    away from zero. So bnb may differ from ours there, and only there; everywhere else, bit for bit."""
    out_dtype = state.dtype
    exact = bnb_dequantize(bnb, packed, state, torch.float32)
    assert torch.equal(bits(weight.dequantize(torch.float32)), bits(exact))
    ours, theirs = weight.dequantize(out_dtype), bnb_dequantize(bnb, packed, state, out_dtype)
    assert ours.dtype == theirs.dtype == out_dtype
    assert torch.equal(bits(ours), bits(exact.to(out_dtype)))  # round to nearest even
    differ = bits(ours) != bits(theirs)
    if differ.any():
        assert out_dtype == torch.float16 and packed.device.type == "cpu", \
            f"bnb differs from ours in {int(differ.sum())} {out_dtype} values on {packed.device}"
        x, mine, other = exact[differ].double(), ours[differ].double(), theirs[differ].double()
        # Exactly midway between our value and bnb's (an fp16 tie; both are then its neighbours), bnb's the larger.
        assert torch.equal(2 * x, mine + other), "bnb differs from ours at values that are not fp16 ties"
        assert (other.abs() > mine.abs()).all(), "bnb rounded an fp16 tie towards zero"


# ---------------------------------------------------------------------------------------------------------------
# codebooks and layout
# ---------------------------------------------------------------------------------------------------------------
def test_codebooks_equal_bnb(bnb):
    assert torch.equal(bits(reference.nf4_code()), bits(bnb.functional.get_4bit_type("nf4", device="cpu")))
    assert torch.equal(bits(reference.dynamic_map_signed()), bits(bnb.functional.create_dynamic_map(signed=True)))


def test_packing_puts_even_element_in_high_nibble():
    # One 32-block [1, -1, 0.5, ...]: 1 -> code 15, -1 -> code 0, so byte 0 must be 0xF0 (element 0 high).
    w = torch.zeros(1, 32)
    w[0, :3] = torch.tensor([1.0, -1.0, 0.5])
    w_nf4, absmax, _, _ = reference.quantize_nf4(w, blocksize=32, double_quant=False)
    assert w_nf4[0].item() == 0xF0
    assert w_nf4[1].item() >> 4 == 12  # 0.5 lies between codes 12 (0.4407) and 13 (0.5626), nearer 12
    assert absmax.tolist() == [1.0]


def test_threshold_ties_take_the_lower_code():
    # A value exactly on the midpoint between two codes must take the lower one (bnb: bucketize / `x > t`).
    code = reference.nf4_code()
    midpoints = (code[:-1] + code[1:]) / 2
    filler = torch.full((16,), 0.3)
    w = torch.cat([torch.ones(1), midpoints, filler]).view(1, 32)  # absmax 1.0, so v == w exactly
    w_nf4, _, _, _ = reference.quantize_nf4(w, blocksize=32, double_quant=False)
    nibbles = torch.stack([w_nf4 >> 4, w_nf4 & 0xF], 1).view(-1)[1:16]
    assert nibbles.tolist() == list(range(15))


# ---------------------------------------------------------------------------------------------------------------
# (1) packed codes and absmax equal bnb's quantize_4bit
# ---------------------------------------------------------------------------------------------------------------
# n*k = 77100 for 257x300: not a multiple of 64*256, so both the last block and the last nested group are partial.
SHAPES = [(128, 64), (33, 77), (257, 300), (64, 4096), (3, 5)]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES.values(), ids=FLOAT_DTYPES.keys())
@pytest.mark.parametrize("blocksize", reference.VALID_BLOCKSIZES, ids=lambda b: f"bs{b}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_codes_and_absmax_equal_bnb(bnb, shape, blocksize, dtype):
    n, k = shape
    zero_block = 1 if n * k >= 3 * blocksize else None  # a deliberate all-zero block where the shape has room
    w = make_weight(n, k, dtype, seed=n * 7919 + k + blocksize, zero_block=zero_block, blocksize=blocksize)
    packed, state = bnb_quantize(bnb, w, blocksize, double_quant=False)
    w_nf4, absmax, nested_absmax, offset = reference.quantize_nf4(w, blocksize, double_quant=False)
    assert nested_absmax is None and offset is None
    assert torch.equal(w_nf4, packed.view(-1))
    assert torch.equal(bits(absmax), bits(state.absmax))


def test_all_zero_partial_last_block_matches_bnb(bnb):
    # bnb stores the clamped absmax fp32(1e-38) for an all-zero *partial* block (and 0 for a full one).
    w = make_weight(5, 30, torch.float32, seed=11)
    w.view(-1)[128:] = 0  # 150 elements, blocksize 64: block 2 = elements 128..149, partial and zero
    packed, state = bnb_quantize(bnb, w, 64, double_quant=False)
    w_nf4, absmax, _, _ = reference.quantize_nf4(w, 64, double_quant=False)
    assert torch.equal(w_nf4, packed.view(-1))
    assert torch.equal(bits(absmax), bits(state.absmax))
    assert absmax[-1].item() > 0  # the clamp floor, not 0


def test_public_quantize_equals_reference():
    w = make_weight(40, 96, torch.bfloat16, seed=3)
    ours = quantize_nf4(w, blocksize=64, double_quant=True)
    ref = reference.quantize_nf4(w, 64, True)
    assert torch.equal(ours.packed.view(-1), ref[0]) and torch.equal(ours.absmax, ref[1])
    assert torch.equal(ours.nested_absmax, ref[2]) and torch.equal(ours.offset, ref[3])
    assert ours.packed.shape == ((40 * 96 + 1) // 2, 1) and ours.shape == (40, 96) and ours.dtype == torch.bfloat16


def test_non_contiguous_weight_quantizes_like_its_contiguous_copy():
    w = make_weight(96, 40, torch.float16, seed=5).t()  # [40, 96] view with strides (1, 40)
    assert not w.is_contiguous()
    a, b = reference.quantize_nf4(w, 64, True), reference.quantize_nf4(w.contiguous(), 64, True)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# ---------------------------------------------------------------------------------------------------------------
# (3) double quant: offset, nested_absmax and nested bytes
# ---------------------------------------------------------------------------------------------------------------
def nested_normalized(absmax_fp32, offset, nested_absmax):
    """(absmax - offset) / nested_absmax per the rule: reciprocal, then multiply (fp32)."""
    group = torch.arange(absmax_fp32.numel()) // reference.NESTED_BLOCKSIZE
    return (absmax_fp32 - offset) * (1.0 / nested_absmax)[group]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES.values(), ids=FLOAT_DTYPES.keys())
@pytest.mark.parametrize("blocksize", [32, 64, 256], ids=lambda b: f"bs{b}")
@pytest.mark.parametrize("shape", [(257, 300), (512, 1024)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_double_quant_equals_bnb_given_same_offset(bnb, shape, blocksize, dtype):
    w = make_weight(*shape, dtype, seed=shape[0] + blocksize, zero_block=2, blocksize=blocksize)
    packed, state = bnb_quantize(bnb, w, blocksize, double_quant=True)
    w_nf4, absmax_q, nested_absmax, offset = reference.quantize_nf4(w, blocksize, double_quant=True)
    assert torch.equal(w_nf4, packed.view(-1))
    assert torch.equal(bits(offset), bits(state.offset))  # same CPU reduction, so the same offset
    assert torch.equal(bits(nested_absmax), bits(state.state2.absmax))

    code = reference.dynamic_map_signed()
    _, absmax_fp32, _, _ = reference.quantize_nf4(w, blocksize, double_quant=False)
    v = nested_normalized(absmax_fp32, offset, nested_absmax).double()
    ours, theirs = absmax_q.long(), state.absmax.long()
    differ = ours != theirs
    # Where bnb CPU's lookup table strays from the nearest code, ours must be at least as near.
    dist_ours, dist_theirs = (v - code.double()[ours]).abs(), (v - code.double()[theirs]).abs()
    assert bool((dist_ours[differ] <= dist_theirs[differ]).all())
    assert differ.float().mean().item() < 0.05, "bnb CPU's table is off for ~1% of values, not more"


def test_nested_code_is_the_nearest_code():
    # Independent oracle: brute-force nearest code in float64 (ties: next test).
    gen = torch.Generator().manual_seed(17)
    v = torch.rand(20000, generator=gen) * 2 - 1
    code = reference.dynamic_map_signed()
    idx = reference.nested_code_index(v, code)
    dist = (v.double().unsqueeze(1) - code.double().unsqueeze(0)).abs()
    best = dist.min(dim=1).values
    assert bool((dist.gather(1, idx.unsqueeze(1)).squeeze(1) == best).all())


def test_nested_code_midpoint_ties_take_the_even_index():
    # bnb CUDA's bisection always ends on an even pivot, and a tie keeps the pivot.
    code = reference.dynamic_map_signed()
    midpoints = (code[:-1] + code[1:]) / 2
    lower = torch.arange(255)
    assert torch.equal(reference.nested_code_index(midpoints, code), lower + lower % 2)


def test_nested_code_extremes():
    code = reference.dynamic_map_signed()
    v = torch.tensor([-1.0, 1.0, 0.0, float("nan")])
    assert reference.nested_code_index(v, code).tolist() == [0, 255, 127, 0]  # NaN: bnb CUDA's code 0


def test_double_quant_dequantizes_close_to_fp32_absmax():
    w = make_weight(300, 256, torch.float32, seed=23)
    _, absmax_q, nested_absmax, offset = reference.quantize_nf4(w, 64, True)
    _, absmax_fp32, _, _ = reference.quantize_nf4(w, 64, False)
    scale = reference.block_scales(absmax_q, nested_absmax, reference.dynamic_map_signed(), offset)
    # Nearest of 256 dynamic codes on [-1, 1]: the top decade has spacing 0.9/64, so the error is below
    # half of that times the group's absmax deviation.
    bound = 0.5 * 0.9 / 64 * nested_absmax.max()
    assert (scale - absmax_fp32).abs().max() <= bound


# ---------------------------------------------------------------------------------------------------------------
# (2) our dequant of bnb's own quant state == bnb's dequantize_4bit, bit for bit
# ---------------------------------------------------------------------------------------------------------------
# bnb 0.50.2's CPU dequant (AVX-512 path) indexes absmax per row as k // blocksize, which is only right when k is a
# multiple of blocksize; we compare there. Odd k goes through bnb's flattened PyTorch path instead (below).
@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES.values(), ids=FLOAT_DTYPES.keys())
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no-dq"])
@pytest.mark.parametrize("shape,blocksize", [((96, 64), 64), ((31, 128), 32), ((40, 4096), 4096), ((300, 1024), 256)],
                         ids=["96x64-bs64", "31x128-bs32", "40x4096-bs4096", "300x1024-bs256"])
def test_dequant_of_bnb_state_equals_bnb(eager_bnb, shape, blocksize, double_quant, out_dtype):
    w = make_weight(*shape, torch.bfloat16, seed=shape[0] + blocksize, zero_block=1, blocksize=blocksize)
    packed, state = bnb_quantize(eager_bnb, w, blocksize, double_quant)
    state.dtype = out_dtype  # bnb dequantizes to quant_state.dtype
    assert_dequant_equals_bnb(eager_bnb, NF4Weight.from_bnb(packed, state), packed, state)


def test_dequant_odd_k_equals_bnb(eager_bnb):
    w = make_weight(33, 77, torch.float16, seed=29)
    packed, state = bnb_quantize(eager_bnb, w, 64, double_quant=True)
    for out_dtype in FLOAT_DTYPES.values():
        state.dtype = out_dtype
        assert_dequant_equals_bnb(eager_bnb, NF4Weight.from_bnb(packed, state), packed, state)


def test_fp16_ties_round_to_even(eager_bnb):
    # Every element an exact fp16 tie: code[15] = 1.0 and code[0] = -1.0, so each row dequantizes to ±its absmax,
    # and these absmax values lie midway between two fp16 numbers (spacing 2^-10 in [1, 2)).
    ulp = 2.0 ** -10
    ties = torch.tensor([1 + ulp / 2, 1 + 3 * ulp / 2, -(1 + ulp / 2), -(1 + 3 * ulp / 2)])
    packed, state = bnb_quantize(eager_bnb, ties[:, None].expand(4, 64).contiguous(), 64, double_quant=False)
    state.dtype = torch.float16
    weight = NF4Weight.from_bnb(packed, state)
    assert weight.dequantize(torch.float16)[:, 0].tolist() == [1.0, 1 + 2 * ulp, -1.0, -(1 + 2 * ulp)]
    assert_dequant_equals_bnb(eager_bnb, weight, packed, state)


def test_all_zero_block_dequantizes_to_positive_zero():
    w = make_weight(4, 64, torch.bfloat16, seed=31, zero_block=2)
    q = quantize_nf4(w, 64, double_quant=False)
    assert torch.equal(bits(q.dequantize()[2]), torch.zeros(64, dtype=torch.int16))


# ---------------------------------------------------------------------------------------------------------------
# state dicts and bnb objects, both ways
# ---------------------------------------------------------------------------------------------------------------
def linear4bit_from_weight(bnb, w, double_quant=True):
    lin = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=False, compress_statistics=double_quant, quant_type="nf4")
    lin.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, compress_statistics=double_quant,
                                   quant_type="nf4", module=lin)
    return lin.to("cpu")  # quantizes


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no-dq"])
def test_our_state_dict_equals_linear4bit_state_dict(bnb, double_quant):
    w = make_weight(64, 128, torch.bfloat16, seed=37)
    ours = quantize_nf4(w, 64, double_quant).state_dict(prefix="weight")
    theirs = linear4bit_from_weight(bnb, w, double_quant).state_dict()
    assert set(ours) == set(theirs)
    expected_keys = {"weight"} | {f"weight.{key}" for key in QUANT_KEYS if double_quant or "nested" not in key}
    assert set(ours) == expected_keys
    meta = json.loads(bytes(ours["weight.quant_state.bitsandbytes__nf4"].tolist()))
    assert meta["shape"] == [64, 128] and meta["dtype"] == "bfloat16" and meta["blocksize"] == 64
    for key in ours:
        if key == "weight.absmax" and double_quant:
            continue  # nested bytes may differ from bnb CPU (module docstring); everything else is identical
        assert ours[key].dtype == theirs[key].dtype and ours[key].shape == theirs[key].shape, key
        assert torch.equal(ours[key], theirs[key]), key


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no-dq"])
def test_our_state_dict_loads_into_linear4bit(bnb, double_quant):
    n, k = 48, 128
    weight = quantize_nf4(make_weight(n, k, torch.bfloat16, seed=41), 64, double_quant)
    sd = weight.state_dict(prefix="weight")
    lin = bnb.nn.Linear4bit(k, n, bias=False, compress_statistics=double_quant, quant_type="nf4")
    # Params4bit.from_prequantized is how transformers loads a bnb-4bit checkpoint into a Linear4bit.
    stats = {key[len("weight."):]: value for key, value in sd.items() if key != "weight"}
    lin.weight = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, device="cpu", module=lin)
    dequant = bnb.functional.dequantize_4bit(lin.weight.data, lin.weight.quant_state, quant_type="nf4")
    assert torch.equal(bits(dequant), bits(weight.dequantize()))
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(43)).to(torch.bfloat16)
    lin.train()  # in eval mode bnb repacks the CPU weight lossily (absmax -> bf16); training mode dequantizes
    assert torch.equal(bits(lin(x)), bits(torch.nn.functional.linear(x, weight.dequantize())))


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no-dq"])
def test_linear4bit_state_dict_loads_as_nf4weight(bnb, double_quant):
    lin = linear4bit_from_weight(bnb, make_weight(80, 192, torch.float16, seed=47), double_quant)
    loaded = NF4Weight.from_state_dict(lin.state_dict(), prefix="weight")
    assert loaded.shape == (80, 192) and loaded.dtype == torch.float16 and loaded.double_quant == double_quant
    assert torch.equal(loaded.packed, lin.weight.data)
    # With double quant, 3 of these 15360 values are exact fp16 ties (bnb's scalar CPU kernel: away from zero).
    assert_dequant_equals_bnb(bnb, loaded, lin.weight.data, lin.weight.quant_state)


def test_state_dict_round_trip_through_safetensors(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch", reason="safetensors is needed for this test")
    weight = quantize_nf4(make_weight(64, 64, torch.float32, seed=53), 64, True)
    path = tmp_path / "w.safetensors"
    safetensors_torch.save_file(weight.state_dict(prefix="layer.weight"), str(path))
    loaded = NF4Weight.from_state_dict(safetensors_torch.load_file(str(path)), prefix="layer.weight")
    assert torch.equal(bits(loaded.dequantize()), bits(weight.dequantize()))
    assert torch.equal(loaded.offset, weight.offset) and loaded.blocksize == weight.blocksize


def test_to_bnb_and_from_bnb_round_trip(bnb):
    weight = quantize_nf4(make_weight(72, 96, torch.bfloat16, seed=59), 32, True)
    packed, state = weight.to_bnb()
    assert torch.equal(bits(bnb.functional.dequantize_4bit(packed, state, quant_type="nf4")),
                       bits(weight.dequantize()))
    back = NF4Weight.from_bnb(packed, state)
    # Same storage for every tensor: no copies and no requantization.
    assert all(a.data_ptr() == b.data_ptr() for a, b in zip(back.op_args(), weight.op_args()))


def test_from_bnb_refuses_cpu_repacked_weight(bnb):
    lin = linear4bit_from_weight(bnb, make_weight(64, 128, torch.bfloat16, seed=61))
    lin.eval()
    with torch.no_grad():
        lin(torch.randn(2, 128).to(torch.bfloat16))  # may repack for the AVX-512 CPU kernel
    if not getattr(lin.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("this CPU has no AVX-512 BF16, so bnb did not repack the weight")
    with pytest.raises(ValueError, match="repacked its weight for CPU"):
        NF4Weight.from_bnb(lin.weight.data, lin.weight.quant_state)


def test_to_device_keeps_dtypes_and_repr():
    weight = quantize_nf4(make_weight(16, 64, torch.float16, seed=67), 64, True)
    moved = weight.to("cpu")
    assert [t.dtype for t in moved.op_args()] == [torch.uint8, torch.uint8, torch.float32, torch.float32,
                                                  torch.float32, torch.float32]
    assert repr(moved) == ("NF4Weight(shape=(16, 64), dtype=torch.float16, blocksize=64, double_quant=True, "
                           "device=cpu)")


# ---------------------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_weight_is_rejected(bad):
    w = make_weight(8, 64, torch.bfloat16, seed=71)
    w[3, 5] = bad
    w[7, 0] = bad
    with pytest.raises(ValueError, match=r"w: expected finite values, found 2 non-finite"):
        quantize_nf4(w)


@pytest.mark.parametrize("blocksize", [0, 16, 48, 8192], ids=lambda b: f"bs{b}")
def test_bad_blocksize_is_rejected(blocksize):
    with pytest.raises(ValueError, match=rf"blocksize: expected one of .*, got {blocksize}"):
        quantize_nf4(make_weight(8, 64, torch.float32, seed=73), blocksize=blocksize)


def test_bad_weight_rank_and_dtype_are_rejected():
    with pytest.raises(ValueError, match=r"w: expected a 2-D tensor, got shape \(512,\)"):
        quantize_nf4(torch.randn(512))
    with pytest.raises(TypeError, match=r"w: expected dtype in .*, got torch.int32"):
        quantize_nf4(torch.ones(8, 64, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"w: expected a non-empty weight"):
        quantize_nf4(torch.empty(0, 64))


def test_bad_storage_is_rejected():
    weight = quantize_nf4(make_weight(8, 64, torch.float32, seed=79), 64, True)
    with pytest.raises(ValueError, match=r"w_nf4: expected shape \(256,\), got \(255,\)"):
        reference.dequantize_nf4(weight.packed.view(-1)[:-1], *weight.op_args()[1:], 8, 64, 64, torch.float32)
    with pytest.raises(ValueError, match=r"expected all three .* or none"):
        reference.dequantize_nf4(*weight.op_args()[:5], None, 8, 64, 64, torch.float32)
    with pytest.raises(TypeError, match=r"absmax: expected dtype torch.float32, got torch.uint8"):
        reference.dequantize_nf4(*weight.op_args()[:3], None, None, None, 8, 64, 64, torch.float32)
    with pytest.raises(ValueError, match=r"packed: expected shape \(256, 1\)"):
        NF4Weight(weight.packed.view(-1), *weight.op_args()[1:], (8, 64), torch.float32, 64)


def test_bad_state_dict_is_rejected():
    sd = quantize_nf4(make_weight(8, 64, torch.float32, seed=83), 64, False).state_dict()
    with pytest.raises(KeyError, match="quant_state.bitsandbytes__nf4: missing"):
        NF4Weight.from_state_dict({k: v for k, v in sd.items() if "quant_state" not in k})
    meta = json.loads(bytes(sd["weight.quant_state.bitsandbytes__nf4"].tolist()))
    meta["quant_type"] = "fp4"
    sd["weight.quant_state.bitsandbytes__nf4"] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    with pytest.raises(ValueError, match="expected quant_type 'nf4', got 'fp4'"):
        NF4Weight.from_state_dict(sd)
