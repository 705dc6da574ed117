"""Every backend's conv kernels through one contract (the conv section of kernels/__init__.py).

Each backend runs on its own device (Triton: the GPU when there is one, else its interpreter on
these tiny layers). Oracle: torch in float64 on the CPU, with the padding after the last row and
column implied by out's size (tests/contract.py pads explicitly); errors are relative to the
same sums of |x| |w| + |bias|, per-dtype tolerance (helpers.TOLERANCE). Outputs start as NaN;
NCHW and channels_last; NaN and infinities come out where torch's do. The layers are a fixed
list chosen so that together they cover kernel 1..7, stride 1..3, dilation 1..3, groups 1 / 2 /
depthwise / depthwise with a channel multiplier, odd and rectangular sizes, an output larger
than the natural one (asymmetric padding) or smaller, 1-channel and 1 x 1 planes (contiguous in
both formats, so the format must be read from the other tensors), and channel counts past the
CPU register tiles and Triton's 16-channel and 32-pixel interpreter blocks.
"""

import pytest
import torch
from contract import (
    ACT_IDS,
    ACTIVATIONS,
    BACKWARD_ACT_IDS,
    BACKWARD_ACTIVATIONS,
    FORMATS,
    GELU_TANH,
    INF,
    NAN,
    Layer,
    act_forward,
    backend_dtypes_for,
    backends_for,
    check,
    check_backward_weight,
    check_conv_forward,
    check_input_gradient,
    conv2d_reference,
    conv2d_weight_reference,
    conv_operands,
    derivative_scale,
    finite_magnitude,
    interpreted,
    kernels,
    layer_id,
    poisoned_in,
    randn_in,
    saved_for,
    with_bias,
)

from brainkern.activations import NONE

CONV = backends_for("conv")
# Triton's interpreter computes in numpy, which warns of the inf - inf and 0 * inf it is given.
INTERPRETER_NAN_WARNINGS = pytest.mark.filterwarnings(
    "ignore:invalid value encountered:RuntimeWarning")
OTHER_DTYPES = backend_dtypes_for("conv", (torch.float64, torch.float16, torch.bfloat16))
NCHW, NHWC = torch.contiguous_format, torch.channels_last


@pytest.fixture(autouse=True)
def _strict_fp32_on_gpu():
    """Triton's conv launchers follow torch's cuDNN TF32 switch, on by default: the contract
    holds float32 to its own tolerance (TF32 is in tests/test_kernels_triton_conv.py)."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = saved


CONV_LAYERS = [
    Layer(2, 3, 5, (9, 7), (3, 3), padding=(1, 1)),
    Layer(1, 1, 4, (8, 8), (5, 5), padding=(2, 2)),  # 1-channel stem
    Layer(2, 4, 6, (9, 7), (3, 3), (2, 2), (1, 1), (2, 2), 2),
    Layer(1, 20, 18, (5, 6), (1, 1)),  # pointwise: a plain GEMM
    Layer(2, 6, 4, (7, 9), (3, 5), (2, 1), (0, 2), (1, 2), extra=(1, 0)),
    Layer(2, 5, 5, (8, 7), (3, 3), padding=(1, 1), groups=5),  # depthwise
    Layer(1, 3, 9, (6, 7), (3, 3), (2, 2), (1, 1), groups=3, extra=(0, 1)),  # multiplier 3
    Layer(1, 32, 18, (5, 6), (3, 3), padding=(1, 1), dilation=(1, 2)),  # 16-channel blocks
    Layer(2, 32, 6, (6, 5), (3, 3), (2, 2), (1, 1), groups=2),
    Layer(1, 2, 3, (15, 16), (7, 7), (3, 3), (3, 3), (2, 2)),
    Layer(2, 6, 4, (9, 9), (2, 2), (2, 2), (0, 0), (3, 3), extra=(2, 0)),
    Layer(1, 2, 3, (4, 4), (6, 6), padding=(3, 3), extra=(1, 1)),  # kernel wider than x
    Layer(1, 8, 40, (12, 11), (4, 2), (3, 2), (1, 0), (1, 2), 2),  # 20 channels a group
    Layer(2, 5, 1, (7, 6), (3, 3), extra=(-1, 0)),  # 1 output channel; out cropped
    Layer(3, 4, 6, (1, 1), (3, 3), padding=(1, 1)),  # 1 x 1 planes
    Layer(2, 4, 12, (9, 8), (5, 3), (1, 2), (2, 1), groups=4, extra=(1, 1)),  # multiplier 3
]
# DCGAN's k4 s2 p1 (four phases of two taps), stride 3 with dilation 2 (phases without taps),
# kernel 1 stride 2 (phases that are bias only), out past the taps' reach (bias only too).
TRANSPOSED_LAYERS = [
    Layer(2, 6, 5, (4, 3), (4, 4), (2, 2), (1, 1), extra=(1, 0)),
    Layer(1, 4, 6, (5, 4), (3, 3), (2, 2), (1, 1), (2, 2), 2, extra=(1, 1)),
    Layer(2, 4, 5, (3, 4), (3, 3), (3, 2), (1, 0), (2, 1)),
    Layer(1, 3, 4, (4, 5), (1, 1), (2, 2)),
    Layer(2, 5, 5, (4, 4), (3, 3), (2, 2), (1, 1), groups=5),  # depthwise
    Layer(2, 3, 6, (5, 6), (3, 2), (1, 1), (2, 0), (2, 2), 3, extra=(1, 0)),  # multiplier 2
    Layer(1, 18, 17, (5, 4), (3, 3), padding=(1, 1)),
    Layer(1, 32, 4, (3, 4), (3, 3), (2, 2), (1, 1), (2, 2), 2),
    Layer(1, 5, 40, (4, 3), (7, 1), (1, 3), (3, 0), extra=(0, 2)),
    Layer(1, 8, 6, (5, 6), (3, 3), (2, 3), (2, 1), (3, 2), 2, extra=(2, 1)),
    Layer(2, 4, 4, (5, 5), (1, 1), (3, 3), groups=2, extra=(4, 3)),
    Layer(2, 1, 1, (1, 1), (3, 3), (2, 2), (1, 1)),  # 1 channel, 1 x 1 planes
    # 1 x 1 inputs onto exactly the kernel (a generator's z -> 4 x 4): one GEMM
    Layer(3, 7, 5, (1, 1), (4, 3)),
    Layer(2, 6, 4, (1, 1), (4, 4), (2, 2)),
]


def half_of(layers, fmt):
    """(layer, takes the other half) pairs: each format gives half the layers one half of a
    test and the rest the other, so the two formats together cover every pairing (half the
    interpreter's time of running both halves on every layer)."""
    return [(layer, (i + (fmt == NHWC)) % 2 == 1) for i, layer in enumerate(layers)]


@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transposed"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("backend", CONV)
def test_forward(backend, fmt, transposed):
    """Every layer with a bias, pre and an activation, and with none of them."""
    for layer, plain in half_of(TRANSPOSED_LAYERS if transposed else CONV_LAYERS, fmt):
        if plain:
            check_conv_forward(backend, layer, transposed, ACTIVATIONS[0], torch.float32, fmt,
                               bias=False, with_pre=False)
        else:
            check_conv_forward(backend, layer, transposed, GELU_TANH, torch.float32, fmt)


# (bias, pre, format, layer index): every pairing, each on another layer kind and format.
EPILOGUES = [(True, True, NHWC, 0), (True, False, NCHW, 5), (False, True, NHWC, 6),
             (False, False, NCHW, 2)]


@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transposed"])
@pytest.mark.parametrize("act", ACTIVATIONS, ids=ACT_IDS)
@pytest.mark.parametrize("backend", CONV)
def test_forward_every_epilogue(backend, act, transposed):
    """Every activation with and without bias and pre, on the GEMM and depthwise paths (groups
    with a bias: a bias indexed by the channel within its group is a known Triton hazard)."""
    layers = TRANSPOSED_LAYERS if transposed else CONV_LAYERS
    epilogues = EPILOGUES
    if interpreted(backend):  # half per activation, alternating: every pairing still runs
        epilogues = EPILOGUES[ACTIVATIONS.index(act) % 2::2]
    for bias, with_pre, fmt, index in epilogues:
        check_conv_forward(backend, layers[index], transposed, act, torch.float32, fmt, bias,
                           with_pre)


@pytest.mark.parametrize("backend,dtype", OTHER_DTYPES)
def test_forward_dtypes(backend, dtype):
    for transposed, layers in ((False, CONV_LAYERS), (True, TRANSPOSED_LAYERS)):
        for layer, fmt in zip((layers[0], layers[2], layers[5]), (NHWC, NCHW, NHWC)):
            check_conv_forward(backend, layer, transposed, ACTIVATIONS[8], dtype, fmt)


# Specials in x and bias, and in the weight of pointwise layers only: where a tap meets the
# padding (or a transposed output no product reaches), 0 * inf (NaN, as an im2col or a masked
# load reads it) and a skipped tap (nothing) both keep to the contract.
SPECIAL_LAYERS = [(False, CONV_LAYERS[0], False), (False, CONV_LAYERS[5], False),
                  (False, CONV_LAYERS[3], True), (False, CONV_LAYERS[8], False),
                  (True, TRANSPOSED_LAYERS[0], False), (True, TRANSPOSED_LAYERS[4], False),
                  (True, Layer(1, 18, 17, (5, 4), (1, 1)), True)]


@INTERPRETER_NAN_WARNINGS
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("act", ACTIVATIONS, ids=ACT_IDS)
@pytest.mark.parametrize("backend", CONV)
def test_forward_nan_and_inf_inputs(backend, act, dtype):
    """Under the interpreter each dtype takes half the layers."""
    for i, (transposed, layer, weight_specials) in enumerate(SPECIAL_LAYERS):
        if interpreted(backend) and (i + (dtype == torch.float64)) % 2:
            continue
        fmt = (NCHW, NHWC)[i % 2]
        x, weight, bias = conv_operands(backend, layer, transposed, dtype, fmt)
        x[0, 0, 0, 0], x[-1, -1, -1, -1], x[0, -1, layer.hw[0] // 2, 0] = NAN, INF, -INF
        bias[-1] = NAN
        if weight_specials:
            weight[1, 0, 0, 0], weight[-1, -1, -1, -1] = -INF, NAN
        if layer.c_out > 2:
            bias[1] = INF
        check_conv_forward(backend, layer, transposed, act, dtype, fmt,
                           operands=(x, weight, bias))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("backend", CONV)
def test_conv2d_gradients(backend, fmt):
    """The weight gradient of every layer, and (through the transposed kernel) the input
    gradient of half of them per format, out's extra rows included."""
    for layer, input_gradient in half_of(CONV_LAYERS, fmt):
        check_backward_weight(backend, layer, torch.float32, fmt)
        if input_gradient:
            check_input_gradient(backend, layer, torch.float32, fmt)


@pytest.mark.parametrize("backend,dtype", OTHER_DTYPES)
def test_conv2d_gradients_dtypes(backend, dtype):
    for layer, fmt in zip((CONV_LAYERS[0], CONV_LAYERS[2], CONV_LAYERS[5]), (NHWC, NCHW, NHWC)):
        check_backward_weight(backend, layer, dtype, fmt)
        check_input_gradient(backend, layer, dtype, fmt)


@INTERPRETER_NAN_WARNINGS
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("backend", CONV)
def test_backward_weight_nan_and_inf(backend, dtype):
    # The stems in both layouts: an input tap past a row's end meets no output (a vector
    # kernel must not multiply it by a zero dz).
    for layer, fmt in zip((CONV_LAYERS[0], CONV_LAYERS[1], CONV_LAYERS[5], CONV_LAYERS[8]),
                          (NHWC, NCHW, NCHW, NHWC)):
        check_backward_weight(backend, layer, dtype, fmt, specials=True)


def check_activation_backward(backend, shape, act, dtype, fmt, grad_view, with_bias=True,
                              specials=False):
    """The 4-D activation backward on poisoned outputs against grad_out * act'(saved)."""
    kern = kernels(backend, "conv")
    saved = saved_for(act, 2 * randn_in(shape, backend, dtype, fmt))
    grad_out = grad_view(shape, backend, dtype)
    if specials:
        grad_out = grad_out.clone()  # an expanded view cannot take them
        grad_out[0, 0, 0, 0], grad_out[-1, -1, -1, -1], grad_out[0, -1, 0, -1] = NAN, INF, -INF
        saved[-1, 0, -1, 0] = NAN
    grad_pre = poisoned_in(shape, saved, fmt)
    grad_bias = poisoned_in((shape[1],), saved) if with_bias else None
    kern.conv2d_activation_backward(grad_out, saved, grad_pre, grad_bias, act.code, act.param,
                                    act.saves_output)
    ref = grad_out.double().cpu() * act.derivative(saved.double().cpu())
    scale = derivative_scale(act, grad_out, saved)
    check(grad_pre, ref, dtype, f"grad_pre {shape} ({act.name} {act.param})", scale)
    if with_bias:  # rounding is relative to the sum of magnitudes, not to a cancelled sum
        check(grad_bias, ref.sum((0, 2, 3)), dtype, "grad_bias", scale.sum((0, 2, 3)))
    return grad_pre, grad_bias


# grad_out in any strides: dense NCHW, the reversed-dimension permutation, every other channel
# of a wider tensor, and broadcast (an expanded gradient, as sum()'s backward gives).
GRAD_VIEWS = [
    lambda s, b, d: randn_in(s, b, d),
    lambda s, b, d: randn_in(s[::-1], b, d).permute(3, 2, 1, 0),
    lambda s, b, d: randn_in((s[0], 2 * s[1], *s[2:]), b, d)[:, ::2],
    lambda s, b, d: randn_in((1, s[1], 1, 1), b, d).expand(s),
]
# One pixel and one channel; odd; Triton's 32-channel block and pixel splits, one past each.
ACTIVATION_SHAPES = [(1, 1, 1, 1), (3, 7, 5, 9), (2, 37, 7, 9)]


@INTERPRETER_NAN_WARNINGS
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("act", BACKWARD_ACTIVATIONS, ids=BACKWARD_ACT_IDS)
@pytest.mark.parametrize("backend", CONV)
def test_conv2d_activation_backward(backend, act, fmt):
    for shape in ACTIVATION_SHAPES:
        for i, view in enumerate(GRAD_VIEWS):
            check_activation_backward(backend, shape, act, torch.float32, fmt, view,
                                      with_bias=i != 1)
    check_activation_backward(backend, (3, 7, 5, 9), act, torch.float32, fmt, GRAD_VIEWS[1],
                              specials=True)


@pytest.mark.parametrize("backend,dtype", OTHER_DTYPES)
def test_conv2d_activation_backward_dtypes(backend, dtype):
    for act, fmt in ((ACTIVATIONS[3], NHWC), (ACTIVATIONS[6], NCHW)):
        check_activation_backward(backend, (2, 37, 7, 9), act, dtype, fmt, GRAD_VIEWS[2])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("backend", CONV)
def test_zero_sizes(backend, fmt):
    """Batch 0, no output channels or an empty output plane: nothing to write in out, and the
    weight and bias gradients and the input gradient (a transposed conv without products) are
    sums over nothing, zeros."""
    kern = kernels(backend, "conv")
    sigmoid = ACTIVATIONS[4]
    for n, c_in, c_out, groups, out_hw in [(0, 4, 6, 2, (5, 4)), (0, 4, 4, 4, (5, 4)),
                                           (2, 3, 0, 1, (5, 4)), (2, 3, 4, 1, (0, 4))]:
        x = randn_in((n, c_in, 7, 6), backend, torch.float32, fmt)
        weight = randn_in((c_out, c_in // groups, 3, 3), backend, torch.float32)
        out = poisoned_in((n, c_out, *out_hw), x, fmt)
        params = ((1, 1), (0, 0), (1, 1), groups)
        kern.conv2d_forward(x, weight, randn_in((c_out,), backend, torch.float32), out,
                            out.clone(), *params, sigmoid.code, 0.0)
        grad_x = poisoned_in(x.shape, x, fmt)
        kern.conv_transpose2d_forward(out, weight, None, grad_x, None, *params, NONE, 0.0)
        assert not grad_x.cpu().any(), "no products: zeros"
        grad_weight = poisoned_in(weight.shape, weight)
        kern.conv2d_backward_weight(out, x, grad_weight, *params)
        assert not grad_weight.cpu().any(), (n, c_in, c_out, out_hw)
        if n == 0:
            grad_bias = poisoned_in((c_out,), x)
            kern.conv2d_activation_backward(out, out, out.clone(), grad_bias, sigmoid.code, 0.0,
                                            True)
            assert not grad_bias.cpu().any()


@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transposed"])
@pytest.mark.parametrize("backend", CONV)
def test_empty_reduction_gives_activation_of_bias(backend, transposed):
    """No input channels (C_in of a conv, C_x of a transposed one): out = act(bias)."""
    for fmt in (NCHW, NHWC):
        layer = Layer(2, 0, 3, (4, 5), (3, 3), padding=(1, 1), extra=(1, 0))
        check_conv_forward(backend, layer, transposed, ACTIVATIONS[6], torch.float32, fmt)
        check_conv_forward(backend, layer, transposed, ACTIVATIONS[4], torch.float32, fmt,
                           bias=False, with_pre=False)


# Activation backward fused into the weight gradient: where a backend has it ----------------

FUSED_WEIGHT = [param for param in CONV
                if hasattr(kernels(param.values[0], "conv"), "conv2d_activation_backward_weight")] or [
    pytest.param(None, marks=pytest.mark.skip(
        reason="no backend here has the optional conv2d_activation_backward_weight"))]
# Thin stride-1 layers (1 and 3 channels: the stems' direct kernels), a dilated one with an
# output past the natural size, and layers the kernel composes (strided, grouped, wide).
FUSED_WEIGHT_LAYERS = [CONV_LAYERS[1], CONV_LAYERS[0],
                       Layer(3, 2, 17, (11, 13), (3, 5), padding=(2, 1), dilation=(2, 1),
                             extra=(1, 0)),
                       CONV_LAYERS[2], CONV_LAYERS[9], CONV_LAYERS[7]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("act", BACKWARD_ACTIVATIONS, ids=BACKWARD_ACT_IDS)
@pytest.mark.parametrize("backend", FUSED_WEIGHT)
def test_conv2d_activation_backward_weight(backend, act, fmt, dtype):
    """grad_weight and grad_bias of dz = grad_out * act'(saved), against torch's float64 weight
    gradient of dz, on poisoned outputs; batch 0 writes zeros."""
    kern = kernels(backend, "conv")
    for i, layer in enumerate(FUSED_WEIGHT_LAYERS + [Layer(0, 1, 4, (8, 8), (5, 5), (1, 1),
                                                           (2, 2))]):
        x = randn_in((layer.n, layer.c_x, *layer.hw), backend, dtype, fmt)
        shape = (layer.n, layer.c_out, *layer.out_hw(False))
        saved = saved_for(act, 2 * randn_in(shape, backend, dtype, fmt))
        grad_out = randn_in(shape, backend, dtype, fmt)
        grad_weight = poisoned_in(layer.weight_shape(False), x)
        grad_bias = poisoned_in((layer.c_out,), x) if i % 2 == 0 else None
        kern.conv2d_activation_backward_weight(grad_out, saved, x, grad_weight, grad_bias,
                                               *layer.params(), act.code, act.param,
                                               act.saves_output)
        dz = grad_out.double().cpu() * act.derivative(saved.double().cpu())
        dz_scale = derivative_scale(act, grad_out, saved)
        ref = conv2d_weight_reference(dz, x, grad_weight.shape, *layer.params())
        scale = conv2d_weight_reference(dz_scale, finite_magnitude(x), grad_weight.shape,
                                        *layer.params())
        check(grad_weight, ref, dtype, f"grad_weight {layer_id(layer)}", scale)
        if grad_bias is not None:
            check(grad_bias, dz.sum((0, 2, 3)), dtype, "grad_bias", dz_scale.sum((0, 2, 3)))


# Fused conv block: where a backend has conv2d_maxpool2d_forward ------------------------------

FUSED = [param for param in CONV
         if hasattr(kernels(param.values[0], "conv"), "conv2d_maxpool2d_forward")] or [
    pytest.param(None, marks=pytest.mark.skip(
        reason="no backend here has the optional conv2d_maxpool2d_forward"))]
# Conv outputs of even and odd size (the last row/column then joins no window), 2 x 2 and the
# 1-channel stem.
FUSED_LAYERS = [CONV_LAYERS[0], CONV_LAYERS[1], CONV_LAYERS[4], CONV_LAYERS[5], CONV_LAYERS[8]]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("act", ACTIVATIONS, ids=ACT_IDS)
@pytest.mark.parametrize("backend", FUSED)
def test_conv2d_maxpool2d_forward(backend, act, fmt):
    """out and pre against torch's max_pool2d of act(z): each index is a tap of its own
    window whose value is the window's maximum (a float tie may pick another tap)."""
    kern = kernels(backend, "conv")
    for i, layer in enumerate(FUSED_LAYERS):
        x, weight, bias = conv_operands(backend, layer, False, torch.float32, fmt, i % 2 == 0)
        conv_hw = layer.out_hw(False)
        shape = (layer.n, layer.c_out, conv_hw[0] // 2, conv_hw[1] // 2)
        out, pre = poisoned_in(shape, x, fmt), poisoned_in(shape, x, fmt)
        indices = poisoned_in(shape, x, fmt, torch.int64)
        kern.conv2d_maxpool2d_forward(x, weight, bias, out, indices, pre, conv_hw,
                                      *layer.params(), act.code, act.param)
        z = with_bias(conv2d_reference(x, weight, conv_hw, *layer.params()), bias)
        y = act_forward(act, z)
        ref = torch.nn.functional.max_pool2d(y, 2, 2)
        won = indices.cpu()
        rows, cols = won // conv_hw[1], won % conv_hw[1]
        grid_h = torch.arange(shape[2]).view(1, 1, -1, 1)
        grid_w = torch.arange(shape[3]).view(1, 1, 1, -1)
        assert torch.equal(rows // 2, grid_h.expand(shape)), "an index outside its window"
        assert torch.equal(cols // 2, grid_w.expand(shape)), "an index outside its window"
        tol_scale = finite_magnitude(y).amax() * torch.ones(shape, dtype=torch.float64)
        check(out, ref, torch.float32, f"out {layer_id(layer)}", tol_scale)
        check(y.flatten(2).gather(2, won.flatten(2)).view(shape), ref, torch.float32,
              "the value at the index", tol_scale)
        check(pre, z.flatten(2).gather(2, won.flatten(2)).view(shape), torch.float32, "pre")
        if getattr(kern, "WINDOW_CODES", False):  # uint8 codes 2u + v name the same winners
            out_c, pre_c = poisoned_in(shape, x, fmt), poisoned_in(shape, x, fmt)
            codes = poisoned_in(shape, x, fmt, torch.uint8)
            kern.conv2d_maxpool2d_forward(x, weight, bias, out_c, codes, pre_c, conv_hw,
                                          *layer.params(), act.code, act.param)
            u, v = codes.cpu().long() // 2, codes.cpu().long() % 2
            assert torch.equal(rows, 2 * grid_h + u) and torch.equal(cols, 2 * grid_w + v)
            assert torch.equal(out_c, out) and torch.equal(pre_c, pre)
