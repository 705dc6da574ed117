"""The convolution's activation backward: ``grad_pre = grad_out * act'(saved)`` in one pass
over blocks of rows, each block's per-channel float64 sums added in block order for the bias
gradient (the same on any thread count).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from brainkern.activations import LEAKY_RELU, RELU, saves_output
from brainkern.kernels.numba import _runtime
from brainkern.kernels.numba._conv_gemm import strides
from brainkern.kernels.numba.linear import (
    _PARALLEL_MIN_ELEMENTS,
    FASTMATH,
    _cdiv,
    _derivative,
    _flat,
)

_BLOCK_ELEMENTS = 1 << 14  # elements per block (rounded to whole rows)


@njit(cache=True, fastmath=FASTMATH)
def _activation_block(block, g, gs, saved, ss, grad_pre, ps, shape, rows_per_block, code, param,
                      sums, has_sums):
    """Block ``block``: rows ``[h0, h0 + rows_per_block)`` of image ``block // row_blocks``
    (row_blocks = ceil(H / rows_per_block)), all channels: ``grad_pre = g * act'(saved)`` there,
    and with has_sums ``sums[block*C + c]`` = the block's float64 channel sums of grad_pre.

    g, saved, grad_pre: flat, element (n, c, h, w) at ``n*s[0] + c*s[1] + h*s[2] + w*s[3]`` for
    their strides gs, ss, ps. shape: (N, C, H, W). Loops follow grad_pre's memory order.
    """
    channels, height, width = shape[1], shape[2], shape[3]
    row_blocks = (height + rows_per_block - 1) // rows_per_block
    n = block // row_blocks
    h0 = (block % row_blocks) * rows_per_block
    h1 = min(height, h0 + rows_per_block)
    base = block * channels
    if has_sums:
        sums[base:base + channels] = 0.0
    if ps[1] == 1:  # NHWC: channels innermost
        for hh in range(h0, h1):
            for ww in range(width):
                gp = n * gs[0] + hh * gs[2] + ww * gs[3]
                sp = n * ss[0] + hh * ss[2] + ww * ss[3]
                pp = n * ps[0] + hh * ps[2] + ww * ps[3]
                if gs[1] == 1:
                    out = grad_pre[pp:pp + channels]
                    _derivative_run(g[gp:gp + channels], saved[sp:sp + channels], out, channels,
                                    code, param)
                    if has_sums:
                        block_sums = sums[base:base + channels]
                        for c in range(channels):
                            block_sums[c] += out[c]
                    continue
                for c in range(channels):
                    value = g[gp + c * gs[1]] * _derivative(saved[sp + c], code, param)
                    grad_pre[pp + c] = value
                    if has_sums:
                        sums[base + c] += value
    else:
        unit = gs[3] == 1 and ss[3] == 1 and ps[3] == 1
        for c in range(channels):
            total = 0.0
            for hh in range(h0, h1):
                gp = n * gs[0] + c * gs[1] + hh * gs[2]
                sp = n * ss[0] + c * ss[1] + hh * ss[2]
                pp = n * ps[0] + c * ps[1] + hh * ps[2]
                if unit:
                    out = grad_pre[pp:pp + width]
                    _derivative_run(g[gp:gp + width], saved[sp:sp + width], out, width, code,
                                    param)
                    for ww in range(width):
                        total += out[ww]
                    continue
                for ww in range(width):
                    value = g[gp + ww * gs[3]] * _derivative(saved[sp + ww * ss[3]], code, param)
                    grad_pre[pp + ww * ps[3]] = value
                    total += value
            if has_sums:
                sums[base + c] = total


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _derivative_run(g, saved, out, count, code, param):
    """out[:count] = g * act'(saved) over contiguous runs. relu and leaky_relu test the code once,
    outside the loop, so it vectorizes (with the code tested per element inside _derivative's
    chain of branches it ran at ~10 ns per element); the products are the same as _derivative's.
    """
    if code == RELU:
        for e in range(count):
            out[e] = g[e] * (1.0 if saved[e] > 0.0 else 0.0)
    elif code == LEAKY_RELU:
        for e in range(count):
            out[e] = g[e] * (1.0 if saved[e] > 0.0 else param)
    else:
        for e in range(count):
            out[e] = g[e] * _derivative(saved[e], code, param)


@njit(cache=True, fastmath=FASTMATH)
def _sum_blocks(sums, blocks, channels, grad_bias):
    """grad_bias[c] = sum over blocks of sums[block*C + c], in block order (deterministic)."""
    for c in range(channels):
        total = 0.0
        for block in range(blocks):
            total += sums[block * channels + c]
        grad_bias[c] = total


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def _activation_parallel(blocks, g, gs, saved, ss, grad_pre, ps, shape, rows_per_block, code,
                         param, grad_bias, has_bias):
    """Every block (arguments as _activation_block), then the bias sums in block order."""
    sums = np.empty(blocks * shape[1] if has_bias else 0, dtype=np.float64)
    for block in prange(blocks):
        _activation_block(np.int64(block), g, gs, saved, ss, grad_pre, ps, shape, rows_per_block,
                          code, param, sums, has_bias)
    if has_bias:
        _sum_blocks(sums, blocks, shape[1], grad_bias)


@njit(cache=True, fastmath=FASTMATH)
def _activation_serial(blocks, g, gs, saved, ss, grad_pre, ps, shape, rows_per_block, code,
                       param, grad_bias, has_bias):
    """_activation_parallel's serial twin: same blocks, same sums, same order."""
    sums = np.empty(blocks * shape[1] if has_bias else 0, dtype=np.float64)
    for block in range(blocks):
        _activation_block(block, g, gs, saved, ss, grad_pre, ps, shape, rows_per_block, code,
                          param, sums, has_bias)
    if has_bias:
        _sum_blocks(sums, blocks, shape[1], grad_bias)


def conv2d_activation_backward(grad_out, saved, grad_pre, grad_bias, act_code, act_param,
                               saved_is_output):
    """``grad_pre = grad_out * act'(saved)``, ``grad_bias = grad_pre.sum((0, 2, 3))`` if given."""
    batch, channels, height, width = grad_pre.shape
    if channels == 0:
        return
    if grad_pre.numel() == 0:
        if grad_bias is not None:
            grad_bias.zero_()
        return
    keeps_output = saves_output(int(act_code), float(act_param))
    if keeps_output != bool(saved_is_output):
        raise ValueError(f"conv2d_activation_backward: activation {act_code} ({act_param}) saves "
                         f"the {'output' if keeps_output else 'pre-activation'}, but "
                         f"saved_is_output={saved_is_output}")
    # Blocks of whole rows, about _BLOCK_ELEMENTS each, fixed by the shape alone.
    rows_per_block = max(1, min(height, _BLOCK_ELEMENTS // max(1, channels * width)))
    blocks = batch * _cdiv(height, rows_per_block)
    grad_pre_flat = _flat(grad_pre)
    stride_arrays = [np.array(s, dtype=np.int64) for s in
               (grad_out.stride(), strides(saved), strides(grad_pre))]
    args = (blocks, _flat(grad_out), stride_arrays[0], _flat(saved), stride_arrays[1], grad_pre_flat,
            stride_arrays[2], np.array(grad_pre.shape, dtype=np.int64), rows_per_block, int(act_code),
            float(act_param), grad_pre_flat if grad_bias is None else _flat(grad_bias),
            grad_bias is not None)
    if blocks > 1 and grad_pre.numel() >= _PARALLEL_MIN_ELEMENTS and _runtime.threads() > 1:
        _activation_parallel(*args)
    else:
        _activation_serial(*args)
