// AVX-512 kernels: built with -mavx512f -mavx512bw -mavx512dq -mavx512vl -mfma (setup.py), run
// only where __builtin_cpu_supports says so (dispatch.cpp).
//
// Tile 12 x 32 (12 rows x 2 zmm): 24 accumulators + 2 B vectors + 1 broadcast of 32 zmm
// registers; 24 chains cover the 8 FMAs in flight (4-cycle latency x 2 pipes) three times over.
// isa_portable.cpp uses this same geometry, so this tile logic is tested on any x86-64 machine.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common.h"
#include "conv.h"
#include "pool.h"

namespace bk_avx512 {

typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
constexpr int kLanes = 16;
constexpr int kMR = 12, kNV = 2;
constexpr int64_t kKC = 256, kMC = 144, kNC = 4096;
constexpr int kEpilogueUnroll = kMR;
constexpr int kPeakChains = 24;
constexpr const char* kName = "avx512";

#include "vec_math.inc"
#include "act_backward.inc"
#include "gemm.inc"
#include "conv.inc"
#include "pool.inc"

}  // namespace bk_avx512
