"""QLoRALinear on CPU: init equals the base, training touches only the adapter, merge, state dict, bad inputs."""
import math

import pytest
import torch
from torch import nn

import qlora_ext
from qlora_ext import QLoRALinear


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
    x = torch.randn(128, 6).T  # [6, 128], column-major
    torch.testing.assert_close(layer(x), layer(x.contiguous()), rtol=0, atol=0)


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
