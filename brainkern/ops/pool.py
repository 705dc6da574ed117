"""Max, average and adaptive average 2-D pooling, forward and backward.

The torch-facing layer: torch's argument rules and output-size arithmetic (ceil_mode is resolved
here: kernels get the output's size), the autograd.Functions, and the memory format (the output
keeps the input's, NCHW or channels_last, as torch's does).
"""

from __future__ import annotations

import torch

from brainkern.ops import _dispatch
from brainkern.ops._checks import check_tensor
from brainkern.ops._conv_geometry import memory_format, pair

_CHANNELS_LAST = torch.channels_last
_MAX_CODE_TAPS = 256  # windows whose every tap has a uint8 window code


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
    return _dispatch.grad_enabled() and x.requires_grad


def _max_forward(kern, x, args, out_hw, fmt, index_dtype=torch.int64):
    """index_dtype: int64 (torch's indices), uint8 (window codes) or None (no indices)."""
    out = _empty_out(x, out_hw, fmt)
    indices = None if index_dtype is None else _empty_out(x, out_hw, fmt, index_dtype)
    kern.max_pool2d_forward(x, out, indices, *args)
    return out, indices


def _max_backward(kern, grad_out, indices, x_shape, fmt, window):
    """window: the forward's (kernel_size, stride, padding, dilation)."""
    grad_out = grad_out.contiguous(memory_format=fmt)
    grad_x = torch.empty(x_shape, dtype=grad_out.dtype, device=grad_out.device,
                         memory_format=fmt)
    kern.max_pool2d_backward(grad_out, indices, grad_x, *window)
    return grad_x


def _avg_forward(kern, x, args, out_hw, fmt):
    """args: avg_pool2d's (kernel, stride, padding, count_include_pad, divisor), or () for
    adaptive_avg_pool2d's windows."""
    out = _empty_out(x, out_hw, fmt)
    if args:
        kern.avg_pool2d_forward(x, out, *args)
    else:
        kern.adaptive_avg_pool2d_forward(x, out)
    return out


def _avg_backward(kern, grad_out, args, x_shape, fmt):
    grad_out = grad_out.contiguous(memory_format=fmt)
    grad_x = torch.empty(x_shape, dtype=grad_out.dtype, device=grad_out.device,
                         memory_format=fmt)
    if args:
        kern.avg_pool2d_backward(grad_out, grad_x, *args)
    else:
        kern.adaptive_avg_pool2d_backward(grad_out, grad_x)
    return grad_x


class MaxPool2d(torch.autograd.Function):
    """``y = max over each window``. Backward: ``dx`` = the sum of dy over the windows whose
    maximum each element was, scattered through the indices the forward saved (a kernel, not
    atomics, so the result is the same on any thread count): torch's int64 indices, or uint8
    window codes when the caller does not want the indices (index_dtype). Backward is linear in
    dy, so create_graph needs nothing more: the gradient of the gradient is this op again."""

    @staticmethod
    def forward(ctx, x, kern, args, out_hw, fmt, index_dtype):
        out, indices = _max_forward(kern, x, args, out_hw, fmt, index_dtype)
        ctx.kern, ctx.fmt, ctx.x_shape, ctx.window = kern, fmt, x.shape, args
        ctx.save_for_backward(indices)
        ctx.mark_non_differentiable(indices)
        # The indices get no gradient: without this autograd would fill a zero tensor for them
        # at every backward (a tenth of a millisecond on the CNN's pooling).
        ctx.set_materialize_grads(False)
        return out, indices

    @staticmethod
    def backward(ctx, grad_out, _grad_indices):
        if grad_out is None:  # out was not used
            return (None,) * 6
        (indices,) = ctx.saved_tensors
        grad_x = _max_backward(ctx.kern, grad_out, indices, ctx.x_shape, ctx.fmt, ctx.window)
        return grad_x, None, None, None, None, None


class AvgPool2d(torch.autograd.Function):
    """``y = sum over each window / its divisor``; backward spreads dy / divisor over each
    window's taps (the adjoint), in the forward's memory format."""

    @staticmethod
    def forward(ctx, x, kern, args, out_hw, fmt):
        ctx.kern, ctx.args, ctx.fmt, ctx.x_shape = kern, args, fmt, x.shape
        return _avg_forward(kern, x, args, out_hw, fmt)

    @staticmethod
    def backward(ctx, grad_out):
        return _avg_backward(ctx.kern, grad_out, ctx.args, ctx.x_shape, ctx.fmt), None, None, \
            None, None


_max_apply = _dispatch.c_apply(MaxPool2d)
_avg_apply = _dispatch.c_apply(AvgPool2d)


def _apply(apply, x, *args):
    """apply(x, *args); x unwrapped and the call run again when x is a dead functorch wrapper
    (see _dispatch.unwrap_dead)."""
    try:
        return apply(x, *args)
    except RuntimeError:
        unwrapped = _dispatch.unwrap_dead(x)
        if unwrapped is None:
            raise
        return apply(unwrapped[0], *args)


# The registered ops: what torch.compile and torch.export see (and meta tensors run).

def _fmt(channels_last):
    return _CHANNELS_LAST if channels_last else torch.contiguous_format


def _max_op_forward(kern, x, kernel, stride, padding, dilation, out_hw, channels_last):
    fmt = _fmt(channels_last)
    args = (tuple(kernel), tuple(stride), tuple(padding), tuple(dilation))
    return _max_forward(kern, x.contiguous(memory_format=fmt), args, tuple(out_hw), fmt)


def _max_op_fake(x, kernel, stride, padding, dilation, out_hw, channels_last):
    fmt = _fmt(channels_last)
    return _empty_out(x, out_hw, fmt), _empty_out(x, out_hw, fmt, torch.int64)


_max_op = _dispatch.define(
    "max_pool2d", "(str backend, Tensor x, int[] kernel_size, int[] stride, int[] padding, "
    "int[] dilation, int[] out_hw, bool channels_last) -> (Tensor, Tensor)",
    family="pool", impl=_max_op_forward, fake=_max_op_fake)


def _max_backward_impl(kern, grad_out, indices, x_shape, kernel, stride, padding, dilation,
                       channels_last):
    window = (tuple(kernel), tuple(stride), tuple(padding), tuple(dilation))
    return _max_backward(kern, grad_out, indices, x_shape, _fmt(channels_last), window)


def _max_backward_fake(grad_out, indices, x_shape, kernel, stride, padding, dilation,
                       channels_last):
    return grad_out.new_empty(x_shape).contiguous(memory_format=_fmt(channels_last))


_max_backward_op = _dispatch.define(
    "max_pool2d_backward", "(str backend, Tensor grad_out, Tensor indices, int[] x_shape, "
    "int[] kernel_size, int[] stride, int[] padding, int[] dilation, bool channels_last) -> "
    "Tensor", family="pool", impl=_max_backward_impl,
    fake=_max_backward_fake)


def _max_setup_context(ctx, inputs, output):
    ctx.backend, x, *ctx.window, _, ctx.channels_last = inputs
    ctx.x_shape = list(x.shape)
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # as MaxPool2d's


def _max_op_autograd(ctx, grad_out, _grad_indices):
    if grad_out is None:
        return (None,) * 8
    (indices,) = ctx.saved_tensors
    grad_x = _max_backward_op(ctx.backend, grad_out, indices, ctx.x_shape, *ctx.window,
                              ctx.channels_last)
    return None, grad_x, None, None, None, None, None, None


torch.library.register_autograd(_max_op, _max_op_autograd, setup_context=_max_setup_context)

# avg_pool2d and adaptive_avg_pool2d: one op, adaptive when kernel_size is empty.
_AVG_PARAMS = ("int[] kernel_size, int[] stride, int[] padding, bool count_include_pad, "
               "int divisor, int[] out_hw, bool channels_last")


def _avg_args(kernel, stride, padding, count_include_pad, divisor):
    if not kernel:
        return ()
    return tuple(kernel), tuple(stride), tuple(padding), count_include_pad, divisor


def _avg_op_forward(kern, x, *params):
    fmt = _fmt(params[-1])
    return _avg_forward(kern, x.contiguous(memory_format=fmt), _avg_args(*params[:5]),
                        tuple(params[5]), fmt)


def _avg_op_fake(x, *params):
    return _empty_out(x, params[5], _fmt(params[-1]))


_avg_op = _dispatch.define(
    "avg_pool2d", f"(str backend, Tensor x, {_AVG_PARAMS}) -> Tensor",
    family="pool", impl=_avg_op_forward, fake=_avg_op_fake)


def _avg_backward_impl(kern, grad_out, x_shape, *params):
    return _avg_backward(kern, grad_out, _avg_args(*params[:5]), x_shape, _fmt(params[-1]))


def _avg_backward_fake(grad_out, x_shape, *params):
    return grad_out.new_empty(x_shape).contiguous(memory_format=_fmt(params[-1]))


_avg_backward_op = _dispatch.define(
    "avg_pool2d_backward", f"(str backend, Tensor grad_out, int[] x_shape, {_AVG_PARAMS}) -> "
    "Tensor", family="pool", impl=_avg_backward_impl, fake=_avg_backward_fake)


def _avg_setup_context(ctx, inputs, output):
    ctx.backend, x, *ctx.params = inputs
    ctx.x_shape = list(x.shape)


def _avg_op_autograd(ctx, grad_out):
    grad_x = _avg_backward_op(ctx.backend, grad_out, ctx.x_shape, *ctx.params)
    return (None, grad_x, *(None,) * len(ctx.params))


torch.library.register_autograd(_avg_op, _avg_op_autograd, setup_context=_avg_setup_context)


def _kernels_or_graph(x):
    """The pool kernel module for eager calls, or None: run the registered op (in a graph, or
    on meta tensors, whose shapes its fake implementation gives)."""
    if _dispatch.in_graph():
        return None
    try:
        return _dispatch.kernels_for("pool", x.device, x.dtype)
    except RuntimeError:
        if x.device.type != "meta":
            raise
        return None


def _backend(x):
    return _dispatch.graph_backend("pool", x.device, x.dtype)


def _with_torch_ops(name, *args):
    """Under torch.func transforms (grad, vmap, ...; compiled or not) the kernels cannot read the
    transformed tensors and the registered ops cannot be vmapped: torch's own pooling runs."""
    return getattr(torch.nn.functional, name)(*args)


def _squeeze(t, unbatched):
    return t.squeeze(0) if unbatched else t


def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
               return_indices=False):
    """torch.nn.functional.max_pool2d: NaN wins a window, as in torch; indices are torch's
    (flat ``h * W + w`` in each plane, usable by max_unpool2d)."""
    *args, out_hw = _window_args(input, kernel_size, stride, padding, dilation, ceil_mode)
    if _dispatch.transforms_active():  # torch.func: see _with_torch_ops
        return _with_torch_ops("max_pool2d", input, kernel_size, stride, padding, dilation,
                               ceil_mode, return_indices)
    x, fmt, unbatched = _prepare(input)
    kern = _kernels_or_graph(x)
    if kern is None:
        out, indices = _max_op(_backend(x), x, *(list(a) for a in args), list(out_hw),
                               fmt is _CHANNELS_LAST)
    elif _needs_grad(x):
        codes = (not return_indices and getattr(kern, "WINDOW_CODES", False)
                 and args[0][0] * args[0][1] <= _MAX_CODE_TAPS)
        out, indices = _apply(_max_apply, x, kern, tuple(args), out_hw, fmt,
                              torch.uint8 if codes else torch.int64)
    else:
        out, indices = _max_forward(kern, x, args, out_hw, fmt,
                                    torch.int64 if return_indices else None)
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
    if _dispatch.transforms_active():
        return _with_torch_ops("avg_pool2d", input, kernel_size, stride, padding, ceil_mode,
                               count_include_pad, divisor_override)
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
    if _dispatch.transforms_active():
        return _with_torch_ops("adaptive_avg_pool2d", input, out_hw)
    return _avg(input, (), out_hw)


def _avg(input, args, out_hw):
    x, fmt, unbatched = _prepare(input)
    kern = _kernels_or_graph(x)
    if kern is None:
        kernel, stride, padding, include_pad, divisor = args or ((), (), (), False, 0)
        out = _avg_op(_backend(x), x, list(kernel), list(stride), list(padding), include_pad,
                      divisor, list(out_hw), fmt is _CHANNELS_LAST)
    elif _needs_grad(x):
        out = _apply(_avg_apply, x, kern, args, out_hw, fmt)
    else:
        out = _avg_forward(kern, x, args, out_hw, fmt)
    return _squeeze(out, unbatched)
