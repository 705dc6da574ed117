"""Every backend's pool kernels, called directly with the plain kernel arguments.

Oracle: torch's own pooling in float64 on the same values (DESIGN.md section 4); max pooling
must match exactly, values and indices. Outputs start as NaN, so an element a kernel forgets to
write fails; NCHW and channels_last; the output's size is torch's for each ceil_mode, so windows
clipped at the bottom/right edge are covered. Triton runs through its interpreter on tiny shapes
(a sample of the parameter grid) when there is no GPU.
"""

import pytest
import torch
import torch.nn.functional as F

from brainkern import backends
from brainkern.kernels.numba import pool as numba_pool
from helpers import assert_close, poisoned

HAS_CUDA = torch.cuda.is_available()
FORMATS = [pytest.param(False, id="nchw"), pytest.param(True, id="channels_last")]


def _backend_dtypes():
    params = []
    for name in backends.available_backends():
        for dtype in backends.kernels(name, "pool").DTYPES:
            params.append(pytest.param(name, dtype, id=f"{name}-{str(dtype)[6:]}"))
    return params


BACKEND_DTYPES = _backend_dtypes()


def device_of(backend):
    return "cuda" if backend == "triton" and HAS_CUDA else "cpu"


def interpreted(backend):
    return backend == "triton" and not HAS_CUDA


def shapes_and_cases(backend, cases):
    """(shape, cases to run on it): the whole grid (every fifth case under the interpreter) on a
    small odd shape; on the CPU kernels a few cases also on a shape past the parallel threshold
    and on a channels_last-friendly one with few images and many channels (whose backward
    splits the channels into blocks)."""
    if interpreted(backend):
        return [((2, 3, 7, 6), cases[::5])]
    few = [case for case in cases if case[:3] in FEW]
    return [((2, 3, 13, 11), cases), ((3, 5, 67, 45), few), ((1, 40, 33, 31), few)]


def window_cases(dilations=(1,)):
    """(kernel, stride, padding, dilation, ceil_mode): square kernels 1..4, strides 1..3, every
    padding up to k // 2, plus rectangular ones with each axis different."""
    cases = [((k, k), (s, s), (p, p), (d, d), ceil)
             for k in range(1, 5) for s in range(1, 4) for p in range(k // 2 + 1)
             for d in dilations for ceil in (False, True)]
    cases += [((3, 2), (2, 1), (1, 0), (dilations[-1], 1), True),
              ((1, 4), (3, 2), (0, 2), (1, dilations[-1]), False),
              ((4, 1), (1, 3), (2, 0), (1, 1), True)]
    return cases


MAX_CASES = window_cases(dilations=(1, 2))
# Windows (kernel, stride, padding) run on the larger shapes too: 2x2 stride 2 (the fast path),
# 3x3 stride 1 padded (overlapping), 4x4 stride 3 padded, the rectangular ones.
FEW = {((2, 2), (2, 2), (0, 0)), ((3, 3), (1, 1), (1, 1)), ((4, 4), (3, 3), (2, 2)),
       ((3, 2), (2, 1), (1, 0)), ((1, 4), (3, 2), (0, 2)), ((4, 1), (1, 3), (2, 0))}
AVG_CASES = window_cases()


def make(shape, backend, dtype, channels_last, fill=None):
    """Fresh random values of ``dtype`` on the backend's device, in the given format."""
    x = torch.randn(shape, dtype=torch.float64) if fill is None else fill(shape)
    x = x.to(dtype=dtype, device=device_of(backend))
    return x.contiguous(memory_format=torch.channels_last if channels_last else
                        torch.contiguous_format)


def empty_like_format(shape, like, dtype=None):
    """A NaN-poisoned output (int64: -1) of ``shape`` in like's device and memory format."""
    dtype = dtype or like.dtype
    if dtype == torch.int64:
        out = torch.full(shape, -1, dtype=dtype, device=like.device)
    else:
        out = poisoned(*shape, dtype=dtype, device=like.device)
    channels_last = not like.is_contiguous()
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def grad_of(fn, x, grad_out):
    """d(sum(fn(x) * grad_out))/dx in float64 on the CPU, by torch.autograd."""
    xd = x.detach().double().cpu().requires_grad_()
    (grad,) = torch.autograd.grad(fn(xd), xd, grad_out.detach().double().cpu())
    return grad


def check_max(kern, x, case, grad_dtype=None):
    """max_pool2d_forward (values, indices) and max_pool2d_backward against torch."""
    kernel, stride, padding, dilation, ceil = case

    def pool(t):
        return F.max_pool2d(t, kernel, stride, padding, dilation, ceil, return_indices=True)

    ref, ref_indices = pool(x.detach().double().cpu())
    out = empty_like_format(ref.shape, x)
    indices = empty_like_format(ref.shape, x, torch.int64)
    kern.max_pool2d_forward(x, out, indices, kernel, stride, padding, dilation)
    assert torch.equal(out.double().cpu().nan_to_num(7.0), ref.nan_to_num(7.0)), case
    assert torch.equal(indices.cpu(), ref_indices), case
    grad_out = make(ref.shape, "cpu", x.dtype, not x.is_contiguous()).to(x.device)
    grad_x = empty_like_format(x.shape, x)
    kern.max_pool2d_backward(grad_out, indices, grad_x)
    assert_close(grad_x, grad_of(lambda t: pool(t)[0], x, grad_out), x.dtype,
                 what=f"grad_x {case}")
    return out, indices


@pytest.mark.parametrize("channels_last", FORMATS)
@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
def test_max_pool(backend, dtype, channels_last):
    kern = backends.kernels(backend, "pool")
    for shape, cases in shapes_and_cases(backend, MAX_CASES):
        x = make(shape, backend, dtype, channels_last)
        for case in cases:
            check_max(kern, x, case)


@pytest.mark.parametrize("channels_last", FORMATS)
@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
def test_max_pool_special_values_and_ties(backend, dtype, channels_last):
    """NaN wins as in torch (the last NaN of a window), -inf windows keep their first tap, and
    among equal maxima the first in torch's scan order wins."""
    kern = backends.kernels(backend, "pool")
    shape = shapes_and_cases(backend, [])[0][0]

    def specials(s):
        x = torch.randn(s, dtype=torch.float64)
        pick = torch.rand(s)
        x[pick < 0.15] = float("nan")
        x[(pick > 0.5) & (pick < 0.8)] = float("-inf")
        x[pick > 0.95] = float("inf")
        return x

    def ties(s):
        return torch.randint(0, 3, s).double()

    for fill in (specials, ties):
        x = make(shape, backend, dtype, channels_last, fill)
        for case in [((2, 2), (2, 2), (0, 0), (1, 1), False), ((3, 3), (1, 1), (1, 1), (1, 1), True),
                     ((4, 3), (3, 2), (2, 1), (1, 2), True)]:
            check_max(kern, x, case)


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
def test_max_pool_indices_unpool_and_no_indices(backend, dtype):
    """The indices drive F.max_unpool2d as torch's do; without indices the values are the same."""
    kern = backends.kernels(backend, "pool")
    x = make(shapes_and_cases(backend, [])[0][0], backend, dtype, False)
    case = ((2, 2), (2, 2), (0, 0), (1, 1), True)
    out, indices = check_max(kern, x, case)
    unpooled = F.max_unpool2d(out.double().cpu(), indices.cpu(), 2, 2,
                              output_size=x.shape[-2:])
    ref, ref_indices = F.max_pool2d(x.double().cpu(), 2, ceil_mode=True, return_indices=True)
    assert torch.equal(unpooled, F.max_unpool2d(ref, ref_indices, 2, 2, output_size=x.shape[-2:]))
    alone = empty_like_format(out.shape, x)
    kern.max_pool2d_forward(x, alone, None, *case[:4])
    assert torch.equal(alone, out)


def avg_reference(kernel, stride, padding, ceil, include_pad, divisor):
    return lambda t: F.avg_pool2d(t, kernel, stride, padding, ceil, include_pad, divisor or None)


def check_avg_like(x, pool, forward, backward, what):
    """A forward (x, out) and backward (grad_out, grad_x) pair against torch's ``pool``."""
    ref = pool(x.detach().double().cpu())
    out = empty_like_format(ref.shape, x)
    forward(x, out)
    assert_close(out, ref, x.dtype, what=f"out {what}")
    grad_out = make(ref.shape, "cpu", x.dtype, not x.is_contiguous()).to(x.device)
    grad_x = empty_like_format(x.shape, x)
    backward(grad_out, grad_x)
    assert_close(grad_x, grad_of(pool, x, grad_out), x.dtype, what=f"grad_x {what}")


@pytest.mark.parametrize("channels_last", FORMATS)
@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
def test_avg_pool(backend, dtype, channels_last):
    kern = backends.kernels(backend, "pool")
    cases = [(*case[:3], case[4], include_pad, divisor) for case in AVG_CASES
             for include_pad, divisor in ((True, 0), (False, 0), (True, 5))]
    for shape, shape_cases in shapes_and_cases(backend, cases):
        x = make(shape, backend, dtype, channels_last)
        for kernel, stride, padding, ceil, include_pad, divisor in shape_cases:
            args = (kernel, stride, padding, include_pad, divisor)
            check_avg_like(
                x, avg_reference(kernel, stride, padding, ceil, include_pad, divisor),
                lambda t, out, args=args: kern.avg_pool2d_forward(t, out, *args),
                lambda g, grad_x, args=args: kern.avg_pool2d_backward(g, grad_x, *args),
                (kernel, stride, padding, ceil, include_pad, divisor))


@pytest.mark.parametrize("channels_last", FORMATS)
@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
def test_adaptive_avg_pool(backend, dtype, channels_last):
    """Output sizes: global (1, 1), odd divisors and non-divisors of the input, the input's own
    size, and larger than the input (overlapping windows)."""
    kern = backends.kernels(backend, "pool")
    for shape, _ in shapes_and_cases(backend, []):
        x = make(shape, backend, dtype, channels_last)
        h, w = shape[2:]
        for size in [(1, 1), (4, 3), (h, w), (h // 2 + 1, w - 1), (h + 4, 2 * w + 1), (1, w + 3)]:
            check_avg_like(x, lambda t, size=size: F.adaptive_avg_pool2d(t, size),
                           kern.adaptive_avg_pool2d_forward, kern.adaptive_avg_pool2d_backward,
                           f"adaptive {size}")


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
def test_nan_propagates_through_average(backend, dtype):
    kern = backends.kernels(backend, "pool")

    def with_nan(s):
        x = torch.randn(s, dtype=torch.float64)
        x[torch.rand(s) < 0.05] = float("nan")
        return x

    for channels_last in (False, True):
        x = make(shapes_and_cases(backend, [])[0][0], backend, dtype, channels_last, with_nan)
        check_avg_like(x, avg_reference((3, 3), (2, 2), (1, 1), True, False, 0),
                       lambda t, out: kern.avg_pool2d_forward(t, out, (3, 3), (2, 2), (1, 1),
                                                              False, 0),
                       lambda g, gx: kern.avg_pool2d_backward(g, gx, (3, 3), (2, 2), (1, 1),
                                                              False, 0), "nan")


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
def test_batch_zero(backend, dtype):
    """Nothing to compute and nothing written; the calls must not fail."""
    kern = backends.kernels(backend, "pool")
    for channels_last in (False, True):
        x = make((0, 3, 8, 7), backend, dtype, channels_last)
        out = empty_like_format((0, 3, 4, 3), x)
        indices = empty_like_format((0, 3, 4, 3), x, torch.int64)
        kern.max_pool2d_forward(x, out, indices, (2, 2), (2, 2), (0, 0), (1, 1))
        kern.max_pool2d_backward(out, indices, torch.empty_like(x))
        kern.avg_pool2d_forward(x, out, (2, 2), (2, 2), (0, 0), True, 0)
        kern.avg_pool2d_backward(out, torch.empty_like(x), (2, 2), (2, 2), (0, 0), True, 0)
        kern.adaptive_avg_pool2d_forward(x, out)
        kern.adaptive_avg_pool2d_backward(out, torch.empty_like(x))


@pytest.mark.parametrize("channels_last", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_numba_backward_is_deterministic_across_thread_counts(dtype, channels_last):
    """Overlapping windows add several gradients into one input: the sums must be the same bits
    on the serial twins (one thread) and the parallel kernels, and from run to run."""
    shape = (1, 40, 33, 31) if channels_last else (3, 5, 67, 45)
    x = make(shape, "numba", dtype, channels_last)
    case = ((3, 3), (1, 1), (1, 1), (1, 1))
    indices = empty_like_format(shape, x, torch.int64)  # 3x3, stride 1, padding 1: x's size
    out = empty_like_format(indices.shape, x)
    numba_pool.max_pool2d_forward(x, out, indices, *case)
    grad_out = torch.randn_like(out)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 2):
            torch.set_num_threads(count)
            grads = (torch.empty_like(x), torch.empty_like(x))
            numba_pool.max_pool2d_backward(grad_out, indices, grads[0])
            numba_pool.avg_pool2d_backward(grad_out, grads[1], *case[:3], False, 0)
            results.append(grads)
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))

