"""Shared checking tools: the float64 oracle comparison and the per-dtype tolerance table."""

import torch

# Relative-norm tolerances (DESIGN.md section 4). Triton's fp32 dot defaults to tf32 on a GPU.
TOLERANCE = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}
TF32_TOLERANCE = 5e-4


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, in float64; NaN anywhere it is not also NaN in ref fails."""
    out = out.detach().to(torch.float64).cpu()
    ref = ref.detach().to(torch.float64).cpu()
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    nan_out, nan_ref = torch.isnan(out), torch.isnan(ref)
    assert torch.equal(nan_out, nan_ref), "NaN where the reference has none (or the reverse)"
    out, ref = out[~nan_ref], ref[~nan_ref]
    if ref.numel() == 0:
        return 0.0
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff if denom == 0.0 else diff / denom


def assert_close(out, ref, dtype=None, tol=None, what="output"):
    """Assert the relative norm error of ``out`` against the float64 ``ref`` is within tol."""
    tol = tol if tol is not None else TOLERANCE[dtype or out.dtype]
    err = rel_err(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def poisoned(*shape, dtype=torch.float32, device="cpu"):
    """An output buffer full of NaN, so any element a kernel forgets to write fails the check."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)
