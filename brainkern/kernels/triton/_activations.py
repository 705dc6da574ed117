"""The fused activations as @triton.jit functions, shared by every Triton kernel's epilogue.

``ACT`` is a code from brainkern.activations, a constexpr, so each kernel is specialised to one
activation and the untaken branches cost nothing. ``slope`` is leaky_relu's negative slope, a
runtime fp64 scalar. Inputs are the fp32 (fp64 for fp64 tensors) accumulator, never a half type:
exp and erf lose too much in fp16/bf16, and the interpreter's erf only takes fp32/fp64.
"""

import os

import triton
import triton.language as tl

# Pinned before any kernel compiles (Triton reads it at compile time): Triton 3.10 turns FMA
# contraction off by default, which would change every epilogue's rounding and the tolerances
# measured with it. An explicit setting by the user still wins.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

# Never renumber: these mirror brainkern.activations (constexpr globals are visible to kernels).
# NONE (0) matches no branch below: the value passes through.
RELU = tl.constexpr(1)
LEAKY_RELU = tl.constexpr(2)
SIGMOID = tl.constexpr(3)
TANH = tl.constexpr(4)
GELU = tl.constexpr(5)
GELU_TANH = tl.constexpr(6)
SILU = tl.constexpr(7)

# Keep a tensor on the left of every product with these: in the interpreter, constexpr * tensor
# wraps the result in a constexpr, which tl.abs / tl.exp then refuse.
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
INV_SQRT_2 = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
GELU_TANH_CUBIC = tl.constexpr(0.044715)


@triton.jit
def _as(scalar, dtype: tl.constexpr):
    # The slope arrives as fp64 (kernels declare it so, and Inductor passes Python floats so):
    # left as is, it would promote the whole fp32 tile to fp64. tl.full rather than tl.cast,
    # because the interpreter hands a Python float to tl.cast, which rounds it through fp32 and
    # costs the fp64 kernels their precision.
    return tl.full((), scalar, dtype)


@triton.jit
def sigmoid(x):
    # exp of -|x| only: no inf intermediates (1 / (1 + exp(-x)) overflows for x < -88 in fp32,
    # and z * sigmoid(z) would then meet inf * 0 paths), and full relative accuracy for x < 0.
    e = tl.exp(-tl.abs(x))
    r = 1.0 / (1.0 + e)
    return tl.where(x >= 0, r, e * r)


@triton.jit
def tanh(x):
    # Built from exp because libdevice's tanh has no interpreter implementation. exp of a
    # non-positive argument cannot overflow; near 0 the error is absolute (~1 ulp of 1), which
    # the relative-norm checks and the saved-output derivative 1 - y^2 both tolerate.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def activation_forward(z, slope, ACT: tl.constexpr):
    """``act(z)`` elementwise; ``slope`` is only read for LEAKY_RELU."""
    if ACT == RELU:
        z = tl.where(z < 0, 0.0, z)  # not z > 0: a NaN must stay NaN, as in torch.relu
    elif ACT == LEAKY_RELU:
        z = tl.where(z > 0, z, z * _as(slope, z.dtype))
    elif ACT == SIGMOID:
        z = sigmoid(z)
    elif ACT == TANH:
        z = tanh(z)
    elif ACT == GELU:
        z = 0.5 * z * (1.0 + tl.math.erf(z * INV_SQRT_2))
    elif ACT == GELU_TANH:
        # 0.5 * (1 + tanh(u)) == sigmoid(2u): the sigmoid form has no 1 + tanh(u) cancellation
        # for negative z, where the textbook form loses every digit of the small result.
        z = z * sigmoid((z + z * z * z * GELU_TANH_CUBIC) * (2.0 * SQRT_2_OVER_PI))
    elif ACT == SILU:
        z = z * sigmoid(z)
    return z


@triton.jit
def activation_derivative(saved, slope, ACT: tl.constexpr):
    """``act'(z)`` from what backward saved: the output y for RELU, SIGMOID, TANH and
    LEAKY_RELU with slope >= 0; the pre-activation z for GELU, GELU_TANH, SILU and LEAKY_RELU
    with slope < 0. LEAKY_RELU's formula is the same from either (y > 0 iff z > 0 when
    slope >= 0). At the kink the derivative is 0 (relu) or slope, as torch."""
    if ACT == RELU:
        d = tl.where(saved > 0, 1.0, 0.0).to(saved.dtype)
    elif ACT == LEAKY_RELU:
        d = tl.where(saved > 0, 1.0, _as(slope, saved.dtype)).to(saved.dtype)
    elif ACT == SIGMOID:
        d = saved * (1.0 - saved)
    elif ACT == TANH:
        d = 1.0 - saved * saved
    elif ACT == GELU:
        z = saved
        d = 0.5 * (1.0 + tl.math.erf(z * INV_SQRT_2)) + z * tl.exp(-0.5 * z * z) * INV_SQRT_2PI
    elif ACT == GELU_TANH:
        # With v = 2u and s = sigmoid(v): d = s + z * s * (1 - s) * dv/dz, where
        # s * (1 - s) = e / (1 + e)^2 with e = exp(-|v|), free of cancellation and overflow.
        z = saved
        v = (z + z * z * z * GELU_TANH_CUBIC) * (2.0 * SQRT_2_OVER_PI)
        e = tl.exp(-tl.abs(v))
        d = sigmoid(v) + z * (e / ((1.0 + e) * (1.0 + e))) * (
            (1.0 + z * z * (3.0 * GELU_TANH_CUBIC)) * (2.0 * SQRT_2_OVER_PI)
        )
    elif ACT == SILU:
        s = sigmoid(saved)
        d = s * (1.0 + saved * (1.0 - s))
    else:  # NONE: the identity
        d = tl.full(saved.shape, 1.0, saved.dtype)
    return d
