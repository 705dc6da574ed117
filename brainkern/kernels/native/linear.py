"""The native backend's linear family: the C++ packed SGEMM for float32, Numba for float64.

Interface: brainkern/kernels/__init__.py. Each kernel trusts its arguments; its ``check_*`` twin
names what is wrong with arguments the C++ core cannot run (the test suite runs it before every
call, tests/conftest.py).
"""

from __future__ import annotations

import torch

from brainkern.activations import NONE
from brainkern.activations import saves_output as _saves_output
from brainkern.kernels.native import core as _native

DEVICES = ("cpu",)
DTYPES = (torch.float32, torch.float64)

_F32, _F64 = torch.float32, torch.float64
_get_num_threads = torch.get_num_threads


def linear_forward(a, weight, bias, out, pre, act_code, act_param, *, isa=None,
                   num_threads=None):
    """``out = act(a @ weight^T + bias)``; ``pre = a @ weight^T + bias`` when given.

    a: (M, K), any strides. weight: (N, K), any strides. bias: (N,) contiguous or None.
    out, pre: (M, N) with unit column stride (contiguous, or a row-sliced view); pre may be None.
        Neither may overlap a, weight or bias: out holds partial sums while the inputs are read.
    act_code, act_param: brainkern.activations' code and leaky_relu's slope.
    isa: run this ISA instead of the default (one of :func:`supported_isas`; for tests).
    num_threads: at most this many threads (default ``torch.get_num_threads()``).
    float32 runs in C++; float64 goes to the Numba kernels.

    Like every kernel it trusts its arguments (brainkern/kernels/__init__.py): the ops layer has
    checked them. The C++ core sees only addresses, so arguments that break this contract would
    be read or written out of bounds: :func:`check_linear_forward` says what is wrong with them.
    """
    # No checks here: at nn.Linear's small sizes the GEMM is a few us, and re-checking what the
    # ops layer checked cost ~3.5 us per call (measured), as much as the arithmetic.
    if a.dtype is _F64:
        from brainkern.kernels.numba import linear as numba_linear

        numba_linear.linear_forward(a, weight, bias, out, pre, act_code, act_param)
        return
    (m, k), n = a.shape, weight.shape[0]
    a_strides, w_strides = a.stride(), weight.stride()
    _native().matmul_forward(  # B = weight^T: B's (k, n) strides are weight's (n, k) swapped
        a.data_ptr(), a_strides[0], a_strides[1],
        weight.data_ptr(), w_strides[1], w_strides[0],
        0 if bias is None else bias.data_ptr(),
        out.data_ptr(), out.stride(0),
        0 if pre is None else pre.data_ptr(), 0 if pre is None else pre.stride(0),
        m, n, k, act_code, act_param,
        _get_num_threads() if num_threads is None else max(1, num_threads), isa or "",
    )


def check_linear_forward(a, weight, bias, out, pre, act_code, act_param) -> None:
    """Raise a TypeError/ValueError if :func:`linear_forward` cannot run these arguments.

    What the C++ side cannot see from addresses: dtypes, devices, ranks, shapes, output strides.
    Outputs overlapping inputs are not checked: the ops layer allocates them fresh.
    """
    if a.dtype is _F64:
        return  # the Numba kernels, which index tensors as arrays
    _check_float32_cpu("linear_forward", a, weight, bias, out, pre)
    if a.dim() != 2 or weight.dim() != 2 or a.shape[1] != weight.shape[1]:
        raise ValueError(f"native linear_forward: a {tuple(a.shape)} @ weight^T for weight "
                         f"{tuple(weight.shape)}: both must be 2-D with the same last dimension")
    shape = (a.shape[0], weight.shape[0])
    n = shape[1]
    for name, t in (("out", out), ("pre", pre)):
        # The kernel writes element (i, j) at i * stride(0) + j: unit column stride needed.
        if t is not None and (t.shape != shape or (n > 1 and t.stride(1) != 1)):
            raise ValueError(f"native linear_forward: {name} must be {shape} with unit column "
                             f"stride, got {tuple(t.shape)} strides {t.stride()}")
    if bias is not None and (bias.shape != shape[1:] or not bias.is_contiguous()):
        raise ValueError(f"native linear_forward: bias must be contiguous ({n},), got "
                         f"{tuple(bias.shape)}")


def activation_backward(grad_out, saved, grad_pre, grad_bias, act_code, act_param,
                        saved_is_output, *, isa=None, num_threads=None):
    """``grad_pre = grad_out * act'(saved)``, ``grad_bias = grad_pre.sum(0)`` when given.

    grad_out: (M, N), any strides. saved, grad_pre: (M, N) contiguous. grad_bias: (N,)
    contiguous or None (summed in float64, the same on any thread count). isa, num_threads: as
    :func:`linear_forward`. float32 runs in C++; float64 goes to the Numba kernel. Trusts its
    arguments: :func:`check_activation_backward` says what is wrong with ones it cannot run.
    """
    if grad_pre.dtype is _F64:
        from brainkern.kernels.numba import linear as numba_linear

        numba_linear.activation_backward(grad_out, saved, grad_pre, grad_bias, act_code,
                                         act_param, saved_is_output)
        return
    m, n = grad_pre.shape
    strides = grad_out.stride()
    _native().activation_backward(
        grad_out.data_ptr(), strides[0], strides[1], saved.data_ptr(), grad_pre.data_ptr(),
        0 if grad_bias is None else grad_bias.data_ptr(), m, n, act_code, act_param,
        _get_num_threads() if num_threads is None else max(1, num_threads), isa or "",
    )


def check_activation_backward(grad_out, saved, grad_pre, grad_bias, act_code, act_param,
                              saved_is_output) -> None:
    """Raise a TypeError/ValueError if :func:`activation_backward` cannot run these arguments."""
    if grad_pre.dtype is _F64:
        return
    _check_saved_flag("activation_backward", act_code, act_param, saved_is_output)
    _check_float32_cpu("activation_backward", grad_out, saved, grad_pre, grad_bias)
    shape = grad_pre.shape
    if (len(shape) != 2 or grad_out.shape != shape or saved.shape != shape
            or not saved.is_contiguous() or not grad_pre.is_contiguous()):
        raise ValueError(f"native activation_backward: grad_out {tuple(grad_out.shape)}, saved "
                         f"{tuple(saved.shape)} and grad_pre {tuple(shape)} must be one 2-D "
                         "shape, saved and grad_pre contiguous")
    if grad_bias is not None and (grad_bias.shape != shape[1:] or not grad_bias.is_contiguous()):
        raise ValueError(f"native activation_backward: grad_bias must be contiguous "
                         f"({shape[1]},), got {tuple(grad_bias.shape)}")


def linear_backward(grad_out, x, weight, saved, grad_x, grad_w, grad_bias, act_code, act_param,
                    saved_is_output, *, isa=None, num_threads=None):
    """The whole backward of ``out = act(x @ weight^T + bias)`` in one native call.

    ``dz = grad_out * act'(saved)`` (``dz = grad_out`` when act_code is NONE), then
    ``grad_bias = dz.sum(0)``, ``grad_x = dz @ weight``, ``grad_w = dz^T @ x``; each output None
    when not wanted. grad_out (M, N), x (M, K), weight (N, K): any strides. saved: (M, N)
    contiguous, None when act_code is NONE. grad_x (M, K), grad_w (N, K), grad_bias (N,):
    contiguous, fresh (not overlapping an input). isa, num_threads: as :func:`linear_forward`.
    float32 runs in C++ (both GEMMs side by side when each is small); float64 composes the
    Numba kernels. Trusts its arguments: :func:`check_linear_backward` says what is wrong with
    ones it cannot run.
    """
    if x.dtype is _F64:
        from brainkern.kernels import compose_linear_backward
        from brainkern.kernels.numba import linear as numba_linear

        compose_linear_backward(numba_linear, grad_out, x, weight, saved, grad_x, grad_w,
                                grad_bias, act_code, act_param, saved_is_output)
        return
    (m, k), n = x.shape, weight.shape[0]
    has_act = act_code != NONE
    grad_pre = torch.empty((m, n), dtype=_F32) if has_act else None
    gs, xs, ws = grad_out.stride(), x.stride(), weight.stride()
    _native().linear_backward(
        grad_out.data_ptr(), gs[0], gs[1], saved.data_ptr() if has_act else 0,
        grad_pre.data_ptr() if has_act else 0, x.data_ptr(), xs[0], xs[1],
        weight.data_ptr(), ws[0], ws[1], 0 if grad_x is None else grad_x.data_ptr(),
        0 if grad_w is None else grad_w.data_ptr(), 0 if grad_bias is None else grad_bias.data_ptr(),
        m, n, k, act_code, act_param,
        _get_num_threads() if num_threads is None else max(1, num_threads), isa or "",
    )


def check_linear_backward(grad_out, x, weight, saved, grad_x, grad_w, grad_bias, act_code,
                          act_param, saved_is_output) -> None:
    """Raise a TypeError/ValueError if :func:`linear_backward` cannot run these arguments."""
    if x.dtype is _F64:
        return
    has_act = act_code != NONE
    if has_act:
        _check_saved_flag("linear_backward", act_code, act_param, saved_is_output)
    _check_float32_cpu("linear_backward", grad_out, x, weight, saved if has_act else None,
                       grad_x, grad_w, grad_bias)
    try:
        (m, n), (m_x, k), (n_w, k_w) = grad_out.shape, x.shape, weight.shape
        ok = (m_x == m and n_w == n and k_w == k
              and (not has_act or (saved.shape == (m, n) and saved.is_contiguous()))
              and _fits(grad_x, (m, k)) and _fits(grad_w, (n, k)) and _fits(grad_bias, (n,)))
    except ValueError:  # not 2-D
        ok = False
    if not ok:
        raise ValueError(
            f"native linear_backward: grad_out {tuple(grad_out.shape)}, x {tuple(x.shape)}, "
            f"weight {tuple(weight.shape)}, saved {None if saved is None else tuple(saved.shape)} "
            "must be (M, N), (M, K), (N, K), (M, N) with saved contiguous, and grad_x, grad_w, "
            "grad_bias contiguous (M, K), (N, K), (N,)")


def _fits(t, shape) -> bool:
    """An output the kernels can write: None, or a contiguous tensor of ``shape``."""
    return t is None or (t.shape == shape and t.is_contiguous())


def _check_float32_cpu(kernel, *tensors) -> None:
    """The C++ core reads float32 in this process's memory: every tensor given (None skipped)."""
    for t in tensors:
        if t is not None and (t.dtype is not _F32 or not t.is_cpu):
            raise TypeError(f"native {kernel}: float32 CPU tensors only, got {t.dtype} on "
                            f"{t.device}")


def _check_saved_flag(kernel, act_code, act_param, saved_is_output) -> None:
    """The C++ side takes the formula from the code alone (leaky_relu's is the same from either
    tensor); the flag is the caller's claim about which tensor it saved, checked here."""
    saves_output = _saves_output(int(act_code), float(act_param))
    if saves_output != bool(saved_is_output):
        raise ValueError(f"native {kernel}: activation {act_code} ({act_param}) saves the "
                         f"{'output' if saves_output else 'pre-activation'}, but "
                         f"saved_is_output={saved_is_output}")
