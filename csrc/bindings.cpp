// brainkern._native: the Python face of the native core. Tensors cross as raw addresses plus
// element strides and sizes (never torch objects: the build needs no libtorch). The binding
// checks what it cheaply can, then releases the GIL for the work.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "dispatch.h"
#include "thread_pool.h"

namespace py = pybind11;

namespace {

// Throws ValueError (via std::invalid_argument) naming the function when ok is false.
void require(bool ok, const char* function, const char* what) {
  if (!ok) throw std::invalid_argument(std::string(function) + ": " + what);
}

void require(bool ok, const char* what) { require(ok, "matmul_forward", what); }

void matmul_forward(uintptr_t a, int64_t a_stride_m, int64_t a_stride_k, uintptr_t b,
                    int64_t b_stride_k, int64_t b_stride_n, uintptr_t bias, uintptr_t out,
                    int64_t out_stride_m, uintptr_t pre, int64_t pre_stride_m, int64_t m,
                    int64_t n, int64_t k, int act_code, float act_param, int num_threads,
                    const std::string& isa) {
  require(m >= 0 && n >= 0 && k >= 0, "sizes must be non-negative");
  require(a_stride_m >= 0 && a_stride_k >= 0 && b_stride_k >= 0 && b_stride_n >= 0,
          "strides must be non-negative");
  require(act_code >= 0 && act_code < bk::kActivationCount, "unknown activation code");
  require(num_threads >= 1 && num_threads <= 4096, "num_threads must be in [1, 4096]");
  require(m * k == 0 || a != 0, "a is null");
  require(k * n == 0 || b != 0, "b is null");
  require(m * n == 0 || out != 0, "out is null");
  require(m <= 1 || out_stride_m >= n, "out rows overlap (out_stride_m < n)");
  require(pre == 0 || m <= 1 || pre_stride_m >= n, "pre rows overlap (pre_stride_m < n)");
  const bk::IsaKernels& kernels = bk::isa_kernels(isa);
  const bk::GemmArgs g{reinterpret_cast<const float*>(a), a_stride_m, a_stride_k,
                       reinterpret_cast<const float*>(b), b_stride_k, b_stride_n,
                       reinterpret_cast<const float*>(bias), reinterpret_cast<float*>(out),
                       out_stride_m, reinterpret_cast<float*>(pre), pre_stride_m,
                       m, n, k, act_code, act_param};
  py::gil_scoped_release release;
  bk::gemm(kernels, g, num_threads);
}

void activation_backward(uintptr_t grad_out, int64_t grad_out_stride_m,
                         int64_t grad_out_stride_n, uintptr_t saved, uintptr_t grad_pre,
                         uintptr_t grad_bias, int64_t m, int64_t n, int act_code,
                         float act_param, int num_threads, const std::string& isa) {
  const char* fn = "activation_backward";
  require(m >= 0 && n >= 0, fn, "sizes must be non-negative");
  require(grad_out_stride_m >= 0 && grad_out_stride_n >= 0, fn, "strides must be non-negative");
  require(act_code > bk::kNone && act_code < bk::kActivationCount, fn,
          "unknown activation code (NONE included: it has no backward here)");
  require(num_threads >= 1 && num_threads <= 4096, fn, "num_threads must be in [1, 4096]");
  require(m * n == 0 || (grad_out != 0 && saved != 0 && grad_pre != 0), fn, "null tensor");
  const bk::IsaKernels& kernels = bk::isa_kernels(isa);
  const bk::ActBackwardArgs g{reinterpret_cast<const float*>(grad_out), grad_out_stride_m,
                              grad_out_stride_n, reinterpret_cast<const float*>(saved),
                              reinterpret_cast<float*>(grad_pre), m, n, act_code, act_param};
  py::gil_scoped_release release;
  bk::activation_backward(kernels, g, reinterpret_cast<float*>(grad_bias), num_threads);
}

void linear_backward(uintptr_t grad_out, int64_t grad_out_stride_m, int64_t grad_out_stride_n,
                     uintptr_t saved, uintptr_t grad_pre, uintptr_t x, int64_t x_stride_m,
                     int64_t x_stride_k, uintptr_t w, int64_t w_stride_n, int64_t w_stride_k,
                     uintptr_t grad_x, uintptr_t grad_w, uintptr_t grad_bias, int64_t m,
                     int64_t n, int64_t k, int act_code, float act_param, int num_threads,
                     const std::string& isa) {
  const char* fn = "linear_backward";
  require(m >= 0 && n >= 0 && k >= 0, fn, "sizes must be non-negative");
  require(grad_out_stride_m >= 0 && grad_out_stride_n >= 0 && x_stride_m >= 0 &&
              x_stride_k >= 0 && w_stride_n >= 0 && w_stride_k >= 0,
          fn, "strides must be non-negative");
  require(act_code >= 0 && act_code < bk::kActivationCount, fn, "unknown activation code");
  require(num_threads >= 1 && num_threads <= 4096, fn, "num_threads must be in [1, 4096]");
  require(m * n == 0 || grad_out != 0, fn, "grad_out is null");
  require(m * n == 0 || act_code == bk::kNone || (saved != 0 && grad_pre != 0), fn,
          "saved and grad_pre are needed with an activation");
  require(grad_x == 0 || m * n * k == 0 || w != 0, fn, "w is null");
  require(grad_w == 0 || m * n * k == 0 || x != 0, fn, "x is null");
  const bk::IsaKernels& kernels = bk::isa_kernels(isa);
  const bk::LinearBackwardArgs g{
      reinterpret_cast<const float*>(grad_out), grad_out_stride_m, grad_out_stride_n,
      reinterpret_cast<const float*>(saved), reinterpret_cast<float*>(grad_pre),
      reinterpret_cast<const float*>(x), x_stride_m, x_stride_k,
      reinterpret_cast<const float*>(w), w_stride_n, w_stride_k,
      reinterpret_cast<float*>(grad_x), reinterpret_cast<float*>(grad_w),
      reinterpret_cast<float*>(grad_bias), m, n, k, act_code, act_param};
  py::gil_scoped_release release;
  bk::linear_backward(kernels, g, num_threads);
}

// (n, c_in, h, w, c_out, h_out, w_out, kh, kw, sh, sw, ph, pw, dh, dw, groups): conv.h's
// ConvGeometry, checked for what would make the kernels' index arithmetic meaningless.
using ConvShape = std::array<int64_t, 16>;

bk::ConvGeometry conv_geometry(const char* fn, const ConvShape& s, bool nhwc) {
  for (int i = 0; i < 7; ++i) require(s[i] >= 0, fn, "sizes must be non-negative");
  for (int i : {7, 8, 9, 10, 13, 14, 15})
    require(s[i] >= 1, fn, "kernel size, stride, dilation and groups must be positive");
  require(s[11] >= 0 && s[12] >= 0, fn, "padding must be non-negative");
  require(s[1] % s[15] == 0 && s[4] % s[15] == 0, fn, "channels must divide by groups");
  return bk::ConvGeometry{s[0], s[1], s[2],  s[3],  s[4],  s[5],  s[6],  s[7],
                          s[8], s[9], s[10], s[11], s[12], s[13], s[14], s[15], nhwc};
}

void require_threads(const char* fn, int num_threads) {
  require(num_threads >= 1 && num_threads <= 4096, fn, "num_threads must be in [1, 4096]");
}

template <class Driver>
void conv_forward_call(Driver driver, const char* fn, uintptr_t x, uintptr_t w, uintptr_t bias,
                       uintptr_t out, uintptr_t pre, const ConvShape& shape, bool nhwc,
                       int act_code, float act_param, int num_threads, const std::string& isa) {
  const bk::ConvGeometry c = conv_geometry(fn, shape, nhwc);
  require(act_code >= 0 && act_code < bk::kActivationCount, fn, "unknown activation code");
  require_threads(fn, num_threads);
  const int64_t in_size = c.n * c.c_in * c.h * c.w, out_size = c.n * c.c_out * c.h_out * c.w_out;
  const bool transposed = std::string(fn) != "conv2d_forward";
  require(x != 0 || (transposed ? out_size : in_size) == 0, fn, "x is null");
  require(w != 0 || c.c_out * c.c_in == 0, fn, "weight is null");
  require(out != 0 || (transposed ? in_size : out_size) == 0, fn, "out is null");
  const bk::IsaKernels& kernels = bk::isa_kernels(isa);
  py::gil_scoped_release release;
  driver(kernels, c, reinterpret_cast<const float*>(x), reinterpret_cast<const float*>(w),
         reinterpret_cast<const float*>(bias), reinterpret_cast<float*>(out),
         reinterpret_cast<float*>(pre), act_code, act_param, num_threads);
}

void conv2d_forward(uintptr_t x, uintptr_t w, uintptr_t bias, uintptr_t out, uintptr_t pre,
                    const ConvShape& shape, bool nhwc, int act_code, float act_param,
                    int num_threads, const std::string& isa) {
  conv_forward_call(bk::conv2d_forward, "conv2d_forward", x, w, bias, out, pre, shape, nhwc,
                    act_code, act_param, num_threads, isa);
}

void conv_transpose2d_forward(uintptr_t x, uintptr_t w, uintptr_t bias, uintptr_t out,
                              uintptr_t pre, const ConvShape& shape, bool nhwc, int act_code,
                              float act_param, int num_threads, const std::string& isa) {
  conv_forward_call(bk::conv_transpose2d_forward, "conv_transpose2d_forward", x, w, bias, out,
                    pre, shape, nhwc, act_code, act_param, num_threads, isa);
}

void conv2d_maxpool2d_forward(uintptr_t x, uintptr_t w, uintptr_t bias, uintptr_t out,
                              uintptr_t indices, uintptr_t codes, uintptr_t pre,
                              const ConvShape& shape, bool nhwc,
                              int act_code, float act_param, int num_threads,
                              const std::string& isa) {
  const char* fn = "conv2d_maxpool2d_forward";
  const bk::ConvGeometry c = conv_geometry(fn, shape, nhwc);
  require(act_code >= 0 && act_code < bk::kActivationCount, fn, "unknown activation code");
  require_threads(fn, num_threads);
  require(c.h_out >= 2 && c.w_out >= 2, fn, "the conv output must be at least 2 x 2");
  const int64_t out_size = c.n * c.c_out * (c.h_out / 2) * (c.w_out / 2);
  require(x != 0 || c.n * c.c_in * c.h * c.w == 0, fn, "x is null");
  require(w != 0 || c.c_out * c.c_in == 0, fn, "weight is null");
  require(out != 0 || out_size == 0, fn, "out is null");
  require(((indices != 0) != (codes != 0)) || out_size == 0, fn,
          "exactly one of indices and codes is needed");
  const bk::IsaKernels& kernels = bk::isa_kernels(isa);
  py::gil_scoped_release release;
  bk::conv2d_maxpool2d_forward(kernels, c, reinterpret_cast<const float*>(x),
                               reinterpret_cast<const float*>(w),
                               reinterpret_cast<const float*>(bias), reinterpret_cast<float*>(out),
                               reinterpret_cast<int64_t*>(indices),
                               reinterpret_cast<uint8_t*>(codes), reinterpret_cast<float*>(pre),
                               act_code, act_param, num_threads);
}

void conv2d_backward_weight(uintptr_t grad_pre, uintptr_t x, uintptr_t grad_w,
                            const ConvShape& shape, bool nhwc, int num_threads,
                            const std::string& isa) {
  const char* fn = "conv2d_backward_weight";
  const bk::ConvGeometry c = conv_geometry(fn, shape, nhwc);
  require_threads(fn, num_threads);
  require(grad_w != 0 || c.c_out * c.c_in == 0, fn, "grad_w is null");
  require((grad_pre != 0 && x != 0) || c.n * c.c_in * c.h * c.w * c.c_out * c.h_out * c.w_out == 0,
          fn, "null tensor");
  const bk::IsaKernels& kernels = bk::isa_kernels(isa);
  py::gil_scoped_release release;
  bk::conv2d_backward_weight(kernels, c, reinterpret_cast<const float*>(grad_pre),
                             reinterpret_cast<const float*>(x), reinterpret_cast<float*>(grad_w),
                             num_threads);
}

void conv2d_activation_backward(uintptr_t grad_out, const std::array<int64_t, 4>& strides,
                                uintptr_t saved, uintptr_t grad_pre, uintptr_t grad_bias,
                                const std::array<int64_t, 4>& shape, bool nhwc, int act_code,
                                float act_param, int num_threads, const std::string& isa) {
  const char* fn = "conv2d_activation_backward";
  for (int64_t v : shape) require(v >= 0, fn, "sizes must be non-negative");
  for (int64_t v : strides) require(v >= 0, fn, "strides must be non-negative");
  require(act_code > bk::kNone && act_code < bk::kActivationCount, fn,
          "unknown activation code (NONE included: it has no backward here)");
  require_threads(fn, num_threads);
  require((grad_out != 0 && saved != 0 && grad_pre != 0) ||
              shape[0] * shape[1] * shape[2] * shape[3] == 0,
          fn, "null tensor");
  const bk::ConvActBackwardArgs a{
      reinterpret_cast<const float*>(grad_out), strides[0], strides[1], strides[2], strides[3],
      reinterpret_cast<const float*>(saved), reinterpret_cast<float*>(grad_pre),
      reinterpret_cast<float*>(grad_bias), shape[0], shape[1], shape[2], shape[3], nhwc,
      act_code, act_param};
  const bk::IsaKernels& kernels = bk::isa_kernels(isa);
  py::gil_scoped_release release;
  bk::conv2d_activation_backward(kernels, a, num_threads);
}

void conv2d_activation_backward_weight(uintptr_t grad_out, uintptr_t saved, uintptr_t x,
                                       uintptr_t grad_w, uintptr_t grad_bias,
                                       const ConvShape& shape, bool nhwc, int act_code,
                                       float act_param, int num_threads, const std::string& isa) {
  const char* fn = "conv2d_activation_backward_weight";
  const bk::ConvGeometry c = conv_geometry(fn, shape, nhwc);
  require(act_code > bk::kNone && act_code < bk::kActivationCount, fn,
          "unknown activation code (NONE included: it has no backward here)");
  require_threads(fn, num_threads);
  require(grad_w != 0 || c.c_out * c.c_in == 0, fn, "grad_w is null");
  require((grad_out != 0 && saved != 0 && x != 0) ||
              c.n * c.c_in * c.h * c.w * c.c_out * c.h_out * c.w_out == 0,
          fn, "null tensor");
  const bk::IsaKernels& kernels = bk::isa_kernels(isa);
  py::gil_scoped_release release;
  bk::conv2d_activation_backward_weight(
      kernels, c, reinterpret_cast<const float*>(grad_out), reinterpret_cast<const float*>(saved),
      reinterpret_cast<const float*>(x), reinterpret_cast<float*>(grad_w),
      reinterpret_cast<float*>(grad_bias), act_code, act_param, num_threads);
}

// Pooling of x (n, c, h, w) into (n, c, ho, wo) by 2x2 windows of stride 2.
using PoolShape = std::array<int64_t, 6>;

bk::Pool2x2 pool_geometry(const char* fn, const PoolShape& s, bool nhwc) {
  for (int64_t v : s) require(v >= 0, fn, "sizes must be non-negative");
  require(2 * s[4] <= s[2] && 2 * s[5] <= s[3], fn,
          "the output must be at most half the input's height and width");
  return nhwc ? bk::Pool2x2{s[0], s[2], s[3], s[1], s[4], s[5]}
              : bk::Pool2x2{s[0] * s[1], s[2], s[3], 1, s[4], s[5]};
}

bool pool_empty(const PoolShape& s) { return s[0] * s[1] * s[4] * s[5] == 0; }

void max_pool2x2_forward(uintptr_t x, uintptr_t out, uintptr_t indices, uintptr_t codes,
                         const PoolShape& shape, bool nhwc, int num_threads,
                         const std::string& isa) {
  const char* fn = "max_pool2x2_forward";
  const bk::Pool2x2 s = pool_geometry(fn, shape, nhwc);
  require_threads(fn, num_threads);
  require((x != 0 && out != 0) || pool_empty(shape), fn, "null tensor");
  const bk::IsaKernels& kernels = bk::isa_kernels(isa);
  py::gil_scoped_release release;
  bk::max_pool2x2_forward(kernels, s, reinterpret_cast<const float*>(x),
                          reinterpret_cast<float*>(out), reinterpret_cast<int64_t*>(indices),
                          reinterpret_cast<uint8_t*>(codes), num_threads);
}

void max_pool2x2_backward(uintptr_t grad_out, uintptr_t indices, uintptr_t codes,
                          uintptr_t grad_x, const PoolShape& shape, bool nhwc, int num_threads,
                          const std::string& isa) {
  const char* fn = "max_pool2x2_backward";
  const bk::Pool2x2 s = pool_geometry(fn, shape, nhwc);
  require_threads(fn, num_threads);
  require(!pool_empty(shape), fn, "the output must not be empty (grad_x is then all zeros)");
  require(grad_out != 0 && grad_x != 0, fn, "null tensor");
  require((indices != 0) != (codes != 0), fn, "exactly one of indices and codes is needed");
  const bk::IsaKernels& kernels = bk::isa_kernels(isa);
  py::gil_scoped_release release;
  bk::max_pool2x2_backward(kernels, s, reinterpret_cast<const float*>(grad_out),
                           reinterpret_cast<const int64_t*>(indices),
                           reinterpret_cast<const uint8_t*>(codes),
                           reinterpret_cast<float*>(grad_x), num_threads);
}

void avg_pool2x2_forward(uintptr_t x, uintptr_t out, const PoolShape& shape, bool nhwc,
                         float scale, int num_threads, const std::string& isa) {
  const char* fn = "avg_pool2x2_forward";
  const bk::Pool2x2 s = pool_geometry(fn, shape, nhwc);
  require_threads(fn, num_threads);
  require((x != 0 && out != 0) || pool_empty(shape), fn, "null tensor");
  const bk::IsaKernels& kernels = bk::isa_kernels(isa);
  py::gil_scoped_release release;
  bk::avg_pool2x2_forward(kernels, s, reinterpret_cast<const float*>(x),
                          reinterpret_cast<float*>(out), scale, num_threads);
}

void avg_pool2x2_backward(uintptr_t grad_out, uintptr_t grad_x, const PoolShape& shape,
                          bool nhwc, float scale, int num_threads, const std::string& isa) {
  const char* fn = "avg_pool2x2_backward";
  const bk::Pool2x2 s = pool_geometry(fn, shape, nhwc);
  require_threads(fn, num_threads);
  require(!pool_empty(shape), fn, "the output must not be empty (grad_x is then all zeros)");
  require(grad_out != 0 && grad_x != 0, fn, "null tensor");
  const bk::IsaKernels& kernels = bk::isa_kernels(isa);
  py::gil_scoped_release release;
  bk::avg_pool2x2_backward(kernels, s, reinterpret_cast<const float*>(grad_out),
                           reinterpret_cast<float*>(grad_x), scale, num_threads);
}

double fma_peak_gflops(int num_threads, double seconds, const std::string& isa) {
  if (num_threads < 1 || num_threads > 4096)
    throw std::invalid_argument("fma_peak_gflops: num_threads must be in [1, 4096]");
  if (!(seconds > 0.0 && seconds <= 60.0))
    throw std::invalid_argument("fma_peak_gflops: seconds must be in (0, 60]");
  const bk::IsaKernels& kernels = bk::isa_kernels(isa);
  py::gil_scoped_release release;
  return bk::fma_peak_gflops(kernels, num_threads, seconds);
}

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() =
      "brainkern's native CPU core: packed SGEMM with a fused bias + activation epilogue, "
      "and the activations' backward.";
  // Decide the ISA now, so a bad $BRAINKERN_NATIVE_ISA fails the import with its reason.
  bk::default_isa();

  m.def("isa", [] { return std::string(bk::default_isa().name); },
        "The ISA calls run on by default: $BRAINKERN_NATIVE_ISA, else the best supported.");
  m.def("supported_isas", &bk::supported_isas,
        "ISAs built here that this CPU runs, best first (a subset of avx512, avx2, portable).");
  m.def("matmul_forward", &matmul_forward, py::arg("a"), py::arg("a_stride_m"),
        py::arg("a_stride_k"), py::arg("b"), py::arg("b_stride_k"), py::arg("b_stride_n"),
        py::arg("bias"), py::arg("out"), py::arg("out_stride_m"), py::arg("pre"),
        py::arg("pre_stride_m"), py::arg("m"), py::arg("n"), py::arg("k"), py::arg("act_code"),
        py::arg("act_param"), py::arg("num_threads"), py::arg("isa") = "",
        R"doc(out = act(A @ B + bias) in float32; pre = A @ B + bias when pre != 0.

a: address of A (m, k), element (i, p) at a[i * a_stride_m + p * a_stride_k].
b: address of B (k, n), element (p, j) at b[p * b_stride_k + j * b_stride_n].
bias: address of (n,) contiguous floats, or 0 for none.
out: address of (m, n), element (i, j) at out[i * out_stride_m + j]; must not alias a, b, bias.
pre: address like out with pre_stride_m, or 0 for none.
Strides count elements. act_code/act_param: brainkern.activations' table. num_threads: at
most this many threads (fewer for small problems). isa: '' for isa(), else one of
supported_isas(). k == 0 writes act(bias) (or act(0)). The GIL is released meanwhile.)doc");
  m.def("activation_backward", &activation_backward, py::arg("grad_out"),
        py::arg("grad_out_stride_m"), py::arg("grad_out_stride_n"), py::arg("saved"),
        py::arg("grad_pre"), py::arg("grad_bias"), py::arg("m"), py::arg("n"),
        py::arg("act_code"), py::arg("act_param"), py::arg("num_threads"), py::arg("isa") = "",
        R"doc(grad_pre = grad_out * act'(saved) in float32; grad_bias = grad_pre.sum(0) when != 0.

grad_out: address of (m, n), element (i, j) at grad_out[i * grad_out_stride_m + j *
grad_out_stride_n] (strides count elements; 0 allowed). saved, grad_pre: addresses of (m, n)
contiguous floats: saved is the activation's output for relu, leaky_relu (slope >= 0),
sigmoid and tanh, else the pre-activation. grad_bias: address of (n,) floats or 0; summed in
double, the same on any num_threads; m == 0 writes zeros. act_code: brainkern.activations'
code, not NONE; act_param: leaky_relu's slope. The GIL is released meanwhile.)doc");
  m.def("linear_backward", &linear_backward, py::arg("grad_out"), py::arg("grad_out_stride_m"),
        py::arg("grad_out_stride_n"), py::arg("saved"), py::arg("grad_pre"), py::arg("x"),
        py::arg("x_stride_m"), py::arg("x_stride_k"), py::arg("w"), py::arg("w_stride_n"),
        py::arg("w_stride_k"), py::arg("grad_x"), py::arg("grad_w"), py::arg("grad_bias"),
        py::arg("m"), py::arg("n"), py::arg("k"), py::arg("act_code"), py::arg("act_param"),
        py::arg("num_threads"), py::arg("isa") = "",
        R"doc(The backward of out = act(x @ W^T + bias) in float32, in one call.

dz = grad_out * act'(saved) into grad_pre (with act_code NONE, dz is grad_out and saved and
grad_pre are unused); then grad_bias = dz.sum(0) (n floats, summed in double as
activation_backward), grad_x = dz @ W (m, k) and grad_w = dz^T @ x (n, k), each written
contiguously and skipped when its address is 0. grad_out (m, n), x (m, k) and w (n, k) are
read with the given element strides; saved and grad_pre are (m, n) contiguous, as in
activation_backward. Outputs must not alias inputs. The GIL is released meanwhile.)doc");
  m.def("run_serially", &bk::run_serially,
        "Run every later call on the calling thread only (in a child forked after OpenMP ran).");
  m.def("backward_scratch_bytes", [] {
    const bk::BackwardScratch s = bk::backward_scratch();
    return std::make_pair(s.held_bytes, s.last_call_bytes);
  }, "(held, last call): this thread's bias-sum space, kept between calls / used by the last "
     "activation_backward, in bytes.");
  m.def("conv_scratch_bytes", [] { return bk::conv_scratch_bytes(); },
        "Bytes this thread's conv buffers hold between calls (each freed above 4 MB).");
  m.def("conv2d_forward", &conv2d_forward, py::arg("x"), py::arg("w"), py::arg("bias"),
        py::arg("out"), py::arg("pre"), py::arg("shape"), py::arg("nhwc"), py::arg("act_code"),
        py::arg("act_param"), py::arg("num_threads"), py::arg("isa") = "",
        R"doc(out = act(conv2d(x, w) + bias) in float32; pre = conv2d(x, w) + bias when pre != 0.

Addresses of x (n, c_in, h, w), w (c_out, c_in / groups, kh, kw) contiguous, bias (c_out,) or
0, out and pre (n, c_out, h_out, w_out) or 0. shape: (n, c_in, h, w, c_out, h_out, w_out, kh,
kw, sh, sw, ph, pw, dh, dw, groups); padding is before the first row and column, the output's
size implies the rest. x, out and pre are contiguous NCHW, or NHWC when nhwc. The GIL is
released meanwhile.)doc");
  m.def("conv_transpose2d_forward", &conv_transpose2d_forward, py::arg("x"), py::arg("w"),
        py::arg("bias"), py::arg("out"), py::arg("pre"), py::arg("shape"), py::arg("nhwc"),
        py::arg("act_code"), py::arg("act_param"), py::arg("num_threads"), py::arg("isa") = "",
        R"doc(The adjoint of conv2d_forward's linear part, then + bias and act, in float32.

shape describes the convolution this is the adjoint of: x has its output's shape (n, c_out,
h_out, w_out), out and pre its input's (n, c_in, h, w), w is (c_out, c_in / groups, kh, kw).
Layouts and the rest as conv2d_forward.)doc");
  m.def("conv2d_maxpool2d_forward", &conv2d_maxpool2d_forward, py::arg("x"), py::arg("w"),
        py::arg("bias"), py::arg("out"), py::arg("indices"), py::arg("codes"), py::arg("pre"),
        py::arg("shape"), py::arg("nhwc"), py::arg("act_code"), py::arg("act_param"),
        py::arg("num_threads"),
        py::arg("isa") = "",
        R"doc(max_pool2d(act(conv2d(x, w) + bias), 2) in float32, the conv output never stored.

shape as conv2d_forward's, (h_out, w_out) the conv output's size (at least 2 x 2); out, pre
(or 0) float32, (n, c_out, h_out // 2, w_out // 2) in x's layout: the pooled maximum (NaN
wins, first maximum on ties) and the pre-activation there; exactly one of indices (int64, its
flat tap h * w_out + w) and codes (uint8, its place 2u + v in its window), alike. The GIL is
released meanwhile.)doc");
  m.def("conv2d_backward_weight", &conv2d_backward_weight, py::arg("grad_pre"), py::arg("x"),
        py::arg("grad_w"), py::arg("shape"), py::arg("nhwc"), py::arg("num_threads"),
        py::arg("isa") = "",
        R"doc(grad_w = the weight gradient of conv2d_forward given grad_pre (out's shape), float32.

Summed over pixels in a fixed split: the same result on any num_threads. shape and layouts as
conv2d_forward; grad_w (c_out, c_in / groups, kh, kw) contiguous.)doc");
  m.def("conv2d_activation_backward", &conv2d_activation_backward, py::arg("grad_out"),
        py::arg("strides"), py::arg("saved"), py::arg("grad_pre"), py::arg("grad_bias"),
        py::arg("shape"), py::arg("nhwc"), py::arg("act_code"), py::arg("act_param"),
        py::arg("num_threads"), py::arg("isa") = "",
        R"doc(grad_pre = grad_out * act'(saved); grad_bias = grad_pre.sum((0, 2, 3)) when != 0.

grad_out: (n, c, h, w) with the given element strides; saved, grad_pre contiguous NCHW, or
NHWC when nhwc; grad_bias (c,) floats summed in double, the same on any num_threads. act_code
not NONE. The GIL is released meanwhile.)doc");
  m.def("conv2d_activation_backward_weight", &conv2d_activation_backward_weight,
        py::arg("grad_out"), py::arg("saved"), py::arg("x"), py::arg("grad_w"),
        py::arg("grad_bias"), py::arg("shape"), py::arg("nhwc"), py::arg("act_code"),
        py::arg("act_param"), py::arg("num_threads"), py::arg("isa") = "",
        R"doc(conv2d_activation_backward then conv2d_backward_weight, grad_pre never stored.

grad_out, saved: the conv output's shape, contiguous in x's layout; x, grad_w, shape and nhwc
as conv2d_backward_weight's; grad_bias (c_out,) or 0, summed in double, the same on any
num_threads; act_code not NONE. The GIL is released meanwhile.)doc");
  m.def("max_pool2x2_forward", &max_pool2x2_forward, py::arg("x"), py::arg("out"),
        py::arg("indices"), py::arg("codes"), py::arg("shape"), py::arg("nhwc"),
        py::arg("num_threads"), py::arg("isa") = "",
        R"doc(out = max_pool2d(x, 2) in float32; indices (int64, or 0 for none) its flat taps,
codes (uint8, or 0 for none) each winner's place in its window, 2 * row + column.

shape (n, c, h, w, ho, wo), 2 * ho <= h and 2 * wo <= w; x and out (and indices) contiguous
NCHW, or NHWC when nhwc. NaN wins a window, the first maximum wins ties (torch's rule).)doc");
  m.def("max_pool2x2_backward", &max_pool2x2_backward, py::arg("grad_out"), py::arg("indices"),
        py::arg("codes"), py::arg("grad_x"), py::arg("shape"), py::arg("nhwc"),
        py::arg("num_threads"), py::arg("isa") = "",
        R"doc(grad_x = grad_out at the taps max_pool2x2_forward's indices (or codes: exactly one
of the two, the other 0) name, zero elsewhere.

Each element of grad_x written once (the windows do not overlap); shapes and layouts as
max_pool2x2_forward.)doc");
  m.def("avg_pool2x2_forward", &avg_pool2x2_forward, py::arg("x"), py::arg("out"),
        py::arg("shape"), py::arg("nhwc"), py::arg("scale"), py::arg("num_threads"),
        py::arg("isa") = "",
        "out = each 2x2 window's sum (in torch's order) * scale; shapes as max_pool2x2_forward.");
  m.def("avg_pool2x2_backward", &avg_pool2x2_backward, py::arg("grad_out"), py::arg("grad_x"),
        py::arg("shape"), py::arg("nhwc"), py::arg("scale"), py::arg("num_threads"),
        py::arg("isa") = "",
        "grad_x = grad_out * scale at every tap of its window, zero at taps no window reads.");
  m.def("fma_peak_gflops", &fma_peak_gflops, py::arg("num_threads"), py::arg("seconds"),
        py::arg("isa") = "",
        "GFLOP/s of independent multiply-adds in registers on num_threads threads for about "
        "`seconds`: the machine's float32 peak as this ISA's kernels can use it.");
}
