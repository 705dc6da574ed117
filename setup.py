"""Builds brainkern._native, the C++ CPU core in csrc/, with pybind11 (never against torch).

Metadata lives in pyproject.toml; this file only describes the extension. Each ISA translation
unit gets its own flags, chosen per source file: setuptools gives every source of an Extension
the same flags, so the compiler's per-file hook is wrapped below. Never -march=native: the
wheel must run on other CPUs, and dispatch.cpp picks the ISA at run time.
"""

import glob
import os
import platform

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext
from setuptools import setup

X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")

# Flags per translation unit; the rest (dispatch, thread pool, bindings, portable kernels)
# get only the common flags, i.e. the target's baseline ISA.
ISA_FLAGS = {
    "isa_avx512.cpp": ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mfma"],
    "isa_avx2.cpp": ["-mavx2", "-mfma"],
}

SOURCES = ["bindings.cpp", "bindings_conv.cpp", "bindings_pool.cpp", "dispatch.cpp",
           "thread_pool.cpp", "isa_portable.cpp"]
if X86:
    SOURCES += sorted(ISA_FLAGS)

# -ffp-contract=fast: a * b + c becomes one FMA (faster, and one rounding instead of two).
# No -ffast-math: the kernels rely on NaN comparisons and exact rounding tricks.
# -Wno-psabi: GCC notes that 64-byte vectors pass differently without AVX-512; the portable
# kernels' vector functions are internal (static), so no ABI boundary is crossed.
COMMON_FLAGS = ["-O3", "-ffp-contract=fast", "-pthread", "-fopenmp", "-Wno-psabi"]


class BuildExt(build_ext):
    """build_ext that adds ISA_FLAGS[file] when compiling that one file."""

    def build_extensions(self):
        if self.compiler.compiler_type != "unix":
            raise RuntimeError("brainkern._native needs GCC or Clang (GCC vector extensions)")
        compile_one = self.compiler._compile

        def compile_with_isa_flags(obj, src, ext, cc_args, extra_postargs, pp_opts):
            extra = ISA_FLAGS.get(os.path.basename(src), [])
            compile_one(obj, src, ext, cc_args, list(extra_postargs) + extra, pp_opts)

        self.compiler._compile = compile_with_isa_flags
        super().build_extensions()


# The translation units compile side by side, one per core (BRAINKERN_BUILD_JOBS to change):
# each ISA unit takes about a minute on these 2-core machines, 3.4 min one after another.
ParallelCompile("BRAINKERN_BUILD_JOBS", default=0).install()

native = Pybind11Extension(
    "brainkern._native",
    [os.path.join("csrc", name) for name in SOURCES],
    include_dirs=["csrc"],
    depends=sorted(glob.glob("csrc/*.h") + glob.glob("csrc/*.inc")),  # rebuild on header edits
    define_macros=[("BK_WITH_X86_ISAS", "1")] if X86 else [],
    extra_compile_args=COMMON_FLAGS,
    extra_link_args=["-pthread", "-fopenmp"],
    cxx_std=17,
)

setup(ext_modules=[native], cmdclass={"build_ext": BuildExt})
