// Portable kernels: baseline flags only (SSE2 on x86-64), so they run on any CPU.
//
// Deliberately the AVX-512 geometry (16 lanes, 12 x 32 tile, same blocks): GCC lowers each
// 64-byte vector to four xmm operations, and the accumulators spill, so this is a slow
// fallback, but it runs exactly the tile, packing and edge logic of isa_avx512.cpp, which
// therefore gets tested on machines without AVX-512.
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common.h"
#include "conv.h"
#include "pool.h"

namespace bk_portable {

typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
constexpr int kLanes = 16;
constexpr int kMR = 12, kNV = 2;
constexpr int64_t kKC = 256, kMC = 144, kNC = 4096;
// 3 x 16 lanes = 12 xmm chains + 2 operands: what 16 xmm registers hold without spilling.
// Rolled epilogue: unrolled, the 8 activations over spilled 16-lane tiles more than double
// this file's compile time (to ~20 s), for a fallback.
constexpr int kEpilogueUnroll = 1;
constexpr int kPeakChains = 3;
constexpr const char* kName = "portable";

#include "vec_math.inc"
#include "act_backward.inc"
#include "gemm.inc"
#include "conv.inc"
#include "pool.inc"

}  // namespace bk_portable
