"""Numba CPU kernels for the pool op family (interface: brainkern/kernels/__init__.py).

Both memory formats are one layout here: a tensor is a contiguous (P, H, W, Q) array, NCHW as
(N*C, H, W, 1) and NHWC as (N, H, W, C), and torch's flat index ``h * W + w`` addresses the same
tap in both. With Q == 1 the loops run along a row of outputs (vectorised along w); with Q > 1
along the channels (vectorised along q).

Windows are separable: ``_pool_kernels.windows`` tabulates, per output row (and column), the
first in-bounds tap, the end of the taps and the divisor's factor, so average and adaptive
average pooling are one kernel, and a window's shape costs nothing inside the loops.

Forward kernels run one output row (p, oh) per task; backward kernels own whole slices of
grad_x (a plane in NCHW, a block of channels of one image in NHWC), zero them and add every
window's share in a fixed order: deterministic, no atomics. 2x2 windows of stride 2 without
padding (every CNN's downsampling) take a path of their own: no window tables, and a backward
that writes each input once instead of zeroing and adding. Each ``prange`` driver has a serial
twin (see numba/linear.py and _runtime.py). The jitted code is in _pool_kernels.py.
"""

from __future__ import annotations

import numpy as np
import torch

from brainkern.kernels.numba import _runtime
from brainkern.kernels.numba._pool_kernels import (
    avg_backward_parallel,
    avg_backward_serial,
    avg_forward_parallel,
    avg_forward_serial,
    max_backward_parallel,
    max_backward_serial,
    max_forward_parallel,
    max_forward_serial,
    windows,
)

DEVICES = ("cpu",)
DTYPES = (torch.float32, torch.float64)
WINDOW_CODES = True  # max pooling takes uint8 window codes for indices (kernels/__init__.py)

# Below this many elements moved a kernel runs on one thread: waking the pool costs ~10-20 us.
_PARALLEL_MIN_ELEMENTS = 1 << 15
# NHWC backward tasks own channel blocks of a multiple of 16 (a 64-byte line of float32), and
# at least this many tasks go to each thread so that uneven blocks still balance.
_CHANNEL_BLOCK_QUANTUM = 16
_TASKS_PER_THREAD = 4

_EMPTY_INDICES = np.empty(0, dtype=np.int64)
_EMPTY_CODES = np.empty(0, dtype=np.uint8)


def _layout(*tensors):
    """(P, Q) of the (P, H, W, Q) view: NHWC when any tensor is not NCHW-contiguous (a tensor
    that is both, C == 1 or H == W == 1, has one memory order for the two formats)."""
    n, c = tensors[0].shape[:2]
    if all(t.is_contiguous() for t in tensors):
        return n * c, 1
    return n, c


def _storage(t: torch.Tensor) -> np.ndarray:
    """A 1-D numpy view of a 4-D NCHW- or NHWC-contiguous tensor's storage, in memory order."""
    t = t.detach()
    if not t.is_contiguous():
        t = t.permute(0, 2, 3, 1)
    return t.numpy().reshape(-1)


def _threads(elements: int) -> int:
    return _runtime.threads() if elements >= _PARALLEL_MIN_ELEMENTS else 1


def _slices(P, Q, threads):
    """(q_block, tasks) for a backward over grad_x's (P, H, W, Q): whole planes when Q == 1
    (or the images alone give every thread enough tasks), else channel blocks."""
    if Q == 1 or P >= _TASKS_PER_THREAD * threads:
        return Q, P
    blocks = -(-_TASKS_PER_THREAD * threads // P)
    quantum = _CHANNEL_BLOCK_QUANTUM
    q_block = max(quantum, -(-Q // blocks) + quantum - 1) // quantum * quantum
    return q_block, P * -(-Q // q_block)


def two_by_two(x, out, kernel_size, stride, padding, dilation=(1, 1)) -> bool:
    """2x2 windows of stride 2, unpadded, undilated, every one inside x (the native backend's
    C++ kernels take these too)."""
    return (tuple(kernel_size) == (2, 2) and tuple(stride) == (2, 2) and tuple(padding) == (0, 0)
            and tuple(dilation) == (1, 1) and 2 * out.shape[2] <= x.shape[2]
            and 2 * out.shape[3] <= x.shape[3])


def _tables(x, out, kernel_size, stride, padding, dilation, adaptive, include_pad):
    return tuple(
        windows(x.shape[axis], out.shape[axis], kernel_size[axis - 2], stride[axis - 2],
                 padding[axis - 2], dilation[axis - 2], adaptive, include_pad)
        for axis in (2, 3))


def _scale(dtype: torch.dtype, divisor: int):
    """1 / the 2x2 window's divisor as a scalar of the tensors' dtype."""
    return (np.float64 if dtype == torch.float64 else np.float32)(1.0 / (divisor or 4))


def _window(kernel_size, stride, padding, dilation) -> tuple:
    return (*stride, *padding, kernel_size[1], *dilation)


def _indices_and_codes(indices):
    """(int64 indices, uint8 codes) storage for the kernels: the given tensor's, and an empty
    array for the other."""
    if indices is None:
        return _EMPTY_INDICES, _EMPTY_CODES
    if indices.dtype == torch.uint8:
        return _EMPTY_INDICES, _storage(indices)
    return _storage(indices), _EMPTY_CODES


def max_pool2d_forward(x, out, indices, kernel_size, stride, padding, dilation):
    """out = each window's maximum; indices (or None) its flat tap ``h * W + w`` (int64) or its
    window code (uint8).

    x (N, C, H, W), out and indices (N, C, H_out, W_out), all NCHW- or all NHWC-contiguous;
    kernel_size, stride, padding, dilation: (h, w) pairs (kernels/__init__.py).
    """
    if out.numel() == 0:
        return
    tensors = (x, out) if indices is None else (x, out, indices)
    P, Q = _layout(*tensors)
    (H, W), (Ho, Wo) = x.shape[2:], out.shape[2:]
    rows, cols = _tables(x, out, kernel_size, stride, padding, dilation, False, False)
    idx, codes = _indices_and_codes(indices)
    args = (_storage(x), _storage(out), idx, idx.size > 0, codes, H, W, Q, Ho, Wo, rows, cols,
            _window(kernel_size, stride, padding, dilation),
            two_by_two(x, out, kernel_size, stride, padding, dilation), P * Ho)
    if _threads(x.numel()) > 1:
        max_forward_parallel(*args)
    else:
        max_forward_serial(*args)


def max_pool2d_backward(grad_out, indices, grad_x, kernel_size, stride, padding, dilation):
    """grad_x = grad_out summed into the taps its indices (or window codes) name, zeros
    elsewhere.

    grad_out, indices (N, C, H_out, W_out) and grad_x (N, C, H, W) in one format, as
    max_pool2d_forward wrote them; the window arguments are the forward's.
    """
    if grad_x.numel() == 0:
        return
    if grad_out.numel() == 0:
        grad_x.zero_()
        return
    P, Q = _layout(grad_x, grad_out, indices)
    (H, W), (Ho, Wo) = grad_x.shape[2:], grad_out.shape[2:]
    threads = _threads(grad_x.numel())
    q_block, tasks = _slices(P, Q, threads)
    idx, codes = _indices_and_codes(indices)
    (kh, kw), (dh, dw) = kernel_size, dilation
    offsets = np.array([i * dh * W + j * dw for i in range(kh) for j in range(kw)],
                       dtype=np.int64)
    args = (_storage(grad_out), idx, codes, _storage(grad_x), H, W, Q, Ho, Wo,
            (*stride, *padding), offsets, q_block, tasks)
    if threads > 1:
        max_backward_parallel(*args)
    else:
        max_backward_serial(*args)


def _avg_forward(x, out, tables, divisor, pairs):
    P, Q = _layout(x, out)
    (H, W), (Ho, Wo) = x.shape[2:], out.shape[2:]
    args = (_storage(x), _storage(out), H, W, Q, Ho, Wo, *tables, divisor, pairs,
            _scale(x.dtype, divisor), P * Ho)
    if _threads(x.numel()) > 1:
        avg_forward_parallel(*args)
    else:
        avg_forward_serial(*args)


def _avg_backward(grad_out, grad_x, tables, divisor, pairs):
    P, Q = _layout(grad_x, grad_out)
    (H, W), (Ho, Wo) = grad_x.shape[2:], grad_out.shape[2:]
    threads = _threads(grad_x.numel())
    q_block, tasks = _slices(P, Q, threads)
    args = (_storage(grad_out), _storage(grad_x), H, W, Q, Ho, Wo, *tables, divisor, pairs,
            _scale(grad_x.dtype, divisor), q_block, tasks)
    if threads > 1:
        avg_backward_parallel(*args)
    else:
        avg_backward_serial(*args)


def avg_pool2d_forward(x, out, kernel_size, stride, padding, count_include_pad, divisor):
    """out = each window's sum over its in-bounds taps / its divisor: ``divisor`` when > 0
    (divisor_override), else the taps in the padded input clipped to input + padding
    (count_include_pad) or in bounds. Tensors as max_pool2d_forward."""
    if out.numel() == 0:
        return
    tables = _tables(x, out, kernel_size, stride, padding, (1, 1), False, count_include_pad)
    _avg_forward(x, out, tables, divisor, two_by_two(x, out, kernel_size, stride, padding))


def avg_pool2d_backward(grad_out, grad_x, kernel_size, stride, padding, count_include_pad,
                        divisor):
    """The adjoint of avg_pool2d_forward: every tap of every window gets the window's gradient
    / its divisor, summed over the windows; grad_x written whole."""
    if grad_x.numel() == 0:
        return
    if grad_out.numel() == 0:
        grad_x.zero_()
        return
    tables = _tables(grad_x, grad_out, kernel_size, stride, padding, (1, 1), False,
                     count_include_pad)
    _avg_backward(grad_out, grad_x, tables, divisor,
                  two_by_two(grad_x, grad_out, kernel_size, stride, padding))


def adaptive_avg_pool2d_forward(x, out):
    """out[..., i, j] = the mean of x over torch's adaptive window (i, j) (kernels/__init__.py)."""
    if out.numel() == 0:
        return
    _avg_forward(x, out, _tables(x, out, (1, 1), (1, 1), (0, 0), (1, 1), True, False), 0, False)


def adaptive_avg_pool2d_backward(grad_out, grad_x):
    """The adjoint of adaptive_avg_pool2d_forward; grad_x written whole."""
    if grad_x.numel() == 0:
        return
    if grad_out.numel() == 0:
        grad_x.zero_()
        return
    _avg_backward(grad_out, grad_x,
                  _tables(grad_x, grad_out, (1, 1), (1, 1), (0, 0), (1, 1), True, False), 0,
                  False)
