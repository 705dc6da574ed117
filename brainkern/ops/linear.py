"""Matrix multiplication with a fused epilogue: ``act(x @ W^T + b)``, and its backward.

The torch-facing layer: argument checks, shape arithmetic and the autograd.Function. Kernels are
found through brainkern.backends and take plain arguments (see brainkern/kernels/__init__.py).
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from brainkern import activations, backends
from brainkern.activations import Activation
from brainkern.ops._checks import check_same_kind, check_tensor


class FusedLinear(torch.autograd.Function):
    """``y = act(z)``, ``z = x @ W^T + b`` with x (M, K), W (N, K), b (N,).

    Backward, with ``g = dL/dy`` (M, N):

    - ``dz = g * act'(z)``: one fused pass that also reduces ``db = sum_m dz[m, :]``. act' comes
      from the saved output y for relu/leaky_relu/sigmoid/tanh (e.g. tanh' = 1 - y^2) and from
      the saved pre-activation z for gelu/silu; without an activation ``dz = g``.
    - ``dx = dz @ W``  (M, N) @ (N, K): the forward GEMM with ``b = W`` as stored.
    - ``dW = dz^T @ x`` (N, M) @ (M, K): the forward GEMM over transposed views; the kernels'
      packing reads any strides, so nothing is copied to transpose.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, act: Activation | None, backend: str):
        kern = backends.kernels(backend, "linear")
        out, saved = _forward(kern, x, weight, bias, act)
        ctx.act, ctx.kern = act, kern
        ctx.save_for_backward(x, weight, saved)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight, saved = ctx.saved_tensors
        kern, act = ctx.kern, ctx.act
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_bias = None
        if act is None:
            grad_pre = grad_out
            if need_b:
                acc = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
                grad_bias = grad_out.sum(0, dtype=acc).to(grad_out.dtype)
        else:
            grad_pre = torch.empty(grad_out.shape, dtype=x.dtype, device=x.device)
            grad_bias = torch.empty(weight.shape[0], dtype=x.dtype, device=x.device) if need_b else None
            kern.activation_backward(
                grad_out, saved, grad_pre, grad_bias, act.code, act.param, act.saves_output
            )
        grad_x = grad_w = None
        if need_x:
            grad_x = torch.empty_like(x, memory_format=torch.contiguous_format)
            kern.matmul_forward(grad_pre, weight, None, grad_x, None, activations.NONE, 0.0)
        if need_w:
            grad_w = torch.empty_like(weight, memory_format=torch.contiguous_format)
            kern.matmul_forward(grad_pre.t(), x, None, grad_w, None, activations.NONE, 0.0)
        return grad_x, grad_w, grad_bias, None, None


def _forward(kern, x, weight, bias, act):
    """Run the forward kernel; returns (out, what backward keeps for the activation or None)."""
    out = torch.empty((x.shape[0], weight.shape[0]), dtype=x.dtype, device=x.device)
    keeps_pre = act is not None and not act.saves_output
    pre = torch.empty_like(out) if keeps_pre else None
    code, param = activations.code_and_param(act)
    kern.matmul_forward(x, weight.t(), bias, out, pre, code, param)
    return out, (pre if keeps_pre else (out if act is not None else None))


def _autocast(*tensors):
    """Under torch.autocast, cast floating tensors to the autocast dtype, as F.linear does."""
    device_type = tensors[0].device.type
    if not (torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                 for t in tensors)


def linear(input, weight, bias=None, activation=None):
    """``act(input @ weight^T + bias)`` over any leading dimensions, as F.linear (+ activation).

    input (*, K) or (K,); weight (N, K); bias (N,) or None. Returns (*, N) or (N,).
    Under torch.autocast the operands are cast to the autocast dtype first, like F.linear.
    """
    check_tensor("input", input)
    input, weight, bias = _autocast(input, weight, bias)
    check_tensor("weight", weight, ndim=(2,))
    if bias is not None:
        check_tensor("bias", bias, ndim=(1,))
    check_same_kind("input", input, weight=weight, bias=bias)
    if input.dim() == 0:
        raise ValueError("input: expected at least 1 dimension, got a 0-D tensor")
    n, k = weight.shape
    if input.shape[-1] != k:
        raise ValueError(
            f"input: last dimension {input.shape[-1]} does not match weight's in_features {k} "
            f"(input shape {tuple(input.shape)}, weight shape {tuple(weight.shape)})"
        )
    if bias is not None and bias.shape[0] != n:
        raise ValueError(f"bias: expected shape ({n},) to match weight, got {tuple(bias.shape)}")
    act = activations.resolve(activation)
    backend = backends.select(input.device, input.dtype)
    lead = input.shape[:-1]
    x2d = input if input.dim() == 2 else input.reshape(math.prod(lead), k)
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    if torch.is_grad_enabled() and (
        input.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    ):
        out = FusedLinear.apply(x2d, weight, bias, act, backend)
    else:  # inference: skip autograd's bookkeeping, nothing will be saved
        out = _forward(backends.kernels(backend, "linear"), x2d, weight, bias, act)[0]
    return out if input.dim() == 2 else out.reshape(*lead, n)


def matmul(a, b):
    """``a @ b`` with torch.matmul's rules for 1-D, 2-D and batched operands."""
    check_tensor("a", a)
    check_tensor("b", b)
    check_same_kind("a", a, b=b)
    if a.dim() == 0 or b.dim() == 0:
        raise ValueError(
            f"matmul: both arguments need at least 1 dimension, got shapes {tuple(a.shape)} "
            f"and {tuple(b.shape)}"
        )
    k_b = b.shape[0] if b.dim() == 1 else b.shape[-2]
    if a.shape[-1] != k_b:
        raise ValueError(
            f"b: its reduction dimension {k_b} does not match a's last dimension {a.shape[-1]} "
            f"(shapes {tuple(a.shape)} and {tuple(b.shape)})"
        )
    if b.dim() <= 2:
        # b as a Linear weight (N, K): a (.., K) @ b (K, N) == linear(a, b^T).
        weight = b.unsqueeze(0) if b.dim() == 1 else b.t()
        out = linear(a, weight)
        return out.squeeze(-1) if b.dim() == 1 else out
    # Batched b: broadcast the batch dimensions and run one GEMM per matrix.
    a2 = a.unsqueeze(0) if a.dim() == 1 else a
    batch = torch.broadcast_shapes(a2.shape[:-2], b.shape[:-2])
    a_b = a2.expand(*batch, *a2.shape[-2:]).reshape(-1, *a2.shape[-2:])
    b_b = b.expand(*batch, *b.shape[-2:]).reshape(-1, *b.shape[-2:])
    outs = [linear(a_i, b_i.t()) for a_i, b_i in zip(a_b.unbind(0), b_b.unbind(0))]
    out = torch.stack(outs).reshape(*batch, a2.shape[-2], b.shape[-1])
    return out.squeeze(-2) if a.dim() == 1 else out
