"""The Numba backend's conv kernels, called directly with the plain kernel arguments.

Oracle: torch's conv2d / conv_transpose2d / autograd in float64 (DESIGN.md section 4). Forward
errors are relative to the same convolution of |x| and |w| plus |bias| (the magnitude rounding
scales with), so an output that cancels to ~0 does not fail a correct kernel. Outputs start as
NaN so an element a kernel forgets to write fails. Every case runs in NCHW and channels_last.
"""

import pytest
import torch
import torch.nn.functional as F

from brainkern import activations as acts
from brainkern.activations import Activation
from brainkern.kernels.numba import conv as kern
from helpers import assert_close, poisoned

ACTIVATIONS = [
    Activation("none", acts.NONE),
    Activation("relu", acts.RELU),
    Activation("leaky_relu", acts.LEAKY_RELU, 0.01),
    Activation("leaky_relu", acts.LEAKY_RELU, -0.2),  # negative slope: backward keeps z
    Activation("sigmoid", acts.SIGMOID),
    Activation("tanh", acts.TANH),
    Activation("gelu", acts.GELU),
    Activation("gelu_tanh", acts.GELU_TANH),
    Activation("silu", acts.SILU),
]
DTYPES = [torch.float32, torch.float64]
LAYOUTS = [torch.contiguous_format, torch.channels_last]

# (N, C_in, C_out, H, W, (kH, kW), stride, padding (top, left), dilation, groups), covering
# kernel 1..7, stride 1..3, dilation 1..3, groups 1 / 2 / depthwise / depthwise x multiplier,
# odd sizes, the 1- and 3-channel stems, and channel counts past one register tile.
CASES = [
    (2, 3, 5, (9, 11), (3, 3), (1, 1), (1, 1), (1, 1), 1),
    (1, 1, 32, (13, 12), (5, 5), (1, 1), (2, 2), (1, 1), 1),
    (3, 4, 6, (10, 9), (1, 1), (2, 3), (0, 0), (1, 1), 2),
    (2, 6, 6, (11, 13), (3, 3), (2, 1), (1, 1), (2, 3), 6),  # depthwise
    (2, 4, 12, (9, 8), (5, 3), (1, 2), (2, 1), (1, 1), 4),  # depthwise, multiplier 3
    (2, 8, 40, (12, 11), (4, 2), (3, 2), (1, 0), (1, 2), 2),
    (1, 16, 33, (15, 14), (7, 7), (2, 2), (3, 3), (1, 1), 1),
    (2, 5, 7, (16, 15), (2, 3), (1, 1), (0, 2), (3, 1), 1),
]


def case_id(case):
    n, ci, co, hw, k, s, p, d, g = case
    return f"{n}x{ci}->{co}@{hw[0]}x{hw[1]}k{k[0]}{k[1]}s{s[0]}{s[1]}p{p[0]}{p[1]}d{d[0]}{d[1]}g{g}"


def act_id(act):
    return f"{act.name}({act.param})" if act.code == acts.LEAKY_RELU else act.name


def _out_size(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def make(shape, dtype, layout):
    return torch.randn(shape, dtype=torch.float64).to(dtype).contiguous(memory_format=layout)


def empty_like_layout(shape, dtype, layout):
    return poisoned(*shape, dtype=dtype).contiguous(memory_format=layout)


def conv_reference(x, w, b, stride, padding, dilation, groups, out_hw, transposed=False):
    """torch's float64 result (and its magnitude |x| * |w| + |b|) for the padding (top, left)
    with the given output size: the padding after the last row/column is implied by out_hw."""
    x, w = x.double(), w.double()
    b = None if b is None else b.double()
    (ph, pw), (kh, kw) = padding, w.shape[2:]
    if not transposed:
        h, wd = x.shape[2:]
        bottom = (out_hw[0] - 1) * stride[0] + dilation[0] * (kh - 1) + 1 - h - ph
        right = (out_hw[1] - 1) * stride[1] + dilation[1] * (kw - 1) + 1 - wd - pw
        padded = F.pad(x, (pw, max(right, 0), ph, max(bottom, 0)))
        padded_abs = F.pad(x.abs(), (pw, max(right, 0), ph, max(bottom, 0)))
        ref = F.conv2d(padded, w, b, stride, 0, dilation, groups)[:, :, :out_hw[0], :out_hw[1]]
        scale = F.conv2d(padded_abs, w.abs(), None if b is None else b.abs(), stride, 0,
                         dilation, groups)[:, :, :out_hw[0], :out_hw[1]]
        return ref, scale
    h, wd = x.shape[2:]
    natural = [(h - 1) * stride[0] - 2 * ph + dilation[0] * (kh - 1) + 1,
               (wd - 1) * stride[1] - 2 * pw + dilation[1] * (kw - 1) + 1]
    extra = [out_hw[0] - natural[0], out_hw[1] - natural[1]]
    assert 0 <= extra[0] < max(stride[0], dilation[0]) and 0 <= extra[1] < max(stride[1],
                                                                              dilation[1])
    args = (stride, padding, tuple(extra), groups, dilation)
    ref = F.conv_transpose2d(x, w, b, *args)
    scale = F.conv_transpose2d(x.abs(), w.abs(), None if b is None else b.abs(), *args)
    return ref, scale


def check_forward(case, dtype, layout, act, with_bias=True, with_pre=True, extra=(0, 0)):
    """conv2d_forward against torch; ``extra`` output rows/columns past the natural size turn
    (top, left) padding into an asymmetric one."""
    n, ci, co, (h, w), k, s, p, d, g = case
    x = make((n, ci, h, w), dtype, layout)
    weight = make((co, ci // g, *k), dtype, torch.contiguous_format)
    bias = make((co,), dtype, torch.contiguous_format) if with_bias else None
    out_hw = (_out_size(h, k[0], s[0], p[0], d[0]) + extra[0],
              _out_size(w, k[1], s[1], p[1], d[1]) + extra[1])
    out = empty_like_layout((n, co, *out_hw), dtype, layout)
    pre = empty_like_layout((n, co, *out_hw), dtype, layout) if with_pre else None
    kern.conv2d_forward(x, weight, bias, out, pre, s, p, d, g, act.code, act.param)
    ref, scale = conv_reference(x, weight, bias, s, p, d, g, out_hw)
    assert_close(out, act.forward(ref), dtype, what=f"out {act_id(act)}", scale=scale)
    if with_pre:
        assert_close(pre, ref, dtype, what="pre", scale=scale)


@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_conv2d_forward(case, dtype, layout):
    check_forward(case, dtype, layout, ACTIVATIONS[6])
    check_forward(case, dtype, layout, ACTIVATIONS[0], with_bias=False, with_pre=False)


@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("act", ACTIVATIONS, ids=act_id)
def test_conv2d_forward_every_activation(act, layout):
    for case in (CASES[0], CASES[3]):  # the GEMM path and the depthwise kernel
        check_forward(case, torch.float32, layout, act)


@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
def test_conv2d_forward_asymmetric_padding(layout):
    """'same' with an even kernel: padding (top, left) = (1, 1) and one more row and column
    than that padding alone gives, i.e. padding 2 after them."""
    for case in (CASES[5], CASES[4], (1, 3, 8, (9, 10), (4, 4), (1, 1), (1, 1), (1, 1), 1)):
        check_forward(case, torch.float64, layout, ACTIVATIONS[1], extra=(1, 1))


def check_transpose(case, dtype, layout, act, with_bias=True, with_pre=True, extra=(0, 0)):
    """conv_transpose2d_forward: case's C_in is the transposed conv's input channels."""
    n, cx, co, (h, w), k, s, p, d, g = case
    x = make((n, cx, h, w), dtype, layout)
    weight = make((cx, co // g, *k), dtype, torch.contiguous_format)
    bias = make((co,), dtype, torch.contiguous_format) if with_bias else None
    out_hw = ((h - 1) * s[0] - 2 * p[0] + d[0] * (k[0] - 1) + 1 + extra[0],
              (w - 1) * s[1] - 2 * p[1] + d[1] * (k[1] - 1) + 1 + extra[1])
    out = empty_like_layout((n, co, *out_hw), dtype, layout)
    pre = empty_like_layout((n, co, *out_hw), dtype, layout) if with_pre else None
    kern.conv_transpose2d_forward(x, weight, bias, out, pre, s, p, d, g, act.code, act.param)
    ref, scale = conv_reference(x, weight, bias, s, p, d, g, out_hw, transposed=True)
    assert_close(out, act.forward(ref), dtype, what=f"out {act_id(act)}", scale=scale)
    if with_pre:
        assert_close(pre, ref, dtype, what="pre", scale=scale)


# Transposed cases: (N, C_x, C_out, ...), output_padding as ``extra``; DCGAN's k4 s2 p1 among them.
TRANSPOSED = [
    ((2, 16, 8, (4, 5), (4, 4), (2, 2), (1, 1), (1, 1), 1), (1, 0)),
    ((2, 6, 9, (5, 4), (3, 5), (3, 2), (1, 2), (1, 1), 3), (2, 1)),
    ((1, 4, 4, (6, 7), (3, 3), (2, 2), (1, 1), (1, 1), 4), (1, 1)),  # depthwise
    ((2, 3, 6, (5, 6), (3, 2), (1, 1), (2, 0), (2, 2), 3), (1, 0)),  # depthwise x2, dil 2
    ((1, 5, 40, (4, 3), (7, 1), (1, 3), (3, 0), (1, 1), 1), (0, 2)),
    ((2, 4, 4, (5, 5), (1, 1), (3, 3), (0, 0), (1, 1), 2), (2, 2)),  # phases without taps
    ((1, 8, 6, (5, 6), (3, 3), (2, 3), (2, 1), (3, 2), 2), (2, 1)),
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case,extra", TRANSPOSED, ids=[case_id(c) for c, _ in TRANSPOSED])
def test_conv_transpose2d_forward(case, extra, dtype, layout):
    check_transpose(case, dtype, layout, ACTIVATIONS[5], extra=extra)
    check_transpose(case, dtype, layout, ACTIVATIONS[0], with_bias=False, with_pre=False)


@pytest.mark.parametrize("act", ACTIVATIONS[1:], ids=act_id)
def test_conv_transpose2d_forward_every_activation(act):
    for (case, extra), layout in zip(TRANSPOSED[:3], LAYOUTS * 2):
        check_transpose(case, torch.float32, layout, act, extra=extra)


def conv_grads(x, weight, grad, s, p, d, g):
    """torch's float64 input and weight gradients of conv2d (symmetric padding p)."""
    x64 = x.double().requires_grad_()
    w64 = weight.double().requires_grad_()
    y = F.conv2d(x64, w64, None, s, p, d, g)
    return torch.autograd.grad(y, (x64, w64), grad.double())


@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_conv2d_gradients(case, dtype, layout):
    """grad_x through conv_transpose2d_forward (bias None, act NONE) and grad_weight through
    conv2d_backward_weight, against torch.autograd.grad."""
    n, ci, co, (h, w), k, s, p, d, g = case
    x = make((n, ci, h, w), dtype, layout)
    weight = make((co, ci // g, *k), dtype, torch.contiguous_format)
    out_hw = (_out_size(h, k[0], s[0], p[0], d[0]), _out_size(w, k[1], s[1], p[1], d[1]))
    grad = make((n, co, *out_hw), dtype, layout)
    ref_x, ref_w = conv_grads(x, weight, grad, s, p, d, g)
    scale_x, scale_w = conv_grads(x.abs(), weight.abs(), grad.abs(), s, p, d, g)
    grad_x = empty_like_layout(x.shape, dtype, layout)
    kern.conv_transpose2d_forward(grad, weight, None, grad_x, None, s, p, d, g, acts.NONE, 0.0)
    assert_close(grad_x, ref_x, dtype, what="grad_x", scale=scale_x)
    grad_w = poisoned(*weight.shape, dtype=dtype)
    kern.conv2d_backward_weight(grad, x, grad_w, s, p, d, g)
    assert_close(grad_w, ref_w, dtype, what="grad_weight", scale=scale_w)


def test_backward_weight_many_pixels_any_thread_count():
    """Enough pixels for several partial gradients: right, and the same on 1 and 2 threads."""
    x = make((9, 6, 33, 31), torch.float32, torch.channels_last)
    weight = make((10, 3, 3, 3), torch.float32, torch.contiguous_format)
    grad = make((9, 10, 17, 16), torch.float32, torch.channels_last)
    ref_w = conv_grads(x, weight, grad, (2, 2), (1, 1), (1, 1), 2)[1]
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            grad_w = poisoned(*weight.shape)
            kern.conv2d_backward_weight(grad, x, grad_w, (2, 2), (1, 1), (1, 1), 2)
            results.append(grad_w)
    finally:
        torch.set_num_threads(before)
    assert_close(results[0], ref_w, torch.float32, what="grad_weight")
    assert torch.equal(results[0], results[1])


def derivative(act, saved):
    """act' in float64 (leaky_relu's slope kept in float64, see test_kernels_numba.py)."""
    if act.code == acts.LEAKY_RELU:
        return torch.where(saved > 0, 1.0, torch.tensor(act.param, dtype=torch.float64))
    return act.derivative(saved)


def check_activation_backward(act, shape, dtype, layout, with_bias=True):
    z = 2 * torch.randn(shape, dtype=torch.float64)
    saved = (act.forward(z) if act.saves_output else z).to(dtype).contiguous(
        memory_format=layout)
    grad_out = torch.randn(shape[::-1], dtype=dtype).permute(3, 2, 1, 0)  # any strides
    grad_pre = empty_like_layout(shape, dtype, layout)
    grad_bias = poisoned(shape[1], dtype=dtype) if with_bias else None
    kern.conv2d_activation_backward(grad_out, saved, grad_pre, grad_bias, act.code, act.param,
                                    act.saves_output)
    ref = grad_out.double() * derivative(act, saved.double())
    assert_close(grad_pre, ref, dtype, what=f"grad_pre {act_id(act)}")
    if with_bias:
        assert_close(grad_bias, ref.sum((0, 2, 3)), dtype, what="grad_bias",
                     scale=ref.abs().sum((0, 2, 3)))
    return grad_pre, grad_bias


@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("act", ACTIVATIONS[1:], ids=act_id)
def test_conv2d_activation_backward(act, layout):
    for dtype in DTYPES:
        for shape in [(1, 1, 1, 1), (3, 7, 5, 9), (2, 33, 17, 13)]:
            check_activation_backward(act, shape, dtype, layout)
    check_activation_backward(act, (2, 5, 4, 3), torch.float32, layout, with_bias=False)


@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
def test_bias_gradient_does_not_depend_on_thread_count(layout):
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            torch.manual_seed(0)
            results.append(check_activation_backward(ACTIVATIONS[7], (8, 24, 40, 37),
                                                     torch.float32, layout))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "nhwc"])
def test_zero_sizes(layout):
    """Batch 0: nothing written but grad_weight (zeros) and grad_bias (zeros)."""
    sigmoid = ACTIVATIONS[4]
    for ci, co, g in [(4, 6, 2), (4, 4, 4)]:
        x = make((0, ci, 7, 6), torch.float32, layout)
        weight = make((co, ci // g, 3, 3), torch.float32, torch.contiguous_format)
        out = torch.empty((0, co, 5, 4)).contiguous(memory_format=layout)
        kern.conv2d_forward(x, weight, torch.randn(co), out, out.clone(), (1, 1), (0, 0), (1, 1),
                            g, sigmoid.code, 0.0)
        kern.conv_transpose2d_forward(out, weight, None, x.clone(), None, (1, 1), (0, 0), (1, 1),
                                      g, 0, 0.0)
        grad_w = poisoned(*weight.shape)
        kern.conv2d_backward_weight(out, x, grad_w, (1, 1), (0, 0), (1, 1), g)
        assert torch.equal(grad_w, torch.zeros_like(grad_w))
        grad_bias = poisoned(co)
        kern.conv2d_activation_backward(out, out, out.clone(), grad_bias, sigmoid.code, 0.0, True)
        assert torch.equal(grad_bias, torch.zeros(co))
