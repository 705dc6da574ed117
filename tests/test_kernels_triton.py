"""What only the Triton linear kernels have: GPU-sized problems over the autotune configs,
TF32, and the bias gradient's determinism across launches on a GPU.

Everything every backend must do (activations, bias and pre combinations, odd shapes, strides,
NaN and inf, zero sizes, half types) is in tests/test_kernel_contract.py, which runs Triton on
the GPU when there is one and through its interpreter otherwise.
"""

import pytest
import torch
from contract import ACTIVATIONS, check_linear_forward, saved_for

from brainkern.kernels.triton import linear as triton_linear
from helpers import TF32_TOLERANCE, TOLERANCE, assert_close, poisoned

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def check_activation_backward(m, n, act, dtype):
    saved = saved_for(act, torch.randn(m, n, device="cuda")).to(dtype)
    grad_out = torch.randn(n, m, dtype=dtype, device="cuda").t()
    grad_pre, grad_bias = poisoned(m, n, dtype=dtype, device="cuda"), poisoned(n, dtype=dtype,
                                                                             device="cuda")
    triton_linear.activation_backward(grad_out, saved, grad_pre, grad_bias, act.code, act.param,
                                      act.saves_output)
    ref = grad_out.double() * act.derivative(saved.double())
    assert_close(grad_pre, ref, dtype, what="grad_pre")
    assert_close(grad_bias, ref.sum(0), dtype, what="grad_bias", scale=ref.abs().sum(0))


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
    check_linear_forward(triton_linear, a, w, torch.randn(n, dtype=dtype, device="cuda"), act,
                         tol=TOLERANCE[dtype] * max(1.0, (k / 1024) ** 0.5))


@pytest.mark.gpu
@gpu
def test_gpu_matmul_tf32(fp32_matmul_precision):
    torch.backends.cuda.matmul.allow_tf32 = True
    a, w = torch.randn(512, 1024, device="cuda"), torch.randn(768, 1024, device="cuda")
    check_linear_forward(triton_linear, a, w, torch.randn(768, device="cuda"), ACTIVATIONS[6],
                         tol=TF32_TOLERANCE)


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
    runs = []
    for _ in range(3):
        grad_pre, grad_bias = torch.empty_like(saved), torch.empty(512, device="cuda")
        triton_linear.activation_backward(grad_out, saved, grad_pre, grad_bias, 7, 0.0, False)
        runs.append(grad_bias)
    assert all(torch.equal(runs[0], r) for r in runs[1:])
