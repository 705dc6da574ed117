#include "thread_pool.h"

#include <pthread.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace bk {
namespace {

// Spin this many pause instructions (~50-100 us) before sleeping on a condition variable:
// back-to-back calls (a training loop) then skip the futex wake-up, ~20-50 us each way, yet an
// idle pool soon stops burning the cores that torch's threads also run on.
constexpr int kSpinPauses = 2000;

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

class ThreadPool {
 public:
  void run(int n, const std::function<void(int)>& fn) {
    std::unique_lock<std::mutex> busy(run_mu_, std::try_to_lock);
    if (!busy.owns_lock()) {
      for (int t = 0; t < n; ++t) fn(t);
      return;
    }
    start_workers(n - 1);
    {
      std::lock_guard<std::mutex> lock(mu_);
      task_ = &fn;
      pending_.store(n - 1, std::memory_order_relaxed);
      error_.clear();
      const uint64_t generation = (post_.load(std::memory_order_relaxed) >> 16) + 1;
      post_.store(generation << 16 | static_cast<uint64_t>(n - 1), std::memory_order_release);
    }
    wake_.notify_all();
    std::exception_ptr caller_error;
    try {
      fn(0);
    } catch (...) {
      caller_error = std::current_exception();  // still wait: workers use fn's captures
    }
    for (int i = 0; i < kSpinPauses && pending_.load(std::memory_order_acquire) != 0; ++i)
      cpu_relax();
    std::unique_lock<std::mutex> lock(mu_);
    done_.wait(lock, [&] { return pending_.load(std::memory_order_acquire) == 0; });
    task_ = nullptr;
    if (caller_error) std::rethrow_exception(caller_error);
    if (!error_.empty()) throw std::runtime_error(error_);
  }

 private:
  void start_workers(int count) {
    while (static_cast<int>(workers_.size()) < count) {
      const int id = static_cast<int>(workers_.size());
      const uint64_t seen = post_.load(std::memory_order_relaxed) >> 16;
      workers_.emplace_back([this, id, seen] { work(id, seen); });
    }
  }

  void work(int id, uint64_t seen) {
    for (;;) {
      uint64_t current = post_.load(std::memory_order_acquire);
      for (int i = 0; i < kSpinPauses && current >> 16 == seen; ++i) {
        cpu_relax();
        current = post_.load(std::memory_order_acquire);
      }
      if (current >> 16 == seen) {
        std::unique_lock<std::mutex> lock(mu_);
        wake_.wait(lock, [&] {
          current = post_.load(std::memory_order_acquire);
          return current >> 16 != seen;
        });
      }
      seen = current >> 16;
      // A call smaller than the pool: sit it out. Non-participants are not waited for, so they
      // may skip generations; reading the count from the same word keeps them consistent.
      if (id >= static_cast<int>(current & 0xffff)) continue;
      try {
        (*task_)(id + 1);
      } catch (const std::exception& e) {
        std::lock_guard<std::mutex> lock(mu_);
        error_ = e.what();
      }
      if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        std::lock_guard<std::mutex> lock(mu_);  // pairs with the caller's predicate check
        done_.notify_one();
      }
    }
  }

  std::mutex run_mu_;  // one parallel_for at a time
  std::mutex mu_;
  std::condition_variable wake_, done_;
  std::vector<std::thread> workers_;
  const std::function<void(int)>* task_ = nullptr;  // read only by a call's participants
  std::string error_;
  // One word so a worker reads both consistently: (generation << 16) | participants.
  std::atomic<uint64_t> post_{0};
  std::atomic<int> pending_{0};
};

// Never destroyed: at exit the workers may still sleep in wait(), and destroying a joinable
// std::thread aborts. After fork() only the forking thread exists in the child, so the child
// drops the inherited pool (its locks may be held by threads that are gone) and builds its own.
std::atomic<ThreadPool*> g_pool{nullptr};

void forget_pool_in_child() { g_pool.store(nullptr, std::memory_order_relaxed); }

ThreadPool& pool() {
  ThreadPool* existing = g_pool.load(std::memory_order_acquire);
  if (existing) return *existing;
  static std::once_flag registered;
  std::call_once(registered, [] { pthread_atfork(nullptr, nullptr, forget_pool_in_child); });
  ThreadPool* fresh = new ThreadPool();
  if (g_pool.compare_exchange_strong(existing, fresh, std::memory_order_acq_rel)) return *fresh;
  delete fresh;  // another thread won the race; no workers were started on ours
  return *existing;
}

}  // namespace

void parallel_for(int n, const std::function<void(int)>& fn) {
  if (n <= 1) {
    if (n == 1) fn(0);
    return;
  }
  pool().run(n, fn);
}

}  // namespace bk
