"""QLoRALinear's eager CUDA fast path: one call of the C++ op torch.ops.qlora_ext._linear, whose backward is a C++
autograd node (csrc/qlora_autograd.cpp). It runs the same path ops as the custom op qlora_linear, so the two routes
must agree bit for bit on y and every gradient. The GPU tests skip without a GPU; the path-table tests run on CPU."""
import math

import pytest
import torch

import qlora_ext
from qlora_ext import policy
from qlora_ext.backends import cuda

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# ---- the path table: Python and C++ name the same paths in the same order (CPU) ---------------------------------
def test_path_name_check_rejects_a_different_order():
    """backends/cuda.py checks the C++ table against policy.PATHS at import with this function: _linear takes a
    path as its index, so a reordered table would silently run another path."""
    cuda.check_path_names(policy.PATHS)
    with pytest.raises(RuntimeError, match="C\\+\\+ path table"):
        cuda.check_path_names(tuple(reversed(policy.PATHS)))
    with pytest.raises(RuntimeError, match="C\\+\\+ path table"):
        cuda.check_path_names(policy.PATHS + ("extra",))


def test_cpp_path_table_matches_policy():
    if not cuda.has_cuda_kernels():
        pytest.skip("qlora_ext was built without its CUDA kernels (no _C)")
    assert tuple(torch.ops.qlora_ext._path_names()) == policy.PATHS


def test_cpp_errors_keep_their_numbers():
    """_linear checks its path ids before it touches a tensor, so this runs on the CPU (CI): a C++ error message
    must carry its numbers. Linked with a private static libstdc++ whose data binds to another copy, _C printed
    "bwd_path " with the number dropped (and crashed the process on the GPU machine); csrc/build_flags.txt, ldflags."""
    if not cuda.has_cuda_kernels():
        pytest.skip("qlora_ext was built without its CUDA kernels (no _C)")
    x, lora_A, lora_B = torch.zeros(2, 64), torch.zeros(4, 64), torch.zeros(8, 4)
    args = (x, [None] * 6, lora_A, lora_B, None, 0.5, 0.0, 0)
    with pytest.raises(RuntimeError, match=r'bwd_path 2 \("gemv"\) is forward-only'):
        torch.ops.qlora_ext._linear(*args, 0, policy.PATHS.index("gemv"))
    with pytest.raises(RuntimeError, match=rf"0 <= fwd_path < {len(policy.PATHS)}\), got {len(policy.PATHS)}"):
        torch.ops.qlora_ext._linear(*args, len(policy.PATHS), 0)


@pytest.mark.parametrize("forced,m,expected", [("fused", 7, ("fused", "fused")),
                                               ("decode_gemm", 7, ("decode_gemm", "decode_gemm")),
                                               ("gemv", 7, ("gemv", "fused")), ("gemv", 33, ("fused", "fused"))])
def test_path_ids_follow_the_override(forced, m, expected):
    """The eager path picks both directions at forward time through policy.path_ids; a forced path still decides
    (gemv has no backward: its calls get the fused backward; outside its m range the fused forward)."""
    with policy.override(forced):
        fwd, bwd = policy.path_ids(0, torch.bfloat16, m, 384, 256)
    assert (policy.PATHS[fwd], policy.PATHS[bwd]) == expected


def test_forced_sm90_falls_back_where_it_cannot_serve():
    """sm90 is forward-only and Hopper-only (9.0a build, n % 8 == 0): elsewhere a forced sm90 runs the fused path."""
    with policy.override("sm90"):
        fwd, bwd = policy.path_ids(0, torch.bfloat16, 7, 384, 256)
        assert policy.PATHS[bwd] == "fused"
        assert policy.PATHS[fwd] == ("sm90" if policy.supports("sm90", 7, True, 384, 0) else "fused")
        assert policy.PATHS[policy.path_ids(0, torch.bfloat16, 7, 388, 256)[0]] == "fused"


def test_path_ids_read_the_environment_per_call(monkeypatch):
    monkeypatch.setenv(policy.ENV_VAR, "decode_gemm")
    assert policy.path_ids(0, torch.float16, 64, 384, 256) == (1, 1)
    monkeypatch.setenv(policy.ENV_VAR, "fused")
    assert policy.path_ids(0, torch.float16, 64, 384, 256) == (0, 0)


# ---- the eager route against the custom-op route (GPU) -----------------------------------------------------------
@pytest.fixture
def gpu_kernels(monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (CI has none)")
    if not qlora_ext.has_cuda_kernels():
        pytest.skip("qlora_ext was built without CUDA kernels")
    monkeypatch.delenv("QLORA_EXT_FORCE_REFERENCE", raising=False)
    monkeypatch.delenv(policy.ENV_VAR, raising=False)


def make_layer(k, n, r, dtype, bias, dropout_p, seed=0, adapter_dtype=None):
    """A layer whose adapter term is as large as its base term (lora_B random), in train mode, the bias trainable."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    linear = torch.nn.Linear(k, n, bias=bias, device="cuda", dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, device="cuda", generator=g) / math.sqrt(k))
    layer = qlora_ext.QLoRALinear.from_linear(linear, r=r, lora_dropout=dropout_p).to(adapter_dtype or dtype)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(n, r, device="cuda", generator=g) / math.sqrt(r))
    if bias:
        layer.bias.requires_grad_(True)
    return layer.train()


def has_cpp_node(y):
    """Whether y's graph holds _linear's C++ node (behind the layer's reshape, a view)."""
    node = y.grad_fn
    while node is not None and "QLoRALinearFunction" not in node.name() and node.next_functions:
        node = node.next_functions[0][0]
    return node is not None and "QLoRALinearFunction" in node.name()


def run(layer, x, dy, eager, rng_seed=1234):
    """y and the gradients of x, lora_A, lora_B, bias from one forward + backward, by one route."""
    layer.eager_fast_path = eager
    for p in layer.parameters():
        p.grad = None
    x = x.detach().requires_grad_(x.requires_grad)
    torch.manual_seed(rng_seed)  # the dropout seed is drawn from the CPU generator by both routes
    y = layer(x)
    assert has_cpp_node(y) == (eager and torch.is_grad_enabled())
    if y.requires_grad:
        y.backward(dy)
    bias_grad = layer.bias.grad if layer.bias is not None else None
    return dict(y=y.detach(), dx=x.grad, dA=layer.lora_A.grad, dB=layer.lora_B.grad, dbias=bias_grad)


def assert_same_bits(ours, theirs):
    for name in ours:
        a, b = ours[name], theirs[name]
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == b.dtype and a.shape == b.shape, name
            assert torch.equal(a, b), f"{name}: {(a != b).sum().item()} of {a.numel()} elements differ"


@pytest.mark.parametrize("m", [17, 300])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1], ids=["nodrop", "drop0.1"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("path", policy.PATHS)
def test_eager_matches_custom_op_bitwise(path, dtype, bias, dropout_p, m, gpu_kernels):
    layer = make_layer(256, 384, 16, dtype, bias, dropout_p)
    x = torch.randn(m, 256, device="cuda", dtype=dtype, requires_grad=True)
    dy = torch.randn(m, 384, device="cuda", dtype=dtype)
    with policy.override(path):
        eager, custom = run(layer, x, dy, eager=True), run(layer, x, dy, eager=False)
    assert_same_bits(eager, custom)
    assert (eager["dbias"] is not None) == bias


def test_eager_path_changes_with_the_override(gpu_kernels):
    """Forcing decode_gemm reaches the eager route: its workspace exists after the call (the other paths have none)."""
    layer = make_layer(256, 384, 16, torch.bfloat16, False, 0.0)
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    qlora_ext.release_workspace()
    with policy.override("fused"):
        layer(x).sum().backward()
    assert qlora_ext.workspace_bytes() == 0
    with policy.override("decode_gemm"):
        layer(x).sum().backward()
    assert qlora_ext.workspace_bytes() == 384 * 256 * 2
    qlora_ext.release_workspace()


@pytest.mark.parametrize("path", policy.PATHS)
def test_eager_without_grad(path, gpu_kernels):
    """no_grad and inference_mode build no graph and give the same y as a call that records one; so does a call in
    which nothing requires grad."""
    layer = make_layer(256, 384, 16, torch.bfloat16, True, 0.1)
    x = torch.randn(5, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with policy.override(path):
        torch.manual_seed(7)
        y = layer(x)
        torch.manual_seed(7)
        with torch.no_grad():
            y_no_grad = layer(x)
        torch.manual_seed(7)
        with torch.inference_mode():
            y_inference = layer(x)
        for p in layer.parameters():
            p.requires_grad_(False)
        torch.manual_seed(7)
        y_frozen = layer(x.detach())
    assert y.grad_fn is not None
    for other in (y_no_grad, y_inference, y_frozen):
        assert other.grad_fn is None and not other.requires_grad
        assert torch.equal(other, y.detach())


@pytest.mark.parametrize("path", policy.PATHS)
def test_eager_x_without_requires_grad(path, gpu_kernels):
    """Only the adapters get gradients (dx is not returned for an x that does not need one), as on the custom op."""
    layer = make_layer(256, 384, 16, torch.float16, True, 0.1)
    x = torch.randn(9, 256, device="cuda", dtype=torch.float16)
    dy = torch.randn(9, 384, device="cuda", dtype=torch.float16)
    with policy.override(path):
        eager, custom = run(layer, x, dy, eager=True), run(layer, x, dy, eager=False)
    assert eager["dx"] is None
    assert_same_bits(eager, custom)


def test_eager_frozen_lora_A_and_grad_of_one_input(gpu_kernels):
    layer = make_layer(256, 384, 16, torch.bfloat16, False, 0.0)
    layer.lora_A.requires_grad_(False)
    x = torch.randn(33, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    (dB,) = torch.autograd.grad(y, [layer.lora_B], torch.ones_like(y), retain_graph=True)
    (dx,) = torch.autograd.grad(y, [x], torch.ones_like(y))
    layer.eager_fast_path = False
    y_op = layer(x)
    dB_op, dx_op = torch.autograd.grad(y_op, [layer.lora_B, x], torch.ones_like(y_op))
    assert torch.equal(dB, dB_op) and torch.equal(dx, dx_op)


def test_eager_non_contiguous_input(gpu_kernels):
    """A [b, s, k] slice of a wider tensor flattens to a strided [m, k] view (rows 512 apart): the op makes it
    contiguous, with the same bits as a contiguous input and as the custom op."""
    layer = make_layer(256, 384, 16, torch.bfloat16, True, 0.1)
    x = torch.randn(3, 6, 512, device="cuda", dtype=torch.bfloat16)[..., :256]
    assert not x.reshape(-1, 256).is_contiguous()
    dy = torch.randn(3, 6, 384, device="cuda", dtype=torch.bfloat16)
    eager = run(layer, x.requires_grad_(), dy, eager=True)
    contiguous = run(layer, x.detach().contiguous().requires_grad_(), dy, eager=True)
    custom = run(layer, x, dy, eager=False)
    assert eager["y"].shape == (3, 6, 384) and eager["dx"].shape == (3, 6, 256)
    assert_same_bits(eager, contiguous)
    assert_same_bits(eager, custom)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_eager_autocast_fp32_adapters(dtype, gpu_kernels):
    """fp32 master adapters under autocast: the layer casts them to the autocast dtype; the gradients come back
    fp32 through the casts, with the same bits on both routes."""
    layer = make_layer(256, 384, 16, torch.float32, True, 0.1)
    x = torch.randn(40, 256, device="cuda", requires_grad=True)
    dy = torch.randn(40, 384, device="cuda", dtype=dtype)
    with torch.autocast("cuda", dtype=dtype):
        eager, custom = run(layer, x, dy, eager=True), run(layer, x, dy, eager=False)
    assert eager["y"].dtype == dtype
    assert eager["dA"].dtype == eager["dB"].dtype == eager["dbias"].dtype == eager["dx"].dtype == torch.float32
    assert_same_bits(eager, custom)


def test_compiled_layer_uses_the_custom_op(gpu_kernels):
    """Under torch.compile the layer goes through the custom op (it has fakes; _linear has none): fullgraph traces,
    and the compiled layer gives the eager layer's bits (same kernels)."""
    layer = make_layer(256, 384, 16, torch.bfloat16, False, 0.0)
    x = torch.randn(2, 24, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(2, 24, 384, device="cuda", dtype=torch.bfloat16)
    eager = run(layer, x, dy, eager=True)
    compiled = torch.compile(layer, fullgraph=True)
    y = compiled(x)
    assert y.grad_fn is not None and not has_cpp_node(y)
    for p in layer.parameters():
        p.grad = None
    x.grad = None
    y.backward(dy)
    assert torch.equal(y.detach(), eager["y"])
    assert torch.equal(x.grad, eager["dx"]) and torch.equal(layer.lora_A.grad, eager["dA"])
    assert torch.equal(layer.lora_B.grad, eager["dB"])


def test_small_m_scratch_lives_in_the_workspace(gpu_kernels):
    """The small-m path keeps its split-k partial sums (k split: fewer row tiles than SMs) in the shared workspace
    (counted by workspace_bytes, freed by release_workspace), so from the second call on a call allocates its
    outputs y and u only; the decode + cuBLAS path at small m allocates nothing weight-sized either (s goes on
    the smaller skinny operand)."""
    layer = make_layer(1024, 1024, 64, torch.bfloat16, False, 0.0)  # 64 row tiles < SMs: gemv splits k
    x = torch.randn(4, 1024, device="cuda", dtype=torch.bfloat16)
    block = 512  # the caching allocator's rounding
    y, u = -(-4 * 1024 * 2 // block) * block, -(-4 * 64 * 2 // block) * block
    for path, allowed in (("gemv", y + u), ("decode_gemm", y + 2 * u)):  # decode_gemm: y, u and s·u
        qlora_ext.release_workspace()
        with policy.override(path), torch.no_grad():
            layer(x)
            held = qlora_ext.workspace_bytes()
            assert held > 0
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            layer(x)
            torch.cuda.synchronize()
            assert torch.cuda.max_memory_allocated() - before <= allowed, path
            assert qlora_ext.workspace_bytes() == held
    qlora_ext.release_workspace()
    assert qlora_ext.workspace_bytes() == 0


def test_decode_workspace_grows_and_releases(gpu_kernels):
    """One workspace per (device, dtype), grown to the largest weight decoded, owned by the last stream that used
    it, freed by release_workspace; the public functions are the ones of backends.decode_gemm."""
    from qlora_ext.backends import decode_gemm
    assert qlora_ext.workspace_bytes is decode_gemm.workspace_bytes
    assert qlora_ext.release_workspace is decode_gemm.release_workspace
    small = make_layer(256, 384, 16, torch.bfloat16, False, 0.0)
    large = make_layer(512, 640, 16, torch.bfloat16, False, 0.0)
    x_small = torch.randn(8, 256, device="cuda", dtype=torch.bfloat16)
    x_large = torch.randn(8, 512, device="cuda", dtype=torch.bfloat16)
    qlora_ext.release_workspace()
    assert qlora_ext.workspace_bytes() == 0
    with policy.override("decode_gemm"):
        small(x_small).sum().backward()
        assert qlora_ext.workspace_bytes() == 384 * 256 * 2
        large(x_large).sum().backward()
        assert qlora_ext.workspace_bytes() == 640 * 512 * 2
        small(x_small).sum().backward()  # reuses the larger buffer
        assert qlora_ext.workspace_bytes() == 640 * 512 * 2
        small.half()(x_small.half()).sum().backward()  # another dtype: a buffer of its own
        assert qlora_ext.workspace_bytes() == 640 * 512 * 2 + 384 * 256 * 2
        y_main = large(x_large)
        for _ in range(3):  # streams take the buffer over in turn; none keeps one of its own
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                y_side = large(x_large)
                y_side.sum().backward()
            torch.cuda.current_stream().wait_stream(side)
            assert qlora_ext.workspace_bytes() == 640 * 512 * 2 + 384 * 256 * 2
            y_back = large(x_large)  # back on the current stream, while the side stream's work may still run
            torch.testing.assert_close(y_side, y_main, rtol=0, atol=0)
            torch.testing.assert_close(y_back, y_main, rtol=0, atol=0)
        qlora_ext.release_workspace()
        assert qlora_ext.workspace_bytes() == 0
        large(x_large).sum().backward()  # allocates again
        assert qlora_ext.workspace_bytes() == 640 * 512 * 2
    qlora_ext.release_workspace()


def test_path_ops_reject_a_forward_only_backward_path(gpu_kernels):
    layer = make_layer(256, 384, 16, torch.bfloat16, False, 0.0)
    x = torch.randn(4, 256, device="cuda", dtype=torch.bfloat16)
    args = (x, list(layer.base.op_args()), layer.lora_A.detach(), layer.lora_B.detach(), None, 2.0, 0.0, 0)
    with pytest.raises(RuntimeError, match="forward-only"):
        torch.ops.qlora_ext._linear(*args, 0, policy.PATHS.index("gemv"))
    with pytest.raises(RuntimeError, match="fwd_path must index"):
        torch.ops.qlora_ext._linear(*args, len(policy.PATHS), 0)


def test_kernel_errors_with_numbers_in_the_message_raise(gpu_kernels):
    """A C++ check whose message formats a number (an int, a double) must raise RuntimeError, never crash: with a
    toolchain that links libstdc++ statically into _C, formatting numbers once crashed the process unless _C was
    linked with --exclude-libs (csrc/build_flags.txt, ldflags)."""
    x = torch.randn(4, 256, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"dropout_p must be in \(0, 1\), got 1\.5"):
        torch.ops.qlora_ext._lora_dropout(x, 1.5, 0)
    layer = make_layer(256, 384, 16, torch.bfloat16, False, 0.0)
    lora_A = torch.zeros(200, 256, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"1 <= r <= 128 .*got r = 200"):
        torch.ops.qlora_ext._fused_fwd(x, list(layer.base.op_args()), lora_A, layer.lora_B.detach(), None, 2.0,
                                       0.0, 0)
