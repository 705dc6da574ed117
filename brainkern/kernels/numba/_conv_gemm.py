"""Convolution as an implicit GEMM: the engine behind numba/conv.py's two forward kernels.

One *pass* computes a grid of output pixels ``(oh0 + i*ostep_h, ow0 + j*ostep_w)`` for
``i < hg, j < wg`` as ``z[pixel, co] = sum over taps t, ci of x[n, g*cg_in + ci, i*istep_h +
tap_dh[t], j*istep_w + tap_dw[t]] * weight(co, ci, tap_kh[t], tap_kw[t])``, x read as 0 outside
its bounds, then ``out = act(z + bias)``. A convolution is one pass (istep = stride, tap offsets
``kh*dh - ph``); a transposed convolution is one pass per output phase ``(oh % sh, ow % sw)``
with only the taps that land on that phase (so no multiply-add is spent on the zeros a scatter
formulation would insert), istep 1 and tap offsets ``(phase + ph - kh*dh) / sh``.

The reduction index is ``k = t*cg_in + ci``. The weight is packed once per pass into zero-padded
micro-panels; each work item (an image, a group, a panel of pixels) gathers its pixels' patches
into a thread-local panel (implicit im2col, from any strides, NCHW or NHWC) and runs
``_simd.microkernel`` against every weight panel of its group. The tile's orientation follows the
output's layout so the epilogue writes contiguous rows: NCHW (``weight_rows``): rows are output
channels, columns pixels of one image; NHWC: rows are pixels, columns output channels.

Integer geometry travels in one int64 array (``G_*`` indices) so each kernel has one compiled
signature per dtype.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from brainkern.activations import LEAKY_RELU, NONE, RELU
from brainkern.kernels.numba._simd import microkernel
from brainkern.kernels.numba.linear import FASTMATH, _activate

# geometry array layout
G_SXN, G_SXC, G_SXH, G_SXW, G_H, G_W = 0, 1, 2, 3, 4, 5
G_SON, G_SOC, G_SOH, G_SOW = 6, 7, 8, 9
G_CG_IN, G_GROUPS, G_CG_OUT = 10, 11, 12
G_HG, G_WG, G_ISTEP_H, G_ISTEP_W, G_OH0, G_OW0, G_OSTEP_H, G_OSTEP_W = 13, 14, 15, 16, 17, 18, 19, 20
G_W_GROUP, G_W_CO, G_W_CI, G_KW = 21, 22, 23, 24
GEOMETRY_SIZE = 25


def strides(t):
    """A 4-D tensor's strides; size-1 dimensions get the stride their layout implies, so that
    the NCHW/NHWC tests on strides do not depend on torch's choice for them."""
    n, c, h, w = t.shape
    if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return h * w * c, 1, w * c, c
    if t.is_contiguous():
        return c * h * w, h * w, w, 1
    return t.stride()


@njit(cache=True, fastmath=FASTMATH)
def pack_weight(weight, geom, tap_kh, tap_kw, width, dst):
    """Pack the weight into panels of ``width`` output channels, k-major, zero-padded.

    weight: flat, element (co, ci, kh, kw) of group g at ``g*w_group + co*w_co + ci*w_ci +
    kh*kW + kw`` (co, ci local to the group: conv2d's and conv_transpose2d's layouts differ
    only in w_co and w_ci). tap_kh, tap_kw: (taps,) int64, the pass's taps.
    dst: ``(groups, panels, k, width)`` flat, panels = ceil(cg_out / width).
    """
    cg_in, groups, cg_out = geom[G_CG_IN], geom[G_GROUPS], geom[G_CG_OUT]
    w_group, w_co, w_ci, kw_size = geom[G_W_GROUP], geom[G_W_CO], geom[G_W_CI], geom[G_KW]
    taps = tap_kh.shape[0]
    k_total = taps * cg_in
    panels = (cg_out + width - 1) // width
    for g in range(groups):
        for q in range(panels):
            base = (g * panels + q) * k_total * width
            valid = min(width, cg_out - q * width)
            for t in range(taps):
                tap = tap_kh[t] * kw_size + tap_kw[t]
                for ci in range(cg_in):
                    row = base + (t * cg_in + ci) * width
                    src = g * w_group + q * width * w_co + ci * w_ci + tap
                    for lane in range(valid):
                        dst[row + lane] = weight[src + lane * w_co]
                    for lane in range(valid, width):
                        dst[row + lane] = 0.0


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _pack_patches(x, x_base, sxc, sxh, sxw, h, w, cg_in, tap_dh, tap_dw, ih0, iw0, count, width,
                  src, run_start, dst):
    """dst[(t*cg_in + ci)*width + p] = x[x_base + ci*sxc + ih*sxh + iw*sxw] (0 outside x) with
    ``ih = ih0[p] + tap_dh[t]``, ``iw = iw0[p] + tap_dw[t]`` for the ``count`` valid pixels p;
    columns past ``count`` are zeros. src, run_start: (width,), (width + 1,) int64 scratch."""
    for t in range(tap_dh.shape[0]):
        for p in range(width):
            ih, iw = ih0[p] + tap_dh[t], iw0[p] + tap_dw[t]
            inside = p < count and ih >= 0 and ih < h and iw >= 0 and iw < w
            src[p] = x_base + ih * sxh + iw * sxw if inside else -1
        if sxc == 1:  # NHWC: a pixel's channels are contiguous
            for p in range(width):
                s = src[p]
                k0 = t * cg_in * width + p
                if s < 0:
                    for ci in range(cg_in):
                        dst[k0 + ci * width] = 0.0
                else:
                    run = x[s:s + cg_in]
                    for ci in range(cg_in):
                        dst[k0 + ci * width] = run[ci]
        else:  # NCHW: for one channel, neighbouring pixels are neighbours in x
            # Runs of pixels whose sources are consecutive in x (or all outside it) are copied
            # (or zeroed) as slices: vector moves instead of a gather per element.
            runs = 0
            for p in range(width):
                if p == 0 or not ((src[p] < 0 and src[p - 1] < 0)
                                  or (src[p] >= 0 and src[p - 1] >= 0
                                      and src[p] == src[p - 1] + sxw)):
                    run_start[runs] = p
                    runs += 1
            run_start[runs] = width
            for ci in range(cg_in):
                row = (t * cg_in + ci) * width
                offset = ci * sxc
                for r in range(runs):
                    p0, p1 = run_start[r], run_start[r + 1]
                    s = src[p0]
                    dst_run = dst[row + p0:row + p1]
                    if s < 0:
                        for e in range(p1 - p0):
                            dst_run[e] = 0.0
                    elif sxw == 1:
                        src_run = x[s + offset:s + offset + p1 - p0]
                        for e in range(p1 - p0):
                            dst_run[e] = src_run[e]
                    else:
                        for e in range(p1 - p0):
                            dst_run[e] = x[s + offset + e * sxw]


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _store(z, dst, cols, code, param):
    """dst[:cols] = act(z[:cols]); relu and leaky_relu get branch-free loops (NaN stays NaN)."""
    if code == NONE:
        for c in range(cols):
            dst[c] = z[c]
    elif code == RELU:
        for c in range(cols):
            dst[c] = max(z[c], 0.0) if z[c] == z[c] else z[c]
    elif code == LEAKY_RELU:
        for c in range(cols):
            dst[c] = z[c] if z[c] > 0.0 else z[c] * param
    else:
        for c in range(cols):
            dst[c] = _activate(z[c], code, param)


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _epilogue(tile, nr, rows, cols, row_off, col_off, bias, has_bias, bias_first, bias_on_rows,
              out, pre, has_pre, code, param):
    """out[row_off[r] + col_off[c]] = act(tile[r*nr + c] + bias), ``pre`` the value before act.

    The bias index is ``bias_first + r`` (bias_on_rows) or ``bias_first + c``. Where the columns
    are consecutive in out (the common case), rows are written as vectorized slices.
    """
    contiguous = True
    for c in range(cols):
        contiguous = contiguous and col_off[c] == col_off[0] + c
    if has_bias:
        for r in range(rows):
            z = tile[r * nr:r * nr + cols]
            if bias_on_rows:
                b = bias[bias_first + r]
                for c in range(cols):
                    z[c] += b
            else:
                bias_row = bias[bias_first:bias_first + cols]
                for c in range(cols):
                    z[c] += bias_row[c]
    if contiguous:
        for r in range(rows):
            z = tile[r * nr:r * nr + cols]
            start = row_off[r] + col_off[0]
            if has_pre:
                pre_row = pre[start:start + cols]
                for c in range(cols):
                    pre_row[c] = z[c]
            _store(z, out[start:start + cols], cols, code, param)
    else:
        for r in range(rows):
            for c in range(cols):
                z = tile[r * nr + c]
                if has_pre:
                    pre[row_off[r] + col_off[c]] = z
                out[row_off[r] + col_off[c]] = _activate(z, code, param)


@njit(cache=True, fastmath=FASTMATH)
def forward_items(first, last, x, wpack, tap_dh, tap_dw, bias, has_bias, out, pre, has_pre, geom,
                  code, param, weight_rows, mr, nr):
    """Work items ``[first, last)`` of one pass; item = ``(n*groups + g)*pixel_panels + panel``.

    x: flat input, element (n, c, h, w) at ``n*sxn + c*sxc + h*sxh + w*sxw``.
    wpack: :func:`pack_weight`'s panels (width mr if weight_rows, else nr).
    tap_dh, tap_dw: (taps,) int64 input offsets of each tap (see the module docstring).
    bias: (C_out,), read if has_bias. out, pre: flat, element (n, co, oh, ow) at ``n*son +
    co*soc + oh*soh + ow*sow``; pre written if has_pre. geom: the ``G_*`` geometry.
    """
    sxn, sxc, sxh, sxw, h, w = (geom[G_SXN], geom[G_SXC], geom[G_SXH], geom[G_SXW], geom[G_H],
                                geom[G_W])
    son, soc, soh, sow = geom[G_SON], geom[G_SOC], geom[G_SOH], geom[G_SOW]
    cg_in, groups, cg_out = geom[G_CG_IN], geom[G_GROUPS], geom[G_CG_OUT]
    hg, wg = geom[G_HG], geom[G_WG]
    istep_h, istep_w, oh0, ow0 = geom[G_ISTEP_H], geom[G_ISTEP_W], geom[G_OH0], geom[G_OW0]
    ostep_h, ostep_w = geom[G_OSTEP_H], geom[G_OSTEP_W]
    k_total = tap_dh.shape[0] * cg_in
    pw, ww = (nr, mr) if weight_rows else (mr, nr)  # pixel panel and weight panel widths
    pixel_panels = (hg * wg + pw - 1) // pw
    co_panels = (cg_out + ww - 1) // ww
    patches = np.empty(max(k_total, 1) * pw, dtype=out.dtype)
    tile = np.empty(mr * nr, dtype=out.dtype)
    ih0, iw0, pix_off = np.empty(pw, np.int64), np.empty(pw, np.int64), np.empty(pw, np.int64)
    src, co_off, run_start = np.empty(pw, np.int64), np.empty(ww, np.int64), np.empty(pw + 1, np.int64)
    for item in range(first, last):
        panel = item % pixel_panels
        g = (item // pixel_panels) % groups
        n = item // (pixel_panels * groups)
        q0 = panel * pw
        count = min(pw, hg * wg - q0)
        for p in range(pw):
            q = q0 + min(p, count - 1)
            i = q // wg
            j = q - i * wg
            ih0[p], iw0[p] = i * istep_h, j * istep_w
            pix_off[p] = n * son + (oh0 + i * ostep_h) * soh + (ow0 + j * ostep_w) * sow
        _pack_patches(x, n * sxn + g * cg_in * sxc, sxc, sxh, sxw, h, w, cg_in, tap_dh, tap_dw,
                      ih0, iw0, count, pw, src, run_start, patches)
        for cq in range(co_panels):
            co_first = g * cg_out + cq * ww
            co_count = min(ww, cg_out - cq * ww)
            for lane in range(ww):
                co_off[lane] = (co_first + lane) * soc
            w_start = (g * co_panels + cq) * k_total * ww
            if weight_rows:
                microkernel(wpack, w_start, patches, 0, k_total, tile, 0, nr, False, tile, 0, nr)
                _epilogue(tile, nr, co_count, count, co_off, pix_off, bias, has_bias, co_first,
                          True, out, pre, has_pre, code, param)
            else:
                microkernel(patches, 0, wpack, w_start, k_total, tile, 0, nr, False, tile, 0, nr)
                _epilogue(tile, nr, count, co_count, pix_off, co_off, bias, has_bias, co_first,
                          False, out, pre, has_pre, code, param)


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def forward_parallel(tasks, items, x, wpack, tap_dh, tap_dw, bias, has_bias, out, pre, has_pre,
                     geom, code, param, weight_rows, mr, nr):
    """All ``items`` of a pass split evenly over ``tasks`` threads (arguments as forward_items;
    its serial twin is forward_items over all items)."""
    for task in prange(tasks):
        # prange indices are uint64: cast, so forward_items compiles once for both callers.
        t = np.int64(task)
        forward_items(t * items // tasks, (t + 1) * items // tasks, x, wpack, tap_dh, tap_dw,
                      bias, has_bias, out, pre, has_pre, geom, code, param, weight_rows, mr, nr)
