"""QLoRALinear on CPU: init equals the base, training touches only the adapter, merge, state dict, autocast, bad
inputs."""
import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import qlora_ext
from conftest import assert_ratio_rule, requires_cuda
from qlora_ext import QLoRALinear, quantize_nf4

EPS32 = 2.0**-24  # fp32 unit roundoff


def make_layer(k=128, n=96, r=8, bias=True, dtype=torch.float32, **kwargs):
    torch.manual_seed(0)
    return QLoRALinear.from_linear(nn.Linear(k, n, bias=bias, dtype=dtype), r=r, **kwargs)


def test_equals_base_at_init():
    layer = make_layer()
    x = torch.randn(4, 7, 128)
    base = x @ layer.dequantize(torch.float32).T + layer.bias
    torch.testing.assert_close(layer(x), base, rtol=1e-6, atol=1e-6)
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0


def test_training_changes_only_the_adapter():
    layer = make_layer()
    target = nn.Linear(128, 96)
    packed, absmax, bias = layer.weight_nf4.packed.clone(), layer.weight_nf4.absmax.clone(), layer.bias.clone()
    params = [p for p in layer.parameters() if p.requires_grad]
    assert {id(p) for p in params} == {id(layer.lora_A), id(layer.lora_B)}
    opt = torch.optim.Adam(params, lr=1e-2)
    x = torch.randn(64, 128)
    losses = []
    for _ in range(20):
        loss = nn.functional.mse_loss(layer(x), target(x).detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    assert torch.equal(layer.weight_nf4.packed, packed) and torch.equal(layer.weight_nf4.absmax, absmax)
    assert torch.equal(layer.bias, bias) and layer.bias.grad is None
    assert torch.count_nonzero(layer.lora_B) > 0


@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
def test_merge_matches_forward(use_rslora):
    layer = make_layer(use_rslora=use_rslora, lora_alpha=16)
    assert layer.scaling == (16 / math.sqrt(8) if use_rslora else 16 / 8)
    with torch.no_grad():
        layer.lora_B.normal_()
    merged = layer.merge()
    assert isinstance(merged, nn.Linear)
    x = torch.randn(5, 128)
    torch.testing.assert_close(merged(x), layer(x), rtol=1e-5, atol=1e-5)


def test_state_dict_round_trip_uses_bnb_keys():
    layer = make_layer()
    with torch.no_grad():
        layer.lora_B.normal_()
    sd = layer.state_dict()
    assert {"weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
            "weight.quant_state.bitsandbytes__nf4", "lora_A", "lora_B", "bias"} <= set(sd)
    other = make_layer()
    with torch.no_grad():
        other.lora_A.zero_()
    other.load_state_dict(sd)
    x = torch.randn(3, 128)
    torch.testing.assert_close(other(x), layer(x), rtol=0, atol=0)


def test_half_keeps_nf4_constants():
    layer = make_layer().to(torch.bfloat16)
    assert layer.weight_nf4.packed.dtype == torch.uint8 and layer.weight_nf4.code.dtype == torch.float32
    assert layer.lora_A.dtype == torch.bfloat16
    assert layer(torch.randn(2, 128, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("storage_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("double_quant", [True, False])
def test_storage_dtype_holds_the_same_bytes(storage_dtype, double_quant):
    # n*k odd-sized rows: 96 x 130 would not take k % 64, so 1-byte rows padded to 2/4-byte elements come from an
    # odd number of blocks (n*k/64 = 3 * 65 = 195 with double quant's uint8 absmax).
    layer = make_layer(k=192, n=65, double_quant=double_quant)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 192)
    expected, sd = layer(x), layer.state_dict()
    before = [None if t is None else t.clone() for t in layer.base.op_args()]
    qlora_ext.distributed.set_storage_dtype(layer, storage_dtype)
    assert {p.dtype for p in layer.base.parameters()} == {storage_dtype}
    after = layer.base.op_args()
    for b, a in zip(before, after):
        assert (a is None) == (b is None) and (a is None or (a.dtype == b.dtype and torch.equal(a, b)))
    assert torch.equal(layer(x), expected)
    assert all(torch.equal(sd[key], value) for key, value in layer.state_dict().items())
    halved = copy.deepcopy(layer).half()  # model-level casts leave the storage (now floating) alone
    assert {p.dtype for p in halved.base.parameters()} == {storage_dtype}
    qlora_ext.distributed.set_storage_dtype(layer, torch.uint8)
    assert torch.equal(layer(x), expected)


def test_a_cast_storage_is_refused_with_the_fix():
    layer = make_layer()
    qlora_ext.distributed.set_storage_dtype(layer, torch.bfloat16)
    layer.base.w_nf4.data = layer.base.w_nf4.data.half()  # what a policy of another param_dtype would do
    with pytest.raises(RuntimeError, match="set_storage_dtype"):
        layer(torch.randn(2, 128))
    with pytest.raises(ValueError, match="storage dtype"):
        layer.base.set_storage_dtype(torch.int32)


def test_extra_repr_names_the_configuration():
    text = repr(make_layer(lora_dropout=0.05))
    for part in ("in_features=128", "out_features=96", "r=8", "lora_dropout=0.05", "NF4(blocksize=64"):
        assert part in text


# ---- bad inputs ----------------------------------------------------------------------------------------------
def test_rank_larger_than_matrix_names_the_limit():
    with pytest.raises(ValueError, match=r"r=200 exceeds min\(n, k\)=96"):
        make_layer(r=200)


def test_wrong_input_width():
    with pytest.raises(ValueError, match="last dim k=128"):
        make_layer()(torch.randn(3, 127))


def test_wrong_input_dtype():
    with pytest.raises((TypeError, ValueError, RuntimeError), match="(?i)dtype"):
        make_layer()(torch.randint(0, 5, (3, 128)))


def test_device_mismatch():
    with pytest.raises((ValueError, RuntimeError), match="(?i)device"):
        make_layer()(torch.randn(3, 128, device="meta"))


def test_non_contiguous_input_works():
    layer = make_layer()
    with torch.no_grad():
        layer.lora_B.normal_()  # B = 0 would leave the adapter path out of the comparison
    x = torch.randn(128, 6).T  # [6, 128], column-major
    assert not x.is_contiguous()
    y_t, y_c = layer(x).double(), layer(x.contiguous()).double()
    # Exact equality is not what the math guarantees: for a transposed operand BLAS may take another kernel, with
    # another order of summation over k (and another split across threads). What any order guarantees: a sum of
    # n fp32 products lies within γ_n·Σ|terms| of the exact sum (γ_n ≈ n·u, u = 2⁻²⁴). y = x·wᵀ + s·(x·Aᵀ)·Bᵀ +
    # bias sums k products in x·wᵀ and k then r in the adapter term, plus 3 roundings where they are added and
    # scaled, so each result is within (k + r + 3)·u·M of the exact y, M = |x|·|w|ᵀ + s·(|x|·|A|ᵀ)·|B|ᵀ + |bias|,
    # and two results within twice that.
    x64, w64 = x.double(), layer.dequantize(torch.float32).double()
    A64, B64 = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    M = x64.abs() @ w64.abs().T + layer.scaling * (x64.abs() @ A64.abs().T) @ B64.abs().T + layer.bias.double().abs()
    bound = 2 * (layer.in_features + layer.r + 3) * EPS32 * M
    assert ((y_t - y_c).abs() <= bound).all(), f"max excess {((y_t - y_c).abs() - bound).max().item():.3e}"


def test_empty_batch():
    layer = make_layer()
    x = torch.randn(0, 128, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 96)
    y.sum().backward()
    assert x.grad.shape == (0, 128) and torch.count_nonzero(layer.lora_A.grad) == 0


def test_not_a_linear():
    with pytest.raises(TypeError, match="nn.Linear"):
        QLoRALinear.from_linear(nn.Conv1d(3, 3, 1))


def test_from_bnb_takes_the_bytes_as_they_are():
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes not importable")
    torch.manual_seed(0)
    linear = nn.Linear(128, 96, dtype=torch.bfloat16)
    l4 = bnb.nn.Linear4bit(128, 96, compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True)
    l4.load_state_dict(linear.state_dict())
    l4 = l4.to("cpu")
    if getattr(l4.weight, "quant_state", None) is None:
        pytest.skip("this bitsandbytes build does not quantize Linear4bit on CPU")
    layer = QLoRALinear.from_bnb(l4, r=4)
    assert torch.equal(layer.weight_nf4.packed.reshape(-1), l4.weight.data.reshape(-1))
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    # Same dequantized bf16 weight on both sides (B = 0); only the bf16 matmul paths differ, whose rounding is
    # a few bf16 ulps (2^-8 relative) of outputs of size ~1.
    torch.testing.assert_close(layer(x), l4(x), rtol=2e-2, atol=2e-2)


# ---- autocast ------------------------------------------------------------------------------------------------
def randomized_layer(device, k=128, n=96, r=8):
    """An fp32 layer (fp32 master adapters) with a nonzero lora_B, so that the adapter path is part of every check."""
    layer = QLoRALinear.from_linear(nn.Linear(k, n, device=device), r=r)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.1)
    return layer


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_autocast_computes_in_the_autocast_dtype_like_nn_linear(device):
    linear = nn.Linear(128, 96, device=device)
    layer = QLoRALinear.from_linear(linear, r=8)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.1)
    x = torch.randn(5, 7, 128, device=device)  # fp32 activations, as autocast sees them from fp32 layers
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        y, y_linear = layer(x), linear(x)
    assert y.dtype == y_linear.dtype == torch.bfloat16
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32  # the master weights are not touched
    # Exactly the op on inputs cast to bf16, run outside autocast: the layer casts, and autocast does not reach
    # into the op (its fp32 accumulation is the spec, which autocast would turn into bf16 matmuls).
    bf16 = lambda t: t.detach().to(torch.bfloat16)
    expected, _ = torch.ops.qlora_ext.qlora_linear(
        bf16(x).reshape(-1, 128), *layer.weight_nf4.op_args(), bf16(layer.lora_A), bf16(layer.lora_B),
        bf16(layer.bias), layer.scaling, 0.0, torch.zeros((), dtype=torch.int64), layer.weight_nf4.blocksize)
    assert torch.equal(y.reshape(-1, 96), expected)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_autocast_gradients_reach_the_fp32_adapters(device):
    layer = randomized_layer(device)
    x = torch.randn(64, 128, device=device)
    dy = torch.randn(64, 96, device=device).bfloat16().float()  # exactly representable in bf16: no input error
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        y = layer(x)
    y.backward(dy.bfloat16())  # outside autocast, as training loops do
    assert y.dtype == torch.bfloat16
    assert layer.lora_A.grad.dtype == layer.lora_B.grad.dtype == torch.float32

    # The same step by hand in bf16 PyTorch ops, the adapters cast from fp32 masters as autocast casts a weight.
    w = layer.dequantize(torch.float32)  # exact
    A = layer.lora_A.detach().clone().requires_grad_(True)
    B = layer.lora_B.detach().clone().requires_grad_(True)
    xb = x.bfloat16()
    y_bf16 = xb @ w.bfloat16().T + layer.scaling * ((xb @ A.bfloat16().T) @ B.bfloat16().T) + layer.bias.bfloat16()
    y_bf16.backward(dy.bfloat16())
    # fp64 reference: what autocast approximates, the fp32 layer's math, computed exactly.
    A64 = layer.lora_A.detach().double().requires_grad_(True)
    B64 = layer.lora_B.detach().double().requires_grad_(True)
    x64 = x.double()
    y64 = x64 @ w.double().T + layer.scaling * ((x64 @ A64.T) @ B64.T) + layer.bias.double()
    y64.backward(dy.double())
    # Ratio rule (conftest): both round x and the adapters to bf16 and accumulate in fp32, so ours may not be
    # worse than twice the plain bf16 computation.
    assert_ratio_rule("y", y, y_bf16, y64)
    assert_ratio_rule("dA", layer.lora_A.grad, A.grad, A64.grad)
    assert_ratio_rule("dB", layer.lora_B.grad, B.grad, B64.grad)


def test_no_autocast_keeps_the_input_dtype():
    layer = randomized_layer("cpu")
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=False):
        assert layer(torch.randn(3, 128)).dtype == torch.float32


# ---- misleading messages and sharp edges ----------------------------------------------------------------------
def test_numpy_input_is_refused_as_not_a_tensor():
    with pytest.raises(TypeError, match="input must be a torch.Tensor, got ndarray"):
        make_layer()(np.random.randn(3, 128).astype(np.float32))


def test_zero_dim_input_names_the_expected_shape():
    with pytest.raises(ValueError, match=r"at least 1 dim and last dim k=128 \(in_features\), got shape \(\)"):
        make_layer()(torch.randn(()))


def test_one_dim_input_works():
    layer = make_layer()
    x = torch.randn(128)
    torch.testing.assert_close(layer(x), layer(x[None])[0], rtol=0, atol=0)  # the same single row


@pytest.mark.parametrize("r", [True, 0, -2, 2.0, "4"])
def test_rank_must_be_a_positive_int(r):
    with pytest.raises(ValueError, match=r"r \(the adapter rank\) must be a positive int, got"):
        make_layer(r=r)


def test_numpy_integer_rank_is_accepted():
    assert make_layer(r=np.int64(4)).r == 4


def test_quantize_nf4_of_a_parameter_is_detached():
    linear = nn.Linear(128, 96)
    weight_nf4 = quantize_nf4(linear.weight)  # a Parameter, requires_grad=True
    assert not any(t.requires_grad for t in weight_nf4.op_args() if t is not None)
    layer = QLoRALinear(weight_nf4, r=4)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer(torch.randn(3, 128)).square().sum().backward()
    assert layer.lora_A.grad is not None and linear.weight.grad is None
    clone = copy.deepcopy(layer)
    assert torch.equal(clone.weight_nf4.packed, layer.weight_nf4.packed)


def test_nf4_weight_to_a_dtype_says_where_the_dtype_goes():
    weight_nf4 = quantize_nf4(torch.randn(96, 128))
    with pytest.raises(TypeError, match=r"NF4Weight.to takes a device, got the dtype torch.float16.*dequantize"):
        weight_nf4.to(torch.float16)
    assert weight_nf4.to("cpu").packed.dtype == torch.uint8


def test_strict_load_reports_an_unknown_weight_key():
    layer = make_layer()
    sd = layer.state_dict()
    sd["weight.not_a_quant_key"] = torch.zeros(3)
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "weight.not_a_quant_key"'):
        make_layer().load_state_dict(sd)
    result = make_layer().load_state_dict(sd, strict=False)
    assert result.unexpected_keys == ["weight.not_a_quant_key"] and result.missing_keys == []
