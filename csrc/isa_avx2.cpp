// AVX2 + FMA kernels: built with -mavx2 -mfma (setup.py), run only where
// __builtin_cpu_supports says so (dispatch.cpp).
//
// Tile 6 x 16 (6 rows x 2 ymm), BLIS's Haswell/Zen tile: 12 accumulators + 2 B vectors + 1
// broadcast of 16 ymm registers; 12 chains cover the 8 FMAs in flight (4-cycle latency x 2
// pipes). Blocks as BLIS's Zen 3 config: the A block (144 x 256, 144 KB) stays in a 512 KB L2,
// a B micro-panel (256 x 16, 16 KB) in a 32 KB L1.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common.h"
#include "conv.h"
#include "pool.h"

namespace bk_avx2 {

typedef float vf __attribute__((vector_size(32)));
typedef int32_t vi __attribute__((vector_size(32)));
constexpr int kLanes = 8;
constexpr int kMR = 6, kNV = 2;
constexpr int64_t kKC = 256, kMC = 144, kNC = 4080;
constexpr int kEpilogueUnroll = kMR;
constexpr int kPeakChains = 12;
constexpr const char* kName = "avx2";

#include "vec_math.inc"
#include "act_backward.inc"
#include "gemm.inc"
#include "conv.inc"
#include "pool.inc"

}  // namespace bk_avx2
