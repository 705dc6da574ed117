// brainkern._native's pooling family (see bindings.cpp): 2x2 windows of stride 2.
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

// A forward's checks: its geometry, the thread count, and x and out unless the pooling is empty.
bk::Pool2x2 forward_geometry(const char* fn, uintptr_t x, uintptr_t out, const PoolShape& shape,
                             bool nhwc, int num_threads) {
  const bk::Pool2x2 s = pool_geometry(fn, shape, nhwc);
  require_threads(fn, num_threads);
  require((x != 0 && out != 0) || pool_empty(shape), fn, "null tensor");
  return s;
}

void max_pool2x2_forward(uintptr_t x, uintptr_t out, uintptr_t indices, uintptr_t codes,
                         const PoolShape& shape, bool nhwc, int num_threads,
                         const std::string& isa) {
  const bk::Pool2x2 s = forward_geometry("max_pool2x2_forward", x, out, shape, nhwc, num_threads);
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
  const bk::Pool2x2 s = forward_geometry("avg_pool2x2_forward", x, out, shape, nhwc, num_threads);
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

}  // namespace

void bind_pool(py::module_& m) {
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
}

}  // namespace bk_bindings
