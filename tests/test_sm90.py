"""The Hopper forward op torch.ops.qlora_ext._sm90_fwd (csrc/qlora_fwd_sm90.cu) against its twin,
qlora_ext.reference.qlora_linear, under the ratio rule of tests/conftest.py: the op's error against an fp64 truth may
be at most 2x the error of the reference computed in the same dtype (+1e-6).

Skips unless a compute capability 9.0 GPU is visible and the library was built with its sm_90a unit (TORCH_CUDA_ARCH_LIST
containing 9.0a). Every case draws fresh random inputs and, before the call, fills freed cached blocks of the outputs'
sizes with NaN, so an element the op forgot to write fails the rule. Both tiles and both weight layouts are selected
through the op's environment overrides (QLORA_EXT_SM90_TILE, QLORA_EXT_SM90_WLAYOUT)."""
import math
import zlib

import pytest
import torch

import qlora_ext
from qlora_ext import reference
from qlora_ext.nf4 import quantize_nf4

from conftest import assert_ratio_rule

ops = torch.ops.qlora_ext
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
TILES = ("128x256", "128x128")
WLAYOUTS = ("stored", "repacked")


def _why_skip():
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (CI has none)"
    if torch.cuda.get_device_capability() != (9, 0):
        return f"needs a compute capability 9.0 GPU (H100/H200), this one is {torch.cuda.get_device_capability()}"
    if not qlora_ext.has_cuda_kernels():
        return "qlora_ext was built without CUDA kernels"
    try:
        has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key("qlora_ext::_sm90_fwd", "CUDA")
    except RuntimeError:
        has_kernel = False
    if not has_kernel:
        return "qlora_ext._C has no CUDA kernel for _sm90_fwd (build with 9.0a in TORCH_CUDA_ARCH_LIST)"
    return None


_SKIP = _why_skip()
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")


@pytest.fixture
def variant(monkeypatch):
    """Select the GEMM tile and weight layout of the op for one test: variant(tile, wlayout)."""
    def select(tile, wlayout):
        monkeypatch.setenv("QLORA_EXT_SM90_TILE", tile)
        monkeypatch.setenv("QLORA_EXT_SM90_WLAYOUT", wlayout)
    return select


def poison_allocator(*shapes_dtypes):
    """Fill freshly freed cached blocks of the coming outputs' sizes with NaN (the caching allocator hands the next
    allocation of the same size the block just freed), so unwritten output elements read back as NaN."""
    blocks = [torch.full(shape, float("nan"), dtype=dtype, device="cuda") for shape, dtype in shapes_dtypes]
    del blocks


def make_case(m, k, n, r, dtype, bias, dropout_p, double_quant, gen_seed):
    """A random layer whose base and LoRA terms are of comparable size, so an error in either shows."""
    g = torch.Generator(device="cuda").manual_seed(gen_seed)
    w = torch.randn(n, k, device="cuda", generator=g) / math.sqrt(k)
    return dict(
        x=torch.randn(m, k, device="cuda", generator=g).to(dtype),
        wq=quantize_nf4(w.to(dtype), double_quant=double_quant),
        lora_A=(torch.randn(r, k, device="cuda", generator=g) / math.sqrt(k)).to(dtype),
        lora_B=(torch.randn(n, r, device="cuda", generator=g) / math.sqrt(r)).to(dtype),
        bias=torch.randn(n, device="cuda", generator=g).to(dtype) if bias else None,
        scaling=2.0, dropout_p=dropout_p, seed=int(torch.randint(0, 2**40, (1,), generator=g, device="cuda")),
    )


def run_sm90(c):
    m, n, r = c["x"].shape[0], c["lora_B"].shape[0], c["lora_A"].shape[0]
    poison_allocator(((m, n), c["x"].dtype), ((m, r), c["x"].dtype))
    y, u = ops._sm90_fwd(c["x"], list(c["wq"].op_args()), c["lora_A"], c["lora_B"], c["bias"], c["scaling"],
                         c["dropout_p"], c["seed"])
    torch.cuda.synchronize()
    return y, u


def run_reference(c):
    return reference.qlora_linear(c["x"], *c["wq"].op_args(), c["lora_A"], c["lora_B"], c["bias"], c["scaling"],
                                  c["dropout_p"], c["seed"], 64)


def fp64_forward(c):
    """y and u of docs/design.md §1 in float64, from the same (rounded) inputs and the exact fp32 weight."""
    x = c["x"].double()
    w = c["wq"].dequantize(torch.float32).double()
    A, B, s = c["lora_A"].double(), c["lora_B"].double(), c["scaling"]
    m, k = x.shape
    if c["dropout_p"] > 0:
        keep = reference.dropout_mask(c["seed"], m, k, c["dropout_p"], x.device).double() / (1 - c["dropout_p"])
        xd = x * keep
    else:
        xd = x
    u = xd @ A.T
    y = x @ w.T + s * (u @ B.T) + (c["bias"].double() if c["bias"] is not None else 0)
    return y, u


def check_case(c):
    y, u = run_sm90(c)
    y_ref, u_ref = run_reference(c)
    y64, u64 = fp64_forward(c)
    assert y.dtype == u.dtype == c["x"].dtype
    assert y.is_contiguous() and u.is_contiguous()
    assert_ratio_rule("u", u, u_ref, u64)
    assert_ratio_rule("y", y, y_ref, y64)
    if c["dropout_p"] == 0:  # u is exactly cuBLAS's x·lora_Aᵀ
        assert torch.equal(u, torch.mm(c["x"], c["lora_A"].t())), "u differs from torch.mm(x, lora_A.t())"
    else:  # the same mask as the _lora_dropout kernel, then cuBLAS
        x_drop = ops._lora_dropout(c["x"], c["dropout_p"], c["seed"])
        assert torch.equal(u, torch.mm(x_drop, c["lora_A"].t())), "u differs from mm(_lora_dropout(x), lora_A.t())"


# ---- numerics: every option, both tiles, both weight layouts ------------------------------------------------------
@pytest.mark.parametrize("wlayout", WLAYOUTS)
@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("r", [16, 64, 128])
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "nodq"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1], ids=["nodrop", "drop0.1"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_sm90_matches_reference_grid(dtype, bias, dropout_p, double_quant, r, tile, wlayout, variant):
    variant(tile, wlayout)
    seed = zlib.crc32(repr((dtype, bias, dropout_p, double_quant, r, tile, wlayout)).encode())
    check_case(make_case(300, 512, 400, r, dtype, bias, dropout_p, double_quant, gen_seed=seed))


# (m, k, n): partial tiles in m and n, one m row, odd cluster counts, and Llama-like k/n with small m.
SHAPES = [(1, 128, 128), (17, 192, 144), (129, 256, 272), (255, 640, 1040), (1000, 1024, 384),
          (48, 4096, 14336), (33, 14336, 4096)]


@pytest.mark.parametrize("wlayout", WLAYOUTS)
@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("m,k,n", SHAPES, ids=[f"m{m}-k{k}-n{n}" for m, k, n in SHAPES])
def test_sm90_shapes(m, k, n, dtype, tile, wlayout, variant):
    variant(tile, wlayout)
    r = min(16, n, k)
    check_case(make_case(m, k, n, r, dtype, True, 0.1, True, gen_seed=m * 131 + k * 7 + n))


@pytest.mark.parametrize("wlayout", WLAYOUTS)
def test_sm90_default_tile_and_n_multiple_of_8(wlayout, variant, monkeypatch):
    """The heuristic's choice (no tile override), and n % 16 == 8, which only the stored layout takes."""
    variant("128x256", wlayout)
    monkeypatch.delenv("QLORA_EXT_SM90_TILE")
    check_case(make_case(77, 256, 256, 16, torch.bfloat16, False, 0.0, True, gen_seed=5))
    c = make_case(77, 256, 264, 16, torch.bfloat16, True, 0.0, True, gen_seed=6)
    if wlayout == "stored":
        check_case(c)
    else:
        with pytest.raises(RuntimeError, match=r"qlora_linear: .*n % 16 == 0"):
            run_sm90(c)


def test_sm90_workspace_grows_then_is_reused(variant):
    """Small layer, larger layer (the workspace grows), small again (reused): every call correct."""
    variant("128x128", "repacked")
    for i, (m, k, n) in enumerate([(64, 256, 256), (96, 2048, 1536), (64, 256, 256), (80, 512, 768)]):
        check_case(make_case(m, k, n, 16, torch.float16, True, 0.0, True, gen_seed=100 + i))


def test_sm90_default_layout_and_shared_workspace(monkeypatch):
    """No overrides: n % 16 == 0 repacks the weight, n % 16 == 8 reads the stored bytes, both correct; the block
    scales and the repacked bytes live in the paths' shared workspace (counted by workspace_bytes, freed by
    release_workspace)."""
    monkeypatch.delenv("QLORA_EXT_SM90_TILE", raising=False)
    monkeypatch.delenv("QLORA_EXT_SM90_WLAYOUT", raising=False)
    qlora_ext.release_workspace()
    check_case(make_case(64, 512, 256, 16, torch.bfloat16, True, 0.0, True, gen_seed=11))
    assert qlora_ext.workspace_bytes() >= 256 * 512 // 2 + 256 * (512 // 64) * 2  # repacked bytes + scales
    check_case(make_case(64, 512, 264, 16, torch.bfloat16, True, 0.0, True, gen_seed=12))
    qlora_ext.release_workspace()
    assert qlora_ext.workspace_bytes() == 0


def test_sm90_misaligned_x_view(variant):
    """x as a view whose base is not 16-byte aligned (TMA needs it): the op copies it."""
    variant("128x256", "stored")
    c = make_case(40, 256, 384, 16, torch.bfloat16, True, 0.0, True, gen_seed=9)
    big = torch.empty(40 * 256 + 1, dtype=torch.bfloat16, device="cuda")
    big[1:].copy_(c["x"].reshape(-1))
    c["x"] = big[1:].view(40, 256)
    assert c["x"].data_ptr() % 16 != 0
    check_case(c)


def test_sm90_empty_batch(variant):
    variant("128x256", "stored")
    c = make_case(0, 128, 128, 8, torch.bfloat16, True, 0.0, True, gen_seed=3)
    y, u = run_sm90(c)
    assert y.shape == (0, 128) and u.shape == (0, 8)


def test_sm90_foreign_codebook_gives_nan(variant):
    """The decoder's table is compiled in: another `code` tensor must not decode silently wrong."""
    variant("128x128", "stored")
    c = make_case(32, 128, 128, 8, torch.bfloat16, False, 0.0, True, gen_seed=4)
    w = list(c["wq"].op_args())
    w[2] = w[2].clone()
    w[2][3] += 0.01
    y, _ = ops._sm90_fwd(c["x"], w, c["lora_A"], c["lora_B"], None, 2.0, 0.0, 0)
    assert torch.isnan(y).all()


# ---- contract errors ------------------------------------------------------------------------------------------------
def test_sm90_errors(variant):
    variant("128x256", "stored")
    c = make_case(8, 128, 132, 8, torch.bfloat16, False, 0.0, True, gen_seed=1)  # n % 8 == 4
    with pytest.raises(RuntimeError, match=r"qlora_linear: .*n % 8 == 0"):
        run_sm90(c)
    c = make_case(8, 96, 128, 8, torch.bfloat16, False, 0.0, True, gen_seed=2)  # k % 64 == 32
    with pytest.raises(RuntimeError, match=r"qlora_linear: k \(in_features\) must be a positive multiple of 64"):
        run_sm90(c)


def test_sm90_bad_overrides(monkeypatch):
    c = make_case(8, 128, 128, 8, torch.bfloat16, False, 0.0, True, gen_seed=7)
    monkeypatch.setenv("QLORA_EXT_SM90_TILE", "64x64")
    with pytest.raises(RuntimeError, match="QLORA_EXT_SM90_TILE must be 128x256 or 128x128"):
        run_sm90(c)
    monkeypatch.delenv("QLORA_EXT_SM90_TILE")
    monkeypatch.setenv("QLORA_EXT_SM90_WLAYOUT", "shuffled")
    with pytest.raises(RuntimeError, match="QLORA_EXT_SM90_WLAYOUT must be stored or repacked"):
        run_sm90(c)
