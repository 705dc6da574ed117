"""brainkern.functional's pooling and nn.MaxPool2d / AvgPool2d / AdaptiveAvgPool2d against torch
on every backend with pool kernels: outputs, indices, gradients, layouts, shapes and errors.
(The kernels' own parameter grid is in test_kernels_pool.py.)"""

import functools
import importlib
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
            if importlib.util.find_spec(f"{backends.BACKENDS[name].package}.pool") is not None]
CL = torch.channels_last


def device_of(backend):
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


CALLS = [
    ("max 2", lambda f, x: f.max_pool2d(x, 2)),
    ("max 3/2 pad 1 ceil", lambda f, x: f.max_pool2d(x, 3, 2, 1, ceil_mode=True)),
    ("max dilated", lambda f, x: f.max_pool2d(x, (3, 2), (1, 2), (1, 0), dilation=(2, 1))),
    ("avg 2", lambda f, x: f.avg_pool2d(x, 2)),
    ("avg ceil no pad count", lambda f, x: f.avg_pool2d(x, 3, 2, 1, True, False)),
    ("avg divisor", lambda f, x: f.avg_pool2d(x, (2, 3), 1, (1, 1), divisor_override=5)),
    ("adaptive 1", lambda f, x: f.adaptive_avg_pool2d(x, 1)),
    ("adaptive odd", lambda f, x: f.adaptive_avg_pool2d(x, (4, None))),
    ("adaptive larger", lambda f, x: f.adaptive_avg_pool2d(x, (11, 3))),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("call", range(len(CALLS)), ids=[c[0] for c in CALLS])
@pytest.mark.parametrize("shape, fmt", [((2, 3, 9, 7), torch.contiguous_format),
                                        ((2, 5, 8, 9), CL), ((3, 7, 6), None),
                                        ((0, 3, 6, 6), CL)])
def test_pooling_matches_torch(backend, call, shape, fmt):
    name, fn = CALLS[call]
    x = torch.randn(shape, dtype=torch.float64, device=device_of(backend))
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    x.requires_grad_()
    with brainkern.use_backend(backend):
        y = fn(BF, x)
    ref = fn(F, x)
    assert y.shape == ref.shape and y.stride() == ref.stride(), name
    assert_close(y, ref, tol=1e-12, what=name)
    g = torch.randn_like(ref)
    assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(ref, x, g)[0], tol=1e-12,
                 what=f"{name}: grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_pool_indices_nan_and_unpool(backend):
    dev = device_of(backend)
    x = torch.randn(2, 3, 8, 8, device=dev)
    x[0, 1, 2, 3] = float("nan")
    x[1, 2, 5, 5] = float("inf")
    x[1, 0, :2, :2] = 1.0  # a tie: the first maximum wins, as in torch
    with brainkern.use_backend(backend):
        y, idx = BF.max_pool2d(x, 2, return_indices=True)
        yt, idxt = bnn.MaxPool2d(2, return_indices=True)(x)
    ref, ref_idx = F.max_pool2d(x, 2, return_indices=True)
    for out, i in ((y, idx), (yt, idxt)):
        assert torch.equal(out.isnan(), ref.isnan())
        assert torch.equal(i, ref_idx)
        assert torch.equal(out.nan_to_num(), ref.nan_to_num())
    assert torch.equal(F.max_unpool2d(y, idx, 2).nan_to_num(),
                       F.max_unpool2d(ref, ref_idx, 2).nan_to_num())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "nhwc"])
def test_max_pool_saves_window_codes_unless_indices_are_asked_for(backend, fmt):
    """A backend with WINDOW_CODES saves uint8 codes for the backward (an eighth of int64's
    bytes) when the caller does not want the indices; either way the gradient is torch's."""
    dev = device_of(backend)
    kern = brainkern.backends.BACKENDS[backend]
    x = torch.randn(2, 5, 9, 8, device=dev).contiguous(memory_format=fmt)
    x[0, 1, :2, :2] = 1.0  # a tie
    ref_y = F.max_pool2d(x.requires_grad_(), 3, 2, 1)
    grad = torch.randn_like(ref_y)
    ref = torch.autograd.grad(ref_y, x, grad)[0]
    with brainkern.use_backend(backend):
        for return_indices in (False, True):
            y = BF.max_pool2d(x, 3, 2, 1, return_indices=return_indices)
            y = y[0] if return_indices else y
            (saved,) = y.grad_fn.saved_tensors
            pool_module = importlib.import_module(f"{kern.package}.pool")
            codes = not return_indices and getattr(pool_module, "WINDOW_CODES", False)
            assert saved.dtype == (torch.uint8 if codes else torch.int64)
            assert torch.equal(torch.autograd.grad(y, x, grad)[0], ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_and_modules(backend):
    dev = device_of(backend)
    x = torch.randn(2, 4, 11, 10, device=dev).contiguous(memory_format=CL)
    pairs = [(torch.nn.MaxPool2d(3, 2, 1, ceil_mode=True), bnn.MaxPool2d(3, 2, 1, ceil_mode=True)),
             (torch.nn.AvgPool2d(2, count_include_pad=False), bnn.AvgPool2d(2,
                                                                            count_include_pad=False)),
             (torch.nn.AdaptiveAvgPool2d((3, 2)), bnn.AdaptiveAvgPool2d((3, 2)))]
    for theirs, ours in pairs:
        with brainkern.use_backend(backend):
            out = ours(x)
        assert_close(out, theirs(x.double()), tol=1e-6, what=type(ours).__name__)
        assert out.is_contiguous(memory_format=CL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64, device=device_of(backend),
                    requires_grad=True)
    with brainkern.use_backend(backend):
        assert gradcheck(lambda t: BF.max_pool2d(t, 2, 1, 1), (x,), backend)
        assert gradcheck(lambda t: BF.avg_pool2d(t, 3, 2, 1, True, False), (x,), backend)
        assert gradcheck(lambda t: BF.adaptive_avg_pool2d(t, (3, 4)), (x,), backend)


def test_accelerate_swaps_pooling():
    model = torch.nn.Sequential(torch.nn.MaxPool2d(2), torch.nn.AvgPool2d(2),
                                torch.nn.AdaptiveAvgPool2d(1))
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    ref = model(x)
    brainkern.accelerate(model)
    assert [type(m) for m in model] == [bnn.MaxPool2d, bnn.AvgPool2d, bnn.AdaptiveAvgPool2d]
    assert_close(model(x), ref, tol=1e-12)


@pytest.mark.parametrize("call, error, match", [
    (lambda x: BF.max_pool2d(x, 2, padding=2), ValueError, "padding: .* at most half"),
    (lambda x: BF.max_pool2d(x, 2, stride=0), ValueError, "stride: expected values >= 1"),
    (lambda x: BF.max_pool2d(x, 0), ValueError, "kernel_size: expected values >= 1"),
    (lambda x: BF.max_pool2d(x, 9), ValueError, "too small"),
    (lambda x: BF.max_pool2d(x[0, 0], 2), ValueError, "input: expected a 3 or 4-D"),
    (lambda x: BF.max_pool2d(x.long(), 2), TypeError, "floating-point"),
    (lambda x: BF.max_pool2d(x[:, :0], 2), ValueError, "non-empty"),
    (lambda x: BF.avg_pool2d(x, 2, divisor_override=0), ValueError, "divisor_override"),
    (lambda x: BF.avg_pool2d(x, (2, 2, 2)), TypeError, "kernel_size"),
    (lambda x: BF.adaptive_avg_pool2d(x, 0), ValueError, "output_size: expected values >= 1"),
    (lambda x: BF.adaptive_avg_pool2d(x, (1, 2, 3)), ValueError, "output_size"),
    (lambda x: BF.avg_pool2d(x.to_sparse(), 2), TypeError, "layout"),
])
def test_bad_arguments_are_named(call, error, match):
    with pytest.raises(error, match=match):
        call(torch.randn(2, 3, 8, 8))


def test_torch_func_transforms_match_torch():
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    for fn in (lambda f, t: f.max_pool2d(t, 2).sum(), lambda f, t: f.avg_pool2d(t, 3, 2, 1).sum(),
               lambda f, t: f.adaptive_avg_pool2d(t, 2).pow(2).sum()):
        want = torch.func.vmap(torch.func.grad(functools.partial(fn, F)))(x)
        got = torch.func.vmap(torch.func.grad(functools.partial(fn, BF)))(x)
        assert_close(got, want, tol=1e-12)
