#include "dispatch.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>

#include "thread_pool.h"

namespace bk {
namespace {

// A thread's share must be worth waking it: 2^16 multiply-adds is ~1-2 us of work. The team is
// torch's OpenMP one, whose workers still spin from the last op, so a wake is cheap. Measured
// on 2 cores (AVX2), 1 vs 2 threads: 56^3 7.0 vs 5.6 us, 64^3 7.7 vs 5.7, 128 x 128 x 10 8.6
// vs 6.9, 512 x 128 x 10 50 vs 27; below 2^17 in all, 2 threads gained nothing.
constexpr int64_t kMinWorkPerThread = int64_t(1) << 16;

// The activation backward reads and writes each element once: a few ns of memory traffic, so a
// thread is worth waking only for 2^15 of them, and a call below 2^16 stays on one thread.
constexpr int64_t kMinBackwardPerThread = int64_t(1) << 15;
constexpr int64_t kMinBackwardParallel = int64_t(1) << 16;
// Rows are summed for grad_bias in blocks of about this many elements, each into its own
// partial sums, added in block order: the same blocks on any number of threads, so the same
// result. Small enough that a block of grad_pre is still in L2 when a thread finishes it.
constexpr int64_t kBackwardBlockElements = int64_t(1) << 14;
// At most this many blocks, so the partial sums take at most 64 rows of n doubles (was one row
// per block: M x N doubles once N > 8192, 1 GB at 4096 x 32768). Fixed, not the thread count,
// so the result still does not depend on the threads; 64 blocks still feed 64 threads.
constexpr int64_t kMaxBackwardBlocks = 64;
// Partial sums up to this size stay allocated for the thread's next call (no page faults for
// small layers); larger ones are freed when the call ends.
constexpr size_t kKeptBackwardSums = size_t(1) << 16;

struct IsaEntry {
  const char* name;
  bool (*supported)();
  const IsaKernels& (*kernels)();
};

#if defined(BK_WITH_X86_ISAS)
bool cpu_has_avx512() {
  __builtin_cpu_init();
  // GCC's check also asks the OS (XGETBV) whether it saves the zmm state.
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("fma");
}

bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#endif

bool always() { return true; }

const IsaEntry kIsas[] = {
#if defined(BK_WITH_X86_ISAS)
    {"avx512", cpu_has_avx512, bk_avx512::kernels},
    {"avx2", cpu_has_avx2, bk_avx2::kernels},
#endif
    {"portable", always, bk_portable::kernels},
};

const IsaKernels* find_supported(const std::string& name) {
  for (const IsaEntry& isa : kIsas)
    if (name == isa.name && isa.supported()) return &isa.kernels();
  return nullptr;
}

std::string unsupported_message(const std::string& name) {
  std::string built, here;
  bool is_built = false;
  for (const IsaEntry& isa : kIsas) {
    built += std::string(built.empty() ? "" : ", ") + isa.name;
    is_built = is_built || name == isa.name;
  }
  for (const std::string& isa : supported_isas()) here += (here.empty() ? "" : ", ") + isa;
  const std::string why = is_built ? "not supported by this CPU"
                                    : "not one this extension was built with (" + built + ")";
  return "ISA '" + name + "' is " + why + "; this CPU runs: " + here;
}

// Packing space, per thread and kept between calls: a fresh multi-MB buffer per call would be
// a fresh mmap, paying its page faults every time.
struct PackBuffer {
  float* data = nullptr;
  size_t floats = 0;
  ~PackBuffer() { std::free(data); }
  float* reserve(size_t need) {
    if (need > floats) {
      std::free(data);
      data = nullptr;
      floats = 0;
      const size_t bytes = (need * sizeof(float) + 63) / 64 * 64;
      data = static_cast<float*>(std::aligned_alloc(64, bytes));
      if (!data) throw std::bad_alloc();
      floats = need;
    }
    return data;
  }
  void trim(size_t keep) {
    if (floats <= keep) return;
    std::free(data);
    data = nullptr;
    floats = 0;
  }
  size_t bytes() const { return floats * sizeof(float); }
};
thread_local PackBuffer t_a_pack, t_b_pack;
// The activation backward's partial column sums, kept for the same reason while small.
thread_local std::vector<double> t_backward_sums;
thread_local size_t t_backward_sums_last_call = 0;  // doubles the last call used

int64_t ceil_div(int64_t x, int64_t y) { return (x + y - 1) / y; }

struct Grid {
  int rows = 1, cols = 1;  // threads split C into rows x cols blocks
};

// Each thread packs the A rows and B columns of its own block (no sharing, no barriers), so a
// grid is good when the slowest block's multiply-adds (h * w per k) plus its packing (~h + w
// per k, weighted as a packed float costing ~16 lane-FMAs) are smallest. A block narrow enough
// to read A in place packs only its w.
Grid choose_grid(const IsaKernels& isa, const GemmArgs& g, int threads) {
  const int64_t work = g.m * g.n * std::max<int64_t>(g.k, 1);
  const int64_t worth_waking = std::max<int64_t>(1, work / kMinWorkPerThread);
  threads = static_cast<int>(std::min<int64_t>(threads, worth_waking));
  const int64_t m_tiles = ceil_div(g.m, isa.mr), n_tiles = ceil_div(g.n, isa.nr);
  const bool a_unit_stride = g.a_stride_k == 1 || g.a_stride_m == 1;
  Grid best;
  double best_cost = -1.0;
  for (int rows = 1; rows <= threads && rows <= m_tiles; ++rows) {
    for (int cols = 1; rows * cols <= threads && cols <= n_tiles; ++cols) {
      const double h = double(ceil_div(m_tiles, rows) * isa.mr);
      const double w = double(ceil_div(n_tiles, cols) * isa.nr);
      const bool packs_a = !a_unit_stride || w > double(isa.in_place_a_cols);
      const double cost = h * w + 16.0 * ((packs_a ? h : 0.0) + w);
      if (best_cost < 0.0 || cost < best_cost) {  // ties keep the grid with fewer threads
        best_cost = cost;
        best = Grid{rows, cols};
      }
    }
  }
  return best;
}

// [begin, end) of part `i` of `parts` of [0, size), cut at multiples of `tile`.
void split(int64_t size, int64_t tile, int parts, int i, int64_t* begin, int64_t* end) {
  const int64_t tiles = ceil_div(size, tile);
  *begin = std::min(size, tiles * i / parts * tile);
  *end = std::min(size, tiles * (i + 1) / parts * tile);
}

}  // namespace

std::vector<std::string> supported_isas() {
  std::vector<std::string> names;
  for (const IsaEntry& isa : kIsas)
    if (isa.supported()) names.emplace_back(isa.name);
  return names;
}

const IsaKernels& default_isa() {
  static const IsaKernels* chosen = [] {
    const char* env = std::getenv("BRAINKERN_NATIVE_ISA");
    const std::string wanted = env && *env ? env : supported_isas().front();
    const IsaKernels* isa = find_supported(wanted);
    if (!isa)
      throw std::runtime_error("BRAINKERN_NATIVE_ISA: " + unsupported_message(wanted));
    return isa;
  }();
  return *chosen;
}

const IsaKernels& isa_kernels(const std::string& name) {
  if (name.empty()) return default_isa();
  const IsaKernels* isa = find_supported(name);
  if (!isa) throw std::invalid_argument(unsupported_message(name));
  return *isa;
}

void gemm(const IsaKernels& isa, const GemmArgs& g, int threads) {
  if (g.m == 0 || g.n == 0) return;
  if (8 * g.n <= 5 * isa.nr && g.k >= 400 && g.a_stride_k == 1 && g.b_stride_k == 1 &&
      !g.accumulate) {
    // Narrow C from k-contiguous A and B (nn.Linear's forward into few outputs): dot products.
    // Their lane sums cost about what idle lanes cost the packed kernel at 2/3 of nr columns:
    // on AVX2 (nr 16), n = 10 gained 10% at k = 128 and 57% at k = 784, n = 15 lost 15%.
    // Only for a long k: the lane sums per element, and k below the lanes done one by one,
    // made short ones slower (AVX-512, 2 threads: 9216 x 8 -> 8, a 1x1 conv, 185 us against
    // 34 packed; 9216 x 128 -> 16 448 against 223; 64 x 128 -> 10 4.6 against 4.1; while
    // 64 x 400 -> 10 took 5.8 against 8.7, 64 x 784 -> 10 8.3 against 14.1).
    const int64_t work = g.m * g.n * std::max<int64_t>(g.k, 1);
    const int64_t row_blocks = ceil_div(g.m, isa.dot_rows);
    const int team = static_cast<int>(
        std::min<int64_t>({threads, row_blocks, std::max<int64_t>(1, work / kMinWorkPerThread)}));
    parallel_for(team, [&](int t) {
      int64_t m0, m1;
      split(g.m, isa.dot_rows, team, t, &m0, &m1);
      if (m0 < m1) isa.gemm_dot_rows(g, m0, m1);
    });
    return;
  }
  const Grid grid = choose_grid(isa, g, threads);
  parallel_for(grid.rows * grid.cols, [&](int t) {
    int64_t m0, m1, n0, n1;
    split(g.m, isa.mr, grid.rows, t / grid.cols, &m0, &m1);
    split(g.n, isa.nr, grid.cols, t % grid.cols, &n0, &n1);
    if (m0 >= m1 || n0 >= n1) return;
    const int64_t kc = std::min<int64_t>(isa.kc, std::max<int64_t>(g.k, 1));
    const int64_t mc = std::min<int64_t>(isa.mc, ceil_div(m1 - m0, isa.mr) * isa.mr);
    const int64_t nc = std::min<int64_t>(isa.nc, ceil_div(n1 - n0, isa.nr) * isa.nr);
    isa.gemm_block(g, m0, m1, n0, n1, t_a_pack.reserve(size_t(mc * kc)),
                   t_b_pack.reserve(size_t(kc * nc)));
  });
}

void activation_backward(const IsaKernels& isa, const ActBackwardArgs& g, float* grad_bias,
                         int threads) {
  if (g.n == 0) return;
  if (g.m == 0) {
    if (grad_bias) std::fill(grad_bias, grad_bias + g.n, 0.0f);
    return;
  }
  const int64_t elements = g.m * g.n;
  const int64_t block_rows = std::max<int64_t>(
      {1, kBackwardBlockElements / g.n, ceil_div(g.m, kMaxBackwardBlocks)});
  const int64_t blocks = ceil_div(g.m, block_rows);
  int64_t team = 1;
  if (elements >= kMinBackwardParallel)
    team = std::min<int64_t>({threads, blocks, elements / kMinBackwardPerThread});
  double* sums = nullptr;
  t_backward_sums_last_call = grad_bias ? size_t(blocks * g.n) : 0;
  if (grad_bias) {
    t_backward_sums.assign(t_backward_sums_last_call, 0.0);
    sums = t_backward_sums.data();
  }
  auto run_blocks = [&](int t) {
    for (int64_t b = blocks * t / team; b < blocks * (t + 1) / team; ++b)
      isa.activation_backward_rows(g, b * block_rows, std::min(g.m, (b + 1) * block_rows),
                                   sums ? sums + b * g.n : nullptr);
  };
  if (team == 1) {
    run_blocks(0);  // no std::function, no OpenMP region: small calls stay a few us
  } else {
    parallel_for(int(team), run_blocks);
  }
  if (!grad_bias) return;
  for (int64_t b = 1; b < blocks; ++b)
    for (int64_t j = 0; j < g.n; ++j) sums[j] += sums[b * g.n + j];
  for (int64_t j = 0; j < g.n; ++j) grad_bias[j] = float(sums[j]);
  if (t_backward_sums.capacity() > kKeptBackwardSums) std::vector<double>().swap(t_backward_sums);
}

BackwardScratch backward_scratch() {
  return {t_backward_sums.capacity() * sizeof(double), t_backward_sums_last_call * sizeof(double)};
}

void linear_backward(const IsaKernels& isa, const LinearBackwardArgs& g, int threads) {
  const bool act = g.act != kNone;
  if (act || g.grad_bias) {
    const ActBackwardArgs a{g.grad_out, g.grad_out_stride_m, g.grad_out_stride_n, g.saved,
                            g.grad_pre, g.m, g.n, g.act, g.act_param};
    activation_backward(isa, a, g.grad_bias, threads);
  }
  // dz: grad_pre, or grad_out itself without an activation.
  const float* dz = act ? g.grad_pre : g.grad_out;
  const int64_t dz_sm = act ? g.n : g.grad_out_stride_m;
  const int64_t dz_sn = act ? 1 : g.grad_out_stride_n;
  const GemmArgs gx{dz, dz_sm, dz_sn, g.w, g.w_stride_n, g.w_stride_k, nullptr,
                    g.grad_x, g.k, nullptr, 0, g.m, g.k, g.n, kNone, 0.0f};
  const GemmArgs gw{dz, dz_sn, dz_sm, g.x, g.x_stride_m, g.x_stride_k, nullptr,
                    g.grad_w, g.k, nullptr, 0, g.n, g.k, g.m, kNone, 0.0f};
  // Each GEMM has the same m * n * k multiply-adds. Too few to share one GEMM between threads,
  // the two still run side by side (measured here, 64 x 128 -> 10: ~2 us less per backward).
  const bool both = g.grad_x && g.grad_w;
  if (both && threads >= 2 && g.m * g.n * g.k < 2 * kMinWorkPerThread) {
    parallel_for(2, [&](int t) { gemm(isa, t == 0 ? gx : gw, 1); });
    return;
  }
  if (g.grad_x) gemm(isa, gx, threads);
  if (g.grad_w) gemm(isa, gw, threads);
}

double fma_peak_gflops(const IsaKernels& isa, int threads, double seconds) {
  using Clock = std::chrono::steady_clock;
  std::vector<double> flops(size_t(threads), 0.0);
  const auto start = Clock::now();
  parallel_for(threads, [&](int t) {
    const auto deadline = Clock::now() + std::chrono::duration<double>(seconds);
    do {
      flops[size_t(t)] += isa.fma_burst(1 << 16);  // ~0.1-1 ms per burst
    } while (Clock::now() < deadline);
  });
  const double elapsed = std::chrono::duration<double>(Clock::now() - start).count();
  double total = 0.0;
  for (double f : flops) total += f;
  return total / elapsed / 1e9;
}

#include "conv_helpers.inc"
#include "conv_dispatch.inc"
#include "conv_backward_dispatch.inc"
#include "conv_block_dispatch.inc"
#include "pool_dispatch.inc"

}  // namespace bk
