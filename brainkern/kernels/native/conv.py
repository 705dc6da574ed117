"""The native backend's convolution family: the C++ core for float32, Numba for float64.

Interface: brainkern/kernels/__init__.py (conv section). In C++ (csrc/conv_dispatch.inc) every
convolution is the packed GEMM on chunks of output pixels gathered straight from the input
(NCHW or NHWC), its bias and activation fused; depthwise layers run a direct kernel. Each kernel
trusts its arguments; its ``check_*`` twin (kept in _conv_checks.py, imported here) names what
is wrong with arguments the C++ core cannot run (the test suite runs it before every call,
tests/conftest.py).

Extra keywords on every kernel, for tests and benchmarks: ``isa`` (one of
``brainkern.kernels.native.supported_isas()``) and ``num_threads`` (default
``torch.get_num_threads()``).
"""

from __future__ import annotations

import torch

from brainkern.activations import LEAKY_RELU, NONE, RELU
from brainkern.kernels.native import core as _native
from brainkern.kernels.native._conv_checks import (  # noqa: F401 (the check_* twins)
    _is_nhwc,
    check_conv2d_activation_backward,
    check_conv2d_activation_backward_weight,
    check_conv2d_backward_weight,
    check_conv2d_forward,
    check_conv2d_maxpool2d_backward,
    check_conv2d_maxpool2d_forward,
    check_conv_transpose2d_forward,
)
from brainkern.kernels.native.pool import _indices_or_codes, codes_to_indices_2x2

DEVICES = ("cpu",)
DTYPES = (torch.float32, torch.float64)
WINDOW_CODES = True  # conv2d_maxpool2d_forward takes uint8 window codes for indices
# conv2d_maxpool2d_backward applies these activations' derivatives itself (act_code).
POOLED_ACTIVATIONS = (RELU, LEAKY_RELU)

_F64 = torch.float64
_CHANNELS_LAST = torch.channels_last
_get_num_threads = torch.get_num_threads


def _threads(num_threads) -> int:
    return _get_num_threads() if num_threads is None else max(1, num_threads)


def _shape(conv_in, conv_out, weight, stride, padding, dilation, groups) -> tuple:
    """The C++ geometry: (n, c_in, h, w, c_out, h_out, w_out, kh, kw, sh, sw, ph, pw, dh, dw,
    groups) of the convolution from ``conv_in`` to ``conv_out``."""
    return (*conv_in.shape, *conv_out.shape[1:], *weight.shape[2:], *stride, *padding,
            *dilation, groups)


def _block_shape(x, weight, conv_hw, stride, padding, dilation, groups) -> tuple:
    """The fused block's C++ geometry: _shape's, the conv output (H_c, W_c) = conv_hw (the
    block never stores that output)."""
    return (*x.shape, weight.shape[0], *conv_hw, *weight.shape[2:], *stride, *padding,
            *dilation, groups)


def _ptr(t) -> int:
    return 0 if t is None else t.data_ptr()


def conv2d_forward(x, weight, bias, out, pre, stride, padding, dilation, groups, act_code,
                   act_param, *, isa=None, num_threads=None):
    """``out = act(conv2d(x, weight) + bias)``; ``pre`` (when given) the value before act.

    x: (N, C_in, H, W), contiguous NCHW or channels_last. weight: (C_out, C_in / groups, kH, kW)
    contiguous. bias: (C_out,) contiguous or None. out, pre: (N, C_out, H_out, W_out) in x's
    format; pre may be None. stride, padding (top, left), dilation: (h, w) pairs.
    float32 runs in C++; float64 goes to brainkern.kernels.numba.conv.
    """
    if x.dtype is _F64:
        from brainkern.kernels.numba import conv as numba_conv

        numba_conv.conv2d_forward(x, weight, bias, out, pre, stride, padding, dilation, groups,
                                  act_code, act_param)
        return
    _native().conv2d_forward(
        x.data_ptr(), weight.data_ptr(), _ptr(bias), out.data_ptr(), _ptr(pre),
        _shape(x, out, weight, stride, padding, dilation, groups), _is_nhwc(x, out),
        act_code, act_param, _threads(num_threads), isa or "")


def conv2d_maxpool2d_forward(x, weight, bias, out, indices, pre, conv_hw, stride, padding,
                             dilation, groups, act_code, act_param, *, isa=None,
                             num_threads=None):
    """``out = max_pool2d(act(conv2d(x, weight) + bias), 2)``, the conv output never stored.

    x, weight, bias, stride, padding, dilation, groups as :func:`conv2d_forward`. conv_hw:
    (H_c, W_c) >= (2, 2), the conv output's size. out, pre: (N, C_out, H_c // 2, W_c // 2) in
    x's format (pre may be None); indices: int64, out's shape and format, the winning tap's
    flat ``h * W_c + w``, or uint8 window codes (``WINDOW_CODES``), its place ``2u + v`` in
    its window, or None where no winner is wanted (inference: the winners are then neither
    written nor settled, conv_block_dispatch.inc); pre: the pre-activation at that tap. In C++
    every chunk of conv outputs is pooled while in cache; float64 composes Numba's conv and
    pool over a full-size scratch output.
    """
    if x.dtype is _F64:
        if indices is None:
            indices = torch.empty(out.shape, dtype=torch.int64, memory_format=(
                _CHANNELS_LAST if _is_nhwc(x, out) else torch.contiguous_format))
        _compose_maxpool2d_forward(x, weight, bias, out, indices, pre, conv_hw, stride, padding,
                                   dilation, groups, act_code, act_param)
        return
    _native().conv2d_maxpool2d_forward(
        x.data_ptr(), weight.data_ptr(), _ptr(bias), out.data_ptr(), *_indices_or_codes(indices),
        _ptr(pre), _block_shape(x, weight, conv_hw, stride, padding, dilation, groups),
        _is_nhwc(*(t for t in (x, out, indices) if t is not None)), act_code, act_param,
        _threads(num_threads), isa or "")


def conv2d_maxpool2d_backward(grad_pooled, indices, x, weight, grad_x, grad_weight, conv_hw,
                              stride, padding, dilation, groups, *, saved=None,
                              act_code=NONE, act_param=0.0, grad_bias=None,
                              isa=None, num_threads=None) -> bool:
    """The conv block's ``grad_x`` and ``grad_weight`` (each None when not wanted) from the
    pooled ``dz``, the winners' products alone (a quarter of the dense backward's).

    grad_pooled: dz at the winners (the activation's derivative applied), out's shape and format
    as :func:`conv2d_maxpool2d_forward` wrote it; indices: its uint8 window codes. x, weight,
    conv_hw and the geometry as that kernel's. Returns False, having written nothing, where it
    does not run: float64, int64 indices, or a non-finite grad_pooled (or x for grad_weight,
    weight for grad_x), whose zeros' products torch's dense sums keep (0 * inf = NaN).

    With ``act_code`` in ``POOLED_ACTIVATIONS`` (leaky_relu with ``act_param >= 0``),
    grad_pooled is the pooled output's gradient and ``saved`` the pooled output (its shape and
    format): dz = grad_pooled * act'(saved), the same bits as conv2d_activation_backward's,
    and ``grad_bias`` (C_out,) or None gets dz's per-channel sums (then grad_weight is
    needed). Other activations return False.
    """
    if x.dtype is _F64 or indices.dtype is not torch.uint8:
        return False
    return _native().conv2d_maxpool2d_backward(
        grad_pooled.data_ptr(), indices.data_ptr(), x.data_ptr(), weight.data_ptr(),
        _ptr(grad_x), _ptr(grad_weight),
        _block_shape(x, weight, conv_hw, stride, padding, dilation, groups),
        _is_nhwc(*(t for t in (x, grad_pooled, indices, grad_x, saved) if t is not None)),
        _threads(num_threads), isa or "", _ptr(saved), act_code, act_param, _ptr(grad_bias))


def _compose_maxpool2d_forward(x, weight, bias, out, indices, pre, conv_hw, stride, padding,
                               dilation, groups, act_code, act_param) -> None:
    from brainkern.kernels.numba import conv as numba_conv
    from brainkern.kernels.numba import pool as numba_pool

    fmt = _CHANNELS_LAST if _is_nhwc(x, out) else torch.contiguous_format
    full = torch.empty((x.shape[0], weight.shape[0], *conv_hw), dtype=x.dtype,
                       memory_format=fmt)
    full_pre = None if pre is None else torch.empty_like(full)
    numba_conv.conv2d_forward(x, weight, bias, full, full_pre, stride, padding, dilation, groups,
                              act_code, act_param)
    numba_pool.max_pool2d_forward(full, out, indices, (2, 2), (2, 2), (0, 0), (1, 1))
    if pre is not None:
        taps = (indices if indices.dtype is torch.int64
                else codes_to_indices_2x2(indices, conv_hw[1]))
        pre.copy_(full_pre.flatten(2).gather(2, taps.flatten(2)).view_as(pre))


def conv_transpose2d_forward(x, weight, bias, out, pre, stride, padding, dilation, groups,
                             act_code, act_param, *, isa=None, num_threads=None):
    """``out = act(conv_transpose2d(x, weight) + bias)``; ``pre`` the value before act.

    x: (N, C_x, H, W), contiguous NCHW or channels_last. weight: (C_x, C_out / groups, kH, kW)
    contiguous. bias: (C_out,) or None. out, pre: (N, C_out, H_out, W_out) in x's format.
    Computed as the GEMM ``x^T weight`` per chunk of x's pixels, scattered into out (col2im).
    """
    if x.dtype is _F64:
        from brainkern.kernels.numba import conv as numba_conv

        numba_conv.conv_transpose2d_forward(x, weight, bias, out, pre, stride, padding,
                                            dilation, groups, act_code, act_param)
        return
    _native().conv_transpose2d_forward(
        x.data_ptr(), weight.data_ptr(), _ptr(bias), out.data_ptr(), _ptr(pre),
        _shape(out, x, weight, stride, padding, dilation, groups), _is_nhwc(x, out),
        act_code, act_param, _threads(num_threads), isa or "")


def conv2d_backward_weight(grad_pre, x, grad_weight, stride, padding, dilation, groups, *,
                           isa=None, num_threads=None):
    """``grad_weight`` = the sum over batch and pixels of grad_pre times the input taps.

    grad_pre: (N, C_out, H_out, W_out) and x: (N, C_in, H, W), contiguous in one format.
    grad_weight: (C_out, C_in / groups, kH, kW) contiguous, written whole (zeros for batch 0).
    Summed in float32 over a fixed split of the pixels: the same on any thread count.
    """
    if x.dtype is _F64:
        from brainkern.kernels.numba import conv as numba_conv

        numba_conv.conv2d_backward_weight(grad_pre, x, grad_weight, stride, padding, dilation,
                                          groups)
        return
    _native().conv2d_backward_weight(
        grad_pre.data_ptr(), x.data_ptr(), grad_weight.data_ptr(),
        _shape(x, grad_pre, grad_weight, stride, padding, dilation, groups),
        _is_nhwc(grad_pre, x), _threads(num_threads), isa or "")


def conv2d_activation_backward(grad_out, saved, grad_pre, grad_bias, act_code, act_param,
                               saved_is_output, *, isa=None, num_threads=None):
    """``grad_pre = grad_out * act'(saved)``, ``grad_bias = grad_pre.sum((0, 2, 3))``.

    grad_out: (N, C, H, W), any strides. saved, grad_pre: contiguous, one format (NCHW or
    channels_last). grad_bias: (C,) contiguous or None, summed in float64 in one pass with
    grad_pre, the same on any thread count. act_code is not NONE.
    """
    if grad_pre.dtype is _F64:
        from brainkern.kernels.numba import conv as numba_conv

        numba_conv.conv2d_activation_backward(grad_out, saved, grad_pre, grad_bias, act_code,
                                              act_param, saved_is_output)
        return
    _native().conv2d_activation_backward(
        grad_out.data_ptr(), grad_out.stride(), saved.data_ptr(), grad_pre.data_ptr(),
        _ptr(grad_bias), grad_pre.shape, _is_nhwc(saved, grad_pre), act_code, act_param,
        _threads(num_threads), isa or "")


def conv2d_activation_backward_weight(grad_out, saved, x, grad_weight, grad_bias, stride,
                                      padding, dilation, groups, act_code, act_param,
                                      saved_is_output, *, isa=None, num_threads=None):
    """:func:`conv2d_activation_backward` then :func:`conv2d_backward_weight`, ``grad_pre``
    never stored: for a convolution whose input needs no gradient (a network's stem).

    grad_out, saved: (N, C_out, H_out, W_out) contiguous in x's format; the rest as those two
    kernels take them. In C++ thin stride-1 layers compute each image's dz into an L2-sized
    buffer right before the direct weight-gradient kernel reads it; other layers compose the
    two kernels; float64 composes Numba's.
    """
    if x.dtype is _F64:
        grad_pre = torch.empty_like(saved)
        conv2d_activation_backward(grad_out, saved, grad_pre, grad_bias, act_code, act_param,
                                   saved_is_output)
        conv2d_backward_weight(grad_pre, x, grad_weight, stride, padding, dilation, groups)
        return
    _native().conv2d_activation_backward_weight(
        grad_out.data_ptr(), saved.data_ptr(), x.data_ptr(), grad_weight.data_ptr(),
        _ptr(grad_bias), _shape(x, saved, grad_weight, stride, padding, dilation, groups),
        _is_nhwc(grad_out, saved, x), act_code, act_param, _threads(num_threads), isa or "")
