"""The convolution's weight gradient (the activation's backward pass: _conv_activation.py).

``conv2d_backward_weight`` is a GEMM ``grad_weight[co, (tap, ci)] = sum over pixels of
grad_pre[pixel, co] * patch[pixel, (tap, ci)]`` whose reduction runs over every output pixel of
the batch. The pixels are split into a fixed number of chunks that depends on the problem's
size alone; each chunk accumulates its own partial gradient over blocks of ``_KC`` pixels, and
the partials are added in chunk order: the result does not depend on the thread count.
With at least ``lanes`` output channels per group, a chunk reads its operands in place
(_weight_chunk_direct: a zero-padded NHWC copy of x and NHWC grad_pre, through
``_simd_conv.microkernel_offsets``); fewer (depthwise and narrow layers, where vectors along the
output channels would be mostly empty) pack panels of grad_pre and of the gathered patches for
``_simd.microkernel`` (_weight_chunk). Depthwise layers (one input channel per group) sum their
taps directly along the channels (_depthwise_weight_chunk).
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from brainkern.kernels.numba import _runtime, _simd, _simd_conv
from brainkern.kernels.numba._conv_gemm import strides
from brainkern.kernels.numba._conv_pad import padded
from brainkern.kernels.numba.linear import (
    _NUMPY_DTYPE,
    _PARALLEL_MIN_FMAS,
    FASTMATH,
    _cdiv,
    _flat,
)

_KC = 128  # pixels per packed block: a (mr + nr) x 128 pair of panels stays in L1/L2
_CHUNK_PIXELS = 2048  # at least this many pixels per partial gradient ...
_MAX_CHUNKS = 16  # ... and at most this many partials (memory: one padded weight each)

# geometry array layout of the weight gradient
(W_SXN, W_SXC, W_SXH, W_SXW, W_H, W_W, W_SGN, W_SGC, W_SGH, W_SGW, W_HO, W_WO, W_CG_IN,
 W_GROUPS, W_CG_OUT, W_SH, W_SW, W_PH, W_PW, W_DH, W_DW, W_KH, W_KW, W_CHUNK, W_BATCH) = range(25)


@njit(cache=True, fastmath=FASTMATH)
def _weight_chunk(chunk, x, grad, partial, geom, mr, nr):
    """Chunk ``chunk``'s partial weight gradient, every group, into
    ``partial[chunk]``: ``(groups, co_panels, col_panels, mr, nr)`` flat, col = tap*cg_in + ci.

    x: flat input, element (n, c, h, w) at ``n*sxn + c*sxc + h*sxh + w*sxw``.
    grad: flat grad_pre, element (n, co, oh, ow) at ``n*sgn + co*sgc + oh*sgh + ow*sgw``.
    """
    sxn, sxc, sxh, sxw = geom[W_SXN], geom[W_SXC], geom[W_SXH], geom[W_SXW]
    sgn, sgc, sgh, sgw = geom[W_SGN], geom[W_SGC], geom[W_SGH], geom[W_SGW]
    h, w, h_out, w_out = geom[W_H], geom[W_W], geom[W_HO], geom[W_WO]
    cg_in, groups, cg_out = geom[W_CG_IN], geom[W_GROUPS], geom[W_CG_OUT]
    sh, sw, ph, pw, dh, dw = geom[W_SH], geom[W_SW], geom[W_PH], geom[W_PW], geom[W_DH], geom[W_DW]
    kh_size, kw_size, chunk_pixels = geom[W_KH], geom[W_KW], geom[W_CHUNK]
    cols = kh_size * kw_size * cg_in
    co_panels, col_panels = (cg_out + mr - 1) // mr, (cols + nr - 1) // nr
    tile_size = mr * nr
    group_size = co_panels * col_panels * tile_size
    acc = partial[chunk * groups * group_size:(chunk + 1) * groups * group_size]
    acc[:] = 0.0
    total = geom[W_BATCH] * h_out * w_out
    first, last = chunk * chunk_pixels, min(total, (chunk + 1) * chunk_pixels)
    a_pack = np.empty(co_panels * mr * _KC, dtype=x.dtype)
    # B's padding columns are left unwritten: they only reach tile columns that are dropped.
    b_pack = np.empty(col_panels * nr * _KC, dtype=x.dtype)
    x_pix, ih0, iw0, g_pix = (np.empty(_KC, np.int64), np.empty(_KC, np.int64),
                              np.empty(_KC, np.int64), np.empty(_KC, np.int64))
    col_dh, col_dw, col_c = np.empty(cols, np.int64), np.empty(cols, np.int64), np.empty(cols, np.int64)
    for col in range(cols):
        tap, ci = col // cg_in, col % cg_in
        col_dh[col], col_dw[col], col_c[col] = (tap // kw_size) * dh, (tap % kw_size) * dw, ci * sxc
    for p0 in range(first, last, _KC):
        steps = min(_KC, last - p0)
        for k in range(steps):
            pixel = p0 + k
            n = pixel // (h_out * w_out)
            oh = (pixel // w_out) % h_out
            ow = pixel % w_out
            x_pix[k], ih0[k], iw0[k] = n * sxn, oh * sh - ph, ow * sw - pw
            g_pix[k] = n * sgn + oh * sgh + ow * sgw
        for g in range(groups):
            for p in range(co_panels):  # A: mr channels of grad_pre per pixel
                for r in range(mr):
                    co = p * mr + r
                    base = p * steps * mr + r
                    if co < cg_out:
                        offset = (g * cg_out + co) * sgc
                        for k in range(steps):
                            a_pack[base + k * mr] = grad[g_pix[k] + offset]
                    else:
                        for k in range(steps):
                            a_pack[base + k * mr] = 0.0
            # B: nr patch columns per pixel, col = tap*cg_in + ci (offsets from col_*).
            x_group = g * cg_in * sxc
            for q in range(col_panels):
                lanes = min(nr, cols - q * nr)
                for k in range(steps):
                    dst = b_pack[(q * steps + k) * nr:(q * steps + k) * nr + lanes]
                    x_k = x_pix[k] + x_group
                    for lane in range(lanes):
                        col = q * nr + lane
                        ih, iw = ih0[k] + col_dh[col], iw0[k] + col_dw[col]
                        inside = ih >= 0 and ih < h and iw >= 0 and iw < w
                        dst[lane] = x[x_k + ih * sxh + iw * sxw + col_c[col]] if inside else 0.0
            for q in range(col_panels):
                for p in range(co_panels):
                    t0 = ((g * co_panels + p) * col_panels + q) * tile_size
                    _simd.microkernel(a_pack, p * steps * mr, b_pack, q * steps * nr, steps,
                                      acc, t0, nr, True, acc, t0, nr)


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def _weight_parallel(chunks, x, grad, partial, geom, mr, nr):
    """Every chunk's partial, one prange iteration each (serial twin: _weight_serial)."""
    for chunk in prange(chunks):
        _weight_chunk(np.int64(chunk), x, grad, partial, geom, mr, nr)


@njit(cache=True, fastmath=FASTMATH)
def _weight_serial(chunks, x, grad, partial, geom, mr, nr):
    for chunk in range(chunks):
        _weight_chunk(chunk, x, grad, partial, geom, mr, nr)


@njit(cache=True, fastmath=FASTMATH)
def _weight_chunk_direct(chunk, xp, grad, col_off, partial, geom, mr, nr, lanes):
    """Chunk ``chunk``'s partial weight gradient, every group, read where the operands lie:
    ``partial[chunk]`` is ``(groups, cols, cg_out)`` flat, col = tap*cg_in + ci.

    xp: flat zero-padded NHWC input, element (n, c, h, w) at ``n*sxn + c + h*sxh + w*sxw`` with
    h, w shifted by the padding, so that every tap of every output pixel lies inside it.
    grad: flat NHWC grad_pre, element (n, co, oh, ow) at ``n*sgn + co + oh*sgh + ow*sgw``.
    col_off: (cols,) int64, column col's offset in xp from an output pixel's window origin.
    Tile rows are columns (broadcasts from xp), tile vectors ``lanes`` output channels of grad
    (cg_out >= lanes: a last vector past cg_out is moved back to end at cg_out, and the
    channels it repeats are written twice with the same value).
    """
    sxn, sxh, sxw = geom[W_SXN], geom[W_SXH], geom[W_SXW]
    sgn, sgh, sgw = geom[W_SGN], geom[W_SGH], geom[W_SGW]
    h_out, w_out = geom[W_HO], geom[W_WO]
    cg_in, groups, cg_out = geom[W_CG_IN], geom[W_GROUPS], geom[W_CG_OUT]
    sh, sw, chunk_pixels = geom[W_SH], geom[W_SW], geom[W_CHUNK]
    nvec = nr // lanes
    cols = col_off.shape[0]
    total = geom[W_BATCH] * h_out * w_out
    first, last = chunk * chunk_pixels, min(total, (chunk + 1) * chunk_pixels)
    steps = last - first
    x_pix, g_pix = np.empty(max(steps, 1), np.int64), np.empty(max(steps, 1), np.int64)
    for k in range(steps):
        pixel = first + k
        n = pixel // (h_out * w_out)
        oh = (pixel // w_out) % h_out
        ow = pixel % w_out
        x_pix[k] = n * sxn + oh * sh * sxh + ow * sw * sxw
        g_pix[k] = n * sgn + oh * sgh + ow * sgw
    row_panels, co_panels = (cols + mr - 1) // mr, (cg_out + nr - 1) // nr
    tiles = np.empty(row_panels * co_panels * mr * nr, dtype=xp.dtype)
    a_base, b_base = np.empty(mr, np.int64), np.empty(nvec, np.int64)
    group_size = cols * cg_out
    for g in range(groups):
        # Blocks of _KC pixels, each against every tile: a block's grad_pre rows and input
        # windows stay in L1/L2 while the tiles sum over it (one long reduction per tile
        # streamed the whole chunk from L2 for each of them).
        for k0 in range(0, max(steps, 1), _KC):
            block = min(_KC, steps - k0)
            for p in range(row_panels):
                rows = min(mr, cols - p * mr)
                for r in range(mr):
                    a_base[r] = g * cg_in + col_off[p * mr + min(r, rows - 1)]
                for q in range(co_panels):
                    for v in range(nvec):
                        b_base[v] = g * cg_out + min(q * nr + v * lanes, cg_out - lanes)
                    _simd_conv.microkernel_offsets(xp, a_base, x_pix[k0:], grad, b_base,
                                                   g_pix[k0:], block, tiles,
                                                   (p * co_panels + q) * mr * nr, nr, k0 > 0)
        acc = partial[(chunk * groups + g) * group_size:(chunk * groups + g + 1) * group_size]
        for p in range(row_panels):
            for q in range(co_panels):
                tile = tiles[(p * co_panels + q) * mr * nr:(p * co_panels + q + 1) * mr * nr]
                for r in range(min(mr, cols - p * mr)):
                    for v in range(nvec):
                        co0 = min(q * nr + v * lanes, cg_out - lanes)
                        dst = acc[(p * mr + r) * cg_out + co0:(p * mr + r) * cg_out + co0 + lanes]
                        src = tile[r * nr + v * lanes:r * nr + v * lanes + lanes]
                        for lane in range(lanes):
                            dst[lane] = src[lane]


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def _weight_direct_parallel(chunks, xp, grad, col_off, partial, geom, mr, nr, lanes):
    """Every chunk's partial, one prange iteration each (serial twin: _weight_direct_serial)."""
    for chunk in prange(chunks):
        _weight_chunk_direct(np.int64(chunk), xp, grad, col_off, partial, geom, mr, nr, lanes)


@njit(cache=True, fastmath=FASTMATH)
def _weight_direct_serial(chunks, xp, grad, col_off, partial, geom, mr, nr, lanes):
    for chunk in range(chunks):
        _weight_chunk_direct(chunk, xp, grad, col_off, partial, geom, mr, nr, lanes)


@njit(cache=True, fastmath=FASTMATH)
def _weight_direct_reduce(partial, chunks, geom, grad_weight):
    """grad_weight[g*cg_out + co, ci, kh, kw] = sum over chunks, in order, of the partials."""
    cg_in, groups, cg_out = geom[W_CG_IN], geom[W_GROUPS], geom[W_CG_OUT]
    kernel_area = geom[W_KH] * geom[W_KW]
    cols = kernel_area * cg_in
    chunk_size = groups * cols * cg_out
    for g in range(groups):
        for co in range(cg_out):
            row = (g * cg_out + co) * cols
            for col in range(cols):
                src = (g * cols + col) * cg_out + co
                total = 0.0
                for chunk in range(chunks):
                    total += partial[chunk * chunk_size + src]
                tap, ci = col // cg_in, col % cg_in
                grad_weight[row + ci * kernel_area + tap] = total


@njit(cache=True, fastmath=FASTMATH)
def _weight_reduce(partial, chunks, geom, mr, nr, grad_weight):
    """grad_weight[g*cg_out + co, ci, kh, kw] = sum over chunks, in order, of the partials."""
    cg_in, groups, cg_out = geom[W_CG_IN], geom[W_GROUPS], geom[W_CG_OUT]
    kernel_area = geom[W_KH] * geom[W_KW]
    cols = kernel_area * cg_in
    co_panels, col_panels = (cg_out + mr - 1) // mr, (cols + nr - 1) // nr
    chunk_size = groups * co_panels * col_panels * mr * nr
    for g in range(groups):
        for co in range(cg_out):
            p, r = co // mr, co % mr
            row = (g * cg_out + co) * cols
            for col in range(cols):
                q = col // nr
                src = (((g * co_panels + p) * col_panels + q) * mr + r) * nr + col - q * nr
                total = 0.0
                for chunk in range(chunks):
                    total += partial[chunk * chunk_size + src]
                tap, ci = col // cg_in, col % cg_in
                grad_weight[row + ci * kernel_area + tap] = total


@njit(cache=True, fastmath=FASTMATH)
def _depthwise_weight_chunk(chunk, x, grad, partial, geom):
    """Depthwise layers (one input channel per group, output channel co reading input channel
    co // mult): ``partial[chunk]`` (taps, c_out) flat = the sum over the chunk's output pixels
    of grad times each tap's input. x and grad: NHWC-contiguous, flat; a vector loop along the
    channels per tap, where the GEMM's tiles would be one channel wide."""
    h, w, h_out, w_out = geom[W_H], geom[W_W], geom[W_HO], geom[W_WO]
    groups, cg_out = geom[W_GROUPS], geom[W_CG_OUT]
    sh, sw, ph, pw = geom[W_SH], geom[W_SW], geom[W_PH], geom[W_PW]
    dh, dw, kh, kw = geom[W_DH], geom[W_DW], geom[W_KH], geom[W_KW]
    c_in, c_out = groups, groups * cg_out
    chunk_pixels, batch = geom[W_CHUNK], geom[W_BATCH]
    acc = partial[chunk * kh * kw * c_out:(chunk + 1) * kh * kw * c_out]
    acc[:] = 0
    plane = h_out * w_out
    for p in range(chunk * chunk_pixels, min((chunk + 1) * chunk_pixels, batch * plane)):
        n = p // plane
        oh = (p - n * plane) // w_out
        ow = p - n * plane - oh * w_out
        g = grad[p * c_out:(p + 1) * c_out]
        for i in range(kh):
            ih = oh * sh - ph + i * dh
            if ih < 0 or ih >= h:
                continue
            for j in range(kw):
                iw = ow * sw - pw + j * dw
                if iw < 0 or iw >= w:
                    continue
                xs = ((n * h + ih) * w + iw) * c_in
                a = acc[(i * kw + j) * c_out:(i * kw + j + 1) * c_out]
                if cg_out == 1:
                    xv = x[xs:xs + c_in]
                    for co in range(c_out):
                        a[co] += g[co] * xv[co]
                else:
                    for co in range(c_out):
                        a[co] += g[co] * x[xs + co // cg_out]


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def _depthwise_weight_parallel(chunks, x, grad, partial, geom):
    for chunk in prange(chunks):
        _depthwise_weight_chunk(np.int64(chunk), x, grad, partial, geom)


@njit(cache=True, fastmath=FASTMATH)
def _depthwise_weight_serial(chunks, x, grad, partial, geom):
    for chunk in range(chunks):
        _depthwise_weight_chunk(chunk, x, grad, partial, geom)


def _backward_weight_depthwise(grad_pre, x, grad_weight, geom, chunks):
    """conv2d_backward_weight of a depthwise layer: NHWC copies where the tensors are not, each
    chunk's tap-major partial, the partials added in chunk order."""
    c_out, _, kh_size, kw_size = grad_weight.shape
    xn = _flat(x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1))
    gn = _flat(grad_pre.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1))
    taps = kh_size * kw_size
    partial = np.empty(chunks * taps * c_out, dtype=_NUMPY_DTYPE[x.dtype])
    fmas = grad_pre.numel() * taps
    if chunks > 1 and fmas >= _PARALLEL_MIN_FMAS and _runtime.threads() > 1:
        _depthwise_weight_parallel(chunks, xn, gn, partial, geom)
    else:
        _depthwise_weight_serial(chunks, xn, gn, partial, geom)
    total = partial.reshape(chunks, taps, c_out).sum(axis=0)  # numpy adds in chunk order
    grad_weight.copy_(torch.from_numpy(np.ascontiguousarray(total.T)).view(grad_weight.shape))


def _backward_weight_direct(grad_pre, x, grad_weight, geom, chunks, mr, nr, lanes):
    """conv2d_backward_weight through _weight_chunk_direct: x copied once into a zero-padded
    NHWC tensor and grad_pre read as NHWC (copied if it is not), so that no patch is gathered
    and no tap needs a bounds test."""
    (sh, sw), (ph, pw) = geom[[W_SH, W_SW]], geom[[W_PH, W_PW]]
    (dh, dw), (kh_size, kw_size) = geom[[W_DH, W_DW]], geom[[W_KH, W_KW]]
    h, w, h_out, w_out = x.shape[2], x.shape[3], grad_pre.shape[2], grad_pre.shape[3]
    bottom = max(0, int((h_out - 1) * sh - ph + (kh_size - 1) * dh) - (h - 1))
    right = max(0, int((w_out - 1) * sw - pw + (kw_size - 1) * dw) - (w - 1))
    xp = padded(x, int(ph), bottom, int(pw), right, nchw=False)
    grad = padded(grad_pre, 0, 0, 0, 0, nchw=False)
    geom[[W_SXN, W_SXC, W_SXH, W_SXW]] = strides(xp)
    geom[[W_SGN, W_SGC, W_SGH, W_SGW]] = strides(grad)
    cg_in, groups, cg_out = geom[W_CG_IN], geom[W_GROUPS], geom[W_CG_OUT]
    sxh, sxw = geom[W_SXH], geom[W_SXW]
    taps = np.arange(kh_size * kw_size, dtype=np.int64)
    col_off = (((taps // kw_size) * dh * sxh + (taps % kw_size) * dw * sxw)[:, None]
               + np.arange(cg_in, dtype=np.int64)[None, :]).reshape(-1)
    partial = np.empty(chunks * groups * col_off.shape[0] * cg_out, dtype=_NUMPY_DTYPE[x.dtype])
    args = (chunks, _flat(xp), _flat(grad), col_off, partial, geom, mr, nr, lanes)
    fmas = grad_pre.shape[0] * h_out * w_out * groups * cg_out * col_off.shape[0]
    if chunks > 1 and fmas >= _PARALLEL_MIN_FMAS and _runtime.threads() > 1:
        _weight_direct_parallel(*args)
    else:
        _weight_direct_serial(*args)
    _weight_direct_reduce(partial, chunks, geom, _flat(grad_weight))


def conv2d_backward_weight(grad_pre, x, grad_weight, stride, padding, dilation, groups):
    """``grad_weight = sum over n, oh, ow of grad_pre * x's patch`` (kernels/__init__.py)."""
    batch, _, h_out, w_out = grad_pre.shape
    c_out, cg_in, kh_size, kw_size = grad_weight.shape
    pixels = batch * h_out * w_out
    if grad_weight.numel() == 0:
        return
    if pixels == 0 or x.numel() == 0:
        grad_weight.zero_()
        return
    mr, nr, lanes = _simd.gemm_tile(_NUMPY_DTYPE[x.dtype])
    chunks = min(_MAX_CHUNKS, _cdiv(pixels, _CHUNK_PIXELS))
    chunk_pixels = _cdiv(pixels, chunks)
    chunks = _cdiv(pixels, chunk_pixels)
    cg_out = c_out // groups
    geom = np.array([*strides(x), *x.shape[2:], *strides(grad_pre), h_out, w_out, cg_in, groups,
                     cg_out, *stride, *padding, *dilation, kh_size, kw_size, chunk_pixels, batch],
                    dtype=np.int64)
    if cg_in == 1 and groups > 1:
        _backward_weight_depthwise(grad_pre, x, grad_weight, geom, chunks)
        return
    if cg_out >= lanes:
        mr = _simd_conv.offsets_tile(_NUMPY_DTYPE[x.dtype], rows_apart=True)[0]
        _backward_weight_direct(grad_pre, x, grad_weight, geom, chunks, mr, nr, lanes)
        return
    partial = np.empty(chunks * groups * _cdiv(cg_out, mr) * mr
                       * _cdiv(kh_size * kw_size * cg_in, nr) * nr, dtype=_NUMPY_DTYPE[x.dtype])
    args = (chunks, _flat(x), _flat(grad_pre), partial, geom, mr, nr)
    fmas = pixels * c_out * cg_in * kh_size * kw_size
    if chunks > 1 and fmas >= _PARALLEL_MIN_FMAS and _runtime.threads() > 1:
        _weight_parallel(*args)
    else:
        _weight_serial(*args)
    _weight_reduce(partial, chunks, geom, mr, nr, _flat(grad_weight))
