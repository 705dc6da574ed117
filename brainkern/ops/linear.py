"""Matrix multiplication with a fused epilogue: ``act(x @ W^T + b)``, and its backward.

The torch-facing layer: argument checks, shape arithmetic, the eager autograd.Function and the
``brainkern::linear`` / ``brainkern::linear_backward`` ops that torch.compile and torch.export
see (how the two paths split: brainkern/ops/_dispatch.py). Kernels are found through
brainkern.backends and take plain arguments (see brainkern/kernels/__init__.py).
"""

from __future__ import annotations

import functools
import math

import torch

from brainkern import activations
from brainkern.activations import Activation
from brainkern.kernels import compose_linear_backward
from brainkern.ops import _dispatch
from brainkern.ops._checks import check_same_kind, check_tensor

_empty_contiguous = _dispatch.empty_contiguous


def _forward(kern, x, weight, bias, act):
    """Run the forward kernel; returns (out, what backward keeps for the activation or None).

    The saved tensor is ``out`` itself when the activation's derivative follows from its output,
    the pre-activation (gelu, silu, leaky_relu with a negative slope) otherwise.
    """
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


def _backward(kern, grad_out, x, weight, bias, saved, act, needs):
    """Gradients (x, weight, bias), each None where ``needs`` (three flags) says it is not
    wanted: see FusedLinear's docstring."""
    # Allocation is a good part of a small layer's backward: empty_like is the cheapest torch
    # allocator call (x and weight are contiguous in the common case; bias is contiguous).
    need_x, need_w, need_b = needs
    grad_x = _empty_contiguous(x) if need_x else None
    grad_w = _empty_contiguous(weight) if need_w else None
    grad_b = torch.empty_like(bias) if need_b else None
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
    return grad_x, grad_w, grad_b


def _with_torch_ops(x, weight, bias, act):
    """The layer in torch's own ops: under torch.func transforms, and for create_graph."""
    z = torch.nn.functional.linear(x, weight, bias)
    return z if act is None else act.forward(z)


def _differentiable_backward(grad_out, x, weight, bias, act, needs):
    """backward(create_graph=True), e.g. for a gradient penalty: the gradients must be
    differentiable themselves, which the kernels' are not. The layer is recomputed with
    torch's ops and differentiated by autograd (reentrant), so that higher derivatives are
    exact for every activation, gelu's and silu's pre-activation included."""
    inputs = [t for t, need in zip((x, weight, bias), needs) if need]
    y = _with_torch_ops(x, weight, bias, act)
    grads = iter(torch.autograd.grad(y, inputs, grad_out, create_graph=True))
    return tuple(next(grads) if need else None for need in needs)


class FusedLinear(torch.autograd.Function):
    """``y = act(z)``, ``z = x @ W^T + b`` with x (M, K), W (N, K), b (N,): the eager path.

    Backward, with ``g = dL/dy`` (M, N):

    - ``dz = g * act'(z)``: one fused pass that also reduces ``db = sum_m dz[m, :]``. act' comes
      from the saved output y for relu/leaky_relu/sigmoid/tanh (e.g. tanh' = 1 - y^2) and from
      the saved pre-activation z for gelu/silu; without an activation ``dz = g``.
    - ``dx = dz @ W``  (M, N) @ (N, K) and ``dW = dz^T @ x`` (N, M) @ (M, K): two GEMMs over
      strided views of the saved tensors; the kernels' packing reads any strides, so nothing
      is copied to transpose.

    A backend may do all of it in one call (``linear_backward``, the native core does); else it
    is composed from the backend's two kernels (brainkern.kernels.compose_linear_backward).
    The registered op ``brainkern::linear`` (for graphs) runs the same _forward and _backward.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, act: Activation | None, kern):
        out, saved = _forward(kern, x, weight, bias, act)
        ctx.act, ctx.kern = act, kern
        ctx.save_for_backward(x, weight, bias, saved)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, saved = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():
            grads = _differentiable_backward(grad_out, x, weight, bias, ctx.act, needs)
        else:
            grads = _backward(ctx.kern, grad_out, x, weight, bias, saved, ctx.act, needs)
        return (*grads, None, None)


_apply = _dispatch.c_apply(FusedLinear)


# The registered ops: what torch.compile and torch.export see (and meta tensors run).


@functools.cache
def _activation(code: int, param: float) -> Activation | None:
    """The Activation a graph's (act_code, act_param) constants stand for."""
    return None if code == activations.NONE else Activation("", code, param)


def _op_forward(kern, x, weight, bias, act_code, act_param):
    act = _activation(act_code, act_param)
    # A compiled graph passes its own tensors; the kernels need a contiguous bias.
    out, saved = _forward(kern, x, weight, None if bias is None else bias.contiguous(), act)
    # An op's outputs may not alias each other: the output saved as itself is returned once.
    return out, (x.new_empty(0) if saved is None or saved is out else saved)


def _fake_forward(x, weight, bias, act_code, act_param):
    out = x.new_empty(x.shape[0], weight.shape[0])
    keeps_pre = act_code != activations.NONE and not activations.saves_output(act_code, act_param)
    return out, (torch.empty_like(out) if keeps_pre else x.new_empty(0))


_linear_op = _dispatch.define(
    "linear", "(str backend, Tensor x, Tensor weight, Tensor? bias, int act_code, "
    "float act_param) -> (Tensor, Tensor)",
    family="linear", impl=_op_forward, fake=_fake_forward)


def _op_backward(kern, grad_out, x, weight, bias, saved, act_code, act_param, needs):
    act = _activation(act_code, act_param)
    grads = _backward(kern, grad_out, x, weight, bias, saved, act, needs)
    return [g for g in grads if g is not None]


def _fake_backward(grad_out, x, weight, bias, saved, act_code, act_param, needs):
    return [torch.empty_like(t) for t, need in zip((x, weight, bias), needs) if need]


_linear_backward_op = _dispatch.define(
    "linear_backward", "(str backend, Tensor grad_out, Tensor x, Tensor weight, Tensor? bias, "
    "Tensor? saved, int act_code, float act_param, bool[] needs) -> Tensor[]",
    family="linear", impl=_op_backward, fake=_fake_backward)


def _setup_context(ctx, inputs, output):
    backend, x, weight, bias, act_code, act_param = inputs
    out, extra = output
    if act_code == activations.NONE:
        saved = None
    else:
        saved = out if activations.saves_output(act_code, act_param) else extra
    ctx.backend, ctx.act_code, ctx.act_param = backend, act_code, act_param
    ctx.save_for_backward(x, weight, bias, saved)


def _op_autograd(ctx, grad_out, _grad_extra):
    x, weight, bias, saved = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[1:4])
    if torch.is_grad_enabled():
        act = _activation(ctx.act_code, ctx.act_param)
        grads = _differentiable_backward(grad_out, x, weight, bias, act, needs)
    else:
        computed = iter(_linear_backward_op(ctx.backend, grad_out, x, weight, bias, saved,
                                            ctx.act_code, ctx.act_param, needs))
        grads = tuple(next(computed) if need else None for need in needs)
    return (None, *grads, None, None)


torch.library.register_autograd(_linear_op, _op_autograd, setup_context=_setup_context)


def _linear_in_graph(x, weight, bias, act):
    """The 2-D layer as one ``brainkern::linear`` node, its backend fixed now."""
    backend = _dispatch.graph_backend("linear", x.device, x.dtype)
    code, param = (activations.NONE, 0.0) if act is None else (act.code, act.param)
    return _linear_op(backend, x, weight, bias, code, param)[0]


# Bound once: the eager path below runs for every layer call.
_grad_enabled = _dispatch.grad_enabled
_any_autocast = _dispatch.any_autocast
_in_graph = _dispatch.in_graph
_transforms_active = _dispatch.transforms_active
_kernels_for = _dispatch.kernels_for
_STRIDED = torch.strided


def _run(kern, x, weight, bias, act):
    """The 2-D layer: through FusedLinear when a gradient is wanted, else the bare kernel."""
    if _grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    ):
        return _apply(x, weight, bias, act, kern)
    return _forward(kern, x, weight, bias, act)[0]  # inference: no autograd bookkeeping


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
        input, weight, bias = _dispatch.autocast(input, weight, bias)
    Tensor = torch.Tensor
    try:
        dtype, device, (n, k), ndim = input.dtype, input.device, weight.shape, input.ndim
        valid = (
            isinstance(input, Tensor) and isinstance(weight, Tensor) and input.is_floating_point()
            and weight.dtype is dtype and ndim > 0 and input.shape[-1] == k
            and weight.device == device and input.layout is _STRIDED
            and weight.layout is _STRIDED
            and (bias is None or (isinstance(bias, Tensor) and bias.dtype is dtype
                                  and bias.shape == (n,) and bias.device == device
                                  and bias.layout is _STRIDED))
        )
    except (AttributeError, TypeError, ValueError):
        valid = False
    if not valid:
        _check_linear(input, weight, bias)  # raises, naming the argument
        dtype, device, (n, k), ndim = input.dtype, input.device, weight.shape, input.ndim
    act = activation if activation is None or type(activation) is Activation else (
        activations.resolve(activation))
    x = input if ndim == 2 else input.reshape(math.prod(input.shape[:-1]), k)
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    if _transforms_active():
        # Under a torch.func transform (grad, vmap, jacrev, ...) the kernels cannot run: they
        # read data pointers, which transformed tensors lack. torch's ops, which every transform
        # supports, compute the layer there, so brainkern layers work inside torch.func as
        # torch.nn's do (at torch's speed). Tested before the graph: the registered op has no
        # vmap rule, and Dynamo tracing a transform sees it active here too.
        out = _with_torch_ops(x, weight, bias, act)
    elif _in_graph():
        out = _linear_in_graph(x, weight, bias, act)
    else:
        try:
            kern = _kernels_for("linear", device, dtype)
        except RuntimeError:
            if device.type != "meta":
                raise
            # No kernel runs on meta tensors: the registered op's fake implementation gives
            # the shape (and its autograd the gradients' shapes), as torch.nn.Linear does.
            out = _linear_in_graph(x, weight, bias, act)
        else:
            try:
                out = _run(kern, x, weight, bias, act)
            except RuntimeError:
                unwrapped = _dispatch.unwrap_dead(x, weight, bias)
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
