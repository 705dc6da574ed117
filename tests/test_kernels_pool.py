"""What only the Numba pool kernels have (native's pool family re-exports them): the parallel
drivers past the parallel threshold, the channel-block tasks of an NHWC backward with few images
and many channels, and sums that are the same bits on any thread count.

Everything every backend must do (the window grid, ceil_mode, NaN/inf/ties, indices, adaptive
pooling, degenerate planes, batch 0) is in tests/test_kernel_contract_pool.py.
"""

import pytest
import torch
from contract import (
    FORMATS,
    check_adaptive_avg_pool,
    check_avg_pool,
    check_max_pool,
    poisoned_in,
    randn_from,
    window_cases,
)

from brainkern.kernels.numba import pool as numba_pool

# 2x2 stride 2 (the fast path), 3x3 stride 1 padded (overlapping), 4x4 stride 3 padded, and the
# rectangular ones.
FEW = {((2, 2), (2, 2), (0, 0)), ((3, 3), (1, 1), (1, 1)), ((4, 4), (3, 3), (2, 2)),
       ((3, 2), (2, 1), (1, 0)), ((1, 4), (3, 2), (0, 2)), ((4, 1), (1, 3), (2, 0))}
# Past the parallel threshold in NCHW; few images with many channels in NHWC (whose backward
# splits the channels into blocks).
LARGE_SHAPES = [(3, 5, 67, 45), (1, 40, 33, 31)]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_parallel_paths(dtype, fmt):
    for shape in LARGE_SHAPES:
        x = randn_from(shape, "cpu", dtype, fmt)
        for case in window_cases(dilations=(1, 2)):
            if case[:3] in FEW:
                check_max_pool(numba_pool, x, case)
        for i, case in enumerate(window_cases()):
            if case[:3] in FEW:
                check_avg_pool(numba_pool, x, (*case[:3], case[4], i % 2 == 0, 5 * (i % 3 == 2)))
        h, w = shape[2:]
        for size in [(1, 1), (h // 2 + 1, w - 1), (h + 4, 2 * w + 1)]:
            check_adaptive_avg_pool(numba_pool, x, size)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_backward_is_deterministic_across_thread_counts(dtype, fmt):
    """Overlapping windows add several gradients into one input: the sums must be the same bits
    on the serial twins (one thread) and the parallel kernels, and from run to run."""
    shape = LARGE_SHAPES[fmt == torch.channels_last]
    x = randn_from(shape, "cpu", dtype, fmt)
    case = ((3, 3), (1, 1), (1, 1), (1, 1))
    indices = poisoned_in(shape, x, fmt, torch.int64)  # 3x3, stride 1, padding 1: x's size
    out = poisoned_in(shape, x, fmt)
    numba_pool.max_pool2d_forward(x, out, indices, *case)
    grad_out = torch.randn_like(out)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 2):
            torch.set_num_threads(count)
            grads = (torch.empty_like(x), torch.empty_like(x))
            numba_pool.max_pool2d_backward(grad_out, indices, grads[0], *case)
            numba_pool.avg_pool2d_backward(grad_out, grads[1], *case[:3], False, 0)
            results.append(grads)
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))
