"""The ``native`` backend's pool family: the C++ core for float32 2x2 windows of stride 2,
Numba's kernels (brainkern/kernels/numba/pool.py) for every other window and for float64.

2x2 pooling of stride 2 is every CNN's downsampling (and the fused conv block's backward), and
it is memory-bound: what decides its speed is moving each byte once, at full vector width. In
Numba the NCHW rows' stride-2 taps did not vectorise, and the backward zeroed grad_x and then
added into it; the C++ kernels (csrc/pool.inc) deinterleave the taps in registers, mask a row's
last partial vector, and write each element of grad_x once, since such windows never overlap.
Measured on (64, 64, 28, 28) float32, 2 threads (Intel Xeon, AVX-512): max forward NCHW
1.0-1.4 -> 0.37-0.48 ms, max backward 0.6-0.85 -> 0.36 ms, average backward 1.1 -> 0.31 ms.

Interface: brainkern/kernels/__init__.py (pool section). Extra keywords, as in native/conv.py:
``isa`` and ``num_threads``.
"""

from __future__ import annotations

import torch

from brainkern.kernels.native import core as _native
from brainkern.kernels.numba import pool as _numba
from brainkern.kernels.numba.pool import (  # noqa: F401 - the family's interface, re-exported
    adaptive_avg_pool2d_backward,
    adaptive_avg_pool2d_forward,
)

DEVICES = ("cpu",)
DTYPES = (torch.float32, torch.float64)
WINDOW_CODES = True  # max pooling takes uint8 window codes for indices (kernels/__init__.py)

_F32 = torch.float32


def _threads(num_threads) -> int:
    return torch.get_num_threads() if num_threads is None else max(1, num_threads)


def _pairs(x, out, kernel_size, stride, padding, dilation=(1, 1)) -> bool:
    """float32 2x2 windows of stride 2, unpadded, undilated, every one inside x."""
    return x.dtype is _F32 and _numba.two_by_two(x, out, kernel_size, stride, padding, dilation)


def _shape_and_layout(x, out, *others):
    """(n, c, h, w, ho, wo) and whether the C++ core reads the tensors as NHWC, or None when
    they are not all contiguous in one format (Numba's kernels take them then)."""
    tensors = (x, out, *others)
    if all(t.is_contiguous() for t in tensors):
        nhwc = False
    elif all(t.is_contiguous(memory_format=torch.channels_last) for t in tensors):
        nhwc = True
    else:
        return None
    return (*x.shape, *out.shape[2:]), nhwc


def codes_to_indices_2x2(codes, width):
    """torch's flat indices ``h * width + w`` of the taps that 2x2 windows of stride 2 name by
    their window codes ``2u + v`` (codes: (..., H, W) uint8; the pooled input ``width`` wide)."""
    rows = torch.arange(codes.shape[-2], device=codes.device).mul_(2).unsqueeze(1)
    cols = torch.arange(codes.shape[-1], device=codes.device).mul_(2)
    taps = codes.to(torch.int64)
    return (rows + taps.div(2, rounding_mode="floor")) * width + cols + taps.remainder(2)


def _indices_or_codes(indices) -> tuple:
    """(int64 indices address, uint8 codes address): the given tensor's, 0 for the other."""
    if indices is None:
        return 0, 0
    if indices.dtype == torch.uint8:
        return 0, indices.data_ptr()
    return indices.data_ptr(), 0


def max_pool2d_forward(x, out, indices, kernel_size, stride, padding, dilation, *, isa=None,
                       num_threads=None):
    """out = each window's maximum; indices (or None) its flat tap ``h * W + w`` (int64) or
    its window code (uint8)."""
    layout = _pairs(x, out, kernel_size, stride, padding, dilation) and _shape_and_layout(
        x, out, *(() if indices is None else (indices,)))
    if not layout or out.numel() == 0:
        _numba.max_pool2d_forward(x, out, indices, kernel_size, stride, padding, dilation)
        return
    shape, nhwc = layout
    _native().max_pool2x2_forward(x.data_ptr(), out.data_ptr(), *_indices_or_codes(indices),
                                  shape, nhwc, _threads(num_threads), isa or "")


def max_pool2d_backward(grad_out, indices, grad_x, kernel_size, stride, padding, dilation, *,
                        isa=None, num_threads=None):
    """grad_x = grad_out at the taps its indices (or codes) name, zeros elsewhere (written
    whole)."""
    layout = _pairs(grad_x, grad_out, kernel_size, stride, padding, dilation) and \
        _shape_and_layout(grad_x, grad_out, indices)
    if not layout or grad_out.numel() == 0:
        _numba.max_pool2d_backward(grad_out, indices, grad_x, kernel_size, stride, padding,
                                   dilation)
        return
    shape, nhwc = layout
    _native().max_pool2x2_backward(grad_out.data_ptr(), *_indices_or_codes(indices),
                                   grad_x.data_ptr(), shape, nhwc, _threads(num_threads),
                                   isa or "")


def _scale(divisor: int) -> float:
    return 1.0 / (divisor or 4)


def avg_pool2d_forward(x, out, kernel_size, stride, padding, count_include_pad, divisor, *,
                       isa=None, num_threads=None):
    """out = each window's sum / its divisor (kernels/__init__.py)."""
    layout = _pairs(x, out, kernel_size, stride, padding) and _shape_and_layout(x, out)
    if not layout or out.numel() == 0:
        _numba.avg_pool2d_forward(x, out, kernel_size, stride, padding, count_include_pad,
                                  divisor)
        return
    shape, nhwc = layout
    _native().avg_pool2x2_forward(x.data_ptr(), out.data_ptr(), shape, nhwc, _scale(divisor),
                                  _threads(num_threads), isa or "")


def avg_pool2d_backward(grad_out, grad_x, kernel_size, stride, padding, count_include_pad,
                        divisor, *, isa=None, num_threads=None):
    """The adjoint of avg_pool2d_forward; grad_x written whole."""
    layout = _pairs(grad_x, grad_out, kernel_size, stride, padding) and _shape_and_layout(
        grad_x, grad_out)
    if not layout or grad_out.numel() == 0:
        _numba.avg_pool2d_backward(grad_out, grad_x, kernel_size, stride, padding,
                                   count_include_pad, divisor)
        return
    shape, nhwc = layout
    _native().avg_pool2x2_backward(grad_out.data_ptr(), grad_x.data_ptr(), shape, nhwc,
                                   _scale(divisor), _threads(num_threads), isa or "")
