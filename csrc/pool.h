// The pooling family's shared structs: 2x2 windows of stride 2 (every CNN's downsampling, and
// the fused conv block's), the only pooling the C++ core runs; other windows run in Numba
// (brainkern/kernels/native/pool.py). Plain structs and declarations only, for the reason
// common.h gives.
#pragma once

#include <cstdint>

namespace bk {

// 2x2 max pooling with stride 2 of a block of y (the fused conv block's conv outputs, or a
// pooling's input): pooled pixel (a, b) of channel ch takes tap (u, v) in {0, 1}^2 from
// y[(2a + u) * y_row + (2b + v) * y_pixel + ch * y_channel] (z, the pre-activation, alike)
// for a < rows, b < cols, ch < channels, and writes at a * out_row + b * out_pixel +
// ch * out_channel: out = the maximum (torch's rule: a tap replaces the best so far when
// greater or NaN), indices (when not null) = its flat tap (first_row + 2a + u) * conv_width +
// 2b + v, codes (when not null) = the tap's place in its window, 2u + v, and, when pre is not
// null, pre = z at that tap.
struct PoolBlock {
  const float* y;
  const float* z;
  int64_t y_row, y_pixel, y_channel;
  float* out;
  int64_t* indices;
  float* pre;
  int64_t out_row, out_pixel, out_channel;
  int64_t rows, cols, channels;
  int64_t first_row, conv_width;
  uint8_t* codes = nullptr;
};

// A pooling of x (planes, h, w, channels) into out (planes, ho, wo, channels) by 2x2 windows
// of stride 2 (2 * ho <= h, 2 * wo <= w), both contiguous: NCHW as (n * c, h, w, 1), NHWC as
// (n, h, w, c). A row task is pooled row `a` of plane `p`, numbered p * ho + a; the backward
// kernels write x's rows 2a and 2a + 1 whole for it (and, for a == ho - 1, the rows past 2 * ho
// that no window reads, as zeros), so row tasks split grad_x without overlap.
struct Pool2x2 {
  int64_t planes, h, w, channels, ho, wo;
};

// The pooling kernels of one ISA, on row tasks [r0, r1) (pool.inc).
struct PoolKernels {
  void (*max_pool_2x2)(const PoolBlock& p);
  // The same over whole rows of x into out (and indices or codes, each when not null).
  void (*max_pool_2x2_rows)(const Pool2x2& s, const float* x, float* out, int64_t* indices,
                            uint8_t* codes, int64_t r0, int64_t r1);
  // gx = g at the tap of each window that its index (flat h * w + w) or, when indices is null,
  // its code (2u + v) names, as PoolBlock writes them; zero at the window's other taps and at
  // taps no window reads.
  // stream: write gx with non-temporal stores (for a gx larger than the last-level cache).
  void (*max_pool_2x2_backward)(const Pool2x2& s, const float* g, const int64_t* indices,
                                const uint8_t* codes, float* gx, int64_t r0, int64_t r1,
                                bool stream);
  // The windows of a max_pool_2x2 block (channels contiguous, z given) whose winner a float32
  // error of up to tol[ch] in each z (act: none, relu or leaky_relu with a slope >= 0, all
  // monotone) could have changed: those where the winner's act(z - tol) does not clear every
  // other tap's act(z + tol) (strictly for an earlier tap: ties go to the first). Writes each
  // as (a * cols + b) * channels + ch to doubts (room for rows * cols * channels), in order;
  // returns their count.
  int64_t (*max_pool_2x2_doubts)(const PoolBlock& p, const float* tol, int act, float param,
                                 int64_t* doubts);
  // out = the window's sum (taps in scan order) * scale.
  void (*avg_pool_2x2)(const Pool2x2& s, const float* x, float* out, float scale, int64_t r0,
                       int64_t r1);
  // gx = g * scale at every tap of each window, zero at taps no window reads.
  void (*avg_pool_2x2_backward)(const Pool2x2& s, const float* g, float* gx, float scale,
                                int64_t r0, int64_t r1, bool stream);
};

}  // namespace bk

namespace bk_avx512 { const bk::PoolKernels& pool_kernels(); }
namespace bk_avx2 { const bk::PoolKernels& pool_kernels(); }
namespace bk_portable { const bk::PoolKernels& pool_kernels(); }
