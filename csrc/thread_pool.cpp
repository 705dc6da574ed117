#include "thread_pool.h"

#include <omp.h>
#include <pthread.h>

#include <atomic>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>

namespace bk {
namespace {

// Set in a child forked after this process ran an OpenMP team: GNU OpenMP's worker threads do
// not survive fork(), and the child's next team would wait for them forever (torch's own ops
// hang there too). Such a child runs every parallel_for serially instead.
std::atomic<bool> g_team_started{false};
std::atomic<bool> g_serial_only{false};

void after_fork_in_child() {
  if (g_team_started.load(std::memory_order_relaxed)) g_serial_only.store(true);
}

void register_fork_handler() {
  static std::once_flag registered;
  std::call_once(registered, [] { pthread_atfork(nullptr, nullptr, after_fork_in_child); });
}

}  // namespace

void run_serially() { g_serial_only.store(true); }

void parallel_for(int n, const std::function<void(int)>& fn) {
  register_fork_handler();
  if (n <= 1 || g_serial_only.load(std::memory_order_relaxed)) {
    for (int t = 0; t < n; ++t) fn(t);
    return;
  }
  g_team_started.store(true, std::memory_order_relaxed);
  std::mutex error_mu;
  std::exception_ptr error;
#pragma omp parallel num_threads(n)
  {
    // The runtime may grant fewer threads than asked (nesting, OMP_THREAD_LIMIT): every t in
    // [0, n) still runs, some threads taking several.
    const int team = omp_get_num_threads();
    for (int t = omp_get_thread_num(); t < n; t += team) {
      try {
        fn(t);
      } catch (...) {
        // An exception must not unwind through the OpenMP runtime's frames.
        std::lock_guard<std::mutex> lock(error_mu);
        if (!error) error = std::current_exception();
      }
    }
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace bk
