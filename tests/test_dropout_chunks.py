"""The reference dropout mask is built in row chunks, so that its int64 hash temporaries stay small; the mask must
still be the reference definition bit for bit (the spec the CUDA kernels match): element (row, col) kept iff
dropout_hash(seed, row * k + col) >= floor(p * 2^32), hashed over the whole [m, k] at once.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from qlora_ext import reference

DEFAULT_CHUNK = reference._DROPOUT_CHUNK_ELEMS


def whole_tensor_mask(seed, m, k, p):
    """The definition, as the reference computed it before chunking: one hash over every element index."""
    idx = torch.arange(m * k, dtype=torch.int64)
    return (reference.dropout_hash(seed, idx) >= reference._dropout_threshold(p)).view(m, k)


def whole_tensor_dropout(x, seed, p):
    keep = whole_tensor_mask(seed, x.shape[0], x.shape[1], p)
    scaled = (x.float() * reference._keep_scale(p)).to(x.dtype)
    return torch.where(keep, scaled, torch.zeros((), dtype=x.dtype))


def random_cases(count, seed):
    """(seed, m, k, p) with random sizes: m and k from 1 to a few hundred, so that m is rarely a multiple of the
    rows per chunk, plus fixed edge cases."""
    g = torch.Generator().manual_seed(seed)
    cases = [(int(torch.randint(0, 2**62, (), generator=g)), int(torch.randint(1, 300, (), generator=g)),
              int(torch.randint(1, 300, (), generator=g)), float(torch.rand((), generator=g)) * 0.9)
             for _ in range(count)]
    # 37 rows of 10 at 64 elements per chunk: 6 rows per chunk, 37 is not a multiple of 6; k = 100 > 64: one row
    # per chunk; and the empty mask.
    return cases + [(2**40 + 5, 37, 10, 0.3), (7, 5, 100, 0.5), (3, 0, 8, 0.1)]


@pytest.mark.parametrize("chunk", [DEFAULT_CHUNK, 1000, 64], ids=["default-chunk", "chunk-1000", "chunk-64"])
def test_chunked_mask_is_the_whole_tensor_definition(chunk, monkeypatch):
    monkeypatch.setattr(reference, "_DROPOUT_CHUNK_ELEMS", chunk)
    for seed, m, k, p in random_cases(8, seed=chunk):
        assert torch.equal(reference.dropout_mask(seed, m, k, p), whole_tensor_mask(seed, m, k, p)), (seed, m, k, p)


def test_default_chunking_splits_a_large_mask_unevenly():
    # At the default chunk size, 4096-wide rows go 64 per chunk; 300 rows leave a partial last chunk of 44.
    m, k = 300, 4096
    assert m % (DEFAULT_CHUNK // k) != 0
    assert torch.equal(reference.dropout_mask(11, m, k, 0.1), whole_tensor_mask(11, m, k, 0.1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("chunk", [DEFAULT_CHUNK, 64], ids=["default-chunk", "chunk-64"])
def test_chunked_dropout_is_the_whole_tensor_definition(dtype, chunk, monkeypatch):
    monkeypatch.setattr(reference, "_DROPOUT_CHUNK_ELEMS", chunk)
    for seed, m, k, p in random_cases(4, seed=1 + chunk):
        x = torch.randn(m, k).to(dtype)
        ours, expected = reference.dropout(x, seed, p), whole_tensor_dropout(x, seed, p)
        assert ours.dtype == dtype and torch.equal(ours, expected), (seed, m, k, p)
    x = torch.randn(40, 64).to(dtype)
    assert torch.equal(reference.dropout(x.T, 9, 0.2), whole_tensor_dropout(x.T.contiguous(), 9, 0.2))


class LargestAllocation(TorchDispatchMode):
    """The largest storage any op returns while active (every temporary is some op's output)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


def test_dropout_allocates_nothing_larger_than_its_result(monkeypatch):
    # The mask's hash runs in int64 over several temporaries: over the whole [m, k] each would take 8 bytes per
    # element, 4x a bf16 activation (+2.5 GB at 8192 x 4096). Chunked, none exceeds the chunk (64 rows of 96 here),
    # and the largest allocation is the result itself: the bool mask, or dropout's output of x's size.
    monkeypatch.setattr(reference, "_DROPOUT_CHUNK_ELEMS", 64 * 96)
    m, k = 1000, 96
    with LargestAllocation() as mode:
        mask = reference.dropout_mask(5, m, k, 0.1)
    assert mode.largest == mask.untyped_storage().nbytes() == m * k
    x = torch.randn(m, k, dtype=torch.bfloat16)
    with LargestAllocation() as mode:
        out = reference.dropout(x, 5, 0.1)
    assert mode.largest <= x.untyped_storage().nbytes() == out.untyped_storage().nbytes()
