"""Shared test helpers: the error metric and ratio rule of docs/design.md §7, and the CUDA skip marker."""
import pytest
import torch

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; NaN anywhere in out gives inf so it can never pass."""
    out64, ref64 = out.double(), ref.double()
    if not torch.isfinite(out64).all():
        return float("inf")
    return ((out64 - ref64).norm() / ref64.norm().clamp_min(1e-300)).item()


def assert_ratio_rule(name: str, ours: torch.Tensor, same_dtype: torch.Tensor, ref64: torch.Tensor,
                      factor: float = 2.0, tiny: float = 1e-6) -> None:
    """err(ours) ≤ factor·err(PyTorch in the same dtype) + tiny, both measured against an fp64 reference.

    The same-dtype PyTorch computation makes rounding errors of the size our kernel legitimately makes (bf16/fp16
    inputs, fp32 accumulation in a different order), so a bound relative to it is as strict as the arithmetic
    allows; `tiny` only absorbs the case where both errors are ~0 (e.g. exactly representable results)."""
    assert ours.shape == ref64.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref64.shape)}"
    e_ours, e_torch = rel_err(ours, ref64), rel_err(same_dtype, ref64)
    assert e_ours <= factor * e_torch + tiny, f"{name}: err {e_ours:.3e} > {factor}×{e_torch:.3e} + {tiny:g}"
