"""Numba CPU kernels for the pool op family (interface: brainkern/kernels/__init__.py).

Both memory formats are one layout here: a tensor is a contiguous (P, H, W, Q) array, NCHW as
(N*C, H, W, 1) and NHWC as (N, H, W, C), and torch's flat index ``h * W + w`` addresses the same
tap in both. With Q == 1 the loops run along a row of outputs (vectorised along w); with Q > 1
along the channels (vectorised along q).

Windows are separable: :func:`_windows` tabulates, per output row (and column), the first
in-bounds tap, the end of the taps and the divisor's factor, so average and adaptive average
pooling are one kernel, and a window's shape costs nothing inside the loops.

Forward kernels run one output row (p, oh) per task; backward kernels own whole slices of
grad_x (a plane in NCHW, a block of channels of one image in NHWC), zero them and add every
window's share in a fixed order: deterministic, no atomics. 2x2 windows of stride 2 without
padding (every CNN's downsampling) take a path of their own: no window tables, and a backward
that writes each input once instead of zeroing and adding. Each ``prange`` driver has a serial
twin (see numba/linear.py and _runtime.py).
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from brainkern.kernels.numba import _runtime
from brainkern.kernels.numba.linear import FASTMATH

DEVICES = ("cpu",)
DTYPES = (torch.float32, torch.float64)

# Below this many elements moved a kernel runs on one thread: waking the pool costs ~10-20 us.
_PARALLEL_MIN_ELEMENTS = 1 << 15
# NHWC backward tasks own channel blocks of a multiple of 16 (a 64-byte line of float32), and
# at least this many tasks go to each thread so that uneven blocks still balance.
_CHANNEL_BLOCK_QUANTUM = 16
_TASKS_PER_THREAD = 4

_EMPTY_INDICES = np.empty(0, dtype=np.int64)


@njit(cache=True)
def _windows(size, out_size, kernel, stride, padding, dilation, adaptive, include_pad):
    """(3, out_size) int64: per output position, its first in-bounds tap, the end (exclusive)
    of its taps, and its divisor's factor (the taps counted: in the padded input clipped to
    input + padding when include_pad, else in bounds). adaptive: torch's adaptive windows
    ``[floor(i * size / out_size), ceil((i + 1) * size / out_size))``."""
    table = np.empty((3, out_size), dtype=np.int64)
    for i in range(out_size):
        if adaptive:
            first, end = i * size // out_size, -(-(i + 1) * size // out_size)
            count = end - first
        else:
            start = i * stride - padding
            end = min(start + (kernel - 1) * dilation + 1, size)
            first = start
            if first < 0:  # the first tap at or past 0 on the dilation grid
                first += (-first + dilation - 1) // dilation * dilation
            count = min(start + kernel, size + padding) - start if include_pad else end - first
        table[0, i], table[1, i], table[2, i] = first, end, count
    return table


@njit(cache=True, inline="always", fastmath=FASTMATH)
def _max_forward_row(row, x, out, idx, has_idx, H, W, Q, Ho, Wo, rows, cols, dh, dw, pairs):
    """Output row ``row`` = (p, oh) of max pooling.

    x: flat (P, H, W, Q). out, idx: flat (P, Ho, Wo, Q); idx (int64) written if has_idx.
    rows, cols: _windows tables of the two axes; dh, dw: dilation. pairs: 2x2 windows of stride
    2 inside the input (no tables needed). A tap replaces the best so far when greater or NaN
    (torch's scan order and rule: the first maximum, or the last NaN, wins).
    """
    p = row // Ho
    oh = row - p * Ho
    x0 = p * H * W * Q
    o0 = row * Wo * Q
    if pairs:
        top = 2 * oh * W
        a = x[x0 + top * Q:x0 + (top + W) * Q]
        b = x[x0 + (top + W) * Q:x0 + (top + 2 * W) * Q]
        if Q == 1:
            o, ix = out[o0:o0 + Wo], idx[o0:o0 + Wo]
            for ow in range(Wo):
                best, at = a[2 * ow], top + 2 * ow
                v = a[2 * ow + 1]
                if v > best or v != v:
                    best, at = v, top + 2 * ow + 1
                v = b[2 * ow]
                if v > best or v != v:
                    best, at = v, top + W + 2 * ow
                v = b[2 * ow + 1]
                if v > best or v != v:
                    best, at = v, top + W + 2 * ow + 1
                o[ow] = best
                if has_idx:
                    ix[ow] = at
            return
        for ow in range(Wo):
            o, ix = out[o0 + ow * Q:o0 + ow * Q + Q], idx[o0 + ow * Q:o0 + ow * Q + Q]
            a0, a1 = a[2 * ow * Q:2 * ow * Q + Q], a[2 * ow * Q + Q:2 * ow * Q + 2 * Q]
            b0, b1 = b[2 * ow * Q:2 * ow * Q + Q], b[2 * ow * Q + Q:2 * ow * Q + 2 * Q]
            at0 = top + 2 * ow
            for q in range(Q):
                best, at = a0[q], at0
                v = a1[q]
                if v > best or v != v:
                    best, at = v, at0 + 1
                v = b0[q]
                if v > best or v != v:
                    best, at = v, at0 + W
                v = b1[q]
                if v > best or v != v:
                    best, at = v, at0 + W + 1
                o[q] = best
                if has_idx:
                    ix[q] = at
        return
    h_first, h_end = rows[0, oh], rows[1, oh]
    for ow in range(Wo):
        w_first, w_end = cols[0, ow], cols[1, ow]
        first = h_first * W + w_first
        o, ix = out[o0 + ow * Q:o0 + ow * Q + Q], idx[o0 + ow * Q:o0 + ow * Q + Q]
        # Starting from the first tap, not -inf, keeps the dtype; rescanning it changes nothing.
        o[:] = x[x0 + first * Q:x0 + first * Q + Q]
        if has_idx:
            ix[:] = first
        for h in range(h_first, h_end, dh):
            for w in range(w_first, w_end, dw):
                tap = h * W + w
                t = x[x0 + tap * Q:x0 + tap * Q + Q]
                for q in range(Q):
                    v = t[q]
                    if v > o[q] or v != v:
                        o[q] = v
                        if has_idx:
                            ix[q] = tap


@njit(cache=True, inline="always", fastmath=FASTMATH)
def _avg_forward_row(row, x, out, H, W, Q, Ho, Wo, rows, cols, divisor, pairs, pair_scale):
    """Output row ``row`` = (p, oh) of average pooling: each window's sum / its divisor.

    x: flat (P, H, W, Q); out: flat (P, Ho, Wo, Q). rows, cols: _windows tables (taps at unit
    stride, factors of the divisor); divisor > 0 overrides them. pairs: as _max_forward_row,
    pair_scale: 1 / their divisor, of x's dtype (a float64 division would halve the vectors).
    """
    p = row // Ho
    oh = row - p * Ho
    x0 = p * H * W * Q
    o0 = row * Wo * Q
    if pairs:
        top = 2 * oh * W
        a = x[x0 + top * Q:x0 + (top + W) * Q]
        b = x[x0 + (top + W) * Q:x0 + (top + 2 * W) * Q]
        if Q == 1:
            o = out[o0:o0 + Wo]
            for ow in range(Wo):
                o[ow] = (a[2 * ow] + a[2 * ow + 1] + b[2 * ow] + b[2 * ow + 1]) * pair_scale
            return
        for ow in range(Wo):
            o = out[o0 + ow * Q:o0 + ow * Q + Q]
            a0, a1 = a[2 * ow * Q:2 * ow * Q + Q], a[2 * ow * Q + Q:2 * ow * Q + 2 * Q]
            b0, b1 = b[2 * ow * Q:2 * ow * Q + Q], b[2 * ow * Q + Q:2 * ow * Q + 2 * Q]
            for q in range(Q):
                o[q] = (a0[q] + a1[q] + b0[q] + b1[q]) * pair_scale
        return
    h_first, h_end = rows[0, oh], rows[1, oh]
    for ow in range(Wo):
        w_first, w_end = cols[0, ow], cols[1, ow]
        div = divisor if divisor > 0 else rows[2, oh] * cols[2, ow]
        o = out[o0 + ow * Q:o0 + ow * Q + Q]
        o[:] = 0.0
        for h in range(h_first, h_end):
            for w in range(w_first, w_end):
                t = x[x0 + (h * W + w) * Q:x0 + (h * W + w) * Q + Q]
                for q in range(Q):
                    o[q] += t[q]
        for q in range(Q):
            o[q] /= div


@njit(cache=True, inline="always", fastmath=FASTMATH)
def _max_backward_slice(task, g, idx, gx, H, W, Q, Ho, Wo, q_block):
    """grad_x's slice ``task`` = (p, channel block): zeroed, then each output's gradient added
    at its index. g, idx: flat (P, Ho, Wo, Q); gx: flat (P, H, W, Q); q_block: channels per
    block (Q when Q == 1)."""
    blocks = (Q + q_block - 1) // q_block
    p = task // blocks
    q0 = (task - p * blocks) * q_block
    q1 = min(q0 + q_block, Q)
    x0 = p * H * W * Q
    o0 = p * Ho * Wo * Q
    if Q == 1:
        plane = gx[x0:x0 + H * W]
        plane[:] = 0.0
        for o in range(o0, o0 + Ho * Wo):
            plane[idx[o]] += g[o]
        return
    for hw in range(H * W):
        gx[x0 + hw * Q + q0:x0 + hw * Q + q1] = 0.0
    for o in range(o0 + q0, o0 + Ho * Wo * Q, Q):
        for q in range(q1 - q0):
            gx[x0 + idx[o + q] * Q + q0 + q] += g[o + q]


@njit(cache=True, inline="always", fastmath=FASTMATH)
def _avg_backward_slice(task, g, gx, H, W, Q, Ho, Wo, rows, cols, divisor, pairs, pair_scale,
                        q_block):
    """grad_x's slice ``task`` (as _max_backward_slice) of average pooling's adjoint: every tap
    of every window gets the window's gradient / its divisor. Arguments as _avg_forward_row."""
    blocks = (Q + q_block - 1) // q_block
    p = task // blocks
    q0 = (task - p * blocks) * q_block
    q1 = min(q0 + q_block, Q)
    x0 = p * H * W * Q
    o0 = p * Ho * Wo * Q
    if pairs and 2 * Ho == H and 2 * Wo == W:  # the windows tile grad_x: one store per element
        for oh in range(Ho):
            top = x0 + 2 * oh * W * Q
            if Q == 1:
                share = g[o0 + oh * Wo:o0 + oh * Wo + Wo]
                a, b = gx[top:top + W], gx[top + W:top + 2 * W]
                for ow in range(Wo):
                    v = share[ow] * pair_scale
                    a[2 * ow], a[2 * ow + 1], b[2 * ow], b[2 * ow + 1] = v, v, v, v
                continue
            for ow in range(Wo):
                share = g[o0 + (oh * Wo + ow) * Q + q0:o0 + (oh * Wo + ow) * Q + q1]
                for corner in (top + 2 * ow * Q, top + (2 * ow + 1) * Q,
                               top + (W + 2 * ow) * Q, top + (W + 2 * ow + 1) * Q):
                    dst = gx[corner + q0:corner + q1]
                    for q in range(q1 - q0):
                        dst[q] = share[q] * pair_scale
        return
    for hw in range(H * W):
        gx[x0 + hw * Q + q0:x0 + hw * Q + q1] = 0.0
    for oh in range(Ho):
        for ow in range(Wo):
            div = divisor if divisor > 0 else rows[2, oh] * cols[2, ow]
            share = g[o0 + (oh * Wo + ow) * Q + q0:o0 + (oh * Wo + ow) * Q + q1]
            for h in range(rows[0, oh], rows[1, oh]):
                for w in range(cols[0, ow], cols[1, ow]):
                    dst = gx[x0 + (h * W + w) * Q + q0:x0 + (h * W + w) * Q + q1]
                    for q in range(q1 - q0):
                        dst[q] += share[q] / div


# Drivers: each ``prange`` kernel and its serial twin (prange indices are uint64: cast, so the
# bodies compile once for both).

@njit(cache=True, parallel=True, fastmath=FASTMATH)
def _max_forward_parallel(x, out, idx, has_idx, H, W, Q, Ho, Wo, rows, cols, dh, dw, pairs, tasks):
    for row in prange(tasks):
        _max_forward_row(np.int64(row), x, out, idx, has_idx, H, W, Q, Ho, Wo, rows, cols, dh, dw,
                         pairs)


@njit(cache=True, fastmath=FASTMATH)
def _max_forward_serial(x, out, idx, has_idx, H, W, Q, Ho, Wo, rows, cols, dh, dw, pairs, tasks):
    for row in range(tasks):
        _max_forward_row(row, x, out, idx, has_idx, H, W, Q, Ho, Wo, rows, cols, dh, dw, pairs)


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def _avg_forward_parallel(x, out, H, W, Q, Ho, Wo, rows, cols, divisor, pairs, pair_scale, tasks):
    for row in prange(tasks):
        _avg_forward_row(np.int64(row), x, out, H, W, Q, Ho, Wo, rows, cols, divisor, pairs,
                         pair_scale)


@njit(cache=True, fastmath=FASTMATH)
def _avg_forward_serial(x, out, H, W, Q, Ho, Wo, rows, cols, divisor, pairs, pair_scale, tasks):
    for row in range(tasks):
        _avg_forward_row(row, x, out, H, W, Q, Ho, Wo, rows, cols, divisor, pairs, pair_scale)


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def _max_backward_parallel(g, idx, gx, H, W, Q, Ho, Wo, q_block, tasks):
    for task in prange(tasks):
        _max_backward_slice(np.int64(task), g, idx, gx, H, W, Q, Ho, Wo, q_block)


@njit(cache=True, fastmath=FASTMATH)
def _max_backward_serial(g, idx, gx, H, W, Q, Ho, Wo, q_block, tasks):
    for task in range(tasks):
        _max_backward_slice(task, g, idx, gx, H, W, Q, Ho, Wo, q_block)


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def _avg_backward_parallel(g, gx, H, W, Q, Ho, Wo, rows, cols, divisor, pairs, pair_scale, q_block,
                           tasks):
    for task in prange(tasks):
        _avg_backward_slice(np.int64(task), g, gx, H, W, Q, Ho, Wo, rows, cols, divisor, pairs,
                            pair_scale, q_block)


@njit(cache=True, fastmath=FASTMATH)
def _avg_backward_serial(g, gx, H, W, Q, Ho, Wo, rows, cols, divisor, pairs, pair_scale, q_block,
                         tasks):
    for task in range(tasks):
        _avg_backward_slice(task, g, gx, H, W, Q, Ho, Wo, rows, cols, divisor, pairs, pair_scale,
                            q_block)


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


def _pairs(x, out, kernel_size, stride, padding, dilation=(1, 1)) -> bool:
    """2x2 windows of stride 2, unpadded, undilated, every one inside x."""
    return (tuple(kernel_size) == (2, 2) and tuple(stride) == (2, 2) and tuple(padding) == (0, 0)
            and tuple(dilation) == (1, 1) and 2 * out.shape[2] <= x.shape[2]
            and 2 * out.shape[3] <= x.shape[3])


def _tables(x, out, kernel_size, stride, padding, dilation, adaptive, include_pad):
    return tuple(
        _windows(x.shape[axis], out.shape[axis], kernel_size[axis - 2], stride[axis - 2],
                 padding[axis - 2], dilation[axis - 2], adaptive, include_pad)
        for axis in (2, 3))


def _scale(dtype: torch.dtype, divisor: int):
    """1 / the 2x2 window's divisor as a scalar of the tensors' dtype."""
    return (np.float64 if dtype == torch.float64 else np.float32)(1.0 / (divisor or 4))


def max_pool2d_forward(x, out, indices, kernel_size, stride, padding, dilation):
    """out = each window's maximum; indices (or None) its flat tap ``h * W + w``.

    x (N, C, H, W), out and indices (int64) (N, C, H_out, W_out), all NCHW- or all
    NHWC-contiguous; kernel_size, stride, padding, dilation: (h, w) pairs (kernels/__init__.py).
    """
    if out.numel() == 0:
        return
    tensors = (x, out) if indices is None else (x, out, indices)
    P, Q = _layout(*tensors)
    (H, W), (Ho, Wo) = x.shape[2:], out.shape[2:]
    rows, cols = _tables(x, out, kernel_size, stride, padding, dilation, False, False)
    args = (_storage(x), _storage(out),
            _EMPTY_INDICES if indices is None else _storage(indices), indices is not None,
            H, W, Q, Ho, Wo, rows, cols, dilation[0], dilation[1],
            _pairs(x, out, kernel_size, stride, padding, dilation), P * Ho)
    if _threads(x.numel()) > 1:
        _max_forward_parallel(*args)
    else:
        _max_forward_serial(*args)


def max_pool2d_backward(grad_out, indices, grad_x):
    """grad_x = grad_out summed into the taps its indices name, zeros elsewhere.

    grad_out, indices (N, C, H_out, W_out) and grad_x (N, C, H, W) in one format, as
    max_pool2d_forward wrote them.
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
    args = (_storage(grad_out), _storage(indices), _storage(grad_x), H, W, Q, Ho, Wo, q_block,
            tasks)
    if threads > 1:
        _max_backward_parallel(*args)
    else:
        _max_backward_serial(*args)


def _avg_forward(x, out, tables, divisor, pairs):
    P, Q = _layout(x, out)
    (H, W), (Ho, Wo) = x.shape[2:], out.shape[2:]
    args = (_storage(x), _storage(out), H, W, Q, Ho, Wo, *tables, divisor, pairs,
            _scale(x.dtype, divisor), P * Ho)
    if _threads(x.numel()) > 1:
        _avg_forward_parallel(*args)
    else:
        _avg_forward_serial(*args)


def _avg_backward(grad_out, grad_x, tables, divisor, pairs):
    P, Q = _layout(grad_x, grad_out)
    (H, W), (Ho, Wo) = grad_x.shape[2:], grad_out.shape[2:]
    threads = _threads(grad_x.numel())
    q_block, tasks = _slices(P, Q, threads)
    args = (_storage(grad_out), _storage(grad_x), H, W, Q, Ho, Wo, *tables, divisor, pairs,
            _scale(grad_x.dtype, divisor), q_block, tasks)
    if threads > 1:
        _avg_backward_parallel(*args)
    else:
        _avg_backward_serial(*args)


def avg_pool2d_forward(x, out, kernel_size, stride, padding, count_include_pad, divisor):
    """out = each window's sum over its in-bounds taps / its divisor: ``divisor`` when > 0
    (divisor_override), else the taps in the padded input clipped to input + padding
    (count_include_pad) or in bounds. Tensors as max_pool2d_forward."""
    if out.numel() == 0:
        return
    tables = _tables(x, out, kernel_size, stride, padding, (1, 1), False, count_include_pad)
    _avg_forward(x, out, tables, divisor, _pairs(x, out, kernel_size, stride, padding))


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
                  _pairs(grad_x, grad_out, kernel_size, stride, padding))


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
