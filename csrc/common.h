// What every translation unit of the native core shares: the GEMM's arguments and the table of
// kernels each ISA translation unit exports.
//
// This header is compiled with every ISA's flags, so it holds only plain structs and
// declarations: an inline function or template defined here would be emitted by each ISA
// translation unit, and the linker may keep the AVX-512 copy for everyone (SIGILL elsewhere).
#pragma once

#include <cstdint>

namespace bk {

// Activation codes: brainkern/activations.py's table. Never renumber.
enum Activation : int {
  kNone = 0,
  kRelu = 1,
  kLeakyRelu = 2,
  kSigmoid = 3,
  kTanh = 4,
  kGelu = 5,  // exact, erf form
  kGeluTanh = 6,
  kSilu = 7,
  kActivationCount = 8,
};

// C = act(A @ B + bias), float32, with any element strides on A and B.
//   a:    (m, k); element (i, p) at a[i * a_stride_m + p * a_stride_k].
//   b:    (k, n); element (p, j) at b[p * b_stride_k + j * b_stride_n].
//   bias: (n,) contiguous, or nullptr.
//   out:  (m, n); element (i, j) at out[i * out_stride_m + j]. Also holds the partial sums
//         between k blocks, so it must not alias a, b or bias.
//   pre:  (m, n) like out with pre_stride_m, or nullptr; written with A @ B + bias.
//   act, act_param: the activation (act_param is leaky_relu's negative slope).
struct GemmArgs {
  const float* a;
  int64_t a_stride_m, a_stride_k;
  const float* b;
  int64_t b_stride_k, b_stride_n;
  const float* bias;
  float* out;
  int64_t out_stride_m;
  float* pre;
  int64_t pre_stride_m;
  int64_t m, n, k;
  int act;
  float act_param;
  // B already packed, all of it, by IsaKernels::pack_b_panels (b, b_stride_k and b_stride_n
  // then unused): for a B that many GEMMs share, such as a convolution's weight for every
  // chunk of pixels. Only for blocks whose first column n0 is a multiple of nr.
  const float* b_packed = nullptr;
  // out += A B, out's prior contents kept (a sum over several GEMMs, such as a weight
  // gradient's chunks of pixels), where it is otherwise overwritten; bias, pre and act unused.
  bool accumulate = false;
};

// grad_pre = grad_out * act'(saved), float32 (see act_backward.inc for which tensor is saved).
//   grad_out: (m, n); element (i, j) at grad_out[i * grad_out_stride_m + j * grad_out_stride_n].
//   saved, grad_pre: (m, n) contiguous.
//   act, act_param: as in GemmArgs. act == kNone reads only grad_out (saved and grad_pre may be
//   null): the bias gradient of a layer without activation, whose grad_pre is grad_out.
struct ActBackwardArgs {
  const float* grad_out;
  int64_t grad_out_stride_m, grad_out_stride_n;
  const float* saved;
  float* grad_pre;
  int64_t m, n;
  int act;
  float act_param;
};

// The whole backward of out = act(x @ W^T + bias), x (m, k), W (n, k), float32:
//   dz = grad_out * act'(saved) into grad_pre (dz = grad_out itself when act == kNone),
//   grad_bias = dz.sum(0), grad_x = dz @ W (m, k), grad_w = dz^T @ x (n, k).
//   grad_out: (m, n), any element strides. saved, grad_pre: (m, n) contiguous (unused, may be
//   null, when act == kNone). x, w: any element strides. grad_x, grad_w: contiguous, and
//   grad_bias (n,): each null when not wanted.
struct LinearBackwardArgs {
  const float* grad_out;
  int64_t grad_out_stride_m, grad_out_stride_n;
  const float* saved;
  float* grad_pre;
  const float* x;
  int64_t x_stride_m, x_stride_k;
  const float* w;
  int64_t w_stride_n, w_stride_k;
  float* grad_x;
  float* grad_w;
  float* grad_bias;
  int64_t m, n, k;
  int act;
  float act_param;
};

// One ISA's kernels. Cache blocking: a thread packs kc x nc of B (nc a multiple of nr) and
// mc x kc of A (mc a multiple of mr) at a time, into buffers the caller provides.
struct IsaKernels {
  const char* name;
  int mr, nr;
  int64_t kc, mc, nc;
  // A block of C at most this many columns wide reads A in place (when A has a unit stride)
  // instead of packing it: packing pays off only over many B micro-panels.
  int64_t in_place_a_cols;
  // Computes rows [m0, m1) x columns [n0, n1) of the GEMM, all of k. a_pack holds mc * kc
  // floats, b_pack kc * nc floats, both 64-byte aligned.
  void (*gemm_block)(const GemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1,
                     float* a_pack, float* b_pack);
  // Rows [m0, m1) of C, all columns, as dot products read straight from A and B: for C
  // narrower than nr when A's rows and B's columns are contiguous in k (a_stride_k ==
  // b_stride_k == 1). Rows are best split in multiples of dot_rows.
  void (*gemm_dot_rows)(const GemmArgs& g, int64_t m0, int64_t m1);
  int dot_rows;
  // Rows [r0, r1) of the activation backward; when sums is not null, also adds each column of
  // grad_pre (grad_out for kNone) to sums[j] (n doubles).
  void (*activation_backward_rows)(const ActBackwardArgs& g, int64_t r0, int64_t r1,
                                   double* sums);
  // Runs `iterations` rounds of independent multiply-adds; returns the FLOPs done.
  double (*fma_burst)(int64_t iterations);
  // Packs all of B (k x n, element (p, j) at b[p * sk + j * sn]) for GemmArgs::b_packed into
  // dst: ceil(n / nr) micro-panels of k x nr, columns past n zero.
  void (*pack_b_panels)(const float* b, int64_t sk, int64_t sn, int64_t k, int64_t n,
                        float* dst);
};

}  // namespace bk

// One table per translation unit, each compiled with its own ISA flags.
namespace bk_avx512 { const bk::IsaKernels& kernels(); }
namespace bk_avx2 { const bk::IsaKernels& kernels(); }
namespace bk_portable { const bk::IsaKernels& kernels(); }
