"""Numba CPU kernels for the convolution op family (interface: brainkern/kernels/__init__.py).

``conv2d_forward`` and ``conv_transpose2d_forward`` run as implicit GEMMs (_conv_gemm.py): a
zero-padded copy of the input (_conv_pad.py) read in place by offset-addressed SIMD micro-kernels
(_simd_conv.py), and the bias + activation epilogue on the register tile. A transposed convolution
is computed per output phase with only the taps that reach it (a gather, no scatter and no
multiply-adds on inserted zeros). Depthwise layers (one input channel per group), where a GEMM
tile would be mostly empty, run a direct kernel (_conv_direct.py).
``conv2d_backward_weight``: _conv_backward.py; ``conv2d_activation_backward``:
_conv_activation.py.

Every kernel has a serial twin for forked children and small problems (see linear.py and
_runtime.py); a task split never changes a result, so outputs do not depend on the thread count.
"""

from __future__ import annotations

import numpy as np
import torch

from brainkern.kernels.numba import _conv_activation, _conv_backward, _conv_direct, _runtime, _simd
from brainkern.kernels.numba import _conv_gemm as gemm
from brainkern.kernels.numba._conv_pad import padded
from brainkern.kernels.numba._simd_conv import offsets_tile
from brainkern.kernels.numba.linear import (
    _NUMPY_DTYPE,
    _PARALLEL_MIN_FMAS,
    _cdiv,
    _flat,
    linear_forward,
)

DEVICES = ("cpu",)
DTYPES = (torch.float32, torch.float64)


def _padded_for_pass(x, top, bottom, left, right, nchw, copies):
    """A padded copy of x with at least these borders, and its (top, left): one made for an
    earlier pass of the same call (``copies``: layout -> (copy, borders)) when it has room,
    so that the phases of a transposed convolution share one copy."""
    if nchw in copies:
        xp, have = copies[nchw]
        if all(h >= need for h, need in zip(have, (top, bottom, left, right))):
            return xp, have[0], have[2]
        top, bottom, left, right = (max(h, need) for h, need in
                                    zip(have, (top, bottom, left, right)))
    xp = padded(x, top, bottom, left, right, nchw)
    copies[nchw] = xp, (top, bottom, left, right)
    return xp, top, left


def _run_pass(x, weight_flat, bias, out, pre, geom, tap_kh, tap_kw, tap_dh, tap_dw, act_code,
              act_param, batch, copies):
    """One pass of the implicit GEMM (see _conv_gemm): pad the input so that no tap needs a
    bounds test (copies: see _padded_for_pass), pack the weight, run the work items."""
    dtype = _NUMPY_DTYPE[out.dtype]
    _, _, lanes = _simd.gemm_tile(dtype)
    hg, wg = geom[gemm.G_HG], geom[gemm.G_WG]
    if (len(tap_dh) and not tap_dh.any() and not tap_dw.any() and x.is_contiguous()
            and tuple(x.shape[2:]) == (hg, wg) and geom[gemm.G_SOW] == 1
            and geom[gemm.G_SOH] == wg and not geom[gemm.G_OH0] and not geom[gemm.G_OW0]
            and (geom[[gemm.G_ISTEP_H, gemm.G_ISTEP_W, gemm.G_OSTEP_H, gemm.G_OSTEP_W]] == 1).all()):
        # A 1x1 convolution of NCHW planes: each image's plane is one long row, so that the
        # tile's pixel vectors run across the rows (no lanes lost at the rows' ends).
        hg, wg = 1, hg * wg
        geom[[gemm.G_HG, gemm.G_WG]] = hg, wg
        x = x.reshape(x.shape[0], x.shape[1], 1, wg)
    row_segments = _cdiv(wg, lanes)
    # Output channels on the tile rows, pixels read as vectors straight from the padded input,
    # when the output is NCHW (contiguous epilogue stores) and few vector lanes fall past the
    # row's end; otherwise pixels on the rows, read as broadcasts from an NHWC copy.
    weight_rows = bool(geom[gemm.G_SOC] != 1 and geom[gemm.G_ISTEP_W] == 1
                       and 4 * row_segments * lanes <= 5 * wg)
    groups, cg_in, cg_out = geom[gemm.G_GROUPS], geom[gemm.G_CG_IN], geom[gemm.G_CG_OUT]
    # One or two output channels (a stem's input gradient): a single-row tile, not 12 rows of
    # mostly padding (the 32->1 5x5 transposed pass ran at 1/12 of the tile's FMAs).
    mr, nr, _ = offsets_tile(dtype, rows_apart=not weight_rows,
                             single_row=weight_rows and cg_out <= 2)
    width = mr if weight_rows else nr
    k_total = len(tap_kh) * cg_in
    wpack = np.empty(groups * _cdiv(cg_out, width) * width * max(k_total, 1), dtype=dtype)
    if k_total:
        gemm.pack_weight(weight_flat, geom, tap_kh, tap_kw, width, wpack)
        top, left = max(0, -int(tap_dh.min())), max(0, -int(tap_dw.min()))
        last_col = row_segments * lanes - 1 if weight_rows else (wg - 1) * geom[gemm.G_ISTEP_W]
        bottom = max(0, int((hg - 1) * geom[gemm.G_ISTEP_H] + tap_dh.max()) - (x.shape[2] - 1))
        right = max(0, int(last_col + tap_dw.max()) - (x.shape[3] - 1))
        xp, top, left = _padded_for_pass(x, top, bottom, left, right, weight_rows, copies)
        sxn, sxc, sxh, sxw = gemm.strides(xp)
        k_off = (((tap_dh + top) * sxh + (tap_dw + left) * sxw)[:, None]
                 + np.arange(cg_in, dtype=np.int64)[None, :] * sxc).reshape(-1)
        geom[[gemm.G_SXN, gemm.G_SXC, gemm.G_SXH, gemm.G_SXW]] = sxn, sxc, sxh, sxw
        xp_flat = _flat(xp)
    else:  # nothing to read: z is the bias alone
        xp_flat, k_off = np.zeros(1, dtype=dtype), np.zeros(0, dtype=np.int64)
        geom[[gemm.G_SXN, gemm.G_SXC, gemm.G_SXH, gemm.G_SXW]] = 0
    units = hg * row_segments if weight_rows else hg * wg
    items = batch * groups * _cdiv(units, nr // lanes if weight_rows else mr)
    out_flat = _flat(out)
    args = (xp_flat, wpack, k_off, out_flat if bias is None else _flat(bias), bias is not None,
            out_flat, out_flat if pre is None else _flat(pre), pre is not None, geom,
            int(act_code), float(act_param), weight_rows, mr, nr, lanes)
    fmas = batch * hg * wg * groups * cg_out * max(k_total, 1)
    threads = _runtime.threads() if fmas >= _PARALLEL_MIN_FMAS else 1
    tasks = min(threads, items)
    if tasks <= 1:
        gemm.forward_items(0, items, *args)
    else:
        gemm.forward_parallel(tasks, items, *args)


def _depthwise(x, weight, bias, out, pre, geom, taps_h, taps_w, act_code, act_param, batch):
    """One pass of the direct depthwise kernel (_conv_direct), weight element (co, tap) at
    ``co*kH*kW + tap`` (conv2d's depthwise weight and conv_transpose2d's alike)."""
    c_out = out.shape[1]
    weight = weight.reshape(c_out, -1)
    if geom[gemm.G_SXC] == 1:  # NHWC: the vector loop runs over channels
        weight = weight.t().contiguous()
    rows = batch * geom[gemm.G_HG]
    out_flat = _flat(out)
    args = (_flat(x), _flat(weight), np.array(taps_h, np.int64).reshape(-1, 2),
            np.array(taps_w, np.int64).reshape(-1, 2), out_flat if bias is None else _flat(bias),
            bias is not None, out_flat, out_flat if pre is None else _flat(pre), pre is not None,
            geom, int(act_code), float(act_param))
    work = rows * geom[gemm.G_WG] * c_out * len(taps_h) * len(taps_w)
    tasks = min(_runtime.threads() if work >= _PARALLEL_MIN_FMAS else 1, rows)
    if tasks <= 1:
        _conv_direct.depthwise_rows(0, rows, *args)
    else:
        _conv_direct.depthwise_parallel(tasks, rows, *args)


def _geometry(x, out, cg_in, groups, cg_out, weight_strides, kw_size):
    geom = np.zeros(gemm.GEOMETRY_SIZE, dtype=np.int64)
    geom[[gemm.G_SXN, gemm.G_SXC, gemm.G_SXH, gemm.G_SXW]] = gemm.strides(x)
    geom[[gemm.G_H, gemm.G_W]] = x.shape[2:]
    geom[[gemm.G_SON, gemm.G_SOC, gemm.G_SOH, gemm.G_SOW]] = gemm.strides(out)
    geom[[gemm.G_CG_IN, gemm.G_GROUPS, gemm.G_CG_OUT]] = cg_in, groups, cg_out
    geom[[gemm.G_W_GROUP, gemm.G_W_CO, gemm.G_W_CI]] = weight_strides
    geom[gemm.G_KW] = kw_size
    return geom


def _taps(offsets_h, offsets_w):
    """The cross product of per-row and per-column taps ``[(k, offset)]``, as the int64 arrays
    (tap_kh, tap_kw, tap_dh, tap_dw)."""
    pairs = [(kh, kw, dh, dw) for kh, dh in offsets_h for kw, dw in offsets_w]
    return tuple(np.array([p[i] for p in pairs], dtype=np.int64) for i in range(4))


def conv2d_forward(x, weight, bias, out, pre, stride, padding, dilation, groups, act_code,
                   act_param):
    """``out = act(conv2d(x, weight) + bias)``, ``pre`` before act (kernels/__init__.py)."""
    if out.numel() == 0:
        return
    batch = x.shape[0]
    c_out, cg_in, kh_size, kw_size = weight.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    cg_out = c_out // groups
    kernel_area = kh_size * kw_size
    geom = _geometry(x, out, cg_in, groups, cg_out, (cg_out * cg_in * kernel_area,
                                                      cg_in * kernel_area, kernel_area), kw_size)
    geom[[gemm.G_HG, gemm.G_WG]] = out.shape[2:]
    geom[[gemm.G_ISTEP_H, gemm.G_ISTEP_W, gemm.G_OSTEP_H, gemm.G_OSTEP_W]] = sh, sw, 1, 1
    taps_h = [(kh, kh * dh - ph) for kh in range(kh_size)]
    taps_w = [(kw, kw * dw - pw) for kw in range(kw_size)]
    if cg_in == 1 and groups > 1 and x.numel():
        _depthwise(x, weight, bias, out, pre, geom, taps_h, taps_w, act_code, act_param, batch)
        return
    taps = _taps(taps_h, taps_w) if x.numel() else _taps([], [])
    _run_pass(x, _flat(weight), bias, out, pre, geom, *taps, act_code, act_param, batch, {})


def _phase_taps(phase, pad, dilation, stride, size):
    """Taps ``(k, input offset)`` of a transposed convolution that reach output rows
    ``oh = phase + i*stride``: those with ``(phase + pad - k*dilation)`` divisible by stride,
    reading input row ``i + (phase + pad - k*dilation) // stride``."""
    return [(k, (phase + pad - k * dilation) // stride) for k in range(size)
            if (phase + pad - k * dilation) % stride == 0]


def _projection(x, weight, bias, out, pre, act_code, act_param):
    """A transposed convolution of 1x1 inputs onto exactly its kernel (a generator's z -> 4x4
    layer) is one GEMM, ``out[n, (co, i, j)] = x[n, :] @ weight[:, (co, i, j)]``, through
    linear.py: the phase passes would compute every tap for every output pixel, all but one
    reading padding (16x the multiply-adds for a 4x4 kernel)."""
    batch, c_x = x.shape[:2]
    c_out, area = out.shape[1], out.shape[2] * out.shape[3]
    a = x.reshape(batch, c_x)
    w_t = weight.reshape(c_x, c_out * area).t()  # (c_out * area, c_x), strided: no copy
    b = None if bias is None else bias.repeat_interleave(area)
    nchw = out.is_contiguous()  # else channels_last: the GEMM's rows are (co, i, j), not NHWC
    dst = out.view(batch, -1) if nchw else torch.empty(batch, c_out * area, dtype=out.dtype)
    dst_pre = None if pre is None else (pre.view(batch, -1) if nchw else torch.empty_like(dst))
    linear_forward(a, w_t, b, dst, dst_pre, act_code, act_param)
    if not nchw:
        out.copy_(dst.view(out.shape))
        if pre is not None:
            pre.copy_(dst_pre.view(out.shape))


def conv_transpose2d_forward(x, weight, bias, out, pre, stride, padding, dilation, groups,
                             act_code, act_param):
    """``out = act(conv_transpose2d(x, weight) + bias)``, ``pre`` before act."""
    if out.numel() == 0:
        return
    batch, c_x, _, _ = x.shape
    _, cg_out, kh_size, kw_size = weight.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    h_out, w_out = out.shape[2:]
    if (groups == 1 and tuple(x.shape[2:]) == (1, 1) and (h_out, w_out) == (kh_size, kw_size)
            and (ph, pw) == (0, 0) and (dh, dw) == (1, 1)):
        _projection(x, weight, bias, out, pre, act_code, act_param)
        return
    cg_in = c_x // groups
    kernel_area = kh_size * kw_size
    geom = _geometry(x, out, cg_in, groups, cg_out,
                     (cg_in * cg_out * kernel_area, kernel_area, cg_out * kernel_area), kw_size)
    geom[[gemm.G_ISTEP_H, gemm.G_ISTEP_W, gemm.G_OSTEP_H, gemm.G_OSTEP_W]] = 1, 1, sh, sw
    weight_flat = _flat(weight)
    copies = {}
    for phase_h in range(min(sh, h_out)):
        taps_h = _phase_taps(phase_h, ph, dh, sh, kh_size) if x.numel() else []
        for phase_w in range(min(sw, w_out)):
            taps_w = _phase_taps(phase_w, pw, dw, sw, kw_size) if x.numel() else []
            pass_geom = geom.copy()
            pass_geom[[gemm.G_HG, gemm.G_WG, gemm.G_OH0, gemm.G_OW0]] = (
                _cdiv(h_out - phase_h, sh), _cdiv(w_out - phase_w, sw), phase_h, phase_w)
            if cg_in == 1 and groups > 1 and x.numel():
                _depthwise(x, weight, bias, out, pre, pass_geom, taps_h, taps_w, act_code,
                           act_param, batch)
            else:
                _run_pass(x, weight_flat, bias, out, pre, pass_geom,
                          *_taps(taps_h, taps_w), act_code, act_param, batch, copies)


conv2d_backward_weight = _conv_backward.conv2d_backward_weight
conv2d_activation_backward = _conv_activation.conv2d_activation_backward
