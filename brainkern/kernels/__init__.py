"""Kernels, one module per backend and op family, all offering the same plain functions.

They know nothing of autograd, modules or argument checking: the ops layer (brainkern/ops/)
validates, allocates outputs and calls them, and they trust what it passes. The native core sees
only addresses, so a broken contract there reads or writes out of bounds: brainkern.kernels.native
has a ``check_<kernel>`` function per kernel that names what is wrong with arguments it cannot
run, and the test suite runs it before every native call (tests/conftest.py).

Every backend's linear-family module offers:

``linear_forward(a, weight, bias, out, pre, act_code, act_param) -> None``
    a:      (M, K) tensor, any strides (transposed and sliced views included).
    weight: (N, K) tensor, any strides, same dtype and device as ``a``: nn.Linear's layout,
            so a layer passes its weight as stored (a general ``a @ b`` passes ``b.t()``).
    bias:   (N,) contiguous tensor or None.
    out:    (M, N) contiguous tensor, written with ``act(a @ weight^T + bias)``.
    pre:    (M, N) contiguous tensor or None; when given, also written with
            ``a @ weight^T + bias`` (the pre-activation that gelu/silu's backward needs).
    act_code, act_param: the activation, as in brainkern.activations (NONE = 0 allowed).
    M, N or K may be 0 (K = 0 gives ``act(bias)``, or ``act(0)`` without bias).

``activation_backward(grad_out, saved, grad_pre, grad_bias, act_code, act_param,
                      saved_is_output) -> None``
    grad_out:  (M, N) tensor, any strides.
    saved:     (M, N) contiguous: the activation's output when ``saved_is_output``, else the
               pre-activation.
    grad_pre:  (M, N) contiguous, written with ``grad_out * act'(z)``.
    grad_bias: (N,) contiguous or None; when given, written with ``grad_pre.sum(0)``, reduced in
               at least float32 and in the same pass over the data.
    act_code != NONE.

Optionally, a backend fuses the whole backward of ``out = act(x @ weight^T + bias)``:

``linear_backward(grad_out, x, weight, saved, grad_x, grad_w, grad_bias, act_code, act_param,
                  saved_is_output) -> None``
    grad_out (M, N), x (M, K), weight (N, K): any strides. saved: as for activation_backward,
    None when act_code is NONE. Writes ``dz = grad_out * act'(z)`` (``grad_out`` itself without
    an activation), ``grad_bias = dz.sum(0)``, ``grad_x = dz @ weight`` and ``grad_w = dz^T @ x``
    into the given contiguous outputs, each None when not wanted. A backend without it gets
    :func:`compose_linear_backward` over its two required kernels.
"""

import torch

from brainkern.activations import NONE


def compose_linear_backward(kern, grad_out, x, weight, saved, grad_x, grad_w, grad_bias, act_code,
                            act_param, saved_is_output) -> None:
    """``linear_backward`` built from a backend's ``activation_backward`` and ``linear_forward``.

    One pass for ``dz`` and the bias gradient, then two GEMMs over strided views (``dz^T``,
    ``W^T`` and ``x^T`` are views: the kernels read any strides, so nothing is copied).
    """
    if act_code == NONE:
        grad_pre = grad_out
        if grad_bias is not None:
            acc = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
            grad_bias.copy_(grad_out.sum(0, dtype=acc))
    else:
        grad_pre = torch.empty(grad_out.shape, dtype=x.dtype, device=x.device)
        kern.activation_backward(grad_out, saved, grad_pre, grad_bias, act_code, act_param,
                                 saved_is_output)
    if grad_x is not None:
        kern.linear_forward(grad_pre, weight.t(), None, grad_x, None, NONE, 0.0)  # dz @ W
    if grad_w is not None:
        kern.linear_forward(grad_pre.t(), x.t(), None, grad_w, None, NONE, 0.0)  # dz^T @ x

