"""2-D convolution and transposed convolution with a fused bias + activation, and their backward.

The torch-facing layer: the eager autograd.Function, the ``brainkern::conv2d`` ops that graphs
see (brainkern/ops/_dispatch.py) and the public functions. Argument checks and shapes:
brainkern/ops/_conv_geometry.py. Kernels take plain arguments (brainkern/kernels/__init__.py).
"""

from __future__ import annotations

import torch

from brainkern import activations
from brainkern.activations import Activation
from brainkern.kernels.reference import conv as torch_conv
from brainkern.ops import _dispatch
from brainkern.ops._conv_geometry import (
    ConvGeometry,
    conv2d_geometry,
    conv_transpose2d_geometry,
    memory_format,
)

_CHANNELS_LAST = torch.channels_last
_CONTIGUOUS = torch.contiguous_format


def _forward(kern, x, weight, bias, geometry: ConvGeometry, act: Activation | None, fmt):
    """Run the forward kernel; returns (out, what backward keeps for the activation or None)."""
    c_out = weight.shape[1] * geometry.groups if geometry.transposed else weight.shape[0]
    out = torch.empty((x.shape[0], c_out, *geometry.out_hw), dtype=x.dtype, device=x.device,
                      memory_format=fmt)
    run = kern.conv_transpose2d_forward if geometry.transposed else kern.conv2d_forward
    code, param = (activations.NONE, 0.0) if act is None else (act.code, act.param)
    pre = None if act is None or act.saves_output else torch.empty_like(out)
    run(x, weight, bias, out, pre, *geometry.kernel_args, code, param)
    return out, (None if act is None else out if pre is None else pre)


def activation_backward(kern, grad_out, saved, act, need_b, fmt):
    """``(dz, db)``: ``dz = grad_out * act'(z)`` in ``fmt`` (grad_out itself without an
    activation) and, when ``need_b``, ``db = dz.sum((0, 2, 3))`` from the same pass."""
    grad_out = grad_out.contiguous(memory_format=fmt)
    grad_b = grad_out.new_empty(grad_out.shape[1]) if need_b else None
    if act is None:
        if need_b:
            acc = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
            grad_b.copy_(grad_out.sum((0, 2, 3), dtype=acc))
        return grad_out, grad_b
    grad_pre = torch.empty_like(grad_out)
    kern.conv2d_activation_backward(grad_out, saved, grad_pre, grad_b, act.code, act.param,
                                    act.saves_output)
    return grad_pre, grad_b


def linear_backward(kern, grad_pre, x, weight, geometry: ConvGeometry, need_x, need_w):
    """``(dx, dW)`` of the convolution's linear part given ``dz`` (each None if not wanted)."""
    args = geometry.kernel_args
    grad_x = grad_w = None
    if need_x:
        grad_x = torch.empty_like(x)
        adjoint = kern.conv2d_forward if geometry.transposed else kern.conv_transpose2d_forward
        adjoint(grad_pre, weight, None, grad_x, None, *args, activations.NONE, 0.0)
    if need_w:
        grad_w = torch.empty_like(weight)
        if geometry.transposed:
            kern.conv2d_backward_weight(x, grad_pre, grad_w, *args)
        else:
            kern.conv2d_backward_weight(grad_pre, x, grad_w, *args)
    return grad_x, grad_w


def _backward(kern, grad_out, x, weight, saved, geometry: ConvGeometry, act, fmt, needs):
    """Gradients (x, weight, bias), each None where ``needs`` says it is not wanted: see
    FusedConv2d's docstring."""
    need_x, need_w, need_b = needs
    fused = getattr(kern, "conv2d_activation_backward_weight", None)
    if fused is not None and act is not None and need_w and not need_x and not geometry.transposed:
        # A stem: dz feeds the weight gradient alone, which computes it where it reads it.
        grad_out = grad_out.contiguous(memory_format=fmt)
        grad_w = torch.empty_like(weight)
        grad_b = grad_out.new_empty(grad_out.shape[1]) if need_b else None
        fused(grad_out, saved, x, grad_w, grad_b, *geometry.kernel_args, act.code, act.param,
              act.saves_output)
        return None, grad_w, grad_b
    grad_pre, grad_b = activation_backward(kern, grad_out, saved, act, need_b, fmt)
    return (*linear_backward(kern, grad_pre, x, weight, geometry, need_x, need_w), grad_b)


def with_torch_ops(x, weight, bias, geometry: ConvGeometry, act: Activation | None):
    """The layer in torch's own differentiable ops (double backward, torch.func transforms)."""
    op = torch_conv.conv_transpose2d if geometry.transposed else torch_conv.conv2d
    z = op(x, weight, bias, geometry.out_hw, *geometry.kernel_args)
    return z if act is None else act.forward(z)


def _differentiable_backward(grad_out, x, weight, bias, geometry, act, needs):
    """backward(create_graph=True): the kernels' gradients are not differentiable, so the layer
    is recomputed with torch's ops and differentiated by autograd (gradient penalties get exact
    higher derivatives)."""
    inputs = [t for t, need in zip((x, weight, bias), needs) if need]
    y = with_torch_ops(x, weight, bias, geometry, act)
    grads = iter(torch.autograd.grad(y, inputs, grad_out, create_graph=True))
    return tuple(next(grads) if need else None for need in needs)


class FusedConv2d(torch.autograd.Function):
    """``y = act(z)``, ``z = conv(x, W) + b`` where conv is conv2d or, for a transposed
    convolution, its adjoint conv2d^T (both linear in x and in W): the eager path.

    Backward, with ``g = dL/dy`` (the output's shape):

    - ``dz = g * act'(z)``, one fused pass that also reduces ``db = sum over n, h, w of dz``;
      act' from the saved output or pre-activation, as for Linear. Without activation dz = g.
    - ``dx = conv^T(dz, W)``: the adjoint of the forward's linear map, i.e. conv2d's input
      gradient is the transposed-convolution kernel and a transposed convolution's is conv2d.
    - ``dW``: conv2d_backward_weight(dz, x) for conv2d; for conv2d^T the same kernel with the
      roles of its input and output exchanged, conv2d_backward_weight(x, dz), since
      ``<conv^T(x, W), dz> = <x, conv(dz, W)>``.

    All three are written in the forward's memory format (NCHW or channels_last), so the kernels
    never see a third layout; grad_out is brought into it once. The registered ops
    ``brainkern::conv2d`` / ``conv2d_backward`` (for graphs) run the same _forward and _backward.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, geometry: ConvGeometry, act: Activation | None, kern, fmt):
        out, saved = _forward(kern, x, weight, bias, geometry, act, fmt)
        ctx.geometry, ctx.act, ctx.kern, ctx.fmt = geometry, act, kern, fmt
        ctx.save_for_backward(x, weight, bias, saved)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, saved = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():
            grads = _differentiable_backward(grad_out, x, weight, bias, ctx.geometry, ctx.act,
                                             needs)
        else:
            grads = _backward(ctx.kern, grad_out, x, weight, saved, ctx.geometry, ctx.act,
                              ctx.fmt, needs)
        return (*grads, None, None, None, None)


_apply_function = _dispatch.c_apply(FusedConv2d)


# The registered ops: what torch.compile and torch.export see (and meta tensors run). The
# geometry and the memory format travel as schema constants.

_CONV_PARAMS = ("int[] stride, int[] padding, int[] dilation, int groups, int[] out_hw, "
                "bool transposed, bool channels_last, int act_code, float act_param")


def _unpack(stride, padding, dilation, groups, out_hw, transposed, channels_last, act_code,
            act_param):
    geometry = ConvGeometry(tuple(stride), tuple(padding), tuple(dilation), groups,
                            tuple(out_hw), transposed)
    act = None if act_code == activations.NONE else Activation("", act_code, act_param)
    return geometry, act, _CHANNELS_LAST if channels_last else _CONTIGUOUS


def _pack(geometry: ConvGeometry, act, fmt):
    code, param = (activations.NONE, 0.0) if act is None else (act.code, act.param)
    return (list(geometry.stride), list(geometry.padding), list(geometry.dilation),
            geometry.groups, list(geometry.out_hw), geometry.transposed,
            fmt is _CHANNELS_LAST, code, param)


def _op_forward(kern, x, weight, bias, *params):
    geometry, act, fmt = _unpack(*params)
    # A compiled graph passes its own tensors: bring them to the layouts the kernels take.
    x, weight = x.contiguous(memory_format=fmt), weight.contiguous()
    out, saved = _forward(kern, x, weight, None if bias is None else bias.contiguous(),
                          geometry, act, fmt)
    # An op's outputs may not alias each other: the output saved as itself is returned once.
    return out, (x.new_empty(0) if saved is None or saved is out else saved)


def _fake_forward(x, weight, bias, *params):
    geometry, act, fmt = _unpack(*params)
    c_out = weight.shape[1] * geometry.groups if geometry.transposed else weight.shape[0]
    out = x.new_empty((x.shape[0], c_out, *geometry.out_hw)).contiguous(memory_format=fmt)
    keeps_pre = act is not None and not act.saves_output
    return out, (torch.empty_like(out) if keeps_pre else x.new_empty(0))


_conv_op = _dispatch.define(
    "conv2d", f"(str backend, Tensor x, Tensor weight, Tensor? bias, {_CONV_PARAMS}) -> "
    "(Tensor, Tensor)", family="conv", impl=_op_forward, fake=_fake_forward)


def _op_backward(kern, grad_out, x, weight, saved, needs, *params):
    geometry, act, fmt = _unpack(*params)
    x, weight = x.contiguous(memory_format=fmt), weight.contiguous()
    grads = _backward(kern, grad_out, x, weight, saved, geometry, act, fmt, needs)
    return [g for g in grads if g is not None]


def _fake_backward(grad_out, x, weight, saved, needs, *params):
    shapes = (x, weight, grad_out.new_empty(grad_out.shape[1]))
    return [torch.empty_like(t) for t, need in zip(shapes, needs) if need]


_conv_backward_op = _dispatch.define(
    "conv2d_backward", "(str backend, Tensor grad_out, Tensor x, Tensor weight, Tensor? saved, "
    f"bool[] needs, {_CONV_PARAMS}) -> Tensor[]", family="conv", impl=_op_backward,
    fake=_fake_backward)


def _setup_context(ctx, inputs, output):
    backend, x, weight, bias, *params = inputs
    out, extra = output
    geometry, act, _ = _unpack(*params)
    saved = None if act is None else out if act.saves_output else extra
    ctx.backend, ctx.params = backend, params
    ctx.save_for_backward(x, weight, bias, saved)


def _op_autograd(ctx, grad_out, _grad_extra):
    x, weight, bias, saved = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[1:4])
    if torch.is_grad_enabled():
        geometry, act, _ = _unpack(*ctx.params)
        grads = _differentiable_backward(grad_out, x, weight, bias, geometry, act, needs)
    else:
        computed = iter(_conv_backward_op(ctx.backend, grad_out, x, weight, saved, needs,
                                          *ctx.params))
        grads = tuple(next(computed) if need else None for need in needs)
    return (None, *grads, *(None,) * len(ctx.params))


torch.library.register_autograd(_conv_op, _op_autograd, setup_context=_setup_context)


def _in_graph(x, weight, bias, geometry, act, fmt):
    """The layer as one ``brainkern::conv2d`` node, its backend fixed now."""
    backend = _dispatch.graph_backend("conv", x.device, x.dtype)
    return _conv_op(backend, x, weight, bias, *_pack(geometry, act, fmt))[0]


def _apply(input, weight, bias, geometry: ConvGeometry, activation):
    """Run a checked convolution: layouts for the kernels, the backend, autograd or not."""
    act = activations.resolve(activation)
    unbatched = input.dim() == 3
    x = input.unsqueeze(0) if unbatched else input
    fmt = memory_format(x, weight)
    # Every 4-D tensor a kernel gets is dense in this one format (see kernels/__init__.py).
    x = x.contiguous(memory_format=fmt)
    weight = weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    if _dispatch.transforms_active():
        # torch.func transforms (also when compiled): the kernels cannot read transformed
        # tensors (no data pointer), and the registered op cannot be vmapped.
        out = with_torch_ops(x, weight, bias, geometry, act)
    elif _dispatch.in_graph():
        out = _in_graph(x, weight, bias, geometry, act, fmt)
    else:
        try:
            kern = _dispatch.kernels_for("conv", x.device, x.dtype)
        except RuntimeError:
            if x.device.type != "meta":
                raise
            out = _in_graph(x, weight, bias, geometry, act, fmt)  # shapes only
        else:
            out = _run(kern, x, weight, bias, geometry, act, fmt)
    return out.squeeze(0) if unbatched else out


def _run(kern, x, weight, bias, geometry, act, fmt):
    """Through FusedConv2d when a gradient is wanted, else the bare kernel; a dead functorch
    wrapper (no data pointer) is unwrapped and tried once more."""
    try:
        if _dispatch.grad_enabled() and (x.requires_grad or weight.requires_grad
                                         or (bias is not None and bias.requires_grad)):
            return _apply_function(x, weight, bias, geometry, act, kern, fmt)
        return _forward(kern, x, weight, bias, geometry, act, fmt)[0]
    except RuntimeError:
        unwrapped = _dispatch.unwrap_dead(x, weight, bias)
        if unwrapped is None:
            raise
        return _run(kern, *unwrapped, geometry, act, fmt)


def _autocast(input, weight, bias):
    """Under torch.autocast, the autocast dtype for all three, as F.conv2d does."""
    if _dispatch.any_autocast() and isinstance(input, torch.Tensor):
        return _dispatch.autocast(input, weight, bias)
    return input, weight, bias


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, activation=None):
    """``act(conv2d(input, weight) + bias)``, with torch.nn.functional.conv2d's arguments.

    input (N, C_in, H, W) or (C_in, H, W); weight (C_out, C_in / groups, kH, kW); bias (C_out,).
    padding: int, pair, "valid" or "same". The output is channels_last when input or weight is.
    """
    input, weight, bias = _autocast(input, weight, bias)
    geometry = conv2d_geometry(input, weight, bias, stride, padding, dilation, groups)
    return _apply(input, weight, bias, geometry, activation)


def conv_transpose2d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1,
                     dilation=1, activation=None, output_size=None):
    """``act(conv_transpose2d(input, weight) + bias)``, torch.nn.functional's arguments, plus
    ``output_size`` (as nn.ConvTranspose2d's forward takes it) to choose output_padding.

    input (N, C_in, H, W) or (C_in, H, W); weight (C_in, C_out / groups, kH, kW); bias (C_out,).
    """
    input, weight, bias = _autocast(input, weight, bias)
    geometry = conv_transpose2d_geometry(input, weight, bias, stride, padding, output_padding,
                                         groups, dilation, output_size)
    return _apply(input, weight, bias, geometry, activation)
