"""Convolution as an implicit GEMM: the engine behind numba/conv.py's two forward kernels.

One *pass* computes a grid of output pixels ``(oh0 + i*ostep_h, ow0 + j*ostep_w)`` for
``i < hg, j < wg`` as ``z[pixel, co] = sum over taps t, ci of x[n, g*cg_in + ci, i*istep_h +
tap_dh[t], j*istep_w + tap_dw[t]] * weight(co, ci, tap_kh[t], tap_kw[t])``, x read as 0 outside
its bounds, then ``out = act(z + bias)``. A convolution is one pass (istep = stride, tap offsets
``kh*dh - ph``); a transposed convolution is one pass per output phase ``(oh % sh, ow % sw)``
with only the taps that land on that phase (so no multiply-add is spent on the zeros a scatter
formulation would insert), istep 1 and tap offsets ``(phase + ph - kh*dh) / sh``.

The reduction index is ``k = t*cg_in + ci``. The input is first copied with zero borders
(_conv_pad.py) wide enough that every tap of every computed pixel lies inside it: no bounds
tests, and no patches gathered. The weight is packed once per pass into zero-padded micro-panels.
Each work item (an image, a group, a panel of pixels) runs the offset-addressed micro-kernels of
_simd_conv.py, which read the input where it lies (pixel base + per-k offset), against every
weight panel of its group. Two tile orientations:

- NCHW output with unit input steps along a row (``weight_rows``): rows are output channels
  (broadcasts from the packed weight), each column vector ``lanes`` consecutive pixels of one
  output row read straight from an NCHW copy; the epilogue stores rows of pixels. One or two
  output channels take a 1-row tile of 8 vectors instead of 12 rows of padding.
- otherwise: rows are pixels (broadcasts from an NHWC copy, any steps), columns output channels
  (vectors of the packed weight), reduced in blocks of ``_KC`` steps.

Integer geometry travels in one int64 array (``G_*`` indices) so each kernel has one compiled
signature per dtype.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from brainkern.activations import LEAKY_RELU, NONE, RELU
from brainkern.kernels.numba._simd_conv import (
    microkernel_offsets,
    microkernel_offsets_packed_a,
    microkernel_offsets_row,
)
from brainkern.kernels.numba.linear import FASTMATH, _activate

# geometry array layout
G_SXN, G_SXC, G_SXH, G_SXW, G_H, G_W = 0, 1, 2, 3, 4, 5
G_SON, G_SOC, G_SOH, G_SOW = 6, 7, 8, 9
G_CG_IN, G_GROUPS, G_CG_OUT = 10, 11, 12
G_HG, G_WG, G_ISTEP_H, G_ISTEP_W, G_OH0, G_OW0, G_OSTEP_H, G_OSTEP_W = 13, 14, 15, 16, 17, 18, 19, 20
G_W_GROUP, G_W_CO, G_W_CI, G_KW = 21, 22, 23, 24
GEOMETRY_SIZE = 25

_KC = 128  # reduction steps per block of the pixel-row tiles (an nr x 128 weight block: 16 KB)


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
def forward_items(first, last, xp, wpack, k_off, bias, has_bias, out, pre, has_pre, geom, code,
                  param, weight_rows, mr, nr, lanes):
    """Work items ``[first, last)`` of one pass; item = ``(n*groups + g)*pixel_panels + panel``.

    xp: flat zero-padded input, element (n, c, h, w) at ``n*sxn + c*sxc + h*sxh + w*sxw``,
    padded so that every tap of every computed pixel (tile padding included) lies inside it.
    wpack: :func:`pack_weight`'s panels (width mr if weight_rows, else nr).
    k_off: (k_total,) int64; reduction index k's offset in xp from a pixel's origin
    ``n*sxn + g*cg_in*sxc + i*istep_h*sxh + j*istep_w*sxw``.
    bias: (C_out,), read if has_bias. out, pre: flat, element (n, co, oh, ow) at ``n*son +
    co*soc + oh*soh + ow*sow``; pre written if has_pre. geom: the ``G_*`` geometry (strides of
    xp). weight_rows: tile rows are output channels and each of the tile's nr / lanes column
    vectors is ``lanes`` consecutive pixels of one output row (needs istep_w = 1 and sxw = 1);
    otherwise tile rows are pixels and columns output channels.
    """
    sxn, sxc, sxh, sxw = geom[G_SXN], geom[G_SXC], geom[G_SXH], geom[G_SXW]
    son, soc, soh, sow = geom[G_SON], geom[G_SOC], geom[G_SOH], geom[G_SOW]
    cg_in, groups, cg_out = geom[G_CG_IN], geom[G_GROUPS], geom[G_CG_OUT]
    hg, wg = geom[G_HG], geom[G_WG]
    istep_h, istep_w, oh0, ow0 = geom[G_ISTEP_H], geom[G_ISTEP_W], geom[G_OH0], geom[G_OW0]
    ostep_h, ostep_w = geom[G_OSTEP_H], geom[G_OSTEP_W]
    k_total = k_off.shape[0]
    nvec = nr // lanes
    ww = mr if weight_rows else nr  # weight panel width
    # A panel of pixels: nvec row segments of `lanes` pixels (weight_rows), or mr pixels.
    row_segments = (wg + lanes - 1) // lanes
    units = hg * row_segments if weight_rows else hg * wg
    per_panel = nvec if weight_rows else mr
    pixel_panels = (units + per_panel - 1) // per_panel
    co_panels = (cg_out + ww - 1) // ww
    w_off = np.arange(max(k_total, 1)) * ww
    tile = np.empty(mr * nr, dtype=out.dtype)
    tiles = np.empty(0 if weight_rows else co_panels * mr * nr, dtype=out.dtype)
    bases, pix_off = np.empty(max(mr, nvec), np.int64), np.empty(max(mr, nr), np.int64)
    seg_cols, w_base = np.empty(nvec, np.int64), np.empty(nvec, np.int64)
    co_off = np.empty(ww, np.int64)
    for item in range(first, last):
        panel = item % pixel_panels
        g = (item // pixel_panels) % groups
        n = item // (pixel_panels * groups)
        x_origin = n * sxn + g * cg_in * sxc
        u0 = panel * per_panel
        count = min(per_panel, units - u0)
        for p in range(per_panel):
            # Units past the end repeat the last one: their loads stay inside xp.
            u = u0 + min(p, count - 1)
            if weight_rows:
                i = u // row_segments
                j0 = (u - i * row_segments) * lanes
                bases[p] = x_origin + i * istep_h * sxh + j0
                seg_cols[p] = min(lanes, wg - j0) if p < count else 0
                for lane in range(lanes):
                    pix_off[p * lanes + lane] = (n * son + (oh0 + i * ostep_h) * soh
                                                 + (ow0 + (j0 + lane) * ostep_w) * sow)
            else:
                i = u // wg
                j = u - i * wg
                bases[p] = x_origin + i * istep_h * sxh + j * istep_w * sxw
                pix_off[p] = n * son + (oh0 + i * ostep_h) * soh + (ow0 + j * ostep_w) * sow
        if weight_rows:
            for cq in range(co_panels):
                co_first = g * cg_out + cq * ww
                for lane in range(ww):
                    co_off[lane] = (co_first + lane) * soc
                w_base[0] = (g * co_panels + cq) * k_total * ww
                if mr == 1:
                    microkernel_offsets_row(wpack, w_base, w_off, xp, bases, k_off, k_total,
                                            tile, 0, nr, False)
                else:
                    microkernel_offsets_packed_a(wpack, w_base, w_off, xp, bases, k_off, k_total,
                                                 tile, 0, nr, False)
                # Vectors that continue each other in out (a row split over vectors, or a 1x1
                # pass's long rows) are stored as one run: one epilogue call per run.
                v = 0
                while v < nvec:
                    cols, end = seg_cols[v], v + 1
                    while (end < nvec and cols == (end - v) * lanes and seg_cols[end] > 0
                           and pix_off[end * lanes] == pix_off[v * lanes] + cols):
                        cols += seg_cols[end]
                        end += 1
                    _epilogue(tile[v * lanes:], nr, min(ww, cg_out - cq * ww), cols, co_off,
                              pix_off[v * lanes:], bias, has_bias, co_first, True, out, pre,
                              has_pre, code, param)
                    v = end
        else:
            # Blocks of _KC reduction steps, each against every weight panel: a block of the
            # packed weight (nr x _KC) stays in L1 (one pass over all k streamed the whole
            # panel from L2: ~160 against ~195 GFLOP/s for the micro-kernel alone).
            for k0 in range(0, max(k_total, 1), _KC):
                block = min(_KC, k_total - k0)
                for cq in range(co_panels):
                    for v in range(nvec):
                        w_base[v] = (g * co_panels + cq) * k_total * ww + v * lanes
                    microkernel_offsets(xp, bases, k_off[k0:], wpack, w_base, w_off[k0:], block,
                                        tiles, cq * mr * nr, nr, k0 > 0)
            for cq in range(co_panels):
                co_first = g * cg_out + cq * ww
                for lane in range(ww):
                    co_off[lane] = (co_first + lane) * soc
                _epilogue(tiles[cq * mr * nr:], nr, count, min(ww, cg_out - cq * ww), pix_off,
                          co_off, bias, has_bias, co_first, False, out, pre, has_pre, code, param)


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def forward_parallel(tasks, items, xp, wpack, k_off, bias, has_bias, out, pre, has_pre, geom,
                     code, param, weight_rows, mr, nr, lanes):
    """All ``items`` of a pass split evenly over ``tasks`` threads (arguments as forward_items;
    its serial twin is forward_items over all items)."""
    for task in prange(tasks):
        # prange indices are uint64: cast, so forward_items compiles once for both callers.
        t = np.int64(task)
        forward_items(t * items // tasks, (t + 1) * items // tasks, xp, wpack, k_off, bias,
                      has_bias, out, pre, has_pre, geom, code, param, weight_rows, mr, nr, lanes)
