"""Shared checking tools: the float64 oracle comparison and the per-dtype tolerance table."""

import os

import torch

# Relative-norm tolerances (DESIGN.md section 4). Triton's fp32 dot defaults to tf32 on a GPU.
TOLERANCE = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}
TF32_TOLERANCE = 5e-4


def rel_err(out: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    """||out - ref|| / ||scale or ref||, in float64, over the elements where ref is finite.

    NaN where ref has none (or the reverse) fails, and so does an infinity that ref does not
    have with the same sign (or the reverse): special values must come out as torch's do.

    ``scale`` is the magnitude rounding errors are relative to, e.g. ``|x| @ |w|^T + |b|`` for a
    GEMM: the textbook bound |fl(x.w) - x.w| <= gamma_K |x|.|w|. Without it a single output that
    cancels to nearly zero (gelu of a negative sum, say) fails a correct kernel.
    """
    out = out.detach().to(torch.float64).cpu()
    ref = ref.detach().to(torch.float64).cpu()
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    nan_out, nan_ref = torch.isnan(out), torch.isnan(ref)
    assert torch.equal(nan_out, nan_ref), "NaN where the reference has none (or the reverse)"
    inf_ref = torch.isinf(ref)
    assert torch.equal(torch.isinf(out), inf_ref) and torch.equal(out[inf_ref], ref[inf_ref]), (
        "an infinity where the reference has none, or of the other sign (or the reverse)")
    finite = torch.isfinite(ref)
    denom_source = ref if scale is None else scale.detach().to(torch.float64).cpu()
    out, ref, denom_source = out[finite], ref[finite], denom_source[finite]
    if ref.numel() == 0:
        return 0.0
    denom = denom_source.norm().item()
    diff = (out - ref).norm().item()
    return diff if denom == 0.0 else diff / denom


def assert_close(out, ref, dtype=None, tol=None, what="output", scale=None):
    """Assert the relative norm error of ``out`` against the float64 ``ref`` is within tol."""
    tol = tol if tol is not None else TOLERANCE[dtype or out.dtype]
    err = rel_err(out, ref, scale)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def matmul_magnitude(a, b, bias=None):
    """``|a| @ |b| + |bias|`` in float64: what a GEMM's rounding error is relative to."""
    magnitude = a.detach().double().cpu().abs() @ b.detach().double().cpu().abs()
    return magnitude if bias is None else magnitude + bias.detach().double().cpu().abs()


def gemm_error_scales(x, w, b, grad):
    """Magnitudes the float rounding of y = x @ w^T + b and its gradients is relative to.

    Returns scales for (output, d input, d weight, d bias) given the upstream gradient ``grad``;
    the activations' derivatives are bounded by ~1.13, so |grad| stands in for |dz|.
    """
    g = grad.detach().double().abs()
    x_abs, w_abs = x.detach().double().abs(), w.detach().double().abs()
    return matmul_magnitude(x, w.t(), b), g @ w_abs, g.t() @ x_abs, g.sum(0)


def poisoned(*shape, dtype=torch.float32, device="cpu"):
    """An output buffer full of NaN, so any element a kernel forgets to write fails the check."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def gradcheck(fn, inputs, backend, second_order=False):
    """torch.autograd.gradcheck (or gradgradcheck) of ``fn`` on float64 ``inputs``.

    Under Triton's interpreter a kernel launch costs ~0.1-0.5 s, and the full check evaluates
    the function twice per input element (minutes per test on a 2-core CI machine), so there the
    check runs in torch's fast mode: the finite-difference and the analytic Jacobian are compared
    through random vectors on both sides (v^T J u), a handful of launches, and any wrong entry of
    J still shows with probability one. Compiled backends get the full element-wise check.
    """
    fast = backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1"
    check = torch.autograd.gradgradcheck if second_order else torch.autograd.gradcheck
    return check(fn, inputs, fast_mode=fast)
