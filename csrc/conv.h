// The convolution family's shared structs: the geometry every conv kernel reads, and the table
// of conv pieces each ISA translation unit exports (conv.inc). Plain structs and declarations
// only, for the reason common.h gives.
#pragma once

#include <cstdint>
#include <type_traits>

namespace bk {

// A 2-D convolution from `in` (n, c_in, h, w) to `out` (n, c_out, h_out, w_out) with weight
// (c_out, c_in / groups, kh, kw); both activation tensors contiguous as NCHW, or as NHWC when
// nhwc. A transposed convolution is described by the convolution it is the adjoint of: its
// input has `out`'s shape here and its output `in`'s. Output pixel (oh, ow) reads input
// (oh * sh - ph + i * dh, ow * sw - pw + j * dw) for tap (i, j); reads outside are zeros.
struct ConvGeometry {
  int64_t n, c_in, h, w;
  int64_t c_out, h_out, w_out;
  int64_t kh, kw, sh, sw, ph, pw, dh, dw;
  int64_t groups;
  bool nhwc;
};

// One image of a convolution as an implicit GEMM (conv_implicit.inc): no im2col, the
// register tile's rows read the padded input in place. Output pixels are numbered on a virtual
// grid of rows x wv (wv: the output width rounded up to ConvKernels::implicit_group), each
// group of that many pixels within one row; the tile's groups may come from different rows.
//   xpad: the image in NHWC, zero-padded: rows of wp pixels of c_in floats, pixel (r, q) the
//         input's (r - ph, q - pw); every tap of every virtual pixel inside it. Output pixel
//         (oh, ow)'s tap (0, 0) is xpad's pixel (oh * sh, ow * sw).
//   tap_offsets[t]: floats from a pixel's tap (0, 0) to its tap t = (i, j): (i dh wp + j dw) c_in.
//   b_packed: the weight as pack_b_panels of K x c_out, K ordered (tap, ci).
//   bias: c_out floats padded to a multiple of nr (zeros past c_out), or null.
//   out, pre (or null): virtual pixel v's c_out outputs at v * ldo (ldo a multiple of nr), for
//         v < rows; a tile with rows past `rows` goes through `edge` (kMR x ldo floats, then
//         as many for pre), its real rows copied out after its last tap. A virtual output
//         (rows: pixels rounded up to the tile, the rows past pixels scratch) needs no edge;
//         an NHWC output tensor written in place (rows = pixels, ldo = c_out) does.
//   Only the tiles of pixels [v_begin, v_end) are computed (v_begin a multiple of the tile).
//   row_taps[2 oh], [2 oh + 1]: output row oh's taps whose kernel row reads inside the input,
//         [lo, hi) (lo = taps, hi = 0 if none): a tile runs the taps that any of its rows
//         needs, not the padding's zeros (16x16 5x5 padding 2: 7% of the products). Null:
//         every tap (a weight with an inf or NaN, whose products with zeros torch keeps).
struct ImplicitConv {
  const float* xpad;
  int64_t wp, c_in, pixels, wv, v_begin, v_end, sh, sw;
  const int64_t* tap_offsets;
  const int64_t* row_taps;
  int64_t taps;
  const float* b_packed;
  int64_t c_out;
  const float* bias;
  int act;
  float act_param;
  float* out;
  float* pre;
  int64_t ldo, rows;
  float* edge;
};

// One image's share of a convolution's weight gradient as an implicit GEMM
// (conv_implicit.inc): acc (K x ld, K = taps * c_in ordered (tap, ci), rows past K rounded up
// to the tile are scratch) = (first ? 0 : acc) + dW^T, summing over the image's h_out x w_out
// output pixels, their inputs read in place from xpad (as ImplicitConv's, with its tap
// offsets); dz_packed: the image's dz as pack_b_panels of pixels x c_out. c_in must be a
// multiple of ConvKernels::implicit_group. tap_rows[2 t], [2 t + 1] and tap_cols (likewise):
// the output rows and columns, [lo, hi), where tap t reads inside the input (lo = h_out or
// w_out, hi = 0 if none): a tile sums over the pixels any of its taps needs, not the padding's
// zeros (16x16 5x5 padding 2: 14% of the products); both null: every pixel (a dz with an inf
// or NaN, whose products with zeros torch keeps).
struct ImplicitWeightGrad {
  const float* xpad;
  int64_t wp, c_in, h_out, w_out, sh, sw;
  const int64_t* tap_offsets;
  const int64_t* tap_rows;
  const int64_t* tap_cols;
  int64_t taps;
  const float* dz_packed;
  int64_t c_out;
  float* acc;
  int64_t ld;
  bool first;
};

// The pieces of the convolutions that run per ISA; the drivers (conv_dispatch.inc) cut the work
// into chunks of output pixels and call these and the GEMM on them.
// Winograd F(2x2, r x r)'s output transform (ConvKernels::winograd_output), a = r + 1: tiles
// [t0, t1) of an image tiles_w tiles wide, tile t's a^2 transformed sums (element e = a i + j)
// at m[e * m_step + (t - t0) * ldm + co]; its 2x2 outputs (those inside h_out x w_out) + bias
// (or none), pre (when not null) and act into the image's NHWC out, whose first row is output
// row row0.
// f(std::integral_constant<int, r>{}) for Winograd's kernel sizes r = 2, 3, 5 (winograd.inc).
template <class F>
decltype(auto) with_winograd_r(int64_t r, F&& f) {
  if (r == 2) return f(std::integral_constant<int, 2>{});
  if (r == 3) return f(std::integral_constant<int, 3>{});
  return f(std::integral_constant<int, 5>{});
}

struct WinogradOut {
  int r;
  const float* m;
  int64_t m_step, ldm, t0, t1, tiles_w, c_out, h_out, w_out, row0;
  const float* bias;
  int act;
  float act_param;
  float* out;
  float* pre;
};

// The fused conv block's backward (conv_block_dispatch.inc's conv2d_maxpool2d_backward). Behind
// a 2x2 max pooling dz is zero but at each window's winner, so the weight and input gradients
// need only the winners' products: a quarter of a dense convolution's. Both kernels work in
// "slots" of `lanes` floats (ConvKernels::pooled_lanes, or 8 where a run fits in 8 and the ISA's
// vectors are wider: conv_block_dispatch.inc's pooled_slots): a run of one patch row's taps in a
// padded NHWC image (ImplicitConv's xpad), slot j at slot_offsets[j] floats from a pixel's tap
// (0, 0); the lanes past a row's taps are scratch. Entry i of the list: src + where[i], times
// grads[i].
//   pooled_weight_grad: dst[j * lanes + l] += sum over i of grads[i] * src[where[i] +
//     slot_offsets[j] + l] (src: xpad, where: the winners' taps (0, 0); dst: a channel's slots).
//   pooled_input_grad: dst[slot_offsets[j] + l] += sum over i of grads[i] * src[where[i] +
//     j * lanes + l] (src: the weight in slots, zero in the scratch lanes, where: the winning
//     channels' rows; dst: dxpad at the output pixel's tap (0, 0), which they share).
struct PooledGrad {
  const float* src;
  const int64_t* where;
  const float* grads;
  int64_t count;
  const int64_t* slot_offsets;
  int64_t slots;
  float* dst;
  int64_t lanes;
};

// A pooled plane's winners, as pooled_weight_grad's list (conv_pooled.inc's pooled_winners):
// every pixel p < count, a zero's products adding nothing (for a ReLU only the windows whose
// four taps are all <= 0, ~1/16, so no list is compacted): where[p] = base + window[p] +
// (code & 1) * col + (code >> 1 & 1) * row, the winning tap's (0, 0) for code = codes[p];
// grads[p] = dz = grad[p] * (signs[p] > 0 ? 1 : below). Returns whether every grad[p] was
// finite.
struct PooledPlane {
  const float* grad;
  const float* signs;
  float below;
  const uint8_t* codes;
  const int64_t* window;
  int64_t base, col, row, count;
};

struct ConvKernels {
  // NCHW: cols[k * rows + r] for k = (ci, i, j) of group g (weight's own order) and output
  // pixel p0 + r of image `image` (r < rows, p0 + rows <= h_out * w_out): the input tap, or 0.
  void (*im2col_nchw)(const ConvGeometry& c, const float* in, int64_t image, int64_t g,
                      int64_t p0, int64_t rows, float* cols);
  // NHWC: cols[r * K + (i * kw + j) * cin_g + ci] for output pixel m0 + r of the whole batch
  // (pixels numbered image-major), group g.
  void (*im2col_nhwc)(const ConvGeometry& c, const float* in, int64_t g, int64_t m0,
                      int64_t rows, float* cols);
  // The adjoints of the two above: every cols element is added to the input tap it was read
  // from (taps outside are dropped). `in` is the whole input tensor.
  void (*col2im_nchw)(const ConvGeometry& c, const float* cols, int64_t image, int64_t g,
                      int64_t p0, int64_t rows, float* in);
  void (*col2im_nhwc)(const ConvGeometry& c, const float* cols, int64_t g, int64_t m0,
                      int64_t rows, float* in);
  // z = v[r, j] + bias (bias[r] when bias_per_row, else bias[j]; none when null); pre[r, j] = z
  // when pre is not null; v[r, j] = act(z). v and pre: rows x cols with row strides ldv, ldp.
  void (*bias_act)(float* v, int64_t ldv, float* pre, int64_t ldp, int64_t rows, int64_t cols,
                   const float* bias, bool bias_per_row, int act, float act_param);
  // dst[j * ldd + i] = src[i * lds + j] for i < rows, j < cols: NCHW <-> NHWC for one image.
  void (*transpose)(const float* src, int64_t lds, float* dst, int64_t ldd, int64_t rows,
                    int64_t cols);
  // Direct convolution for groups whose every output channel reads one input channel
  // (depthwise, with any channel multiplier): images [n0, n1) of out (and pre), bias and
  // activation applied. No GEMM: a reduction of kh * kw cannot fill a register tile.
  void (*depthwise_forward)(const ConvGeometry& c, const float* in, const float* weight,
                            const float* bias, float* out, float* pre, int act, float act_param,
                            int64_t n0, int64_t n1);
  // The depthwise convolution's adjoints (groups as for depthwise_forward), each element
  // gathered, not scattered. depthwise_backward_input: images [n0, n1) of dx (c's input
  // shape) from dz (its output shape), written whole; weight as depthwise_forward reads it.
  // depthwise_backward_weight: dW summed over images [n0, n1) into acc (c_out * kh * kw,
  // written whole), tap-major (tap * c_out + co) for NHWC, the weight's order for NCHW.
  void (*depthwise_backward_input)(const ConvGeometry& c, const float* dz, const float* weight,
                                   float* dx, int64_t n0, int64_t n1);
  void (*depthwise_backward_weight)(const ConvGeometry& c, const float* dz, const float* x,
                                    float* acc, int64_t n0, int64_t n1);
  // Direct stride-1 convolution of one image for thin NCHW layers (groups 1, a few input or
  // output channels), vectorised over the output pixels of a row: a reduction of kh * kw * c_in
  // cannot fill a GEMM's register tile, but each input vector feeds kDirectChannels output
  // channels; nor can a few output channels, whose rows share the loaded taps instead.
  // (A grouped layer runs it a group at a time, each group as a layer of its own.) padded:
  // c_in planes of rows x width (the input at row ph, column pw, zeros around it, at least
  // h_out + (kh - 1) * dh + kDirectRows - 1 rows and w_out + (kw - 1) * dw + lanes wide);
  // weight: (ceil(c_out / kDirectChannels), c_in, kh, kw, kDirectChannels), zero past c_out.
  // out, pre: the image's (c_out, h_out, w_out).
  void (*direct_nchw)(const ConvGeometry& c, const float* padded, int64_t rows, int64_t width,
                      const float* weight, int64_t block, const float* bias, float* out,
                      float* pre, int act, float act_param);
  // The weight gradient of the same layers, one image: acc[e * kDirectLanes + l] (+)= lane l's
  // share of dW element e = (co, ci, i, j), summed over the image's output pixels (dz: the
  // image's (c_out, h_out, w_out); padded as direct_nchw's). first: acc is overwritten, else
  // added to. The caller sums the lanes; lanes past the ISA's are left untouched.
  void (*direct_weight_grad)(const ConvGeometry& c, const float* padded, int64_t rows,
                             int64_t width, const float* dz, float* acc, bool first);
  // ImplicitConv's image, and the pixels per group of its virtual grid.
  void (*implicit_conv)(const ImplicitConv& a);
  void (*implicit_weight_grad)(const ImplicitWeightGrad& a);
  int64_t implicit_group;
  // Winograd F(2x2, r x r) for r = 3 or 5 (winograd.inc), NHWC, a = r + 1: the transformed
  // a x a input patches of tiles [0, tiles) of a padded block (wp pixels a row of c_in
  // channels; tile t at row 2 (t / tiles_w), column 2 (t % tiles_w)) into
  // v[e * v_step + t * c_in + ci], e = a i + j, returning whether all of them are finite; and
  // the inverse transform with the epilogue (WinogradOut).
  bool (*winograd_input)(int r, const float* xpad, int64_t wp, int64_t c_in, int64_t tiles_w,
                         int64_t tiles, float* v, int64_t v_step);
  void (*winograd_output)(const WinogradOut& o);
  // The weight gradient's transform of dz: tiles [0, tiles) of a zero-padded NHWC block of dz
  // (wq pixels a row of c_out channels; tile t's 2x2 values at row 2 (t / tiles_w), column
  // 2 (t % tiles_w)) into g[e * g_step + t * c_out + co], a^2 elements each, returning whether
  // all of them are finite.
  bool (*winograd_grad)(int r, const float* dzpad, int64_t wq, int64_t c_out, int64_t tiles_w,
                        int64_t tiles, float* g, int64_t g_step);
  void (*pooled_weight_grad)(const PooledGrad& a);
  void (*pooled_input_grad)(const PooledGrad& a);
  bool (*pooled_winners)(const PooledPlane& a, int64_t* where, float* grads);  // grad finite
  int64_t pooled_lanes;
};

constexpr int64_t kDirectChannels = 8;
constexpr int64_t kDirectRows = 8;  // direct_nchw's padded planes: this many rows - 1 extra
constexpr int64_t kDirectLanes = 16;  // acc slots per dW element in direct_weight_grad
constexpr int64_t kDirectTaps = 5;    // taps of a kernel row per pass of direct_weight_grad

// conv2d_activation_backward's arguments: grad_pre = grad_out * act'(saved), and grad_bias[c]
// = the sum of grad_pre over (n, h, w) when grad_bias is not null.
//   grad_out: (n, c, h, w), element at n * s_n + c * s_c + h * s_h + w * s_w.
//   saved, grad_pre: contiguous, NCHW or NHWC (nhwc). act: not kNone.
struct ConvActBackwardArgs {
  const float* grad_out;
  int64_t s_n, s_c, s_h, s_w;
  const float* saved;
  float* grad_pre;
  float* grad_bias;
  int64_t n, c, h, w;
  bool nhwc;
  int act;
  float act_param;
};

}  // namespace bk

namespace bk_avx512 { const bk::ConvKernels& conv_kernels(); }
namespace bk_avx2 { const bk::ConvKernels& conv_kernels(); }
namespace bk_portable { const bk::ConvKernels& conv_kernels(); }
