"""The ``native`` backend's pool family: Numba's kernels (brainkern/kernels/numba/pool.py).

Pooling is memory-bound and not matrix-shaped, so the C++ core has nothing to add (DESIGN.md:
native is C++ for matrix-shaped work, Numba for the rest); this module only declares what the
native backend serves for pooling.
"""

import torch

from brainkern.kernels.numba.pool import (  # noqa: F401 - the family's interface, re-exported
    adaptive_avg_pool2d_backward,
    adaptive_avg_pool2d_forward,
    avg_pool2d_backward,
    avg_pool2d_forward,
    max_pool2d_backward,
    max_pool2d_forward,
)

DEVICES = ("cpu",)
DTYPES = (torch.float32, torch.float64)
