// The GEMM's parallel loop, on OpenMP.
//
// Why OpenMP and not a pool of our own: torch's wheel ships GNU OpenMP as libgomp.so.1, and
// brainkern imports torch before this extension, so the loader resolves our libgomp.so.1 to the
// runtime torch already loaded. The GEMM then runs on torch's own worker threads. A separate
// pool was measured 2x slower inside a training step: after each torch op, torch's workers spin
// for milliseconds on the same cores, starving a second set of threads.
#pragma once

#include <functional>

namespace bk {

// Runs fn(t) for every t in [0, n) on an OpenMP team of n threads (t = 0 on the calling
// thread) and returns when all are done, rethrowing the first exception. In a child forked
// after a team ran, runs them one after another on the calling thread.
void parallel_for(int n, const std::function<void(int)>& fn);

// From now on every parallel_for runs serially. Called in a forked child whose parent had
// started any OpenMP team (torch's, Numba's, ours: all are one libgomp), which the process's
// thread count at fork shows and this file alone cannot (brainkern/kernels/_openmp.py).
void run_serially();

}  // namespace bk
