"""What only the Triton conv kernels have: the weight gradient's split-K passes around
PIXELS_PER_SPLIT, and, on a CUDA device, real layer sizes in the half types, TF32, and
determinism across launches.

Everything every backend must do (every layer kind, activation, bias/pre, format, float64 and
fp16, NaN and inf, zero sizes) is in tests/test_kernel_contract_conv.py, which runs Triton on
the GPU when there is one and through its interpreter otherwise.
"""

import pytest
import torch
from contract import (
    ACTIVATIONS,
    GELU_TANH,
    Layer,
    check_backward_weight,
    check_conv_forward,
    derivative_scale,
    layer_id,
    saved_for,
)

from brainkern.kernels.triton import conv as triton_conv
from helpers import TF32_TOLERANCE, TOLERANCE, assert_close, poisoned

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
RELU, GELU, SILU = ACTIVATIONS[1], ACTIVATIONS[6], ACTIVATIONS[8]
NCHW, NHWC = torch.contiguous_format, torch.channels_last
LAYOUTS = [pytest.param(NCHW, id="nchw"), pytest.param(NHWC, id="nhwc")]


@pytest.mark.parametrize("pixels", [1, 2, 3], ids=["one-split", "two-splits", "three-splits"])
def test_conv2d_backward_weight_splits(pixels):
    """Output pixels for one split (written in place, no second reduction pass), exactly two,
    and a partial third."""
    n_pixels = {1: triton_conv.PIXELS_PER_SPLIT - 3, 2: 2 * triton_conv.PIXELS_PER_SPLIT,
                3: 2 * triton_conv.PIXELS_PER_SPLIT + 5}[pixels]
    layer = Layer(1, 3, 5, (1, n_pixels), (1, 3), padding=(0, 1))
    check_backward_weight("triton", layer, torch.float32, NCHW)


@pytest.fixture
def conv_fp32_precision():
    """Restore torch's cuDNN TF32 switch (which the conv launchers read) after a test."""
    saved = torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cudnn.allow_tf32 = saved


GPU_DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# Realistic layers: the CNN's stem and 32 -> 64, a ResNet 3x3, depthwise, DCGAN upsampling.
GPU_CONV_LAYERS = [
    Layer(64, 1, 32, (32, 32), (5, 5), padding=(2, 2)),
    Layer(64, 32, 64, (16, 16), (5, 5), padding=(2, 2)),
    Layer(32, 64, 64, (28, 28), (3, 3), padding=(1, 1)),
    Layer(32, 64, 64, (28, 28), (3, 3), (2, 2), (1, 1), groups=64),
]
GPU_TRANSPOSED_LAYERS = [Layer(64, 128, 64, (8, 8), (4, 4), (2, 2), (1, 1)),
                         Layer(64, 64, 1, (16, 16), (4, 4), (2, 2), (1, 1))]


def gpu_tolerance(dtype, layer, transposed=False):
    # Rounding errors grow with the reduction length (channels x taps).
    channels = layer.c_out if transposed else layer.c_x
    reduction = channels // layer.groups * layer.k[0] * layer.k[1]
    return TOLERANCE[dtype] * max(1.0, (reduction / 1024) ** 0.5)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("fmt", LAYOUTS)
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("layer", GPU_CONV_LAYERS, ids=layer_id)
def test_gpu_conv2d(layer, dtype, fmt, conv_fp32_precision):
    torch.backends.cudnn.allow_tf32 = False
    tol = gpu_tolerance(dtype, layer)
    check_conv_forward("triton", layer, False, GELU, dtype, fmt, tol=tol)
    check_backward_weight("triton", layer, dtype, fmt, tol=tol)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("fmt", LAYOUTS)
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("layer", GPU_TRANSPOSED_LAYERS, ids=layer_id)
def test_gpu_conv_transpose2d(layer, dtype, fmt, conv_fp32_precision):
    torch.backends.cudnn.allow_tf32 = False
    check_conv_forward("triton", layer, True, RELU, dtype, fmt,
                       tol=gpu_tolerance(dtype, layer, True))


@pytest.mark.gpu
@gpu
def test_gpu_conv2d_tf32(conv_fp32_precision):
    torch.backends.cudnn.allow_tf32 = True
    check_conv_forward("triton", GPU_CONV_LAYERS[2], False, GELU_TANH, torch.float32, NHWC,
                       tol=TF32_TOLERANCE)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_gpu_activation_backward(dtype):
    shape = (64, 64, 28, 28)
    saved = saved_for(SILU, torch.randn(shape, device="cuda")).to(dtype).to(
        memory_format=NHWC)
    grad_out = torch.randn(shape, dtype=dtype, device="cuda")
    grad_pre = poisoned(*shape, dtype=dtype, device="cuda").to(memory_format=NHWC)
    grad_bias = poisoned(64, dtype=dtype, device="cuda")
    triton_conv.conv2d_activation_backward(grad_out, saved, grad_pre, grad_bias, SILU.code, 0.0,
                                           SILU.saves_output)
    ref = grad_out.double().cpu() * SILU.derivative(saved.double().cpu())
    scale = derivative_scale(SILU, grad_out, saved)
    assert_close(grad_pre, ref, dtype, what="grad_pre", scale=scale)
    assert_close(grad_bias, ref.sum((0, 2, 3)), dtype, what="grad_bias",
                 scale=scale.sum((0, 2, 3)))


@pytest.mark.gpu
@gpu
def test_gpu_backward_is_deterministic():
    layer = GPU_CONV_LAYERS[0]
    x = torch.randn(64, 1, 32, 32, device="cuda").to(memory_format=NHWC)
    grad = torch.randn(64, 32, 32, 32, device="cuda").to(memory_format=NHWC)
    saved = torch.randn(64, 32, 32, 32, device="cuda").to(memory_format=NHWC)
    weights, biases = [], []
    for _ in range(3):
        grad_w = torch.empty(32, 1, 5, 5, device="cuda")
        triton_conv.conv2d_backward_weight(grad, x, grad_w, *layer.params())
        grad_b = torch.empty(32, device="cuda")
        triton_conv.conv2d_activation_backward(grad, saved, torch.empty_like(saved), grad_b,
                                               SILU.code, 0.0, False)
        weights.append(grad_w)
        biases.append(grad_b)
    assert all(torch.equal(weights[0], w) for w in weights[1:])
    assert all(torch.equal(biases[0], b) for b in biases[1:])
