// brainkern._native: the Python face of the native core. Tensors cross as raw addresses plus
// element strides and sizes (never torch objects: the build needs no libtorch). The binding
// checks what it cheaply can, then releases the GIL for the work. This file: the module, the
// GEMM family and the machine's queries; the convolutions in bindings_conv.cpp, pooling in
// bindings_pool.cpp.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "bindings.h"
#include "dispatch.h"
#include "thread_pool.h"

namespace py = pybind11;

namespace {

using bk_bindings::require;

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
  bk_bindings::bind_conv(m);
  bk_bindings::bind_pool(m);
  m.def("fma_peak_gflops", &fma_peak_gflops, py::arg("num_threads"), py::arg("seconds"),
        py::arg("isa") = "",
        "GFLOP/s of independent multiply-adds in registers on num_threads threads for about "
        "`seconds`: the machine's float32 peak as this ISA's kernels can use it.");
}
