"""Direct depthwise convolution: one input channel per group, ``multiplier`` outputs per input.

A GEMM tile over output channels would be almost empty here (the reduction is the kernel's
taps alone), so each work item, one output row of one image, accumulates into a row buffer with
the vector loop where the memory is contiguous: along the row for NCHW (one channel at a time),
along the channels for NHWC (one pixel at a time). The row is computed for a pass (see
_conv_gemm's docstring, whose ``G_*`` geometry it shares): output pixels ``(oh0 + i*ostep_h,
ow0 + j*ostep_w)`` read input ``(i*istep_h + dh, j*istep_w + dw)`` for each row tap ``dh`` and
column tap ``dw``, which serves convolutions (one pass) and transposed convolutions (one per
output phase) alike.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from brainkern.kernels.numba._conv_gemm import (
    G_CG_OUT,
    G_GROUPS,
    G_H,
    G_HG,
    G_ISTEP_H,
    G_ISTEP_W,
    G_KW,
    G_OH0,
    G_OSTEP_H,
    G_OSTEP_W,
    G_OW0,
    G_SOC,
    G_SOH,
    G_SON,
    G_SOW,
    G_SXC,
    G_SXH,
    G_SXN,
    G_SXW,
    G_W,
    G_WG,
    _activate,
    _store,
)
from brainkern.kernels.numba.linear import FASTMATH


@njit(cache=True, fastmath=FASTMATH)
def depthwise_rows(first, last, x, weight, taps_h, taps_w, bias, has_bias, out, pre, has_pre,
                   geom, code, param):
    """Output rows ``[first, last)`` of the pass, row = ``n*hg + i``.

    x: flat input, element (n, c, h, w) at ``n*sxn + c*sxc + h*sxh + w*sxw``; NHWC when sxc is
    1. weight: flat; element (co, kh, kw) at ``co*kH*kW + kh*kW + kw`` for NCHW input and at
    ``(kh*kW + kw)*C_out + co`` for NHWC (so the vector loop reads it contiguously).
    taps_h, taps_w: (taps, 2) int64, rows ``(k, input offset)``. bias: (C_out,) if has_bias.
    out, pre: flat, element (n, co, oh, ow) at ``n*son + co*soc + oh*soh + ow*sow``.
    Output channel co reads input channel ``co // multiplier``.
    """
    sxn, sxc, sxh, sxw, h, w = (geom[G_SXN], geom[G_SXC], geom[G_SXH], geom[G_SXW], geom[G_H],
                                geom[G_W])
    son, soc, soh, sow = geom[G_SON], geom[G_SOC], geom[G_SOH], geom[G_SOW]
    c_in, multiplier, hg, wg = geom[G_GROUPS], geom[G_CG_OUT], geom[G_HG], geom[G_WG]
    istep_h, istep_w, oh0, ow0 = geom[G_ISTEP_H], geom[G_ISTEP_W], geom[G_OH0], geom[G_OW0]
    ostep_h, ostep_w, kw_size = geom[G_OSTEP_H], geom[G_OSTEP_W], geom[G_KW]
    c_out = c_in * multiplier
    kernel_area = weight.shape[0] // c_out
    acc = np.empty(wg * c_out, dtype=out.dtype)
    nhwc = sxc == 1
    for row in range(first, last):
        n, i = row // hg, row % hg
        acc[:] = 0.0
        for th in range(taps_h.shape[0]):
            ih = i * istep_h + taps_h[th, 1]
            if ih < 0 or ih >= h:
                continue
            x_row = n * sxn + ih * sxh
            for tw in range(taps_w.shape[0]):
                tap = taps_h[th, 0] * kw_size + taps_w[tw, 0]
                offset = taps_w[tw, 1]
                # Columns j whose input column j*istep_w + offset lies inside x.
                j_lo = min(wg, max(0, (-offset + istep_w - 1) // istep_w))
                j_hi = max(j_lo, min(wg, (w - offset + istep_w - 1) // istep_w))
                if nhwc:
                    w_tap = weight[tap * c_out:(tap + 1) * c_out]
                    for j in range(j_lo, j_hi):
                        x_pix = x_row + (j * istep_w + offset) * sxw
                        a = acc[j * c_out:(j + 1) * c_out]
                        if multiplier == 1:
                            xs = x[x_pix:x_pix + c_in]
                            for co in range(c_out):
                                a[co] += w_tap[co] * xs[co]
                        else:
                            for ci in range(c_in):
                                xv = x[x_pix + ci]
                                a_ci = a[ci * multiplier:(ci + 1) * multiplier]
                                w_ci = w_tap[ci * multiplier:(ci + 1) * multiplier]
                                for e in range(multiplier):
                                    a_ci[e] += w_ci[e] * xv
                else:
                    for co in range(c_out):
                        wv = weight[co * kernel_area + tap]
                        a = acc[co * wg:(co + 1) * wg]
                        x_start = x_row + (co // multiplier) * sxc + offset * sxw
                        if istep_w * sxw == 1:
                            xs = x[x_start + j_lo:x_start + j_hi]
                            a_run = a[j_lo:j_hi]
                            for j in range(j_hi - j_lo):
                                a_run[j] += wv * xs[j]
                        else:
                            step = istep_w * sxw
                            for j in range(j_lo, j_hi):
                                a[j] += wv * x[x_start + j * step]
        out_row = n * son + (oh0 + i * ostep_h) * soh + ow0 * sow
        step = ostep_w * sow
        if nhwc:
            for j in range(wg):
                z = acc[j * c_out:(j + 1) * c_out]
                if has_bias:
                    for co in range(c_out):
                        z[co] += bias[co]
                _write(z, c_out, out, pre, has_pre, out_row + j * step, soc, code, param)
        else:
            for co in range(c_out):
                z = acc[co * wg:(co + 1) * wg]
                if has_bias:
                    b = bias[co]
                    for j in range(wg):
                        z[j] += b
                _write(z, wg, out, pre, has_pre, out_row + co * soc, step, code, param)


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _write(z, count, out, pre, has_pre, start, step, code, param):
    """out[start + e*step] = act(z[e]) for e < count, pre the same before act; a slice when
    the elements are consecutive, so the loop vectorizes."""
    if step == 1:
        if has_pre:
            pre_run = pre[start:start + count]
            for e in range(count):
                pre_run[e] = z[e]
        _store(z, out[start:start + count], count, code, param)
    else:
        for e in range(count):
            if has_pre:
                pre[start + e * step] = z[e]
            out[start + e * step] = _activate(z[e], code, param)


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def depthwise_parallel(tasks, rows, x, weight, taps_h, taps_w, bias, has_bias, out, pre, has_pre,
                       geom, code, param):
    """All ``rows`` split evenly over ``tasks`` threads; serial twin: depthwise_rows."""
    for task in prange(tasks):
        t = np.int64(task)
        depthwise_rows(t * rows // tasks, (t + 1) * rows // tasks, x, weight, taps_h, taps_w, bias,
                       has_bias, out, pre, has_pre, geom, code, param)
