"""What a forked child may run: every CPU backend shares one OpenMP runtime.

torch's ops, Numba's ``omp`` threading layer and the native core all run their teams on the
libgomp.so.1 that torch's wheel ships. GNU OpenMP's worker threads do not survive fork(), yet
the child's runtime still counts them: its next parallel region waits for them forever. Each
user tracking only its own team misses the others (a child of a parent that ran torch's ops
hung in the native GEMM). So brainkern looks at the whole process: libgomp's workers, once
started, stay alive, so a parent with more than one thread at fork may have had a team. A child
of such a parent, and every descendant of that child, runs brainkern's kernels serially
(DataLoader workers also run torch on one thread). Threads that are not OpenMP's make a child
serial needlessly, which costs speed, never correctness.

The handler is registered when brainkern is imported (brainkern/kernels/__init__.py imports
this module); a fork before that is not seen.
"""

from __future__ import annotations

import os

_state = {"serial": False, "parent_threads": 1}
_on_serial = []  # callbacks run in a child that must run serially


def _thread_count() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:  # no procfs: assume the worst
        return 2


def _before_fork() -> None:
    _state["parent_threads"] = _thread_count()


def _after_fork_in_child() -> None:
    if _state["serial"] or _state["parent_threads"] > 1:
        _state["serial"] = True
        for callback in _on_serial:
            callback()


os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


def forked_serial() -> bool:
    """True in a forked child whose kernels must run on one thread."""
    return _state["serial"]


def when_serial(callback) -> None:
    """Run ``callback()`` now if this process must run serially, and in every forked child that
    must (an OpenMP user that keeps its own flag, such as the native core)."""
    _on_serial.append(callback)
    if _state["serial"]:
        callback()
