"""Every backend's pool kernels through one contract (the pool section of kernels/__init__.py).

Each backend runs on its own device (Triton: the GPU when there is one, else its interpreter on
a sample of the window grid). Oracle: torch's pooling in float64 on the same values; max pooling
matches exactly, values and indices, torch's NaN and tie rules included. Outputs start as NaN
(indices as -1); NCHW and channels_last; the output's size is torch's for each ceil_mode, so
windows clipped at the bottom/right edge are covered; 1-channel and 1 x 1 planes (contiguous in
both formats); batch 0. Numba's parallel paths on larger shapes stay in tests/test_kernels_pool.py.
"""

import pytest
import torch
import torch.nn.functional as F
from contract import (
    FORMATS,
    backend_dtypes_for,
    backends_for,
    check_adaptive_avg_pool,
    check_avg_pool,
    check_max_pool,
    interpreted,
    kernels,
    poisoned_in,
    randn_from,
    window_cases,
)

# Pooling has no tl.dot: Triton's bf16 runs in the interpreter too.
POOL = backend_dtypes_for("pool", (torch.float32, torch.float64, torch.float16, torch.bfloat16),
                          uses_dot=False)
MAX_CASES = window_cases(dilations=(1, 2))
AVG_WINDOWS = window_cases()
# count_include_pad and divisor_override: which one a window gets rotates with the format.
AVG_DIVISORS = [(True, 0), (False, 0), (True, 5)]
# Windows that fit 1 x 1 planes (each keeps an in-bounds tap): (kernel, stride, padding).
TINY_WINDOWS = [((1, 1), (1, 1), (0, 0)), ((2, 2), (1, 1), (1, 1)), ((3, 3), (2, 2), (1, 1)),
                ((4, 2), (3, 1), (2, 1))]
INF, NAN = float("inf"), float("nan")


def small_shape(backend):
    return (2, 3, 7, 6) if interpreted(backend) else (2, 3, 13, 11)


def sample(backend, dtype, cases):
    """The whole grid, every fifth case under the interpreter, a third of that in the half
    types (they change the loads, stores and sums, not the windows)."""
    step = 5 if interpreted(backend) else 1
    return cases[::3 * step] if dtype in (torch.float16, torch.bfloat16) else cases[::step]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("backend,dtype", POOL)
def test_max_pool(backend, dtype, fmt):
    kern = kernels(backend, "pool")
    x = randn_from(small_shape(backend), backend, dtype, fmt)
    for case in sample(backend, dtype, MAX_CASES):
        check_max_pool(kern, x, case)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("backend,dtype", POOL)
def test_max_pool_special_values_and_ties(backend, dtype, fmt):
    """NaN wins as in torch (the last NaN of a window), -inf windows keep their first tap, and
    among equal maxima the first in torch's scan order wins."""
    kern = kernels(backend, "pool")

    def specials(s):
        x = torch.randn(s, dtype=torch.float64)
        pick = torch.rand(s)
        x[pick < 0.15] = NAN
        x[(pick > 0.5) & (pick < 0.8)] = -INF
        x[pick > 0.95] = INF
        return x

    def ties(s):
        return torch.randint(0, 3, s).double()

    for fill in (specials, ties):
        x = randn_from(small_shape(backend), backend, dtype, fmt, fill)
        for case in [((2, 2), (2, 2), (0, 0), (1, 1), False),
                     ((3, 3), (1, 1), (1, 1), (1, 1), True),
                     ((4, 3), (3, 2), (2, 1), (1, 2), True)]:
            check_max_pool(kern, x, case)


@pytest.mark.parametrize("backend,dtype", POOL)
def test_max_pool_indices_unpool_and_no_indices(backend, dtype):
    """The indices drive F.max_unpool2d as torch's do; without indices the values are the same."""
    kern = kernels(backend, "pool")
    x = randn_from(small_shape(backend), backend, dtype, torch.contiguous_format)
    case = ((2, 2), (2, 2), (0, 0), (1, 1), True)
    out, indices = check_max_pool(kern, x, case)
    unpooled = F.max_unpool2d(out.double().cpu(), indices.cpu(), 2, 2,
                              output_size=x.shape[-2:])
    ref, ref_indices = F.max_pool2d(x.double().cpu(), 2, ceil_mode=True, return_indices=True)
    assert torch.equal(unpooled, F.max_unpool2d(ref, ref_indices, 2, 2, output_size=x.shape[-2:]))
    alone = poisoned_in(out.shape, x)
    kern.max_pool2d_forward(x, alone, None, *case[:4])
    assert torch.equal(alone, out)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("backend,dtype", POOL)
def test_avg_pool(backend, dtype, fmt):
    kern = kernels(backend, "pool")
    x = randn_from(small_shape(backend), backend, dtype, fmt)
    shift = fmt == torch.channels_last
    cases = [(*window[:3], window[4], *AVG_DIVISORS[(i + shift) % 3])
             for i, window in enumerate(AVG_WINDOWS)]
    for case in sample(backend, dtype, cases):
        check_avg_pool(kern, x, case)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("backend,dtype", POOL)
def test_adaptive_avg_pool(backend, dtype, fmt):
    """Output sizes: global (1, 1), odd divisors and non-divisors of the input, the input's own
    size, and larger than the input (overlapping windows)."""
    kern = kernels(backend, "pool")
    shape = small_shape(backend)
    x = randn_from(shape, backend, dtype, fmt)
    h, w = shape[2:]
    for size in [(1, 1), (4, 3), (h, w), (h // 2 + 1, w - 1), (h + 4, 2 * w + 1), (1, w + 3)]:
        check_adaptive_avg_pool(kern, x, size)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("backend,dtype", POOL)
def test_nan_and_inf_propagate_through_average(backend, dtype, fmt):
    """A NaN, or both infinities, in a window give NaN; one infinity gives it, as torch's."""
    kern = kernels(backend, "pool")

    def specials(s):
        x = torch.randn(s, dtype=torch.float64)
        pick = torch.rand(s)
        x[pick < 0.05] = NAN
        x[pick > 0.97] = INF
        x[(pick > 0.5) & (pick < 0.53)] = -INF
        return x

    x = randn_from(small_shape(backend), backend, dtype, fmt, specials)
    check_avg_pool(kern, x, ((3, 3), (2, 2), (1, 1), True, False, 0))
    check_adaptive_avg_pool(kern, x, (4, 3))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("backend", backends_for("pool"))
def test_degenerate_planes(backend, fmt):
    """One channel, and 1 x 1 planes: contiguous in both formats, like the outputs of a 1 x 1
    plane, so the format is whatever the other tensors say."""
    kern = kernels(backend, "pool")
    for shape in [(2, 1, 7, 6), (3, 4, 1, 1)]:
        x = randn_from(shape, backend, torch.float32, fmt)
        for i, (kernel, stride, padding) in enumerate(TINY_WINDOWS):
            check_max_pool(kern, x, (kernel, stride, padding, (1, 1), i % 2 == 0))
            check_avg_pool(kern, x, (kernel, stride, padding, i % 2 == 1, i < 2, 0))
        check_adaptive_avg_pool(kern, x, (1, 1))
        check_adaptive_avg_pool(kern, x, (3, 2))


@pytest.mark.parametrize("backend,dtype", POOL)
def test_batch_zero(backend, dtype):
    """Nothing to compute and nothing written; the calls must not fail."""
    kern = kernels(backend, "pool")
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = randn_from((0, 3, 8, 7), backend, dtype, fmt)
        out = poisoned_in((0, 3, 4, 3), x, fmt)
        indices = poisoned_in((0, 3, 4, 3), x, fmt, torch.int64)
        grad_x = poisoned_in(x.shape, x, fmt)
        kern.max_pool2d_forward(x, out, indices, (2, 2), (2, 2), (0, 0), (1, 1))
        kern.max_pool2d_backward(out, indices, grad_x, (2, 2), (2, 2), (0, 0), (1, 1))
        kern.avg_pool2d_forward(x, out, (2, 2), (2, 2), (0, 0), True, 0)
        kern.avg_pool2d_backward(out, grad_x, (2, 2), (2, 2), (0, 0), True, 0)
        kern.adaptive_avg_pool2d_forward(x, out)
        kern.adaptive_avg_pool2d_backward(out, grad_x)
