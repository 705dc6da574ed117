"""Which backend runs an op: the registry, the defaults per device, and ``use_backend``.

Backends:
- ``triton``: CUDA tensors; on a machine without a GPU the same kernels run on CPU tensors through
  Triton's interpreter when ``TRITON_INTERPRET=1`` was set before brainkern imported Triton.
- ``native``: CPU; the C++ GEMM core (float32) for matrix-shaped work, Numba for the rest.
- ``numba``: CPU; every op in Numba.
- ``torch``: torch's own ops, on any device and dtype: the reference and the baseline.

Default: ``triton`` for CUDA tensors; for CPU tensors the fastest built CPU backend that serves
the dtype (``native``, else ``numba``, else ``torch`` for the half types no CPU kernel has).
A backend asked for explicitly (``use_backend`` or ``BRAINKERN_BACKEND``) on a device or dtype it
cannot serve is an error, never a silent fallback.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import importlib.util
import os
from dataclasses import dataclass

import torch

ENV_VAR = "BRAINKERN_BACKEND"


@dataclass(frozen=True)
class Backend:
    name: str
    package: str  # one module per op family: f"{package}.{family}"
    # Which devices and dtypes it serves is declared per op family, beside the kernels: each
    # family module has DEVICES and DTYPES (native's GEMM is float32/64, its pooling need not be).


BACKENDS = {
    "triton": Backend("triton", "brainkern.kernels.triton"),
    "native": Backend("native", "brainkern.kernels.native"),
    "numba": Backend("numba", "brainkern.kernels.numba"),
    "torch": Backend("torch", "brainkern.kernels.reference"),
}

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "brainkern_backend", default=None
)


def _check_name(name: str, source: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"{source}: unknown backend {name!r}; expected one of {sorted(BACKENDS)}")
    return name


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _not_installed_reason(name: str) -> str | None:
    """Why backend ``name``'s kernels cannot be loaded here (cached: it cannot change)."""
    if name == "native":
        from brainkern.kernels import native

        return None if native.is_built() else f"brainkern._native is not built ({native.why_not_built()})"
    if name in ("numba", "triton") and importlib.util.find_spec(name) is None:
        return f"{name} is not installed"
    return None


def _unavailable_reason(name: str) -> str | None:
    """Why backend ``name`` cannot run on this machine at all, or None if it can."""
    why = _not_installed_reason(name)
    if why is None and name == "triton" and not (torch.cuda.is_available() or triton_interpreting()):
        return "no CUDA device, and TRITON_INTERPRET=1 was not set for Triton's interpreter"
    return why


def available_backends() -> tuple[str, ...]:
    """Names of the backends that can run on this machine, fastest first."""
    return tuple(n for n in BACKENDS if _unavailable_reason(n) is None)


@contextlib.contextmanager
def use_backend(name: str):
    """Run the ops inside the ``with`` block on backend ``name`` (thread- and task-local)."""
    token = _override.set(_check_name(name, "use_backend(name)"))
    try:
        yield
    finally:
        _override.reset(token)


def _env_reader():
    """A function returning $BRAINKERN_BACKEND now (it is read on every op, so it must be cheap).

    os.environ.get costs ~1 us (it encodes the key and decodes the value); on POSIX the mapping
    keeps the raw bytes in ``_data``, which a plain dict lookup reads in ~0.05 us, and which
    os.environ's own setters (monkeypatch.setenv included) keep current.
    """
    data = getattr(os.environ, "_data", None)
    if os.name == "posix" and isinstance(data, dict):
        key = os.fsencode(ENV_VAR)

        def read():
            value = data.get(key)
            return None if value is None else os.fsdecode(value)

        return read
    return lambda: os.environ.get(ENV_VAR)


_read_env = _env_reader()


def requested_backend() -> str | None:
    """The backend asked for explicitly: ``use_backend`` first, then ``BRAINKERN_BACKEND``."""
    name = _override.get()
    if name is not None:
        return name
    env = _read_env()
    return _check_name(env, ENV_VAR) if env else None


def _serves(name: str, family: str, device_type: str, dtype: torch.dtype) -> str | None:
    """Why backend ``name`` cannot run ``family`` on tensors of this device and dtype, or None."""
    why = _unavailable_reason(name)
    if why is not None:
        return why
    if name == "triton" and device_type == "cpu" and not triton_interpreting():
        return "CPU tensors need Triton's interpreter (TRITON_INTERPRET=1 before import)"
    try:
        module = kernels(name, family)
    except ModuleNotFoundError as error:
        if error.name != f"{BACKENDS[name].package}.{family}":
            raise
        return f"it has no {family} kernels"
    if device_type not in module.DEVICES:
        return f"its {family} kernels run on {'/'.join(module.DEVICES)} tensors, not {device_type}"
    if dtype not in module.DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in module.DTYPES)
        return (f"its {family} kernels support dtypes {names}, "
                f"not {str(dtype).removeprefix('torch.')}")
    return None


def select(family: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend that runs an op of ``family`` on tensors of ``device`` and ``dtype``."""
    name = requested_backend()
    if name is not None:
        why = _serves(name, family, device.type, dtype)
        if why is not None:
            raise RuntimeError(f"backend {name!r} cannot run this {family} op: {why}")
        return name
    return _default_backend(family, device.type, dtype)


@functools.cache
def _default_backend(family: str, device_type: str, dtype: torch.dtype) -> str:
    """The fastest backend serving (family, device_type, dtype); cached, as what is built
    cannot change."""
    order = ("triton", "torch") if device_type == "cuda" else ("native", "numba", "torch")
    for candidate in order:
        if _serves(candidate, family, device_type, dtype) is None:
            return candidate
    raise RuntimeError(f"no brainkern backend serves {family} on {device_type} tensors of "
                       f"dtype {dtype}")


@functools.cache
def kernels(name: str, family: str):
    """The kernel module of backend ``name`` for an op ``family`` ("linear", "conv", "pool")."""
    return importlib.import_module(f"{BACKENDS[name].package}.{family}")


# (requested backend, device, dtype, family) -> kernel module, for kernels_for. Only
# successful selections are kept: a backend that cannot serve raises every time.
_selected: dict = {}


def kernels_for(family: str, device: torch.device, dtype: torch.dtype):
    """``kernels(select(family, device, dtype), family)``, memoised: it runs on every op call.

    What decides the choice is the requested backend (use_backend or the environment, read live
    each call), the device and the dtype; the rest (what is built) cannot change while the
    process runs. Triton on CPU also depends on TRITON_INTERPRET, so that choice is not kept.
    The key holds the device itself: ``device.type`` builds its string through a C++ ostream
    on every access, 0.3 us alone and ~7 us inside a training step (measured).
    """
    requested = _override.get() or _read_env()
    key = (requested, device, dtype, family)
    kern = _selected.get(key)
    if kern is None:
        kern = kernels(select(family, device, dtype), family)
        if requested != "triton":
            _selected[key] = kern
    return kern

