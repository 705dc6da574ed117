// Shared by the binding translation units (bindings.cpp, bindings_conv.cpp, bindings_pool.cpp):
// the argument checks every binding runs before releasing the GIL, and the families' binders.
#pragma once

#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

namespace bk_bindings {

// Throws ValueError (via std::invalid_argument) naming the function when ok is false.
inline void require(bool ok, const char* function, const char* what) {
  if (!ok) throw std::invalid_argument(std::string(function) + ": " + what);
}

inline void require_threads(const char* fn, int num_threads) {
  require(num_threads >= 1 && num_threads <= 4096, fn, "num_threads must be in [1, 4096]");
}

// The convolution family's functions (bindings_conv.cpp) and the pooling family's
// (bindings_pool.cpp), defined on the module.
void bind_conv(pybind11::module_& m);
void bind_pool(pybind11::module_& m);

}  // namespace bk_bindings
