"""The ``native`` backend: the C++ core (brainkern._native) for float32, Numba for the rest.

One module per op family (``linear``, ...), each offering the kernel interface of
brainkern/kernels/__init__.py and declaring the devices and dtypes it serves. This package holds
what they share: loading the extension, and what it tells about the CPU.

brainkern._native is a plain pybind11 extension, not built against torch: tensors cross as
addresses (``data_ptr()``) plus element strides and sizes, and the extension releases the GIL
while it works. It is loaded on first use; if it cannot be (not built, or a bad
``BRAINKERN_NATIVE_ISA``), :func:`is_built` is False and :func:`why_not_built` says why.

``BRAINKERN_NATIVE_ISA=avx512|avx2|portable`` picks the ISA for the process (only one this CPU
runs); by default the best one this CPU supports. Interface: brainkern/kernels/__init__.py.
"""

from __future__ import annotations

import torch

from brainkern.kernels import _openmp

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
            # A forked child (see _openmp) runs the core's parallel loops serially.
            _openmp.when_serial(_native.run_serially)
    return _loaded["module"]


def core():
    """brainkern._native; RuntimeError naming why when it cannot be loaded."""
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
    return core().isa()


def supported_isas() -> tuple[str, ...]:
    """The ISAs built into brainkern._native that this CPU runs, best first."""
    return tuple(core().supported_isas())


def fma_peak_gflops(num_threads: int | None = None, seconds: float = 0.3,
                    isa: str | None = None) -> float:
    """Measured float32 peak, GFLOP/s: independent multiply-adds in registers.

    num_threads: threads to run on (default ``torch.get_num_threads()``); seconds: about how
    long to run; isa: the ISA's loop to time (default :func:`isa`).
    """
    threads = torch.get_num_threads() if num_threads is None else num_threads
    return core().fma_peak_gflops(threads, seconds, isa or "")


