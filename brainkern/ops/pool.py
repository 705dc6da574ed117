"""Max, average and adaptive average 2-D pooling, forward and backward.

The torch-facing layer: torch's argument rules and output-size arithmetic (ceil_mode is resolved
here: kernels get the output's size), the autograd.Functions, and the memory format (the output
keeps the input's, NCHW or channels_last, as torch's does).
"""

from __future__ import annotations

import torch

from brainkern import backends
from brainkern.ops._checks import check_tensor
from brainkern.ops.conv import memory_format, pair

_CHANNELS_LAST = torch.channels_last


def pool_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int,
                     ceil_mode: bool) -> int:
    """torch's pooling_output_shape: with ceil_mode, a last window must start inside the input
    or its left padding."""
    reach = size + 2 * padding - dilation * (kernel - 1) - 1
    out = (reach + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def _check_input(input):
    check_tensor("input", input, ndim=(3, 4))
    if input.layout != torch.strided:
        raise TypeError(f"input: expected a dense (strided) tensor, got layout {input.layout}")
    if min(input.shape[-3:]) == 0:
        raise ValueError(f"input: expected non-empty channel and spatial dimensions (a batch "
                         f"may be empty), got shape {tuple(input.shape)}")


def _window_args(input, kernel_size, stride, padding, dilation, ceil_mode):
    """Checked (kernel, stride, padding, dilation) pairs and the output's (H, W)."""
    _check_input(input)
    kernel = pair("kernel_size", kernel_size, 1)
    stride = kernel if stride is None or stride == () or stride == [] else pair("stride", stride, 1)
    padding, dilation = pair("padding", padding, 0), pair("dilation", dilation, 1)
    for p, k in zip(padding, kernel):
        if p > k // 2:
            raise ValueError(f"padding: {padding} must be at most half of kernel_size {kernel}")
    out_hw = tuple(pool_output_size(input.shape[-2 + i], kernel[i], stride[i], padding[i],
                                    dilation[i], bool(ceil_mode)) for i in range(2))
    if min(out_hw) < 1:
        raise ValueError(f"input: spatial size {tuple(input.shape[-2:])} is too small for "
                         f"kernel_size {kernel}, stride {stride}, padding {padding}, dilation "
                         f"{dilation}: the output would be {out_hw[0]} x {out_hw[1]}")
    return kernel, stride, padding, dilation, out_hw


def _prepare(input):
    """(4-D input dense in its suggested format, that format, whether it was unbatched)."""
    unbatched = input.dim() == 3
    x = input.unsqueeze(0) if unbatched else input
    fmt = memory_format(x, x)
    return x.contiguous(memory_format=fmt), fmt, unbatched


def _empty_out(x, out_hw, fmt, dtype=None):
    return torch.empty((*x.shape[:2], *out_hw), dtype=dtype or x.dtype, device=x.device,
                       memory_format=fmt)


def _needs_grad(x):
    return torch.is_grad_enabled() and x.requires_grad


class MaxPool2d(torch.autograd.Function):
    """``y = max over each window``. Backward: ``dx`` = the sum of dy over the windows whose
    maximum each element was, scattered through the indices the forward saved (a kernel, not
    atomics, so the result is the same on any thread count)."""

    @staticmethod
    def forward(ctx, x, kern, args, fmt):
        out = _empty_out(x, args[-1], fmt)
        indices = _empty_out(x, args[-1], fmt, torch.int64)
        kern.max_pool2d_forward(x, out, indices, *args[:-1])
        ctx.kern, ctx.fmt = kern, fmt
        ctx.save_for_backward(indices)
        ctx.x_shape = x.shape
        ctx.mark_non_differentiable(indices)
        return out, indices

    @staticmethod
    def backward(ctx, grad_out, _grad_indices):
        (indices,) = ctx.saved_tensors
        grad_out = grad_out.contiguous(memory_format=ctx.fmt)
        grad_x = torch.empty(ctx.x_shape, dtype=grad_out.dtype, device=grad_out.device,
                             memory_format=ctx.fmt)
        ctx.kern.max_pool2d_backward(grad_out, indices, grad_x)
        return grad_x, None, None, None


class AvgPool2d(torch.autograd.Function):
    """``y = sum over each window / its divisor``; backward spreads dy / divisor over each
    window's taps (the adjoint), in the forward's memory format. ``adaptive`` windows are
    torch's adaptive_avg_pool2d's (args is then empty)."""

    @staticmethod
    def forward(ctx, x, kern, args, out_hw, fmt):
        out = _empty_out(x, out_hw, fmt)
        if args:
            kern.avg_pool2d_forward(x, out, *args)
        else:
            kern.adaptive_avg_pool2d_forward(x, out)
        ctx.kern, ctx.args, ctx.fmt, ctx.x_shape = kern, args, fmt, x.shape
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_out = grad_out.contiguous(memory_format=ctx.fmt)
        grad_x = torch.empty(ctx.x_shape, dtype=grad_out.dtype, device=grad_out.device,
                             memory_format=ctx.fmt)
        if ctx.args:
            ctx.kern.avg_pool2d_backward(grad_out, grad_x, *ctx.args)
        else:
            ctx.kern.adaptive_avg_pool2d_backward(grad_out, grad_x)
        return grad_x, None, None, None, None


def _squeeze(t, unbatched):
    return t.squeeze(0) if unbatched else t


def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
               return_indices=False):
    """torch.nn.functional.max_pool2d: NaN wins a window, as in torch; indices are torch's
    (flat ``h * W + w`` in each plane, usable by max_unpool2d)."""
    *args, out_hw = _window_args(input, kernel_size, stride, padding, dilation, ceil_mode)
    x, fmt, unbatched = _prepare(input)
    kern = backends.kernels_for("pool", x.device, x.dtype)
    if _needs_grad(x):
        out, indices = MaxPool2d.apply(x, kern, (*args, out_hw), fmt)
    else:
        out = _empty_out(x, out_hw, fmt)
        indices = _empty_out(x, out_hw, fmt, torch.int64) if return_indices else None
        kern.max_pool2d_forward(x, out, indices, *args)
    if return_indices:
        return _squeeze(out, unbatched), _squeeze(indices, unbatched)
    return _squeeze(out, unbatched)


def avg_pool2d(input, kernel_size, stride=None, padding=0, ceil_mode=False,
               count_include_pad=True, divisor_override=None):
    """torch.nn.functional.avg_pool2d."""
    kernel, stride, padding, _, out_hw = _window_args(input, kernel_size, stride, padding, 1,
                                                      ceil_mode)
    if divisor_override is not None and (not isinstance(divisor_override, int)
                                         or divisor_override == 0):
        raise ValueError(f"divisor_override: expected a non-zero int or None, got "
                         f"{divisor_override!r}")
    args = (kernel, stride, padding, bool(count_include_pad), int(divisor_override or 0))
    return _avg(input, args, out_hw)


def adaptive_avg_pool2d(input, output_size):
    """torch.nn.functional.adaptive_avg_pool2d: output (H, W) (an int for both; None keeps the
    input's size in that dimension)."""
    _check_input(input)
    sizes = (output_size, output_size) if not isinstance(output_size, (tuple, list)) else output_size
    if len(sizes) != 2:
        raise ValueError(f"output_size: expected an int or a pair, got {output_size!r}")
    sizes = tuple(input.shape[-2 + i] if s is None else s for i, s in enumerate(sizes))
    out_hw = pair("output_size", sizes, 1)
    return _avg(input, (), out_hw)


def _avg(input, args, out_hw):
    x, fmt, unbatched = _prepare(input)
    kern = backends.kernels_for("pool", x.device, x.dtype)
    if _needs_grad(x):
        out = AvgPool2d.apply(x, kern, args, out_hw, fmt)
    else:
        out = _empty_out(x, out_hw, fmt)
        if args:
            kern.avg_pool2d_forward(x, out, *args)
        else:
            kern.adaptive_avg_pool2d_forward(x, out)
    return _squeeze(out, unbatched)
