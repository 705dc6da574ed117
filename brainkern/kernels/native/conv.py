"""The native backend's convolution family: the C++ core for float32, Numba for float64.

Interface: brainkern/kernels/__init__.py (conv section). In C++ (csrc/conv_dispatch.inc) every
convolution is the packed GEMM on chunks of output pixels gathered straight from the input
(NCHW or NHWC), its bias and activation fused; depthwise layers run a direct kernel. Each kernel
trusts its arguments; its ``check_*`` twin names what is wrong with arguments the C++ core
cannot run (the test suite runs it before every call, tests/conftest.py).

Extra keywords on every kernel, for tests and benchmarks: ``isa`` (one of
``brainkern.kernels.native.supported_isas()``) and ``num_threads`` (default
``torch.get_num_threads()``).
"""

from __future__ import annotations

import torch

from brainkern.activations import LEAKY_RELU, NONE, RELU
from brainkern.activations import saves_output as _saves_output
from brainkern.kernels.native import core as _native
from brainkern.kernels.native.pool import _indices_or_codes, codes_to_indices_2x2

DEVICES = ("cpu",)
DTYPES = (torch.float32, torch.float64)
WINDOW_CODES = True  # conv2d_maxpool2d_forward takes uint8 window codes for indices
# conv2d_maxpool2d_backward applies these activations' derivatives itself (act_code).
POOLED_ACTIVATIONS = (RELU, LEAKY_RELU)

_F32, _F64 = torch.float32, torch.float64
_CHANNELS_LAST = torch.channels_last
_get_num_threads = torch.get_num_threads


def _threads(num_threads) -> int:
    return _get_num_threads() if num_threads is None else max(1, num_threads)


def _is_nhwc(*tensors) -> bool:
    """The layout the kernels run in. A tensor with one channel or one pixel is contiguous both
    ways (the same bytes), so the format is NHWC as soon as any tensor is only channels_last."""
    return not all(t.is_contiguous() for t in tensors)


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
        taps = indices if indices.dtype is torch.int64 else codes_to_indices_2x2(indices, conv_hw[1])
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


# ---- argument checks: what the C++ core cannot see from addresses ----

def check_conv2d_forward(x, weight, bias, out, pre, stride, padding, dilation, groups,
                         act_code, act_param) -> None:
    """Raise a TypeError/ValueError if :func:`conv2d_forward` cannot run these arguments."""
    if x.dtype is _F64:
        return
    name = "conv2d_forward"
    _check_float32_cpu(name, x, weight, bias, out, pre)
    _check_params(name, stride, padding, dilation, groups)
    n, c_in = _check_4d(name, "x", x)[:2]
    c_out = _check_weight(name, weight, c_in, groups)
    _check_vector(name, "bias", bias, c_out)
    _check_layouts(name, x, out, pre)
    for label, t in (("out", out), ("pre", pre)):
        if t is not None and (t.dim() != 4 or t.shape[:2] != (n, c_out)):
            raise ValueError(f"native {name}: {label} must be ({n}, {c_out}, H_out, W_out), got "
                             f"{tuple(t.shape)}")
    if pre is not None and pre.shape != out.shape:
        raise ValueError(f"native {name}: pre {tuple(pre.shape)} must match out "
                         f"{tuple(out.shape)}")


def check_conv2d_maxpool2d_forward(x, weight, bias, out, indices, pre, conv_hw, stride, padding,
                                   dilation, groups, act_code, act_param) -> None:
    """Raise a TypeError/ValueError if :func:`conv2d_maxpool2d_forward` cannot run these."""
    name = "conv2d_maxpool2d_forward"
    _check_conv_hw(name, conv_hw)
    if x.dtype is _F64:
        return
    if indices is not None and (indices.dtype not in (torch.int64, torch.uint8)
                                or not indices.is_cpu):
        raise TypeError(f"native {name}: indices must be int64 (or uint8 window codes) on the "
                        f"CPU, got {indices.dtype} on {indices.device}")
    c_out = _check_block(name, x, weight, conv_hw, (stride, padding, dilation, groups),
                         {"out": out, "indices": indices, "pre": pre}, bias, out, pre)
    _check_vector(name, "bias", bias, c_out)


def check_conv2d_maxpool2d_backward(grad_pooled, indices, x, weight, grad_x, grad_weight,
                                    conv_hw, stride, padding, dilation, groups, *, saved=None,
                                    act_code=NONE, act_param=0.0,
                                    grad_bias=None) -> None:
    """Raise a TypeError/ValueError if :func:`conv2d_maxpool2d_backward` cannot run these."""
    name = "conv2d_maxpool2d_backward"
    _check_conv_hw(name, conv_hw)
    if x.dtype is _F64 or indices.dtype is not torch.uint8:
        return
    if act_code != NONE and saved is None:
        raise ValueError(f"native {name}: act_code {act_code} needs saved (the pooled output)")
    c_out = _check_block(name, x, weight, conv_hw, (stride, padding, dilation, groups),
                         {"grad_pooled": grad_pooled, "indices": indices, "saved": saved},
                         grad_pooled, grad_x, grad_weight, saved, grad_bias)
    _check_layouts(name, x, grad_pooled, indices, grad_x, saved)
    if grad_bias is not None and (grad_bias.shape != (c_out,) or not grad_bias.is_contiguous()):
        raise ValueError(f"native {name}: grad_bias must be contiguous ({c_out},), got "
                         f"{tuple(grad_bias.shape)}")
    if grad_bias is not None and grad_weight is None:
        raise ValueError(f"native {name}: grad_bias needs grad_weight")
    if grad_x is not None and grad_x.shape != x.shape:
        raise ValueError(f"native {name}: grad_x {tuple(grad_x.shape)} must match x "
                         f"{tuple(x.shape)}")
    if grad_weight is not None and (grad_weight.shape != weight.shape
                                    or not grad_weight.is_contiguous()):
        raise ValueError(f"native {name}: grad_weight must be contiguous "
                         f"{tuple(weight.shape)}, got {tuple(grad_weight.shape)}")


def _check_conv_hw(kernel, conv_hw) -> None:
    if len(conv_hw) != 2 or any(int(v) != v or v < 2 for v in conv_hw):
        raise ValueError(f"native {kernel}: conv_hw must be a pair of ints >= 2, got {conv_hw}")


def _check_block(kernel, x, weight, conv_hw, params, pooled: dict, *floats) -> int:
    """What both fused-block kernels need: float32 CPU tensors (x, weight and ``floats``), the
    geometry, x and weight, and the ``pooled`` tensors (None skipped) in x's format with the
    pooled shape (N, C_out, H_c // 2, W_c // 2). Returns C_out."""
    _check_float32_cpu(kernel, x, weight, *floats)
    _check_params(kernel, *params)
    n, c_in = _check_4d(kernel, "x", x)[:2]
    c_out = _check_weight(kernel, weight, c_in, params[3])
    _check_layouts(kernel, x, *pooled.values())
    shape = (n, c_out, conv_hw[0] // 2, conv_hw[1] // 2)
    for label, t in pooled.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"native {kernel}: {label} must be {shape}, got {tuple(t.shape)}")
    return c_out


def check_conv_transpose2d_forward(x, weight, bias, out, pre, stride, padding, dilation, groups,
                                   act_code, act_param) -> None:
    """Raise a TypeError/ValueError if :func:`conv_transpose2d_forward` cannot run these."""
    if x.dtype is _F64:
        return
    name = "conv_transpose2d_forward"
    _check_float32_cpu(name, x, weight, bias, out, pre)
    _check_params(name, stride, padding, dilation, groups)
    n, c_x = _check_4d(name, "x", x)[:2]
    if weight.dim() != 4 or weight.shape[0] != c_x or not weight.is_contiguous():
        raise ValueError(f"native {name}: weight must be contiguous ({c_x}, C_out / groups, kH, "
                         f"kW), got {tuple(weight.shape)}")
    c_out = weight.shape[1] * groups
    if c_x % groups:
        raise ValueError(f"native {name}: x's {c_x} channels do not divide by groups {groups}")
    _check_vector(name, "bias", bias, c_out)
    _check_layouts(name, x, out, pre)
    for label, t in (("out", out), ("pre", pre)):
        if t is not None and (t.dim() != 4 or t.shape[:2] != (n, c_out)
                              or t.shape != out.shape):
            raise ValueError(f"native {name}: {label} must be ({n}, {c_out}, H_out, W_out) like "
                             f"out, got {tuple(t.shape)}")


def check_conv2d_backward_weight(grad_pre, x, grad_weight, stride, padding, dilation,
                                 groups) -> None:
    """Raise a TypeError/ValueError if :func:`conv2d_backward_weight` cannot run these."""
    if x.dtype is _F64:
        return
    name = "conv2d_backward_weight"
    _check_float32_cpu(name, grad_pre, x, grad_weight)
    _check_params(name, stride, padding, dilation, groups)
    n, c_in = _check_4d(name, "x", x)[:2]
    c_out = _check_weight(name, grad_weight, c_in, groups)
    _check_4d(name, "grad_pre", grad_pre)
    if grad_pre.shape[:2] != (n, c_out):
        raise ValueError(f"native {name}: grad_pre must be ({n}, {c_out}, H_out, W_out), got "
                         f"{tuple(grad_pre.shape)}")
    _check_layouts(name, x, grad_pre)


def check_conv2d_activation_backward(grad_out, saved, grad_pre, grad_bias, act_code, act_param,
                                     saved_is_output) -> None:
    """Raise a TypeError/ValueError if :func:`conv2d_activation_backward` cannot run these."""
    if grad_pre.dtype is _F64:
        return
    name = "conv2d_activation_backward"
    if act_code == NONE:
        raise ValueError(f"native {name}: act_code NONE has no activation backward")
    saves_output = _saves_output(int(act_code), float(act_param))
    if saves_output != bool(saved_is_output):
        raise ValueError(f"native {name}: activation {act_code} ({act_param}) saves the "
                         f"{'output' if saves_output else 'pre-activation'}, but "
                         f"saved_is_output={saved_is_output}")
    _check_float32_cpu(name, grad_out, saved, grad_pre, grad_bias)
    shape = _check_4d(name, "grad_pre", grad_pre)
    if grad_out.shape != shape or saved.shape != shape:
        raise ValueError(f"native {name}: grad_out {tuple(grad_out.shape)}, saved "
                         f"{tuple(saved.shape)} and grad_pre {tuple(shape)} must be one shape")
    _check_layouts(name, saved, grad_pre)
    _check_vector(name, "grad_bias", grad_bias, shape[1])


def check_conv2d_activation_backward_weight(grad_out, saved, x, grad_weight, grad_bias, stride,
                                            padding, dilation, groups, act_code, act_param,
                                            saved_is_output) -> None:
    """Raise a TypeError/ValueError if :func:`conv2d_activation_backward_weight` cannot run
    these."""
    name = "conv2d_activation_backward_weight"
    check_conv2d_activation_backward(grad_out, saved, saved, grad_bias, act_code, act_param,
                                     saved_is_output)
    check_conv2d_backward_weight(saved, x, grad_weight, stride, padding, dilation, groups)
    if x.dtype is not _F64 and not (grad_out.is_contiguous(memory_format=_CHANNELS_LAST)
                                    if _is_nhwc(saved, x) else grad_out.is_contiguous()):
        raise ValueError(f"native {name}: grad_out must be contiguous in x's format")


def _check_float32_cpu(kernel, *tensors) -> None:
    for t in tensors:
        if t is not None and (t.dtype is not _F32 or not t.is_cpu):
            raise TypeError(f"native {kernel}: float32 CPU tensors only, got {t.dtype} on "
                            f"{t.device}")


def _check_params(kernel, stride, padding, dilation, groups) -> None:
    pairs = {"stride": stride, "padding": padding, "dilation": dilation}
    for label, pair in pairs.items():
        low = 0 if label == "padding" else 1
        if len(pair) != 2 or any(int(v) != v or v < low for v in pair):
            raise ValueError(f"native {kernel}: {label} must be a pair of ints >= {low}, got "
                             f"{pair}")
    if int(groups) != groups or groups < 1:
        raise ValueError(f"native {kernel}: groups must be a positive int, got {groups}")


def _check_4d(kernel, label, t):
    if t.dim() != 4:
        raise ValueError(f"native {kernel}: {label} must be 4-D, got {tuple(t.shape)}")
    return t.shape


def _check_weight(kernel, weight, c_in, groups) -> int:
    """weight (C_out, C_in / groups, kH, kW) contiguous; returns C_out."""
    if (weight.dim() != 4 or c_in % groups or weight.shape[1] * groups != c_in
            or weight.shape[0] % groups or not weight.is_contiguous()):
        raise ValueError(f"native {kernel}: weight must be contiguous (C_out, {c_in} / {groups}, "
                         f"kH, kW) with C_out divisible by groups, got {tuple(weight.shape)}")
    return weight.shape[0]


def _check_vector(kernel, label, t, size) -> None:
    if t is not None and (t.shape != (size,) or not t.is_contiguous()):
        raise ValueError(f"native {kernel}: {label} must be contiguous ({size},), got "
                         f"{tuple(t.shape)}")


def _check_layouts(kernel, *tensors) -> None:
    """The kernels address every activation tensor in one format, the one _is_nhwc picks."""
    fmt = _CHANNELS_LAST if _is_nhwc(*(t for t in tensors if t is not None)) else None
    for t in tensors:
        if t is None:
            continue
        ok = t.is_contiguous(memory_format=fmt) if fmt else t.is_contiguous()
        if not ok:
            raise ValueError(f"native {kernel}: tensors must all be contiguous NCHW or all "
                             f"channels_last, got strides {t.stride()} for shape "
                             f"{tuple(t.shape)}")
