"""Op registration (opcheck: schema, fake/meta, autograd registration) and the autograd formula, on CPU."""
import pytest
import torch

import qlora_ext
from qlora_ext import policy
from qlora_ext import reference
from qlora_ext.nf4 import quantize_nf4

ops = torch.ops.qlora_ext


def make_inputs(m=9, k=128, n=96, r=8, dtype=torch.float32, bias=True, dropout_p=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    wq = quantize_nf4(torch.randn(n, k, generator=g).to(dtype))
    x = torch.randn(m, k, generator=g).to(dtype)
    lora_A = (torch.randn(r, k, generator=g) / k ** 0.5).to(dtype)
    lora_B = torch.randn(n, r, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return x, wq, lora_A, lora_B, b, torch.tensor(1234, dtype=torch.int64)


@pytest.mark.parametrize("dropout_p", [0.0, 0.2], ids=["nodrop", "drop0.2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_opcheck_linear_ops(dtype, dropout_p):
    x, wq, lora_A, lora_B, b, seed = make_inputs(dtype=dtype, dropout_p=dropout_p)
    fwd_args = (x.requires_grad_(), *wq.op_args(), lora_A.requires_grad_(), lora_B.requires_grad_(), b, 2.0,
                dropout_p, seed, 64)
    torch.library.opcheck(ops.qlora_linear, fwd_args)
    y, u = ops.qlora_linear(*fwd_args)
    dy = torch.randn_like(y)
    torch.library.opcheck(ops.qlora_linear_backward, (dy, x.detach(), u.detach(), *wq.op_args(), lora_A.detach(),
                                                      lora_B.detach(), 2.0, dropout_p, seed, 64))


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "nodq"])
def test_opcheck_quant_ops(double_quant):
    w = torch.randn(96, 128)
    torch.library.opcheck(ops.quantize_nf4, (w, 64, double_quant))
    wq = quantize_nf4(w, double_quant=double_quant)
    torch.library.opcheck(ops.dequantize_nf4, (*wq.op_args(), 96, 128, 64, torch.bfloat16))


@pytest.mark.parametrize("dropout_p", [0.0, 0.3], ids=["nodrop", "drop0.3"])
def test_autograd_uses_the_backward_op(dropout_p):
    """Gradients through the registered autograd equal reference.qlora_linear_backward (same dtype, same seed),
    and the frozen base gets none."""
    x, wq, lora_A, lora_B, b, seed = make_inputs(dropout_p=dropout_p)
    x.requires_grad_(); lora_A.requires_grad_(); lora_B.requires_grad_()
    y, u = ops.qlora_linear(x, *wq.op_args(), lora_A, lora_B, b, 2.0, dropout_p, seed, 64)
    dy = torch.randn_like(y)
    y.backward(dy)
    dx, dA, dB = reference.qlora_linear_backward(dy, x.detach(), u.detach(), *wq.op_args(), lora_A.detach(),
                                                 lora_B.detach(), 2.0, dropout_p, int(seed), 64)
    torch.testing.assert_close(x.grad, dx, rtol=0, atol=0)
    torch.testing.assert_close(lora_A.grad, dA, rtol=0, atol=0)
    torch.testing.assert_close(lora_B.grad, dB, rtol=0, atol=0)
    assert not u.requires_grad, "u is an auxiliary output and must not carry gradients"


def test_trainable_bias_gets_its_gradient():
    x, wq, lora_A, lora_B, b, seed = make_inputs()
    b.requires_grad_()
    y, _ = ops.qlora_linear(x, *wq.op_args(), lora_A, lora_B, b, 2.0, 0.0, seed, 64)
    dy = torch.randn_like(y)
    y.backward(dy)
    torch.testing.assert_close(b.grad, dy.sum(0))


def test_compiled_module_has_no_graph_breaks():
    """torch.compile(fullgraph=True) traces through QLoRALinear (custom ops with fakes, no Python fallbacks);
    the 'eager' backend checks tracing alone, with no C++ compiler needed."""
    layer = qlora_ext.QLoRALinear.from_linear(torch.nn.Linear(128, 64), r=4, lora_dropout=0.1)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 5, 128, requires_grad=True)
    compiled(x).sum().backward()
    assert layer.lora_A.grad is not None and x.grad is not None


def test_forced_path_rejects_an_unknown_choice(monkeypatch):
    """QLORA_EXT_PATH is read per call; a typo must fail loudly instead of silently picking a path."""
    monkeypatch.setenv("QLORA_EXT_PATH", "cutlass")
    with pytest.raises(ValueError, match="QLORA_EXT_PATH must be one of"):
        policy.forced_path()
    with pytest.raises(ValueError, match="override: path must be one of"):
        with policy.override("cutlass"):
            pass


@pytest.mark.parametrize("m,forward,expected", [(1, True, True), (32, True, True), (33, True, False),
                                                (16, False, False)],
                         ids=["m1-fwd", "m32-fwd", "m33-fwd", "m16-bwd"])
def test_gemv_serves_only_small_m_forward(m, forward, expected):
    assert policy.supports("gemv", m, forward, 384) is expected
    assert policy.supports("fused", m, forward, 384) and policy.supports("decode_gemm", m, forward, 384)


def test_sm90_serves_only_the_forward_with_n_a_multiple_of_8():
    assert not policy.supports("sm90", 4096, False, 4096)  # forward only
    assert not policy.supports("sm90", 4096, True, 4100)  # TMA rows of y
    hopper = (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
              and torch._C._dispatch_has_kernel_for_dispatch_key("qlora_ext::_sm90_fwd", "CUDA"))
    assert policy.supports("sm90", 4096, True, 4096) is hopper


def test_override_beats_the_environment_and_restores(monkeypatch):
    monkeypatch.setenv("QLORA_EXT_PATH", "decode_gemm")
    assert policy.forced_path() == "decode_gemm"
    with policy.override("gemv"):
        assert policy.forced_path() == "gemv"
        with policy.override("auto"):
            assert policy.forced_path() is None
    assert policy.forced_path() == "decode_gemm"


def test_policy_table_is_valid_and_covers_every_shape_class():
    """Every rule names known paths (validated on load) and, for the fallback cc "*" and each measured cc, every
    shape class has an open-ended rule, so no (cc, shape, m) key can miss the table."""
    rules = policy.table()
    for cc in {r.cc for r in rules}:
        for cls in ("small", "expand", "reduce"):
            assert any(r.cc == cc and r.shape_class == cls and r.m_max is None for r in rules), (cc, cls)


@pytest.mark.parametrize("n,k,expected", [(4096, 4096, "small"), (1024, 4096, "small"), (14336, 4096, "expand"),
                                          (4096, 14336, "reduce"), (8192, 8192, "expand"), (8192, 28672, "reduce")])
def test_shape_classes_of_the_llama_layers(n, k, expected):
    assert policy.shape_class(n, k) == expected


def test_backward_under_autocast_keeps_the_ops_dtype_rules():
    """A backward run inside an autocast region (a common training-loop mistake) must not re-cast the op's
    internal fp32 matmuls: the gradients equal those of a backward outside autocast, bit for bit."""
    x, wq, lora_A, lora_B, b, seed = make_inputs(dtype=torch.float32, bias=False)
    lora_A.requires_grad_()
    grads = []
    for use_autocast in (False, True):
        lora_A.grad = None
        y, _ = ops.qlora_linear(x, *wq.op_args(), lora_A, lora_B, None, 2.0, 0.0, seed, 64)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_autocast):
            y.backward(torch.ones_like(y))
        grads.append(lora_A.grad.clone())
    assert torch.equal(grads[0], grads[1])
