"""A zero-padded copy of a convolution's input, for the kernels that read it by tap offsets.

The copy is made in Numba, not with torch's copy ops: a torch parallel region right before or
after a Numba one leaves one runtime's idle threads spinning while the other's work (measured
here: padding the 32->64 layer's 2.6 MB input took ~40 ms through torch under load against
~1 ms in one thread).
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from brainkern.kernels.numba import _runtime
from brainkern.kernels.numba.linear import _PARALLEL_MIN_ELEMENTS, FASTMATH, _flat


@njit(cache=True, fastmath=FASTMATH)
def _pad_rows(first, last, src, src_strides, dst, shape, top, left, hp, wp, nchw):
    """Rows ``[first, last)`` of dst, row = ``n*hp + r``: dst row r of image n (every channel)
    is source row ``r - top`` shifted right by ``left``, zeros where it has no source.

    src: flat, element (n, c, h, w) at ``n*s[0] + c*s[1] + h*s[2] + w*s[3]``, shape (N, C, H, W).
    dst: flat contiguous (N, C, hp, wp) if nchw, else (N, hp, wp, C).
    """
    channels, h, w = shape[1], shape[2], shape[3]
    s0, s1, s2, s3 = src_strides[0], src_strides[1], src_strides[2], src_strides[3]
    for row in range(first, last):
        n, r = row // hp, row % hp
        ih = r - top
        inside = ih >= 0 and ih < h
        if nchw:
            for c in range(channels):
                out = dst[((n * channels + c) * hp + r) * wp:((n * channels + c) * hp + r + 1) * wp]
                if inside:
                    out[:left] = 0.0
                    origin = n * s0 + c * s1 + ih * s2
                    if s3 == 1:  # a unit-stride loop vectorizes; a strided one does not
                        row = src[origin:origin + w]
                        dst_row = out[left:left + w]
                        for j in range(w):
                            dst_row[j] = row[j]
                    else:
                        for j in range(w):
                            out[left + j] = src[origin + j * s3]
                    out[left + w:] = 0.0
                else:
                    out[:] = 0.0
        else:
            out = dst[(n * hp + r) * wp * channels:(n * hp + r + 1) * wp * channels]
            if inside:
                out[:left * channels] = 0.0
                for j in range(w):
                    origin = n * s0 + ih * s2 + j * s3
                    pixel = out[(left + j) * channels:(left + j + 1) * channels]
                    if s1 == 1:
                        run = src[origin:origin + channels]
                        for c in range(channels):
                            pixel[c] = run[c]
                    else:
                        for c in range(channels):
                            pixel[c] = src[origin + c * s1]
                out[(left + w) * channels:] = 0.0
            else:
                out[:] = 0.0


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def _pad_parallel(tasks, rows, src, src_strides, dst, shape, top, left, hp, wp, nchw):
    """Every row, split evenly over ``tasks`` threads (serial twin: _pad_rows over all rows)."""
    for task in prange(tasks):
        t = np.int64(task)
        _pad_rows(t * rows // tasks, (t + 1) * rows // tasks, src, src_strides, dst, shape, top,
                  left, hp, wp, nchw)


def padded(x, top, bottom, left, right, nchw):
    """x (x.numel() > 0) with zero borders, as a contiguous NCHW (nchw) or NHWC tensor: x
    itself when it needs no border and is already one (a 1x1 convolution's input)."""
    n, c, h, w = x.shape
    hp, wp = h + top + bottom, w + left + right
    fmt = torch.contiguous_format if nchw else torch.channels_last
    if hp == h and wp == w and x.is_contiguous(memory_format=fmt):
        return x
    xp = torch.empty((n, c, hp, wp), dtype=x.dtype, memory_format=fmt)
    args = (_flat(x), np.array(x.stride(), dtype=np.int64), _flat(xp),
            np.array(x.shape, dtype=np.int64), top, left, hp, wp, nchw)
    tasks = min(_runtime.threads() if xp.numel() >= _PARALLEL_MIN_ELEMENTS else 1, n * hp)
    if tasks <= 1:
        _pad_rows(0, n * hp, *args)
    else:
        _pad_parallel(tasks, n * hp, *args)
    return xp
