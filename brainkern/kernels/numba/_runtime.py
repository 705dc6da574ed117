"""How many threads brainkern's Numba kernels run on, and what a forked child does.

- The thread count follows torch: ``torch.get_num_threads()``, capped at Numba's pool size
  (``NUMBA_NUM_THREADS``, fixed when the pool starts).
- numba#9387: starting Numba's pool can change torch's thread count when both use the same
  OpenMP runtime. Whenever brainkern sets Numba's count (the first time starts the pool),
  torch's count is checked and put back.
- The threading layer is Numba's default choice (tbb, else omp, else workqueue); on this
  project's machines that is omp, the fastest measured.
- GNU OpenMP is not fork-safe, and Numba's ``omp`` layer shares torch's libgomp with torch's
  ops and the native core: a child forked after the parent ran a team of any of them hangs
  (or, with Numba's own pool started, is killed: "fork() called from a process already using
  GNU OpenMP") at its first parallel region. DataLoader workers fork by default. So in such a
  child (brainkern/kernels/_openmp.py decides, for every OpenMP user at once; a child of a
  parent whose Numba pool had started is one too) every kernel runs its serial variant (a
  plain-``range`` twin of the ``prange`` kernel, compiled only when first needed). torch runs
  its workers on one thread too. A child of a single-threaded parent may start its own pool.

Each kernel family offers a ``parallel`` and a ``serial`` variant; :func:`threads` says which:
1 means serial, more means parallel with ``numba.set_num_threads`` already set to it.
"""

from __future__ import annotations

import os

import numba
import torch
from numba.np.ufunc import parallel as numba_parallel

from brainkern.kernels import _openmp

_state = {"pool_inherited": False}


def _after_fork_in_child() -> None:
    # A private flag, read defensively: if Numba renames it, assume the worst (serial).
    _state["pool_inherited"] = getattr(numba_parallel, "_is_initialized", True)


os.register_at_fork(after_in_child=_after_fork_in_child)


def threads() -> int:
    """The thread count for the next kernel call; 1 means: run the serial variant."""
    if _state["pool_inherited"] or _openmp.forked_serial():
        return 1
    torch_threads = torch.get_num_threads()
    count = max(1, min(torch_threads, numba.config.NUMBA_NUM_THREADS))
    if count > 1:
        # Numba's count is per calling Python thread, so it is checked on every call (~1 us);
        # the first check starts Numba's pool.
        if numba.get_num_threads() != count:
            numba.set_num_threads(count)
        if torch.get_num_threads() != torch_threads:
            torch.set_num_threads(torch_threads)
    return count
