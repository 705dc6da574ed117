"""What only the Numba conv kernels have: SIMD micro-kernel tiles and their edges on layers
larger than the contract's, and partial sums that are the same bits on any thread count.

Everything every backend must do (every layer kind, activation, bias/pre, format, dtype, NaN and
inf, zero sizes) is in tests/test_kernel_contract_conv.py.
"""

import pytest
import torch
from contract import (
    ACTIVATIONS,
    FORMATS,
    Layer,
    check_backward_weight,
    check_conv_forward,
    check_input_gradient,
    conv2d_weight_reference,
    poisoned_in,
    randn_in,
)

from brainkern.kernels.numba import conv as kern
from helpers import assert_close

# Past several register tiles (16-lane vectors, 8 pixel rows): a 1-channel stem to 32 channels,
# 16 -> 33 with a 7x7 kernel (one channel past two vectors), and a 3x3 layer with 48 output
# channels per group (the in-place weight gradient).
SIMD_LAYERS = [
    Layer(1, 1, 32, (13, 12), (5, 5), padding=(2, 2), dilation=(2, 2)),
    Layer(1, 16, 33, (15, 14), (7, 7), (2, 2), (3, 3)),
    Layer(2, 8, 96, (11, 10), (3, 3), padding=(1, 1), groups=2, extra=(1, 0)),
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_simd_tiles(dtype, fmt):
    for layer in SIMD_LAYERS:
        check_conv_forward("numba", layer, False, ACTIVATIONS[6], dtype, fmt)
        check_backward_weight("numba", layer, dtype, fmt)
        check_input_gradient("numba", layer, dtype, fmt)


def test_backward_weight_many_pixels_any_thread_count():
    """Enough pixels for several partial gradients: right, and the same on 1 and 2 threads."""
    x = randn_in((9, 6, 33, 31), "numba", torch.float32, torch.channels_last)
    grad = randn_in((9, 10, 17, 16), "numba", torch.float32, torch.channels_last)
    params = ((2, 2), (1, 1), (1, 1), 2)
    ref = conv2d_weight_reference(grad, x, (10, 3, 3, 3), *params)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            grad_w = poisoned_in((10, 3, 3, 3), x)
            kern.conv2d_backward_weight(grad, x, grad_w, *params)
            results.append(grad_w)
    finally:
        torch.set_num_threads(before)
    assert_close(results[0], ref, torch.float32, what="grad_weight")
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("fmt", FORMATS)
def test_bias_gradient_does_not_depend_on_thread_count(fmt):
    act = ACTIVATIONS[7]
    saved = randn_in((8, 24, 40, 37), "numba", torch.float32, fmt)
    grad_out = randn_in((8, 24, 40, 37), "numba", torch.float32)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            grad_pre, grad_bias = poisoned_in(saved.shape, saved, fmt), poisoned_in((24,), saved)
            kern.conv2d_activation_backward(grad_out, saved, grad_pre, grad_bias, act.code,
                                            act.param, act.saves_output)
            results.append((grad_pre, grad_bias))
    finally:
        torch.set_num_threads(before)
    ref = grad_out.double() * act.derivative(saved.double())
    assert_close(results[0][1], ref.sum((0, 2, 3)), torch.float32, what="grad_bias",
                 scale=ref.abs().sum((0, 2, 3)))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
