"""The Triton conv kernels, called directly with the plain arguments of kernels/__init__.py.

Oracle: torch in float64 (DESIGN.md section 4), with errors relative to the magnitude of the
sums (the same convolution of |x| and |w|). Without a GPU the kernels run through Triton's
interpreter (its config: 32 x 16 x 16 GEMM tiles, 16 x 8 depthwise tiles), so the layers are
tiny yet span several programs, K steps, partial edge tiles and (weight gradient) several
split-K passes. Tests marked ``gpu`` take real sizes and the half types on a CUDA device.
"""

import pytest
import torch
import torch.nn.functional as F
from test_kernels_triton import ACT_IDS, ACTIVATIONS, reference_derivative

from brainkern.kernels.triton import conv as triton_conv
from helpers import TF32_TOLERANCE, assert_close, poisoned

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
NONE, RELU, LEAKY_NEG, GELU, SILU = (ACTIVATIONS[i] for i in (0, 1, 3, 6, 8))
LAYOUTS = ["nchw", "channels_last"]


def tensor(*shape, dtype=torch.float32, layout="nchw"):
    x = torch.randn(*shape, dtype=dtype, device=DEVICE)
    return x.to(memory_format=torch.channels_last) if layout == "channels_last" else x


def poisoned_like(shape, dtype, layout):
    out = poisoned(*shape, dtype=dtype, device=DEVICE)
    return out.to(memory_format=torch.channels_last) if layout == "channels_last" else out


def pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


class Layer:
    """A convolution's parameters; ``c_x`` input channels of the kernel (for a transposed
    convolution, the channels of the x it is given), ``c_out`` output channels."""

    def __init__(self, n, c_x, h, w, c_out, k, stride=1, padding=0, dilation=1, groups=1):
        self.n, self.c_x, self.h, self.w, self.c_out = n, c_x, h, w, c_out
        self.k, self.stride, self.padding = pair(k), pair(stride), pair(padding)
        self.dilation, self.groups = pair(dilation), groups

    def __repr__(self):
        return (f"n{self.n}-c{self.c_x}-{self.h}x{self.w}-o{self.c_out}-k{self.k}-s{self.stride}"
                f"-p{self.padding}-d{self.dilation}-g{self.groups}").replace(" ", "")

    def conv_args(self):
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation,
                    groups=self.groups)


# Kernel 1/3/5, stride 1/2, dilation 1/2, groups 1/2/depthwise/multiplier, 1- and 3-channel
# stems, reductions and channel counts past one tile, non-square everything; groups of 1-20
# channels take the flattened (tap, channel) reduction.
CONV_LAYERS = [
    Layer(2, 3, 9, 7, 5, 3, padding=1),
    Layer(1, 1, 8, 8, 4, 5, padding=2),
    Layer(2, 4, 9, 7, 6, 3, stride=2, padding=1, dilation=2, groups=2),
    Layer(1, 20, 5, 6, 18, 1),
    Layer(2, 6, 7, 9, 4, (3, 5), stride=(2, 1), padding=(0, 2), dilation=(1, 2)),
    Layer(2, 5, 8, 7, 5, 3, padding=1, groups=5),
    Layer(1, 3, 6, 7, 9, 3, stride=2, padding=1, groups=3),
    # Groups of 16 channels (the interpreter's BLOCK_K): the whole-channel-block loop.
    Layer(1, 32, 5, 6, 18, 3, padding=1, dilation=(1, 2)),
    Layer(2, 32, 6, 5, 6, 3, stride=2, padding=1, groups=2),
]
# DCGAN's stride-2 kernel 4 (four phases of two taps each), stride 3 with dilation 2 (tap
# steps and phases that have no taps), kernel 1 with stride 2 (three phases are bias only).
TRANSPOSED_LAYERS = [
    Layer(2, 6, 4, 3, 5, 4, stride=2, padding=1),
    Layer(1, 4, 5, 4, 6, 3, stride=2, padding=1, dilation=2, groups=2),
    Layer(2, 4, 3, 4, 5, 3, stride=(3, 2), padding=(1, 0), dilation=(2, 1)),
    Layer(1, 3, 4, 5, 4, 1, stride=2),
    Layer(2, 5, 4, 4, 5, 3, stride=2, padding=1, groups=5),
    Layer(1, 18, 5, 4, 17, 3, padding=1),
    Layer(1, 16, 4, 3, 17, 4, stride=2, padding=1),
    Layer(1, 32, 3, 4, 4, 3, stride=2, padding=1, dilation=2, groups=2),
]


def magnitude(fn, x, w, b):
    z = fn(x.detach().double().cpu().abs(), w.detach().double().cpu().abs())
    return z if b is None else z + b.detach().double().cpu().abs().view(1, -1, 1, 1)


def check_forward(layer, transposed, act, dtype, layout, bias=True, with_pre=True,
                  output_padding=0, tol=None):
    cg = layer.c_out // layer.groups if transposed else layer.c_x // layer.groups
    w_shape = (layer.c_x, cg, *layer.k) if transposed else (layer.c_out, cg, *layer.k)
    x = tensor(layer.n, layer.c_x, layer.h, layer.w, dtype=dtype, layout=layout)
    w = tensor(*w_shape, dtype=dtype)
    b = tensor(layer.c_out, dtype=dtype) if bias else None
    if transposed:
        def fn(x_, w_, b_=None):
            return F.conv_transpose2d(x_, w_, b_, layer.stride, layer.padding, output_padding,
                                      layer.groups, layer.dilation)
    else:
        def fn(x_, w_, b_=None):
            return F.conv2d(x_, w_, b_, **layer.conv_args())
    ref_pre = fn(x.double().cpu(), w.double().cpu(), None if b is None else b.double().cpu())
    out = poisoned_like(ref_pre.shape, dtype, layout)
    pre = poisoned_like(ref_pre.shape, dtype, layout) if with_pre else None
    kernel = triton_conv.conv_transpose2d_forward if transposed else triton_conv.conv2d_forward
    kernel(x, w, b, out, pre, layer.stride, layer.padding, layer.dilation, layer.groups,
           act.code, act.param)
    scale = magnitude(fn, x, w, b)
    assert_close(out, act.forward(ref_pre), dtype=dtype, tol=tol, what=f"{act.name} out",
                 scale=scale)
    if with_pre:
        assert_close(pre, ref_pre, dtype=dtype, tol=tol, what="pre", scale=scale)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("layer", CONV_LAYERS, ids=repr)
def test_conv2d_forward(layer, layout):
    check_forward(layer, False, SILU, torch.float32, layout)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("layer", TRANSPOSED_LAYERS, ids=repr)
def test_conv_transpose2d_forward(layer, layout):
    check_forward(layer, True, SILU, torch.float32, layout)


@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transposed"])
@pytest.mark.parametrize("act", [NONE, RELU, LEAKY_NEG, GELU], ids=["none", "relu", "leaky-0.3",
                                                                      "gelu"])
def test_forward_float64_activations(act, transposed):
    layers = TRANSPOSED_LAYERS if transposed else CONV_LAYERS
    check_forward(layers[0], transposed, act, torch.float64, "channels_last")
    check_forward(layers[2], transposed, act, torch.float64, "nchw")


@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transposed"])
@pytest.mark.parametrize("bias,with_pre", [(False, True), (True, False), (False, False)])
def test_forward_without_bias_or_pre(bias, with_pre, transposed):
    # Groups with and without bias: a bias indexed by the channel within its group is a known bug.
    layer = (TRANSPOSED_LAYERS if transposed else CONV_LAYERS)[2]
    check_forward(layer, transposed, RELU, torch.float32, "nchw", bias=bias, with_pre=with_pre)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_conv_transpose2d_output_padding(layout):
    # out is one row and column larger than the taps reach: those hold act(bias) only.
    check_forward(TRANSPOSED_LAYERS[0], True, GELU, torch.float32, layout, output_padding=1)
    check_forward(TRANSPOSED_LAYERS[1], True, GELU, torch.float32, layout, output_padding=1)


def test_conv2d_padding_after_implied_by_out():
    # "same" with an even kernel: 1 row/column of padding before, 2 after, which the kernel
    # learns from out's size alone.
    x = tensor(2, 3, 7, 6)
    w = tensor(4, 3, 4, 4)
    out = poisoned_like((2, 4, 7, 6), torch.float32, "nchw")
    triton_conv.conv2d_forward(x, w, None, out, None, (1, 1), (1, 1), (1, 1), 1, 0, 0.0)
    padded = F.pad(x.double().cpu(), (1, 2, 1, 2))
    ref = F.conv2d(padded, w.double().cpu())
    assert_close(out, ref, dtype=torch.float32, scale=F.conv2d(padded.abs(), w.double().cpu().abs()))


@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transposed"])
def test_nan_in_input_stays_nan(transposed):
    layer = (TRANSPOSED_LAYERS if transposed else CONV_LAYERS)[0]
    x = tensor(layer.n, layer.c_x, layer.h, layer.w)
    x[1, 2, 2, 1] = float("nan")
    w_shape = (layer.c_x, layer.c_out, *layer.k) if transposed else (layer.c_out, layer.c_x,
                                                                      *layer.k)
    w = tensor(*w_shape)
    fn = F.conv_transpose2d if transposed else F.conv2d
    ref = fn(x.double().cpu(), w.double().cpu(), None, layer.stride, layer.padding)
    out = poisoned_like(ref.shape, torch.float32, "nchw")
    kernel = triton_conv.conv_transpose2d_forward if transposed else triton_conv.conv2d_forward
    kernel(x, w, None, out, None, layer.stride, layer.padding, layer.dilation, 1, RELU.code, 0.0)
    assert 0 < torch.isnan(ref).sum() < ref.numel()
    assert_close(out, torch.relu(ref), dtype=torch.float32)


@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transposed"])
@pytest.mark.parametrize("bias", [True, False])
def test_empty_reduction_gives_activation_of_bias(bias, transposed):
    x = tensor(2, 0, 4, 5)
    w = tensor(*((0, 3, 3, 3) if transposed else (3, 0, 3, 3)))
    b = tensor(3) if bias else None
    out = poisoned_like((2, 3, 4, 5), torch.float32, "nchw")
    kernel = triton_conv.conv_transpose2d_forward if transposed else triton_conv.conv2d_forward
    kernel(x, w, b, out, None, (1, 1), (1, 1), (1, 1), 1, GELU.code, 0.0)
    z = torch.zeros(2, 3, 4, 5, dtype=torch.float64) + (0 if b is None else b.double().cpu()
                                                         .view(1, -1, 1, 1))
    assert_close(out, GELU.forward(z), dtype=torch.float32)


@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transposed"])
def test_batch_zero_writes_nothing(transposed):
    x = tensor(0, 4, 5, 5)
    w = tensor(4, 2, 3, 3) if transposed else tensor(2, 4, 3, 3)
    out = torch.empty(0, 2, 5, 5, device=DEVICE)
    kernel = triton_conv.conv_transpose2d_forward if transposed else triton_conv.conv2d_forward
    kernel(x, w, None, out, None, (1, 1), (1, 1), (1, 1), 1, RELU.code, 0.0)


def check_backward_weight(layer, dtype, layout, tol=None):
    cg = layer.c_x // layer.groups
    x = tensor(layer.n, layer.c_x, layer.h, layer.w, dtype=dtype, layout=layout)
    w_shape = (layer.c_out, cg, *layer.k)
    grad = F.conv2d(x.double().cpu(), torch.zeros(w_shape, dtype=torch.float64),
                    **layer.conv_args())
    grad = tensor(*grad.shape, dtype=dtype, layout=layout)
    grad_w = poisoned(*w_shape, dtype=dtype, device=DEVICE)
    triton_conv.conv2d_backward_weight(grad, x, grad_w, layer.stride, layer.padding,
                                       layer.dilation, layer.groups)

    def weight_grad(x_, g_):
        return torch.nn.grad.conv2d_weight(x_, w_shape, g_, **layer.conv_args())

    ref = weight_grad(x.double().cpu(), grad.double().cpu())
    scale = weight_grad(x.double().cpu().abs(), grad.double().cpu().abs())
    assert_close(grad_w, ref, dtype=dtype, tol=tol, what="grad_weight", scale=scale)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("layer", CONV_LAYERS, ids=repr)
def test_conv2d_backward_weight(layer, layout):
    check_backward_weight(layer, torch.float32, layout)


@pytest.mark.parametrize("layer", [CONV_LAYERS[0], CONV_LAYERS[2], CONV_LAYERS[5]], ids=repr)
def test_conv2d_backward_weight_float64(layer):
    check_backward_weight(layer, torch.float64, "channels_last")


def test_conv2d_backward_weight_one_split():
    # 20 output pixels: one split, written in place (no second reduction pass).
    assert 20 < triton_conv.PIXELS_PER_SPLIT * 2
    check_backward_weight(Layer(1, 3, 4, 5, 5, 3, padding=1), torch.float32, "nchw")


def test_conv2d_backward_weight_batch_zero_gives_zero():
    grad_w = poisoned(4, 3, 3, 3, device=DEVICE)
    triton_conv.conv2d_backward_weight(torch.empty(0, 4, 5, 5, device=DEVICE),
                                       torch.empty(0, 3, 5, 5, device=DEVICE), grad_w,
                                       (1, 1), (1, 1), (1, 1), 1)
    assert torch.equal(grad_w.cpu(), torch.zeros(4, 3, 3, 3))


def check_activation_backward(shape, act, dtype, layout, with_bias=True, strided_grad=True,
                              tol=None):
    z = tensor(*shape, dtype=torch.float64, layout=layout).cpu()
    saved = (act.forward(z) if act.saves_output else z).to(dtype).to(DEVICE)
    if strided_grad:  # any strides: every other channel of a wider NCHW tensor
        grad_out = torch.randn(shape[0], 2 * shape[1], *shape[2:], dtype=dtype,
                               device=DEVICE)[:, ::2]
    else:
        grad_out = tensor(*shape, dtype=dtype, layout=layout)
    grad_pre = poisoned_like(shape, dtype, layout)
    grad_bias = poisoned(shape[1], dtype=dtype, device=DEVICE) if with_bias else None
    triton_conv.conv2d_activation_backward(grad_out, saved, grad_pre, grad_bias, act.code,
                                           act.param, act.saves_output)
    ref = grad_out.double().cpu() * reference_derivative(act, saved.double().cpu())
    assert_close(grad_pre, ref, dtype=dtype, tol=tol, what="grad_pre")
    assert grad_pre.stride() == saved.stride()
    if with_bias:
        assert_close(grad_bias, ref.sum((0, 2, 3)), dtype=dtype, tol=tol, what="grad_bias")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("act", ACTIVATIONS[1:], ids=ACT_IDS[1:])
def test_activation_backward_every_activation(act, layout):
    # 2 x 7 x 9 = 126 pixels in 4 row splits; 37 channels: two channel blocks, one partial.
    check_activation_backward((2, 37, 7, 9), act, torch.float32, layout)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("strided_grad", [True, False])
def test_activation_backward_float64(with_bias, strided_grad):
    check_activation_backward((3, 5, 4, 3), GELU, torch.float64, "channels_last", with_bias,
                              strided_grad)


def test_activation_backward_batch_zero_gives_zero_bias_grad():
    grad_bias = poisoned(6, device=DEVICE)
    triton_conv.conv2d_activation_backward(
        torch.randn(0, 6, 3, 3, device=DEVICE), torch.randn(0, 6, 3, 3, device=DEVICE),
        torch.empty(0, 6, 3, 3, device=DEVICE), grad_bias, RELU.code, 0.0, True)
    assert torch.equal(grad_bias.cpu(), torch.zeros(6))


@pytest.fixture
def conv_fp32_precision():
    """Restore torch's cuDNN TF32 switch (which the conv launchers read) after a test."""
    saved = torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cudnn.allow_tf32 = saved


GPU_DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# Realistic layers: the CNN's stem and 32 -> 64, a ResNet 3x3, depthwise, DCGAN upsampling.
GPU_CONV_LAYERS = [
    Layer(64, 1, 32, 32, 32, 5, padding=2),
    Layer(64, 32, 16, 16, 64, 5, padding=2),
    Layer(32, 64, 28, 28, 64, 3, padding=1),
    Layer(32, 64, 28, 28, 64, 3, stride=2, padding=1, groups=64),
]
GPU_TRANSPOSED_LAYERS = [Layer(64, 128, 8, 8, 64, 4, stride=2, padding=1),
                         Layer(64, 64, 16, 16, 1, 4, stride=2, padding=1)]


def gpu_tolerance(dtype, layer):
    # Rounding errors grow with the reduction length (channels x taps).
    reduction = layer.c_x // layer.groups * layer.k[0] * layer.k[1]
    base = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}[dtype]
    return base * max(1.0, (reduction / 1024) ** 0.5)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("layer", GPU_CONV_LAYERS, ids=repr)
def test_gpu_conv2d(layer, dtype, layout, conv_fp32_precision):
    torch.backends.cudnn.allow_tf32 = False
    tol = gpu_tolerance(dtype, layer)
    check_forward(layer, False, GELU, dtype, layout, tol=tol)
    check_backward_weight(layer, dtype, layout, tol=tol)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("layer", GPU_TRANSPOSED_LAYERS, ids=repr)
def test_gpu_conv_transpose2d(layer, dtype, layout, conv_fp32_precision):
    torch.backends.cudnn.allow_tf32 = False
    check_forward(layer, True, RELU, dtype, layout, tol=gpu_tolerance(dtype, layer))


@pytest.mark.gpu
@gpu
def test_gpu_conv2d_tf32(conv_fp32_precision):
    torch.backends.cudnn.allow_tf32 = True
    check_forward(GPU_CONV_LAYERS[2], False, GELU, torch.float32, "channels_last",
                  tol=TF32_TOLERANCE)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_gpu_activation_backward(dtype):
    check_activation_backward((64, 64, 28, 28), SILU, dtype, "channels_last")


@pytest.mark.gpu
@gpu
def test_gpu_backward_is_deterministic():
    layer = GPU_CONV_LAYERS[0]
    x = tensor(64, 1, 32, 32, layout="channels_last")
    grad = tensor(64, 32, 32, 32, layout="channels_last")
    saved = tensor(64, 32, 32, 32, layout="channels_last")
    weights, biases = [], []
    for _ in range(3):
        grad_w = torch.empty(32, 1, 5, 5, device="cuda")
        triton_conv.conv2d_backward_weight(grad, x, grad_w, layer.stride, layer.padding,
                                           layer.dilation, 1)
        grad_b = torch.empty(32, device="cuda")
        triton_conv.conv2d_activation_backward(grad, saved, torch.empty_like(saved), grad_b,
                                               SILU.code, 0.0, False)
        weights.append(grad_w)
        biases.append(grad_b)
    assert all(torch.equal(weights[0], w) for w in weights[1:])
    assert all(torch.equal(biases[0], b) for b in biases[1:])
