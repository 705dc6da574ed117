// Which ISA's kernels run, and the multi-threaded drivers around them. Compiled with baseline
// flags only: nothing here may execute an AVX instruction before the CPU check.
#pragma once

#include <string>
#include <vector>

#include "common.h"
#include "conv.h"
#include "pool.h"

namespace bk {

// ISAs built into this extension that this CPU runs, best first: "avx512", "avx2", "portable".
std::vector<std::string> supported_isas();

// The default ISA: $BRAINKERN_NATIVE_ISA if set, else the best supported. Decided on the first
// call; throws std::runtime_error if the variable names an unknown or unsupported ISA.
const IsaKernels& default_isa();

// The named ISA ("" means default_isa()); throws std::invalid_argument if it is unknown or
// this CPU does not support it.
const IsaKernels& isa_kernels(const std::string& name);

// g (see GemmArgs) on up to `threads` threads; fewer when the problem is too small to share.
void gemm(const IsaKernels& isa, const GemmArgs& g, int threads);

// g (see ActBackwardArgs); when grad_bias is not null, also grad_bias[j] = sum_i grad_pre[i, j]
// (n floats), summed in double in an order that does not depend on `threads`.
void activation_backward(const IsaKernels& isa, const ActBackwardArgs& g, float* grad_bias,
                         int threads);

// The calling thread's partial-sum space for grad_bias, in bytes: what it holds between calls,
// and what its last activation_backward used.
struct BackwardScratch {
  size_t held_bytes, last_call_bytes;
};
BackwardScratch backward_scratch();

// g (see LinearBackwardArgs) on up to `threads` threads: the activation backward and bias sums,
// then the two GEMMs, side by side on one thread each when neither is worth two threads.
void linear_backward(const IsaKernels& isa, const LinearBackwardArgs& g, int threads);

// The convolution family (brainkern/kernels/__init__.py's contract; geometry in conv.h), on up
// to `threads` threads. x, w, bias, out, pre: float32 in the layouts ConvGeometry describes;
// bias and pre may be null. out must not alias an input.
void conv2d_forward(const IsaKernels& isa, const ConvGeometry& c, const float* x,
                    const float* w, const float* bias, float* out, float* pre, int act,
                    float act_param, int threads);
// x has the convolution's output shape, out its input shape.
void conv_transpose2d_forward(const IsaKernels& isa, const ConvGeometry& c, const float* x,
                              const float* w, const float* bias, float* out, float* pre,
                              int act, float act_param, int threads);
// grad_w (c_out, c_in / groups, kh, kw) = the sum over pixels of grad_pre x cols; the same
// result on any number of threads.
void conv2d_backward_weight(const IsaKernels& isa, const ConvGeometry& c, const float* grad_pre,
                            const float* x, float* grad_w, int threads);
void conv2d_activation_backward(const IsaKernels& isa, const ConvActBackwardArgs& a,
                                int threads);
// conv2d_activation_backward then conv2d_backward_weight, with grad_out and saved contiguous in
// c's layout (c_out channels), without storing grad_pre: thin stride-1 layers (the stems, whose
// input needs no gradient) compute each image's dz where the weight gradient reads it.
void conv2d_activation_backward_weight(const IsaKernels& isa, const ConvGeometry& c,
                                       const float* grad_out, const float* saved, const float* x,
                                       float* grad_w, float* grad_bias, int act, float act_param,
                                       int threads);
// Bytes the calling thread's conv buffers hold between calls (each at most 4 MB).
size_t conv_scratch_bytes();
// The fused conv block: c describes the convolution (h_out, w_out: its full output, never
// stored); out, indices and pre (or null) are (n, c_out, h_out / 2, w_out / 2) in c's layout:
// act(conv + bias) max-pooled 2x2, stride 2, the winners' flat indices h * w_out + w (or
// window codes 2u + v; both null: no winner recorded) and their pre-activations.
void conv2d_maxpool2d_forward(const IsaKernels& isa, const ConvGeometry& c, const float* x,
                              const float* w, const float* bias, float* out, int64_t* indices,
                              uint8_t* codes, float* pre, int act, float act_param, int threads);

// The conv block's backward from the pooled gradient (its activation's derivative applied):
// grad_x and grad_w (each null when not wanted; c's h_out x w_out is the conv output's size)
// of the convolution whose dz is grad_pooled at the winners its window codes name and zero
// elsewhere, from the winners' products alone. Returns false, having written nothing, when
// grad_pooled, or x for grad_w, or w for grad_x, has an infinite or NaN value (torch's dense
// sums keep 0 * inf = NaN: the caller runs the dense backward).
// With act kRelu or kLeakyRelu (a slope >= 0), grad_pooled is the pooled output's gradient g
// and saved the pooled output: dz = g * act'(saved), as activation_backward_rows computes it;
// with grad_bias (c_out) it also writes sum(dz) per channel, and then needs grad_w.
bool conv2d_maxpool2d_backward(const IsaKernels& isa, const ConvGeometry& c,
                               const float* grad_pooled, const uint8_t* codes, const float* x,
                               const float* w, float* grad_x, float* grad_w, int threads,
                               const float* saved = nullptr, int act = kNone,
                               float act_param = 0.0f, float* grad_bias = nullptr);

// FLOP/s / 1e9 of the ISA's multiply-add loop on `threads` threads for about `seconds`.
double fma_peak_gflops(const IsaKernels& isa, int threads, double seconds);

// The pooling family's 2x2 windows of stride 2 (pool.h's Pool2x2 describes x and out), float32,
// on up to `threads` threads. max: out = each window's maximum, indices (or null) its flat tap,
// codes (or null) its place in the window (pool.h's PoolBlock).
void max_pool2x2_forward(const IsaKernels& isa, const Pool2x2& s, const float* x, float* out,
                         int64_t* indices, uint8_t* codes, int threads);
// grad_x (x's shape) = grad_out at each window's index or, when indices is null, code; zero
// elsewhere; written whole.
void max_pool2x2_backward(const IsaKernels& isa, const Pool2x2& s, const float* grad_out,
                          const int64_t* indices, const uint8_t* codes, float* grad_x,
                          int threads);
// out = each window's sum * scale; its adjoint, grad_x written whole.
void avg_pool2x2_forward(const IsaKernels& isa, const Pool2x2& s, const float* x, float* out,
                         float scale, int threads);
void avg_pool2x2_backward(const IsaKernels& isa, const Pool2x2& s, const float* grad_out,
                          float* grad_x, float scale, int threads);

}  // namespace bk
