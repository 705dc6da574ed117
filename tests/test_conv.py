"""brainkern.functional.conv2d / conv_transpose2d and nn.Conv2d / nn.ConvTranspose2d against
torch, on every backend with conv kernels: forward, all gradients, layouts, shapes, errors."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F

import brainkern
import brainkern.functional as BF
import brainkern.nn as bnn
from brainkern import backends
from tests.helpers import assert_close, gradcheck

BACKENDS = [name for name in backends.available_backends()
            if importlib.util.find_spec(f"{backends.BACKENDS[name].package}.conv") is not None]
CL = torch.channels_last


def device_of(backend):
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def small(backend):
    """Triton's interpreter runs numpy per program: tiny shapes there."""
    return backend == "triton" and not torch.cuda.is_available()


def grads(y, inputs, g):
    return torch.autograd.grad(y, [t for t in inputs if t is not None], g)


def compare(backend, ours, theirs, inputs, dtype, what):
    """Forward and every gradient of ``ours`` against ``theirs`` (torch, float64)."""
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    with brainkern.use_backend(backend):
        y = ours(*inputs)
    ref_inputs = [None if t is None else t.detach().double().requires_grad_() for t in inputs]
    ref = theirs(*ref_inputs)
    assert y.shape == ref.shape and y.dtype == dtype
    assert_close(y, ref, tol=tol, what=f"{what}: output")
    g = torch.randn_like(ref)
    got = grads(y, inputs, g.to(dtype))
    want = grads(ref, ref_inputs, g)
    for name, a, b in zip(("input", "weight", "bias"), got, want):
        assert_close(a, b, tol=tol, what=f"{what}: grad {name}")
    return y, ref


# (C_in, C_out, kernel, stride, padding, dilation, groups, H, W)
CONV_CASES = [
    (3, 5, 3, 1, 1, 1, 1, 9, 8),
    (1, 4, 5, 1, 2, 1, 1, 11, 7),  # stem: one input channel
    (4, 6, (1, 1), 1, 0, 1, 2, 5, 6),  # 1x1, groups
    (6, 6, 3, 2, (1, 0), 1, 6, 9, 10),  # depthwise, stride 2
    (3, 6, 3, 1, 1, 1, 3, 7, 7),  # channel multiplier 2
    (4, 3, (2, 3), (3, 2), 0, (2, 1), 1, 13, 11),  # non-square, stride 3, dilation 2
    (2, 3, 4, 1, "same", 1, 1, 7, 6),  # even kernel: asymmetric padding
    (2, 2, 3, 1, "same", 3, 2, 8, 9),
    (5, 2, 7, 1, "valid", 1, 1, 9, 12),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(CONV_CASES)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_conv2d_matches_torch(backend, case, dtype):
    c_in, c_out, k, s, p, d, g, h, w = CONV_CASES[case]
    if small(backend):
        h, w = min(h, 7), min(w, 7)
        if k == 7:
            k = 3
    dev = device_of(backend)
    kh, kw = (k, k) if isinstance(k, int) else k
    x = torch.randn(2, c_in, h, w, dtype=dtype, device=dev, requires_grad=True)
    weight = torch.randn(c_out, c_in // g, kh, kw, dtype=dtype, device=dev, requires_grad=True)
    bias = torch.randn(c_out, dtype=dtype, device=dev, requires_grad=True)
    compare(backend, lambda *t: BF.conv2d(*t, s, p, d, g, activation="relu"),
            lambda *t: torch.relu(F.conv2d(*t, s, p, d, g)), [x, weight, bias], dtype,
            f"case {case}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", [None, "leaky_relu", "sigmoid", "tanh", "gelu",
                                        "gelu_tanh", "silu", torch.nn.LeakyReLU(-0.2)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_conv2d_activations(backend, activation, with_bias):
    dev = device_of(backend)
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64, device=dev, requires_grad=True)
    weight = torch.randn(4, 3, 3, 3, dtype=torch.float64, device=dev, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, device=dev, requires_grad=True) if with_bias else None
    act = brainkern.activations.resolve(activation)
    compare(backend, lambda *t: BF.conv2d(*t, 1, 1, activation=activation),
            lambda *t: (lambda z: z if act is None else act.forward(z))(F.conv2d(*t, 1, 1)),
            [x, weight, bias], torch.float64, f"activation {activation}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", [1, 0, 5], ids=["stem", "rgb", "strided"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "channels_last"])
def test_conv2d_without_input_gradient(backend, dtype, case, fmt):
    """A stem: only the weight and bias want gradients (backends that fuse the activation
    backward into the weight gradient do so here), with and without a bias."""
    c_in, c_out, k, s, p, d, g, h, w = CONV_CASES[case]
    dev = device_of(backend)
    kh, kw = (k, k) if isinstance(k, int) else k
    x = torch.randn(3, c_in, h, w, dtype=dtype, device=dev).contiguous(memory_format=fmt)
    weight = torch.randn(c_out, c_in // g, kh, kw, dtype=dtype, device=dev, requires_grad=True)
    bias = torch.randn(c_out, dtype=dtype, device=dev, requires_grad=True)
    for activation, act in (("silu", F.silu), (torch.nn.LeakyReLU(0.2), torch.nn.LeakyReLU(0.2))):
        y, _ = compare(backend, lambda *t: BF.conv2d(x, *t, s, p, d, g, activation=activation),
                       lambda *t: act(F.conv2d(x.double(), *t, s, p, d, g)), [weight, bias],
                       dtype, f"stem {case} {activation}")
        torch_y = F.conv2d(x, weight.detach(), None, s, p, d, g)  # the layout torch picks
        assert y.is_contiguous(memory_format=CL) == torch_y.is_contiguous(memory_format=CL)
        assert y.is_contiguous() == torch_y.is_contiguous()
        compare(backend, lambda t: BF.conv2d(x, t, None, s, p, d, g, activation=activation),
                lambda t: act(F.conv2d(x.double(), t, None, s, p, d, g)), [weight], dtype,
                f"stem {case} {activation}, no bias")


def test_memory_format_is_torchs_rule():
    """The ops layer's output format: torch's suggest_memory_format (its unambiguous cases
    answered from is_contiguous) on dense, ambiguous (one channel, 1 x 1 planes), sliced,
    permuted and expanded tensors."""
    from torch._prims_common import suggest_memory_format

    from brainkern.ops._conv_geometry import _format_of

    base = [torch.randn(2, 3, 5, 4), torch.randn(2, 1, 5, 4), torch.randn(2, 3, 1, 1),
            torch.randn(1, 1, 1, 1), torch.randn(3, 2, 4, 1)]
    views = []
    for t in base:
        cl = t.contiguous(memory_format=torch.channels_last)
        views += [t, cl, t[:, :, ::2], cl[:, :, ::2], t.permute(0, 1, 3, 2), cl.transpose(0, 1),
                  t[:, :1], t.expand(3, -1, -1, -1) if t.shape[0] == 1 else t[:1]]
    for t in views:
        assert _format_of(t) == suggest_memory_format(t), (t.shape, t.stride())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["channels_last", "sliced", "weight_channels_last"])
def test_conv2d_layouts_follow_torch(backend, layout):
    dev = device_of(backend)
    base = torch.randn(2, 6, 9, 16, device=dev)
    weight = torch.randn(5, 3, 3, 3, device=dev)
    if layout == "channels_last":
        x = base.contiguous(memory_format=CL)
    elif layout == "sliced":
        x = base[:, ::2, :, ::2]  # non-contiguous in every dimension but H
    else:
        x, weight = base[:, :3], weight.contiguous(memory_format=CL)
    x = x[:, :3] if x.shape[1] != 3 else x
    x.requires_grad_()
    weight.requires_grad_()
    y, ref = compare(backend, lambda *t: BF.conv2d(*t, padding=1, activation="relu"),
                     lambda *t: torch.relu(F.conv2d(*t, padding=1)), [x, weight, None],
                     torch.float32, layout)
    with torch.no_grad():
        torch_out = F.conv2d(x, weight, padding=1)
    assert y.is_contiguous(memory_format=CL) == torch_out.is_contiguous(memory_format=CL)
    assert y.is_contiguous() == torch_out.is_contiguous()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 3, 8, 8), (3, 8, 8), (2, 3, 1, 1), (2, 1, 5, 5)])
def test_conv2d_unbatched_empty_and_degenerate_layouts(backend, shape):
    dev = device_of(backend)
    for fmt in (torch.contiguous_format, CL):
        x = torch.randn(shape, dtype=torch.float64, device=dev)
        if x.dim() == 4:
            x = x.contiguous(memory_format=fmt)
        x.requires_grad_()
        weight = torch.randn(4, shape[-3], 3, 3, dtype=torch.float64, device=dev,
                             requires_grad=True)
        bias = torch.randn(4, dtype=torch.float64, device=dev, requires_grad=True)
        compare(backend, lambda *t: BF.conv2d(*t, padding=1, activation="tanh"),
                lambda *t: torch.tanh(F.conv2d(*t, padding=1)), [x, weight, bias],
                torch.float64, f"shape {shape} {fmt}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv2d_nan_and_inf_propagate(backend):
    dev = device_of(backend)
    x = torch.randn(1, 2, 6, 6, device=dev)
    x[0, 0, 2, 3] = float("nan")
    x[0, 1, 5, 5] = float("inf")
    weight = torch.randn(3, 2, 3, 3, device=dev)
    with brainkern.use_backend(backend):
        y = BF.conv2d(x, weight, padding=1, activation="relu")
    ref = torch.relu(F.conv2d(x.double(), weight.double(), padding=1))
    assert torch.equal(y.isnan().cpu(), ref.isnan().cpu())
    finite = ref.isfinite()
    assert torch.equal(y.isinf().cpu(), ref.isinf().cpu())
    assert_close(y[finite], ref[finite], tol=2e-5)


# (C_in, C_out, kernel, stride, padding, output_padding, dilation, groups, H, W)
TRANSPOSE_CASES = [
    (4, 3, 4, 2, 1, 0, 1, 1, 4, 4),  # DCGAN upsampling
    (5, 2, 4, 1, 0, 0, 1, 1, 1, 1),  # z (1 x 1) -> 4 x 4
    (4, 6, 3, 2, 1, 1, 1, 2, 5, 3),  # output_padding, groups
    (3, 3, (3, 2), (3, 2), (1, 0), (2, 1), (1, 2), 3, 4, 5),  # depthwise, non-square
    (2, 4, 3, 1, 2, 0, 2, 1, 6, 7),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(TRANSPOSE_CASES)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_conv_transpose2d_matches_torch(backend, case, dtype):
    c_in, c_out, k, s, p, op, d, g, h, w = TRANSPOSE_CASES[case]
    dev = device_of(backend)
    kh, kw = (k, k) if isinstance(k, int) else k
    x = torch.randn(2, c_in, h, w, dtype=dtype, device=dev, requires_grad=True)
    weight = torch.randn(c_in, c_out // g, kh, kw, dtype=dtype, device=dev, requires_grad=True)
    bias = torch.randn(c_out, dtype=dtype, device=dev, requires_grad=True)
    compare(backend, lambda *t: BF.conv_transpose2d(*t, s, p, op, g, d, activation="leaky_relu"),
            lambda *t: F.leaky_relu(F.conv_transpose2d(*t, s, p, op, g, d)), [x, weight, bias],
            dtype, f"transposed case {case}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_transpose2d_channels_last_unbatched_and_empty(backend):
    dev = device_of(backend)
    weight = torch.randn(3, 2, 4, 4, dtype=torch.float64, device=dev, requires_grad=True)
    for x in (torch.randn(2, 3, 5, 4, dtype=torch.float64, device=dev).contiguous(memory_format=CL),
              torch.randn(3, 5, 4, dtype=torch.float64, device=dev),
              torch.randn(0, 3, 5, 4, dtype=torch.float64, device=dev)):
        x.requires_grad_()
        y, _ = compare(backend, lambda *t: BF.conv_transpose2d(*t, 2, 1),
                       lambda *t: F.conv_transpose2d(*t, 2, 1), [x, weight, None],
                       torch.float64, f"input {tuple(x.shape)}")
        with torch.no_grad():
            assert y.stride() == F.conv_transpose2d(x, weight, None, 2, 1).stride()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nn_modules_match_torch(backend):
    dev = device_of(backend)
    torch_layers = [
        torch.nn.Conv2d(3, 4, 3, padding=1, padding_mode=mode, device=dev)
        for mode in ("zeros", "reflect", "replicate", "circular")
    ] + [torch.nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding="valid", bias=False, device=dev)]
    x = torch.randn(2, 3, 7, 6, device=dev)
    for layer in torch_layers:
        ours = bnn.Conv2d(3, 4, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
                          layer.groups, layer.bias is not None, layer.padding_mode, device=dev)
        ours.load_state_dict(layer.state_dict())
        with brainkern.use_backend(backend):
            assert_close(ours(x), layer(x).double(), tol=2e-5, what=layer.padding_mode)
            assert_close(ours(x[0]), layer(x[0]).double(), tol=2e-5, what="unbatched")
    up = torch.nn.ConvTranspose2d(3, 2, 4, 2, 1, device=dev)
    ours = bnn.ConvTranspose2d(3, 2, 4, 2, 1, device=dev, activation="tanh")
    ours.load_state_dict(up.state_dict())
    with brainkern.use_backend(backend):
        for size in [(14, 12), (15, 13), torch.Size([2, 2, 15, 12])]:
            assert_close(ours(x, output_size=size), torch.tanh(up(x, output_size=size)).double(),
                         tol=2e-5, what=f"output_size {size}")
    assert "activation=tanh" in repr(ours)


def test_accelerate_swaps_and_fuses_convolutions():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(),
                                torch.nn.ConvTranspose2d(4, 2, 4, 2, 1), torch.nn.Tanh())
    x = torch.randn(2, 1, 8, 8)
    ref = model(x)
    brainkern.accelerate(model)
    assert type(model[0]) is bnn.Conv2d and model[0].activation.name == "relu"
    assert type(model[2]) is bnn.ConvTranspose2d and model[2].activation.name == "tanh"
    assert isinstance(model[1], torch.nn.Identity) and isinstance(model[3], torch.nn.Identity)
    assert_close(model(x), ref.double(), tol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    dev = device_of(backend)
    x = torch.randn(1, 2, 5, 4, dtype=torch.float64, device=dev, requires_grad=True)
    w = torch.randn(4, 1, 3, 2, dtype=torch.float64, device=dev, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, device=dev, requires_grad=True)
    wt = torch.randn(2, 3, 3, 3, dtype=torch.float64, device=dev, requires_grad=True)
    with brainkern.use_backend(backend):
        assert gradcheck(
            lambda *t: BF.conv2d(*t, 2, 1, 1, 2, activation="silu"), (x, w, b), backend)
        assert gradcheck(
            lambda x, w: BF.conv_transpose2d(x, w, None, 2, 1, 1, activation="tanh"), (x, wt),
            backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_recomputes_with_torch_ops(backend):
    """create_graph=True recomputes the layer with torch's ops: gradient penalties get exact
    higher derivatives (this checks that path, not the kernels' backward)."""
    dev = device_of(backend)
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, device=dev, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, device=dev, requires_grad=True)
    with brainkern.use_backend(backend):
        assert gradcheck(lambda x, w: BF.conv2d(x, w, activation="gelu"), (x, w), backend,
                         second_order=True)


@pytest.mark.parametrize("call, error, match", [
    (lambda x, w: BF.conv2d(x[0, 0], w), ValueError, "input: expected a 3 or 4-D"),
    (lambda x, w: BF.conv2d(x, w[0]), ValueError, "weight: expected a 4-D"),
    (lambda x, w: BF.conv2d(x, w, groups=2), ValueError, "input: 3 channels are not divisible"),
    (lambda x, w: BF.conv2d(x, torch.randn(4, 2, 3, 3)), ValueError, "expects 2"),
    (lambda x, w: BF.conv2d(x, torch.randn(9, 9, 9, 9).narrow(1, 0, 3)), ValueError,
     "kernel is larger than the padded input"),
    (lambda x, w: BF.conv2d(x, w, padding=-1), ValueError, "padding: expected values >= 0"),
    (lambda x, w: BF.conv2d(x, w, stride=0), ValueError, "stride: expected values >= 1"),
    (lambda x, w: BF.conv2d(x, w, stride=2, padding="same"), ValueError, "'same' is not supported"),
    (lambda x, w: BF.conv2d(x, w, padding="full"), ValueError, "padding: expected an int"),
    (lambda x, w: BF.conv2d(x, w.double()), TypeError, "weight: dtype"),
    (lambda x, w: BF.conv2d(x, w, torch.randn(5)), ValueError, "bias: expected shape"),
    (lambda x, w: BF.conv2d(x.long(), w), TypeError, "input: expected a floating-point"),
    (lambda x, w: BF.conv2d(x, w, dilation=(1, 2, 3)), TypeError, "dilation: expected an int"),
    (lambda x, w: BF.conv2d(x, w.to_sparse()), TypeError, "weight"),
    (lambda x, w: bnn.Conv2d(3, 4, 3, padding_mode="mirror"), ValueError, "padding_mode"),
    (lambda x, w: BF.conv_transpose2d(x, torch.randn(3, 2, 3, 3), stride=2, output_padding=2),
     ValueError, "output_padding: .* must be smaller"),
    (lambda x, w: BF.conv_transpose2d(x, torch.randn(3, 2, 3, 3), output_size=(40, 40)),
     ValueError, "output_size: .* out of range"),
    (lambda x, w: BF.conv_transpose2d(x, torch.randn(3, 3, 3, 3), groups=2), ValueError,
     "input: 3 channels are not divisible by groups=2"),
    (lambda x, w: BF.conv_transpose2d(x, torch.randn(4, 2, 3, 3)), ValueError,
     "expects 4 input channels"),
])
def test_bad_arguments_are_named(call, error, match):
    x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3)
    with pytest.raises(error, match=match):
        call(x, w)


def test_torch_func_transforms_match_torch():
    """grad/vmap over brainkern convs (eager and compiled) compute with torch's ops."""
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    w = torch.randn(4, 2, 3, 3, dtype=torch.float64)

    def loss(f, w, x):
        return f.conv2d(x.unsqueeze(0), w, padding=1).tanh().sum()

    want = torch.func.vmap(torch.func.grad(lambda w, x: loss(F, w, x)), (None, 0))(w, x)
    ours = torch.func.vmap(torch.func.grad(lambda w, x: loss(BF, w, x)), (None, 0))
    assert_close(ours(w, x), want, tol=1e-12)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    assert_close(compiled(w, x), want, tol=1e-12)
