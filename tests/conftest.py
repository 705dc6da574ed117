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


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """A different but reproducible seed per test: fresh inputs, replayable failures."""
    seed = zlib.crc32(request.node.nodeid.encode())  # str hash() differs per process
    torch.manual_seed(seed)
    yield
