"""Argument checks of the native convolution family (brainkern/kernels/native/conv.py): each
``check_<kernel>`` raises a TypeError/ValueError naming what the C++ core cannot run, before
the kernel, which trusts its arguments, runs (the test suite runs every check before its
kernel, tests/conftest.py); and the layout rule both share."""

from __future__ import annotations

import torch

from brainkern.activations import NONE
from brainkern.activations import saves_output as _saves_output

_F32, _F64 = torch.float32, torch.float64
_CHANNELS_LAST = torch.channels_last


def _is_nhwc(*tensors) -> bool:
    """The layout the kernels run in. A tensor with one channel or one pixel is contiguous both
    ways (the same bytes), so the format is NHWC as soon as any tensor is only channels_last."""
    return not all(t.is_contiguous() for t in tensors)



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
