"""The fused conv block: ``max_pool2d(act(conv2d(x, W) + b), 2)`` as one op.

Every layer of a classic CNN is this block. Fused, it keeps only the pooled output, the pooling
indices (1-byte window codes where the kernels take them) and (for gelu/silu, whose derivative
needs the pre-activation) the pre-activation at the winning taps: a quarter of what the unfused
sequence keeps, and its backward runs the activation derivative on the pooled quarter only.

Backward, with ``g = dL/dy`` on the pooled output and ``i`` the winning taps:

- ``dz_pooled = g * act'(z_i)``: act'(z_i) from the pooled output itself (relu, sigmoid, ... :
  the winner's activation *is* the pooled value) or from the saved pre-activation at i. The
  same pass reduces ``db = sum dz_pooled`` (dz is zero off the winners).
- ``dz = scatter(dz_pooled, i)`` into the convolution's output shape: max_pool2d's backward
  kernel (deterministic, zeros elsewhere, including rows and columns the floor-mode pooling
  drops).
- ``dx`` and ``dW`` exactly as for conv2d (brainkern/ops/conv.py).

A backend may instead take ``dz_pooled`` and the indices straight to ``dx`` and ``dW``,
``conv2d_maxpool2d_backward``: dz is zero off the winners, so their products alone (a quarter
of the dense convolutions' multiply-adds) give the same gradients, and the full-size dz is
never written. For the activations it lists in ``POOLED_ACTIVATIONS`` (relu, leaky_relu) it
also takes ``g`` and the pooled output and applies ``act'`` and reduces ``db`` as it reads
them, so that ``dz_pooled`` is never written either (the stem's relu backward was a tenth of
its fused step).

A backend may fuse the forward in one kernel, ``conv2d_maxpool2d_forward`` (interface in
brainkern/kernels/__init__.py); otherwise it is its conv2d and max_pool2d kernels in sequence
over a scratch output that is not kept. In a graph (torch.compile, export), under torch.func
transforms and on meta tensors the block is the unfused sequence of brainkern ops.
"""

from __future__ import annotations

import torch

from brainkern import activations
from brainkern.activations import Activation
from brainkern.ops import _dispatch, conv, pool
from brainkern.ops._conv_geometry import ConvGeometry, conv2d_geometry, memory_format

_POOL_ARGS = ((2, 2), (2, 2), (0, 0), (1, 1))  # kernel, stride, padding, dilation


def _forward(conv_kern, pool_kern, x, weight, bias, geometry: ConvGeometry, act, fmt,
             for_backward=True):
    """(pooled out, indices, saved pre-activation at the winners or None). Without
    ``for_backward`` a fused kernel records no winners (indices and pre are None)."""
    n, c_out = x.shape[0], weight.shape[0]
    pooled_hw = (geometry.out_hw[0] // 2, geometry.out_hw[1] // 2)
    out = torch.empty((n, c_out, *pooled_hw), dtype=x.dtype, device=x.device, memory_format=fmt)
    keeps_pre = act is not None and not act.saves_output
    fused = getattr(conv_kern, "conv2d_maxpool2d_forward", None)
    code, param = (activations.NONE, 0.0) if act is None else (act.code, act.param)
    records = for_backward or fused is None  # the unfused pooling always writes indices
    # Window codes (an eighth of int64 indices' bytes: 4 MB less to allocate and write for the
    # CNN's stem) where the kernels that write and read them take them; the unfused sequence
    # gathers the pre-activation by torch's indices.
    codes = getattr(pool_kern, "WINDOW_CODES", False) and (
        getattr(conv_kern, "WINDOW_CODES", False) if fused is not None else not keeps_pre)
    indices = (torch.empty_like(out, dtype=torch.uint8 if codes else torch.int64) if records
               else None)
    pre = torch.empty_like(out) if keeps_pre and records else None
    if fused is not None:
        fused(x, weight, bias, out, indices, pre, geometry.out_hw, *geometry.kernel_args, code,
              param)
        return out, indices, pre
    full = torch.empty((n, c_out, *geometry.out_hw), dtype=x.dtype, device=x.device,
                       memory_format=fmt)
    full_pre = torch.empty_like(full) if keeps_pre else None
    conv_kern.conv2d_forward(x, weight, bias, full, full_pre, *geometry.kernel_args, code, param)
    pool_kern.max_pool2d_forward(full, out, indices, *_POOL_ARGS)
    if keeps_pre:
        planes = full_pre.flatten(2)  # (n, c, h * w) view of either format
        pre.copy_(planes.gather(2, indices.flatten(2)).view_as(pre))
    return out, indices, pre


def _backward(conv_kern, pool_kern, grad_out, x, weight, out, indices, pre, geometry, act, fmt,
              needs):
    need_x, need_w, need_b = needs
    # act'(z) at the winners: from the pooled output or the winners' pre-activation.
    saved = out if act is None or act.saves_output else pre
    sparse = getattr(conv_kern, "conv2d_maxpool2d_backward", None)
    if (sparse is not None and need_w and act is not None and act.saves_output
            and act.code in getattr(conv_kern, "POOLED_ACTIVATIONS", ())):
        # The kernel applies act' itself as it reads g: no pass (nor tensor) for dz_pooled.
        grad_out = grad_out.contiguous(memory_format=fmt)
        grad_x = torch.empty_like(x) if need_x else None
        grad_w = torch.empty_like(weight)
        grad_b = grad_out.new_empty(weight.shape[0]) if need_b else None
        if sparse(grad_out, indices, x, weight, grad_x, grad_w, geometry.out_hw,
                  *geometry.kernel_args, saved=out, act_code=act.code, act_param=act.param,
                  grad_bias=grad_b):
            return grad_x, grad_w, grad_b
    grad_pooled, grad_b = conv.activation_backward(conv_kern, grad_out, saved, act, need_b, fmt)
    grad_x = grad_w = None
    if (need_x or need_w) and sparse is not None:
        # dz is zero but at the winners: a backend may sum the winners' products alone.
        grad_x = torch.empty_like(x) if need_x else None
        grad_w = torch.empty_like(weight) if need_w else None
        if sparse(grad_pooled, indices, x, weight, grad_x, grad_w, geometry.out_hw,
                  *geometry.kernel_args):
            return grad_x, grad_w, grad_b
    if need_x or need_w:
        grad_pre = torch.empty((x.shape[0], weight.shape[0], *geometry.out_hw), dtype=x.dtype,
                               device=x.device, memory_format=fmt)
        pool_kern.max_pool2d_backward(grad_pooled, indices, grad_pre, *_POOL_ARGS)
        grad_x, grad_w = conv.linear_backward(conv_kern, grad_pre, x, weight, geometry, need_x,
                                              need_w)
    return grad_x, grad_w, grad_b


class FusedConvMaxPool(torch.autograd.Function):
    """The block's eager path; the derivation is in the module docstring."""

    @staticmethod
    def forward(ctx, x, weight, bias, geometry, act: Activation | None, kerns, fmt):
        out, indices, pre = _forward(*kerns, x, weight, bias, geometry, act, fmt)
        ctx.geometry, ctx.act, ctx.kerns, ctx.fmt = geometry, act, kerns, fmt
        ctx.save_for_backward(x, weight, bias, out, indices, pre)
        ctx.mark_non_differentiable(indices)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, out, indices, pre = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph: differentiate the unfused torch sequence
            inputs = [t for t, need in zip((x, weight, bias), needs) if need]
            y = torch.nn.functional.max_pool2d(
                conv.with_torch_ops(x, weight, bias, ctx.geometry, ctx.act), 2)
            grads = iter(torch.autograd.grad(y, inputs, grad_out, create_graph=True))
            grads = tuple(next(grads) if need else None for need in needs)
        else:
            grads = _backward(*ctx.kerns, grad_out, x, weight, out, indices, pre, ctx.geometry,
                              ctx.act, ctx.fmt, needs)
        return (*grads, None, None, None, None)


_apply = _dispatch.c_apply(FusedConvMaxPool)


def conv2d_maxpool2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1,
                     activation=None):
    """``max_pool2d(act(conv2d(input, weight, bias, ...)), 2)`` in one op: what
    brainkern.accelerate uses for a Conv2d with activation followed by MaxPool2d(2)."""
    act = activations.resolve(activation)
    geometry = conv2d_geometry(input, weight, bias, stride, padding, dilation, groups)
    if (min(geometry.out_hw) < 2 or _dispatch.in_graph() or _dispatch.transforms_active()
            or input.device.type == "meta" or _dispatch.any_autocast()):
        return pool.max_pool2d(conv.conv2d(input, weight, bias, stride, padding, dilation,
                                           groups, act), 2)
    unbatched = input.dim() == 3
    x = input.unsqueeze(0) if unbatched else input
    fmt = memory_format(x, weight)
    x, weight = x.contiguous(memory_format=fmt), weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    kerns = (_dispatch.kernels_for("conv", x.device, x.dtype),
             _dispatch.kernels_for("pool", x.device, x.dtype))
    if _dispatch.grad_enabled() and (x.requires_grad or weight.requires_grad
                                     or (bias is not None and bias.requires_grad)):
        out = _apply(x, weight, bias, geometry, act, kerns, fmt)
    else:
        out = _forward(*kerns, x, weight, bias, geometry, act, fmt, for_backward=False)[0]
    return out.squeeze(0) if unbatched else out
