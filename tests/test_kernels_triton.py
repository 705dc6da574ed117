"""The Triton linear kernels, called directly with the plain arguments of kernels/__init__.py.

Oracle: torch in float64 (DESIGN.md section 4). Without a GPU the kernels run on CPU tensors
through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), which is slow: shapes
stay small, yet large enough to span several programs, partial edge tiles and several K steps
of the interpreter's 64 x 64 x 32 config. Tests marked ``gpu`` take real-GPU sizes and dtypes.
"""

import pytest
import torch

from brainkern import activations
from brainkern.activations import Activation
from brainkern.kernels.triton import linear as triton_linear
from helpers import TF32_TOLERANCE, assert_close, matmul_magnitude, poisoned

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")

# Every code, and leaky_relu with both signs of slope (a negative slope saves the pre-activation).
ACTIVATIONS = [
    Activation("none", activations.NONE),
    Activation("relu", activations.RELU),
    Activation("leaky_relu", activations.LEAKY_RELU, 0.1),
    Activation("leaky_relu", activations.LEAKY_RELU, -0.3),
    Activation("sigmoid", activations.SIGMOID),
    Activation("tanh", activations.TANH),
    Activation("gelu", activations.GELU),
    Activation("gelu_tanh", activations.GELU_TANH),
    Activation("silu", activations.SILU),
]
ACT_IDS = [f"{a.name}{a.param:g}" if a.param else a.name for a in ACTIVATIONS]
# Triton 3.9's interpreter multiplies bf16 operands of tl.dot as their int16 bit patterns
# (InterpreterBuilder.create_dot): bf16 GEMMs are only checkable on a GPU.
BF16_DOT_IN_INTERPRETER = pytest.mark.skipif(
    not HAS_CUDA, reason="Triton 3.9's interpreter computes bf16 tl.dot on raw bits"
)


def run_matmul(a, b, bias, act, with_pre=True):
    """Call the kernel on poisoned outputs; return (out, pre)."""
    m, n = a.shape[0], b.shape[1]
    out = poisoned(m, n, dtype=a.dtype, device=a.device)
    pre = poisoned(m, n, dtype=a.dtype, device=a.device) if with_pre else None
    triton_linear.linear_forward(a, b.t(), bias, out, pre, act.code, act.param)
    return out, pre


def reference_matmul(a, b, bias, act):
    z = a.double().cpu() @ b.double().cpu()
    if bias is not None:
        z = z + bias.double().cpu()
    return act.forward(z), z


def check_matmul(a, b, bias, act, tol=None, with_pre=True):
    out, pre = run_matmul(a, b, bias, act, with_pre)
    ref_out, ref_pre = reference_matmul(a, b, bias, act)
    scale = matmul_magnitude(a, b, bias)
    assert_close(out, ref_out, dtype=a.dtype, tol=tol, what=f"{act.name} output", scale=scale)
    if with_pre:
        assert_close(pre, ref_pre, dtype=a.dtype, tol=tol, what="pre-activation", scale=scale)


def operands(m, k, n, dtype=torch.float32, bias=True):
    a = torch.randn(m, k, dtype=dtype, device=DEVICE)
    b = torch.randn(k, n, dtype=dtype, device=DEVICE)
    return a, b, torch.randn(n, dtype=dtype, device=DEVICE) if bias else None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("act", ACTIVATIONS, ids=ACT_IDS)
def test_matmul_every_activation(act, dtype):
    # (127, 33) x (33, 70): 2 x 2 programs with partial edge tiles, 2 K steps, a masked K tail.
    check_matmul(*operands(127, 33, 70, dtype), act)


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 7, 1), (7, 1, 13), (7, 13, 5), (16, 16, 16),
                                   (127, 127, 7), (257, 20, 65)])
def test_matmul_shapes(shape):
    check_matmul(*operands(*shape), ACTIVATIONS[7])


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("with_pre", [True, False])
def test_matmul_without_bias_or_pre(bias, with_pre):
    a, b, bias_t = operands(33, 20, 17, bias=bias)
    check_matmul(a, b, bias_t, ACTIVATIONS[8], with_pre=with_pre)


@pytest.mark.parametrize("bias", [True, False])
def test_matmul_empty_reduction_gives_activation_of_bias(bias):
    a, b, bias_t = operands(9, 0, 5, bias=bias)
    check_matmul(a, b, bias_t, ACTIVATIONS[4])


@pytest.mark.parametrize("shape", [(0, 5, 7), (5, 7, 0), (0, 0, 0)])
def test_matmul_zero_size(shape):
    out, pre = run_matmul(*operands(*shape), ACTIVATIONS[1])
    assert out.shape == (shape[0], shape[2]) and pre.shape == out.shape


@pytest.mark.parametrize("layout", ["a_transposed", "b_transposed", "both_transposed", "sliced",
                                    "broadcast_row"])
def test_matmul_strided_inputs(layout):
    m, k, n = 37, 45, 29
    if layout == "a_transposed":
        a, b = torch.randn(k, m, device=DEVICE).t(), torch.randn(k, n, device=DEVICE)
    elif layout == "b_transposed":  # nn.Linear's x @ W^T
        a, b = torch.randn(m, k, device=DEVICE), torch.randn(n, k, device=DEVICE).t()
    elif layout == "both_transposed":
        a, b = torch.randn(k, m, device=DEVICE).t(), torch.randn(n, k, device=DEVICE).t()
    elif layout == "sliced":
        a = torch.randn(2 * m, 3 * k, device=DEVICE)[::2, 1::3]
        b = torch.randn(k, 2 * n, device=DEVICE)[:, ::2]
    else:  # stride 0 along M: every row of a is the same
        a, b = torch.randn(1, k, device=DEVICE).expand(m, k), torch.randn(k, n, device=DEVICE)
    assert not (a.is_contiguous() and b.is_contiguous())
    check_matmul(a, b, torch.randn(n, device=DEVICE), ACTIVATIONS[6])


@pytest.mark.parametrize(
    "dtype", [torch.float16, pytest.param(torch.bfloat16, marks=BF16_DOT_IN_INTERPRETER)]
)
def test_matmul_half_types(dtype):
    check_matmul(*operands(45, 40, 70, dtype), ACTIVATIONS[6])


def run_activation_backward(grad_out, saved, act, with_bias):
    m, n = grad_out.shape
    grad_pre = poisoned(m, n, dtype=saved.dtype, device=saved.device)
    grad_bias = poisoned(n, dtype=saved.dtype, device=saved.device) if with_bias else None
    triton_linear.activation_backward(grad_out, saved, grad_pre, grad_bias, act.code, act.param,
                                      act.saves_output)
    return grad_pre, grad_bias


def reference_derivative(act, saved):
    if act.code == activations.LEAKY_RELU:
        # Activation.derivative builds torch.where(y > 0, 1.0, slope) from two Python scalars,
        # which torch evaluates in float32 before the cast: slope 0.1 is then 1.5e-9 off, too
        # coarse for the float64 tolerance. Here the slope stays float64.
        slope = torch.tensor(act.param, dtype=torch.float64)
        return torch.where(saved > 0, torch.ones((), dtype=torch.float64), slope)
    return act.derivative(saved)


def check_activation_backward(m, n, act, dtype, with_bias=True, transposed_grad=True, tol=None):
    z = torch.randn(m, n, dtype=torch.float64)
    saved = (act.forward(z) if act.saves_output else z).to(dtype)
    grad_out = torch.randn(n, m, dtype=dtype).t() if transposed_grad else torch.randn(m, n)
    grad_out = grad_out.to(dtype)
    grad_pre, grad_bias = run_activation_backward(
        grad_out.to(DEVICE), saved.to(DEVICE), act, with_bias
    )
    ref = grad_out.double() * reference_derivative(act, saved.double())
    assert_close(grad_pre, ref, dtype=dtype, tol=tol, what="grad_pre")
    if with_bias:
        assert_close(grad_bias, ref.sum(0), dtype=dtype, tol=tol, what="grad_bias")
    return grad_pre, grad_bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("act", ACTIVATIONS[1:], ids=ACT_IDS[1:])
def test_activation_backward_every_activation(act, dtype):
    # 70 columns: two column blocks, one partial. 100 rows: two row splits of two steps each
    # under the interpreter, the last step partial.
    check_activation_backward(100, 70, act, dtype)


@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (33, 129)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_activation_backward_shapes(shape, with_bias):
    check_activation_backward(*shape, ACTIVATIONS[7], torch.float32, with_bias=with_bias,
                              transposed_grad=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_activation_backward_half_types(dtype):
    check_activation_backward(50, 70, ACTIVATIONS[6], dtype)


def test_activation_backward_zero_rows_gives_zero_bias_grad():
    grad_pre, grad_bias = run_activation_backward(
        torch.randn(0, 6, device=DEVICE), torch.randn(0, 6, device=DEVICE), ACTIVATIONS[1], True
    )
    assert grad_pre.shape == (0, 6) and torch.equal(grad_bias.cpu(), torch.zeros(6))


@pytest.fixture
def fp32_matmul_precision():
    """Restore torch's TF32 switch (which the launcher reads) after a test sets it."""
    saved = torch.backends.cuda.matmul.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(512, 768, 1024), (16, 4096, 1000), (1000, 333, 77)])
@pytest.mark.parametrize("act", [ACTIVATIONS[0], ACTIVATIONS[6], ACTIVATIONS[7]],
                         ids=["none", "gelu", "gelu_tanh"])
def test_gpu_matmul(dtype, shape, act, fp32_matmul_precision):
    torch.backends.cuda.matmul.allow_tf32 = False
    m, k, n = shape
    a = torch.randn(m, k, dtype=dtype, device="cuda")
    w = torch.randn(n, k, dtype=dtype, device="cuda")
    # The tolerance grows with the reduction length: rounding errors accumulate over K.
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}[dtype]
    check_matmul(a, w.t(), torch.randn(n, dtype=dtype, device="cuda"), act,
                 tol=tol * max(1.0, (k / 1024) ** 0.5))


@pytest.mark.gpu
@gpu
def test_gpu_matmul_tf32(fp32_matmul_precision):
    torch.backends.cuda.matmul.allow_tf32 = True
    check_matmul(*operands(512, 1024, 768), ACTIVATIONS[6], tol=TF32_TOLERANCE)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_activation_backward(dtype):
    check_activation_backward(4096, 1024, ACTIVATIONS[8], dtype)


@pytest.mark.gpu
@gpu
def test_gpu_activation_backward_bias_grad_is_deterministic():
    grad_out = torch.randn(8192, 512, device="cuda")
    saved = torch.randn(8192, 512, device="cuda")
    runs = [run_activation_backward(grad_out, saved, ACTIVATIONS[8], True)[1] for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])
