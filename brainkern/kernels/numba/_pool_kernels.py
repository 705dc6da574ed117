"""The jitted kernels behind numba/pool.py: per-row forward and per-slice backward bodies, the
window tables, and the ``prange`` drivers with their serial twins.

Layout and ownership: see numba/pool.py. The bodies and the drivers that inline them live in one
file on purpose: Numba's cache keys on the source file of the function it compiles, so a body
edited in another file would leave the drivers' cached machine code stale.
"""

import numpy as np
from numba import njit, prange

from brainkern.kernels.numba.linear import FASTMATH


@njit(cache=True)
def windows(size, out_size, kernel, stride, padding, dilation, adaptive, include_pad):
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
def _vote4(t0, t1, t2, t3):
    """(the maximum, its code 0-3) of a 2x2 window's taps in scan order, by torch's rule (a tap
    wins when greater or NaN): the two rows' winners, then the better of the two (the same tap
    as the sequential scan), written as selects: branches on random data ran 2-3x slower."""
    w1 = (t1 > t0) | (t1 != t1)
    top = t1 if w1 else t0
    w3 = (t3 > t2) | (t3 != t3)
    bottom = t3 if w3 else t2
    wb = (bottom > top) | (bottom != bottom)
    return (bottom if wb else top), np.uint8((2 + np.int32(w3)) if wb else np.int32(w1))


@njit(cache=True, inline="always", fastmath=FASTMATH)
def _vote4_at(a, b, i, at0, W):
    """(the maximum, its flat tap) of the window of taps a[i], a[i + 1], b[i], b[i + 1] whose
    first tap is at0; as _vote4 (this form vectorises for int64 taps, _vote4's does not)."""
    best, at = a[i], at0
    v = a[i + 1]
    if v > best or v != v:
        best, at = v, at0 + 1
    v = b[i]
    if v > best or v != v:
        best, at = v, at0 + W
    v = b[i + 1]
    if v > best or v != v:
        best, at = v, at0 + W + 1
    return best, at


@njit(cache=True, inline="always", fastmath=FASTMATH)
def _max_forward_row(row, x, out, idx, has_idx, codes, H, W, Q, Ho, Wo, rows, cols, window,
                     pairs):
    """Output row ``row`` = (p, oh) of max pooling.

    x: flat (P, H, W, Q). out, idx, codes: flat (P, Ho, Wo, Q); idx (int64) written if has_idx,
    else codes (uint8: the tap's place ``i * kw + j`` in its window) when it is not empty.
    rows, cols: ``windows`` tables of the two axes; window: (sh, sw, ph, pw, kw, dh, dw). pairs:
    2x2 windows of stride 2 inside the input (no tables needed). A tap replaces the best so far
    when greater or NaN (torch's scan order and rule: the first maximum, or the last NaN, wins).
    """
    has_codes = not has_idx and codes.size > 0
    p = row // Ho
    oh = row - p * Ho
    x0 = p * H * W * Q
    o0 = row * Wo * Q
    if pairs:
        top = 2 * oh * W
        a = x[x0 + top * Q:x0 + (top + W) * Q]
        b = x[x0 + (top + W) * Q:x0 + (top + 2 * W) * Q]
        # One loop per output kind: a store that may or may not happen kept LLVM from
        # vectorising the loop (4x slower).
        if Q == 1:
            o = out[o0:o0 + Wo]
            if has_idx:
                ix = idx[o0:o0 + Wo]
                for ow in range(Wo):
                    o[ow], ix[ow] = _vote4_at(a, b, 2 * ow, top + 2 * ow, W)
            elif has_codes:
                cs = codes[o0:o0 + Wo]
                for ow in range(Wo):
                    o[ow], cs[ow] = _vote4(a[2 * ow], a[2 * ow + 1], b[2 * ow], b[2 * ow + 1])
            else:
                for ow in range(Wo):
                    o[ow] = _vote4(a[2 * ow], a[2 * ow + 1], b[2 * ow], b[2 * ow + 1])[0]
            return
        for ow in range(Wo):
            o = out[o0 + ow * Q:o0 + ow * Q + Q]
            a0, a1 = a[2 * ow * Q:2 * ow * Q + Q], a[2 * ow * Q + Q:2 * ow * Q + 2 * Q]
            b0, b1 = b[2 * ow * Q:2 * ow * Q + Q], b[2 * ow * Q + Q:2 * ow * Q + 2 * Q]
            if has_idx:
                ix = idx[o0 + ow * Q:o0 + ow * Q + Q]
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
                    o[q], ix[q] = best, at
            elif has_codes:
                cs = codes[o0 + ow * Q:o0 + ow * Q + Q]
                for q in range(Q):
                    o[q], cs[q] = _vote4(a0[q], a1[q], b0[q], b1[q])
            else:
                for q in range(Q):
                    o[q] = _vote4(a0[q], a1[q], b0[q], b1[q])[0]
        return
    sh, sw, ph, pw, kw, dh, dw = window
    h_first, h_end = rows[0, oh], rows[1, oh]
    for ow in range(Wo):
        w_first, w_end = cols[0, ow], cols[1, ow]
        first = h_first * W + w_first
        o, ix = out[o0 + ow * Q:o0 + ow * Q + Q], idx[o0 + ow * Q:o0 + ow * Q + Q]
        cs = codes[o0 + ow * Q:o0 + ow * Q + Q] if has_codes else codes
        h0, w0 = oh * sh - ph, ow * sw - pw
        # Starting from the first tap, not -inf, keeps the dtype; rescanning it changes nothing.
        o[:] = x[x0 + first * Q:x0 + first * Q + Q]
        if has_idx:
            ix[:] = first
        elif has_codes:
            cs[:] = (h_first - h0) // dh * kw + (w_first - w0) // dw
        for h in range(h_first, h_end, dh):
            for w in range(w_first, w_end, dw):
                tap = h * W + w
                code = (h - h0) // dh * kw + (w - w0) // dw
                t = x[x0 + tap * Q:x0 + tap * Q + Q]
                for q in range(Q):
                    v = t[q]
                    if v > o[q] or v != v:
                        o[q] = v
                        if has_idx:
                            ix[q] = tap
                        elif has_codes:
                            cs[q] = code


@njit(cache=True, inline="always", fastmath=FASTMATH)
def _avg_forward_row(row, x, out, H, W, Q, Ho, Wo, rows, cols, divisor, pairs, pair_scale):
    """Output row ``row`` = (p, oh) of average pooling: each window's sum / its divisor.

    x: flat (P, H, W, Q); out: flat (P, Ho, Wo, Q). rows, cols: ``windows`` tables (taps at unit
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
def _max_backward_slice(task, g, idx, codes, gx, H, W, Q, Ho, Wo, origin, offsets, q_block):
    """grad_x's slice ``task`` = (p, channel block): zeroed, then each output's gradient added
    at its index, or (idx empty) at the tap its code names in its window. g, idx, codes: flat
    (P, Ho, Wo, Q); gx: flat (P, H, W, Q); origin: (sh, sw, ph, pw), window (oh, ow) starting
    at (oh * sh - ph, ow * sw - pw); offsets: each code's flat offset from the window's start;
    q_block: channels per block (Q when Q == 1)."""
    blocks = (Q + q_block - 1) // q_block
    p = task // blocks
    q0 = (task - p * blocks) * q_block
    q1 = min(q0 + q_block, Q)
    x0 = p * H * W * Q
    o0 = p * Ho * Wo * Q
    if idx.size == 0:
        sh, sw, ph, pw = origin
        if Q == 1:
            plane = gx[x0:x0 + H * W]
            plane[:] = 0.0
            for oh in range(Ho):
                row = (oh * sh - ph) * W - pw
                for ow in range(Wo):
                    o = o0 + oh * Wo + ow
                    plane[row + ow * sw + offsets[codes[o]]] += g[o]
            return
        for hw in range(H * W):
            gx[x0 + hw * Q + q0:x0 + hw * Q + q1] = 0.0
        for oh in range(Ho):
            row = (oh * sh - ph) * W - pw
            for ow in range(Wo):
                o = o0 + (oh * Wo + ow) * Q
                start = row + ow * sw
                for q in range(q0, q1):
                    gx[x0 + (start + offsets[codes[o + q]]) * Q + q] += g[o + q]
        return
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
def max_forward_parallel(x, out, idx, has_idx, codes, H, W, Q, Ho, Wo, rows, cols, window, pairs,
                         tasks):
    for row in prange(tasks):
        _max_forward_row(np.int64(row), x, out, idx, has_idx, codes, H, W, Q, Ho, Wo, rows, cols,
                         window, pairs)


@njit(cache=True, fastmath=FASTMATH)
def max_forward_serial(x, out, idx, has_idx, codes, H, W, Q, Ho, Wo, rows, cols, window, pairs,
                       tasks):
    for row in range(tasks):
        _max_forward_row(row, x, out, idx, has_idx, codes, H, W, Q, Ho, Wo, rows, cols, window,
                         pairs)


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def avg_forward_parallel(x, out, H, W, Q, Ho, Wo, rows, cols, divisor, pairs, pair_scale, tasks):
    for row in prange(tasks):
        _avg_forward_row(np.int64(row), x, out, H, W, Q, Ho, Wo, rows, cols, divisor, pairs,
                         pair_scale)


@njit(cache=True, fastmath=FASTMATH)
def avg_forward_serial(x, out, H, W, Q, Ho, Wo, rows, cols, divisor, pairs, pair_scale, tasks):
    for row in range(tasks):
        _avg_forward_row(row, x, out, H, W, Q, Ho, Wo, rows, cols, divisor, pairs, pair_scale)


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def max_backward_parallel(g, idx, codes, gx, H, W, Q, Ho, Wo, origin, offsets, q_block, tasks):
    for task in prange(tasks):
        _max_backward_slice(np.int64(task), g, idx, codes, gx, H, W, Q, Ho, Wo, origin, offsets,
                            q_block)


@njit(cache=True, fastmath=FASTMATH)
def max_backward_serial(g, idx, codes, gx, H, W, Q, Ho, Wo, origin, offsets, q_block, tasks):
    for task in range(tasks):
        _max_backward_slice(task, g, idx, codes, gx, H, W, Q, Ho, Wo, origin, offsets, q_block)


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def avg_backward_parallel(g, gx, H, W, Q, Ho, Wo, rows, cols, divisor, pairs, pair_scale, q_block,
                           tasks):
    for task in prange(tasks):
        _avg_backward_slice(np.int64(task), g, gx, H, W, Q, Ho, Wo, rows, cols, divisor, pairs,
                            pair_scale, q_block)


@njit(cache=True, fastmath=FASTMATH)
def avg_backward_serial(g, gx, H, W, Q, Ho, Wo, rows, cols, divisor, pairs, pair_scale, q_block,
                         tasks):
    for task in range(tasks):
        _avg_backward_slice(task, g, gx, H, W, Q, Ho, Wo, rows, cols, divisor, pairs, pair_scale,
                            q_block)
