"""Matrix multiplication with a fused epilogue: ``act(x @ W^T + b)``, and its backward.

The torch-facing layer: argument checks, shape arithmetic and the autograd.Function. Kernels are
found through brainkern.backends and take plain arguments (see brainkern/kernels/__init__.py).
"""

from __future__ import annotations

import math

import torch

from brainkern import activations, backends
from brainkern.activations import Activation
from brainkern.kernels import compose_linear_backward
from brainkern.ops._checks import check_same_kind, check_tensor


class FusedLinear(torch.autograd.Function):
    """``y = act(z)``, ``z = x @ W^T + b`` with x (M, K), W (N, K), b (N,).

    Backward, with ``g = dL/dy`` (M, N):

    - ``dz = g * act'(z)``: one fused pass that also reduces ``db = sum_m dz[m, :]``. act' comes
      from the saved output y for relu/leaky_relu/sigmoid/tanh (e.g. tanh' = 1 - y^2) and from
      the saved pre-activation z for gelu/silu; without an activation ``dz = g``.
    - ``dx = dz @ W``  (M, N) @ (N, K) and ``dW = dz^T @ x`` (N, M) @ (M, K): two GEMMs over
      strided views of the saved tensors; the kernels' packing reads any strides, so nothing
      is copied to transpose.

    A backend may do all of it in one call (``linear_backward``, the native core does); else it
    is composed from the backend's two kernels (brainkern.kernels.compose_linear_backward).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, act: Activation | None, kern):
        out, saved = _forward(kern, x, weight, bias, act)
        ctx.act, ctx.kern = act, kern
        ctx.save_for_backward(x, weight, bias, saved)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():
            return FusedLinear._differentiable_backward(ctx, grad_out)
        x, weight, bias, saved = ctx.saved_tensors
        kern, act = ctx.kern, ctx.act
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        # Allocation is a good part of a small layer's backward: empty_like is the cheapest
        # torch allocator call (x and weight are contiguous in the common case).
        grad_x = _empty_contiguous(x) if need_x else None
        grad_w = _empty_contiguous(weight) if need_w else None
        grad_b = torch.empty_like(bias) if need_b else None  # linear() made bias contiguous
        if act is None:
            code, param, saves_output = activations.NONE, 0.0, True
        else:
            code, param, saves_output = act.code, act.param, act.saves_output
        fused = getattr(kern, "linear_backward", None)
        if fused is not None:
            fused(grad_out, x, weight, saved, grad_x, grad_w, grad_b, code, param, saves_output)
        else:
            compose_linear_backward(kern, grad_out, x, weight, saved, grad_x, grad_w, grad_b,
                                    code, param, saves_output)
        return grad_x, grad_w, grad_b, None, None

    @staticmethod
    def _differentiable_backward(ctx, grad_out):
        """backward(create_graph=True), e.g. for a gradient penalty: the gradients must be
        differentiable themselves, which the kernels' are not. The layer is recomputed with
        torch's ops and differentiated by autograd (reentrant), so that higher derivatives are
        exact for every activation, gelu's and silu's pre-activation included."""
        x, weight, bias, _ = ctx.saved_tensors
        inputs = [t for t, need in zip((x, weight, bias), ctx.needs_input_grad) if need]
        y = _with_torch_ops(x, weight, bias, ctx.act)
        grads = iter(torch.autograd.grad(y, inputs, grad_out, create_graph=True))
        return (*(next(grads) if need else None for need in ctx.needs_input_grad[:3]), None, None)


def _with_torch_ops(x, weight, bias, act):
    """The layer in torch's own ops: what runs under torch.func transforms (below)."""
    z = torch.nn.functional.linear(x, weight, bias)
    return z if act is None else act.forward(z)


# FusedLinear's C++ apply. Function.apply is a Python classmethod over it that checks for
# setup_context and functorch transforms and unwraps dead functorch wrappers: ~3 us per call
# standalone and ~10 in a training step (measured; a small layer's whole GEMM is a few us).
# linear() does what of that applies itself (below) and calls the C++ apply; under
# torch.compile the classmethod runs, as dynamo expects of an autograd.Function.
try:
    _c_apply = torch._C._FunctionBase.__dict__["apply"].__get__(None, FusedLinear)
except (AttributeError, KeyError):
    _c_apply = FusedLinear.apply
_is_compiling = torch.compiler.is_compiling
_grad_enabled = torch.is_grad_enabled
_kernels_for = backends.kernels_for
_transforms_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)
_unwrap_if_dead = getattr(getattr(torch._C, "_functorch", None), "unwrap_if_dead", lambda t: t)


def _run(kern, x, weight, bias, act):
    """The 2-D layer: through FusedLinear when a gradient is wanted, else the bare kernel."""
    if _grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    ):
        if _is_compiling():
            return FusedLinear.apply(x, weight, bias, act, kern)
        return _c_apply(x, weight, bias, act, kern)
    return _forward(kern, x, weight, bias, act)[0]  # inference: no autograd bookkeeping


def _unwrap_dead(*tensors):
    """``tensors`` with dead functorch wrappers unwrapped, or None if none was one.

    A tensor kept from inside a torch.func transform is a dead wrapper without storage: the
    kernels' data_ptr() fails on it (before any kernel runs). Function.apply would unwrap it;
    linear() does so only after that failure, which keeps three calls per layer off the
    common path.
    """
    unwrapped = tuple(None if t is None else _unwrap_if_dead(t) for t in tensors)
    return None if all(u is t for u, t in zip(unwrapped, tensors)) else unwrapped


def _empty_contiguous(t):
    if t.is_contiguous():
        return torch.empty_like(t)
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def _forward(kern, x, weight, bias, act):
    """Run the forward kernel; returns (out, what backward keeps for the activation or None)."""
    out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    if act is None:
        kern.linear_forward(x, weight, bias, out, None, activations.NONE, 0.0)
        return out, None
    if act.saves_output:
        kern.linear_forward(x, weight, bias, out, None, act.code, act.param)
        return out, out
    pre = torch.empty_like(out)
    kern.linear_forward(x, weight, bias, out, pre, act.code, act.param)
    return out, pre


def _autocast(*tensors):
    """Under torch.autocast, cast floating tensors to the autocast dtype, as F.linear does."""
    device_type = tensors[0].device.type
    if not (torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                 for t in tensors)


# One C call telling whether any autocast region is active (private in torch, present since 2.0;
# without it, the public per-device check in _autocast runs every time).
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def _check_linear(input, weight, bias):
    """Raise the error that describes what is wrong with linear's arguments (the slow path)."""
    check_tensor("input", input)
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


def linear(input, weight, bias=None, activation=None):
    """``act(input @ weight^T + bias)`` over any leading dimensions, as F.linear (+ activation).

    input (*, K) or (K,); weight (N, K); bias (N,) or None. Returns (*, N) or (N,).
    Under torch.autocast the operands are cast to the autocast dtype first, like F.linear.
    """
    # This runs for every layer call, and at nn.Linear's small sizes the whole GEMM takes a few
    # microseconds: the common case is recognised with a handful of cheap tests, and anything
    # else goes through _check_linear, which names what is wrong.
    if _any_autocast() and isinstance(input, torch.Tensor):
        input, weight, bias = _autocast(input, weight, bias)
    Tensor = torch.Tensor
    try:
        dtype, device, (n, k), ndim = input.dtype, input.device, weight.shape, input.ndim
        valid = (
            isinstance(input, Tensor) and isinstance(weight, Tensor) and input.is_floating_point()
            and weight.dtype is dtype and ndim > 0 and input.shape[-1] == k
            and weight.device == device
            and (bias is None or (isinstance(bias, Tensor) and bias.dtype is dtype
                                  and bias.shape == (n,) and bias.device == device))
        )
    except (AttributeError, TypeError, ValueError):
        valid = False
    if not valid:
        _check_linear(input, weight, bias)  # raises, naming the argument
        dtype, device, (n, k), ndim = input.dtype, input.device, weight.shape, input.ndim
    act = activation if activation is None or type(activation) is Activation else (
        activations.resolve(activation))
    kern = _kernels_for("linear", device, dtype)
    x = input if ndim == 2 else input.reshape(math.prod(input.shape[:-1]), k)
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    if _transforms_active():
        # Under a torch.func transform (grad, vmap, jacrev, ...) the kernels cannot run: they
        # read data pointers, which transformed tensors lack. torch's ops, which every transform
        # supports, compute the layer there, so brainkern layers work inside torch.func as
        # torch.nn's do (at torch's speed).
        out = _with_torch_ops(x, weight, bias, act)
    else:
        try:
            out = _run(kern, x, weight, bias, act)
        except RuntimeError:
            unwrapped = _unwrap_dead(x, weight, bias)
            if unwrapped is None:
                raise
            out = _run(kern, *unwrapped, act)
    return out if ndim == 2 else out.reshape(*input.shape[:-1], n)


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
