// A small persistent thread pool for the GEMM's parallel loop.
//
// Not OpenMP: torch's wheel bundles its own OpenMP runtime, and a second runtime in this
// extension would keep a second set of spinning threads on the same cores.
#pragma once

#include <functional>

namespace bk {

// Runs fn(t) for every t in [0, n): t = 0 on the calling thread, the others on pool workers
// (started on first need, then kept). Returns when all are done; rethrows a worker's exception
// as std::runtime_error. If another thread is already running a parallel_for, the calls run one
// after another on the calling thread instead (results never depend on the pool). A child
// process forked after the workers started abandons them and starts its own. n < 65536.
void parallel_for(int n, const std::function<void(int)>& fn);

}  // namespace bk
