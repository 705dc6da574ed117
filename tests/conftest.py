"""Test setup: Triton runs through its interpreter when there is no GPU.

TRITON_INTERPRET must be set before any @triton.jit function is decorated, i.e. before
brainkern's Triton modules are imported, so it is set here at collection time.
"""

import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from brainkern.kernels.native import conv as native_conv  # noqa: E402
from brainkern.kernels.native import linear as native_linear  # noqa: E402

# Every native kernel with a check_<name> twin, per family module.
_CHECKED_NATIVE_KERNELS = [
    (module, name) for module in (native_linear, native_conv) for name in dir(module)
    if not name.startswith(("check_", "_")) and hasattr(module, f"check_{name}")
]


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """A different but reproducible seed per test: fresh inputs, replayable failures."""
    seed = zlib.crc32(request.node.nodeid.encode())  # str hash() differs per process
    torch.manual_seed(seed)
    yield


@pytest.fixture(autouse=True)
def _native_kernels_check_their_arguments(monkeypatch):
    """In every test, each call into the native kernels first runs the kernel's argument check.

    The kernels trust their arguments (the C++ core sees only addresses), and the ops layer is
    what makes that safe: with this, every test that goes through the ops layer also shows that
    it hands the kernels only arguments they can run.
    """
    for module, name in _CHECKED_NATIVE_KERNELS:
        kernel, check = getattr(module, name), getattr(module, f"check_{name}")

        def checked(*args, _kernel=kernel, _check=check, **kwargs):
            _check(*args)
            return _kernel(*args, **kwargs)

        monkeypatch.setattr(module, name, checked)
