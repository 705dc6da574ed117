"""The fused conv block (conv2d + bias + activation + 2x2 max pooling) against the unfused torch
sequence, on every backend with conv and pool kernels, and how accelerate builds it."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F

import brainkern
import brainkern.nn as bnn
from brainkern import backends
from brainkern.activations import resolve
from brainkern.ops.conv_block import conv2d_maxpool2d
from tests.helpers import assert_close, gradcheck

BACKENDS = [
    name for name in backends.available_backends()
    if all(importlib.util.find_spec(f"{backends.BACKENDS[name].package}.{family}") is not None
           for family in ("conv", "pool"))
]


def device_of(backend):
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def reference(x, w, b, act, stride=1, padding=1):
    z = F.conv2d(x, w, b, stride, padding)
    return F.max_pool2d(z if act is None else act.forward(z), 2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["relu", "tanh", "gelu", "silu",
                                        torch.nn.LeakyReLU(-0.3), None])
@pytest.mark.parametrize("shape, fmt", [((2, 3, 9, 8), torch.contiguous_format),
                                        ((2, 4, 7, 11), torch.channels_last),
                                        ((0, 3, 6, 6), torch.contiguous_format)])
def test_block_matches_unfused(backend, activation, shape, fmt):
    dev = device_of(backend)
    x = torch.randn(shape, dtype=torch.float64, device=dev).contiguous(memory_format=fmt)
    x.requires_grad_()
    w = torch.randn(5, shape[1], 3, 3, dtype=torch.float64, device=dev, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, device=dev, requires_grad=True)
    act = resolve(activation)
    with brainkern.use_backend(backend):
        y = conv2d_maxpool2d(x, w, b, 1, 1, activation=activation)
    ref = reference(x, w, b, act)
    assert y.shape == ref.shape and y.stride() == ref.stride()
    assert_close(y, ref, tol=1e-12)
    g = torch.randn_like(ref)
    for got, want, name in zip(torch.autograd.grad(y, (x, w, b), g),
                               torch.autograd.grad(ref, (x, w, b), g), ("x", "w", "b")):
        assert_close(got, want, tol=1e-12, what=f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_gradcheck_and_float32(backend):
    dev = device_of(backend)
    x = torch.randn(1, 2, 6, 7, dtype=torch.float64, device=dev, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, device=dev, requires_grad=True)
    with brainkern.use_backend(backend):
        assert gradcheck(
            lambda x, w: conv2d_maxpool2d(x, w, None, 1, 1, activation="silu"), (x, w), backend)
        x32 = torch.randn(4, 3, 16, 16, device=dev)
        w32 = torch.randn(8, 3, 5, 5, device=dev)
        out = conv2d_maxpool2d(x32, w32, None, 1, 2, activation="relu")
    assert_close(out, reference(x32.double(), w32.double(), None, resolve("relu"), 1, 2),
                 tol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("shape, stride, fmt", [((3, 4, 10, 9), 1, torch.contiguous_format),
                                                ((2, 1, 12, 12), 1, torch.channels_last),
                                                ((2, 6, 13, 11), 2, torch.channels_last)])
def test_block_float32_gradients(backend, activation, shape, stride, fmt):
    """float32 gradients against float64 torch: where the native backend runs its sparse
    backward (the max pooling's winners' products alone)."""
    dev = device_of(backend)
    x = torch.randn(shape, device=dev).contiguous(memory_format=fmt).requires_grad_()
    w = torch.randn(7, shape[1], 3, 3, device=dev, requires_grad=True)
    b = torch.randn(7, device=dev, requires_grad=True)
    with brainkern.use_backend(backend):
        y = conv2d_maxpool2d(x, w, b, stride, 1, activation=activation)
    leaves = [t.detach().double().requires_grad_() for t in (x, w, b)]
    ref = reference(*leaves, resolve(activation), stride)
    g = torch.randn(ref.shape, dtype=torch.float64, device=dev)
    got = torch.autograd.grad(y, (x, w, b), g.float())
    want = torch.autograd.grad(ref, leaves, g)
    for a, e, name in zip(got, want, ("x", "w", "b")):
        assert_close(a, e, tol=1e-5, what=f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_gradients_keep_torchs_nans(backend):
    """An infinite input: torch's dense weight gradient is NaN where a zero of dz meets it (0 *
    inf); a backend that skips dz's zeros must fall back to the dense sums there."""
    dev = device_of(backend)
    x = torch.randn(2, 3, 8, 8, device=dev)
    x[1, 2, 3, 4] = float("inf")
    x.requires_grad_()
    w = torch.randn(4, 3, 3, 3, device=dev, requires_grad=True)
    with brainkern.use_backend(backend):
        y = conv2d_maxpool2d(x, w, None, 1, 1, activation="tanh")
    w64 = w.detach().double().requires_grad_()
    ref = reference(x.detach().double(), w64, None, resolve("tanh"))
    g = torch.randn(ref.shape, dtype=torch.float64, device=dev)
    got = torch.autograd.grad(y, w, g.float())[0]
    want = torch.autograd.grad(ref, w64, g)[0]
    assert want.isnan().any() and torch.equal(got.isnan(), want.isnan())
    finite = ~want.isnan()
    assert_close(got[finite], want[finite], tol=1e-5, what="grad w")


def test_accelerate_fuses_conv_activation_maxpool():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 5, padding=2), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(4, 6, 3), torch.nn.MaxPool2d(2),  # no activation: pooled apart
        torch.nn.Conv2d(6, 6, 1), torch.nn.Tanh(), torch.nn.MaxPool2d(2, 1),  # stride 1: apart
    ).double()
    x = torch.randn(2, 1, 20, 20, dtype=torch.float64)
    ref = model(x)
    brainkern.accelerate(model)
    assert model[0].fuses_max_pool and "fused max_pool2d(2)" in repr(model[0])
    assert isinstance(model[1], torch.nn.Identity) and isinstance(model[2], torch.nn.Identity)
    assert not model[3].fuses_max_pool and type(model[4]) is bnn.MaxPool2d
    assert not model[5].fuses_max_pool and type(model[7]) is bnn.MaxPool2d
    assert_close(model(x), ref, tol=1e-12)


def test_block_in_a_compiled_graph():
    model = brainkern.accelerate(torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2)))
    x = torch.randn(2, 1, 8, 8)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    assert_close(compiled(x), model(x).double(), tol=1e-6)
    assert torch._dynamo.explain(model)(x).graph_break_count == 0
