// brainkern._native's convolution family (see bindings.cpp): addresses and a shape in,
// checked, then the GIL released for the work.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <string>

#include "bindings.h"
#include "dispatch.h"

namespace py = pybind11;

namespace bk_bindings {
namespace {

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
  require(indices == 0 || codes == 0, fn, "indices and codes are exclusive");
  const bk::IsaKernels& kernels = bk::isa_kernels(isa);
  py::gil_scoped_release release;
  bk::conv2d_maxpool2d_forward(kernels, c, reinterpret_cast<const float*>(x),
                               reinterpret_cast<const float*>(w),
                               reinterpret_cast<const float*>(bias), reinterpret_cast<float*>(out),
                               reinterpret_cast<int64_t*>(indices),
                               reinterpret_cast<uint8_t*>(codes), reinterpret_cast<float*>(pre),
                               act_code, act_param, num_threads);
}

bool conv2d_maxpool2d_backward(uintptr_t grad_pooled, uintptr_t codes, uintptr_t x, uintptr_t w,
                               uintptr_t grad_x, uintptr_t grad_w, const ConvShape& shape,
                               bool nhwc, int num_threads, const std::string& isa,
                               uintptr_t saved, int act_code, float act_param,
                               uintptr_t grad_bias) {
  const char* fn = "conv2d_maxpool2d_backward";
  const bk::ConvGeometry c = conv_geometry(fn, shape, nhwc);
  require_threads(fn, num_threads);
  require(c.h_out >= 2 && c.w_out >= 2, fn, "the conv output must be at least 2 x 2");
  const int64_t pooled_size = c.n * c.c_out * (c.h_out / 2) * (c.w_out / 2);
  require((grad_pooled != 0 && codes != 0) || pooled_size == 0, fn, "grad_pooled or codes is null");
  require(x != 0 || c.n * c.c_in * c.h * c.w == 0, fn, "x is null");
  require(w != 0 || c.c_out * c.c_in == 0, fn, "weight is null");
  require(act_code >= bk::kNone && act_code < bk::kActivationCount, fn,
          "unknown activation code");
  require(saved != 0 || act_code == bk::kNone || pooled_size == 0, fn, "saved is null");
  const bk::IsaKernels& kernels = bk::isa_kernels(isa);
  py::gil_scoped_release release;
  return bk::conv2d_maxpool2d_backward(
      kernels, c, reinterpret_cast<const float*>(grad_pooled),
      reinterpret_cast<const uint8_t*>(codes), reinterpret_cast<const float*>(x),
      reinterpret_cast<const float*>(w), reinterpret_cast<float*>(grad_x),
      reinterpret_cast<float*>(grad_w), num_threads, reinterpret_cast<const float*>(saved),
      act_code, act_param, reinterpret_cast<float*>(grad_bias));
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

}  // namespace

void bind_conv(py::module_& m) {
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
wins, first maximum on ties) and the pre-activation there; at most one of indices (int64, its
flat tap h * w_out + w) and codes (uint8, its place 2u + v in its window), alike (neither:
no winner recorded, for inference). The GIL is
released meanwhile.)doc");
  m.def("conv2d_maxpool2d_backward", &conv2d_maxpool2d_backward, py::arg("grad_pooled"),
        py::arg("codes"), py::arg("x"), py::arg("w"), py::arg("grad_x"), py::arg("grad_w"),
        py::arg("shape"), py::arg("nhwc"), py::arg("num_threads"), py::arg("isa") = "",
        py::arg("saved") = 0, py::arg("act_code") = 0, py::arg("act_param") = 0.0f,
        py::arg("grad_bias") = 0,
        R"doc(The conv block's grad_x and grad_w (each 0 when not wanted) from the pooled dz.

grad_pooled (dz at the winners, the activation's derivative applied) and codes (uint8 window
codes, as conv2d_maxpool2d_forward wrote them): (n, c_out, h_out // 2, w_out // 2) in x's
layout; shape, x, w as conv2d_maxpool2d_forward's; grad_x x's shape and layout, grad_w w's.
With act_code relu or leaky_relu (act_param >= 0), grad_pooled is the pooled output's
gradient and saved the pooled output (its shape and layout): dz = grad_pooled * act'(saved);
grad_bias (c_out, or 0) then gets sum(dz) per channel (grad_w needed). Returns False for
other activations.
Only the winners' products, deterministic on any num_threads. Returns False, having written
nothing, when grad_pooled (or x for grad_w, w for grad_x) is not all finite. The GIL is
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
}

}  // namespace bk_bindings
