"""The ``native`` backend's kernels: the C++ core for float32, Numba for float64.

brainkern._native is a plain pybind11 extension, not built against torch: tensors cross as
addresses (``data_ptr()``) plus element strides and sizes, and the extension releases the GIL
while it works. It is loaded on first use; if it cannot be (not built, or a bad
``BRAINKERN_NATIVE_ISA``), :func:`is_built` is False and :func:`why_not_built` says why.

``BRAINKERN_NATIVE_ISA=avx512|avx2|portable`` picks the ISA for the process (only one this CPU
runs); by default the best one this CPU supports. Interface: brainkern/kernels/__init__.py.
"""

from __future__ import annotations

import torch

from brainkern.activations import saves_output as _saves_output

_loaded: dict = {}


def _load():
    """brainkern._native, or None; the import is tried once per process."""
    if "module" not in _loaded:
        try:
            from brainkern import _native
        except ImportError as error:
            _loaded["module"], _loaded["error"] = None, str(error) or type(error).__name__
        else:
            _loaded["module"], _loaded["error"] = _native, None
    return _loaded["module"]


def _native():
    module = _load()
    if module is None:
        raise RuntimeError(f"brainkern._native is not available: {_loaded['error']}")
    return module


def is_built() -> bool:
    """True if brainkern._native loads in this process."""
    return _load() is not None


def why_not_built() -> str | None:
    """Why brainkern._native does not load (the ImportError's message), or None if it does."""
    _load()
    return _loaded["error"]


def isa() -> str:
    """The ISA the native kernels run by default: "avx512", "avx2" or "portable"."""
    return _native().isa()


def supported_isas() -> tuple[str, ...]:
    """The ISAs built into brainkern._native that this CPU runs, best first."""
    return tuple(_native().supported_isas())


def fma_peak_gflops(num_threads: int | None = None, seconds: float = 0.3,
                    isa: str | None = None) -> float:
    """Measured float32 peak, GFLOP/s: independent multiply-adds in registers.

    num_threads: threads to run on (default ``torch.get_num_threads()``); seconds: about how
    long to run; isa: the ISA's loop to time (default :func:`isa`).
    """
    threads = torch.get_num_threads() if num_threads is None else num_threads
    return _native().fma_peak_gflops(threads, seconds, isa or "")


def matmul_forward(a, b, bias, out, pre, act_code, act_param, *, isa=None, num_threads=None):
    """``out = act(a @ b + bias)``; ``pre = a @ b + bias`` when given.

    a: (M, K), any strides. b: (K, N), any strides. bias: (N,) contiguous or None.
    out, pre: (M, N) with unit column stride (contiguous, or a row-sliced view); pre may be None.
        Neither may overlap a, b or bias: out holds partial sums while the inputs are read.
    act_code, act_param: brainkern.activations' code and leaky_relu's slope.
    isa: run this ISA instead of the default (one of :func:`supported_isas`; for tests).
    num_threads: at most this many threads (default ``torch.get_num_threads()``).
    float32 runs in C++; float64 goes to the Numba kernels.
    """
    if a.dtype == torch.float64:
        from brainkern.kernels.numba import linear as numba_linear

        numba_linear.matmul_forward(a, b, bias, out, pre, act_code, act_param)
        return
    # Shapes and strides are read once, as tuples, and shared by the checks and the call: each
    # tensor attribute costs ~0.1-0.3 us, and at nn.Linear's small sizes (10-20 us calls) the
    # adapter's own cost showed (it was ~6 us, half of a 64 x 128 x 10 layer).
    try:
        (m, k), (n_k, n), a_strides, b_strides = a.shape, b.shape, a.stride(), b.stride()
    except ValueError:
        raise ValueError(f"native matmul_forward: a {tuple(a.shape)} @ b {tuple(b.shape)}, "
                         "both must be 2-D") from None
    _check(a, b, bias, out, pre, m, k, n_k, n)
    threads = torch.get_num_threads() if num_threads is None else num_threads
    _native().matmul_forward(
        a.data_ptr(), a_strides[0], a_strides[1],
        b.data_ptr(), b_strides[0], b_strides[1],
        0 if bias is None else bias.data_ptr(),
        out.data_ptr(), out.stride(0),
        0 if pre is None else pre.data_ptr(), 0 if pre is None else pre.stride(0),
        m, n, k, int(act_code), float(act_param), max(1, threads), isa or "",
    )


def activation_backward(grad_out, saved, grad_pre, grad_bias, act_code, act_param,
                        saved_is_output, *, isa=None, num_threads=None):
    """``grad_pre = grad_out * act'(saved)``, ``grad_bias = grad_pre.sum(0)`` when given.

    grad_out: (M, N), any strides. saved, grad_pre: (M, N) contiguous. grad_bias: (N,)
    contiguous or None (summed in float64, the same on any thread count). isa, num_threads: as
    :func:`matmul_forward`. float32 runs in C++; float64 goes to the Numba kernel.
    """
    if grad_pre.dtype == torch.float64:
        from brainkern.kernels.numba import linear as numba_linear

        numba_linear.activation_backward(grad_out, saved, grad_pre, grad_bias, act_code,
                                         act_param, saved_is_output)
        return
    code, param = int(act_code), float(act_param)
    # The C++ side takes the formula from the code alone (leaky_relu's is the same from either
    # tensor); the flag is the caller's claim about which tensor it saved, checked here.
    saves_output = _saves_output(code, param)
    if saves_output != bool(saved_is_output):
        raise ValueError(f"native activation_backward: activation {code} ({param}) saves the "
                         f"{'output' if saves_output else 'pre-activation'}, but "
                         f"saved_is_output={saved_is_output}")
    shape = grad_pre.shape
    f32 = torch.float32
    for t in (grad_out, saved, grad_pre, grad_bias):
        if t is not None and (t.dtype is not f32 or not t.is_cpu):
            raise TypeError(f"native activation_backward: float32 CPU tensors only, got "
                            f"{t.dtype} on {t.device}")
    if (len(shape) != 2 or grad_out.shape != shape or saved.shape != shape
            or not saved.is_contiguous() or not grad_pre.is_contiguous()):
        raise ValueError(f"native activation_backward: grad_out {tuple(grad_out.shape)}, saved "
                         f"{tuple(saved.shape)} and grad_pre {tuple(shape)} must be one 2-D "
                         "shape, saved and grad_pre contiguous")
    m, n = shape
    if grad_bias is not None and (grad_bias.shape != shape[1:] or not grad_bias.is_contiguous()):
        raise ValueError(f"native activation_backward: grad_bias must be contiguous ({n},), got "
                         f"{tuple(grad_bias.shape)}")
    strides = grad_out.stride()
    threads = torch.get_num_threads() if num_threads is None else num_threads
    _native().activation_backward(
        grad_out.data_ptr(), strides[0], strides[1], saved.data_ptr(), grad_pre.data_ptr(),
        0 if grad_bias is None else grad_bias.data_ptr(), m, n, code, param, max(1, threads),
        isa or "",
    )


def _check(a, b, bias, out, pre, m, k, n_k, n):
    """What the C++ side cannot see from addresses: dtypes, devices, shapes, output strides.

    a is (m, k), b (n_k, n). The ops layer validates first; this keeps a misuse from reading or
    writing out of bounds, in about a microsecond (it runs on every call). Outputs overlapping
    inputs are not checked: the ops layer allocates them fresh.
    """
    f32 = torch.float32
    for t in (a, b, bias, out, pre):
        # dtypes are singletons: `is` is half the cost of ==.
        if t is not None and (t.dtype is not f32 or not t.is_cpu):
            raise TypeError(f"native matmul_forward: float32 CPU tensors only, got {t.dtype} "
                            f"on {t.device}")
    if k != n_k:
        raise ValueError(f"native matmul_forward: a {tuple(a.shape)} @ b {tuple(b.shape)}")
    shape = (m, n)
    for name, t in (("out", out), ("pre", pre)):
        # The kernel writes element (i, j) at i * stride(0) + j: unit column stride needed.
        if t is not None and (t.shape != shape or (n > 1 and t.stride(1) != 1)):
            raise ValueError(f"native matmul_forward: {name} must be {shape} with unit column "
                             f"stride, got {tuple(t.shape)} strides {t.stride()}")
    if bias is not None and (bias.shape != shape[1:] or not bias.is_contiguous()):
        raise ValueError(f"native matmul_forward: bias must be contiguous ({n},), got "
                         f"{tuple(bias.shape)}")
