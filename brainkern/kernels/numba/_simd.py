"""LLVM vector code for Numba kernels: the SIMD width and a register-tiled GEMM micro-kernel.

Numba's auto-vectorizer turns a register block written as loops over a local array into gathers
(~6 GFLOP/s, see /work/shared/notes/cpu-kernels.md). The micro-kernel here is written directly in
LLVM IR instead: ``<lanes x float>`` vector loads of packed B, scalar broadcasts of packed A and
``llvm.fma``, with the accumulators as SSA values (loop phis) so they live in registers.

Everything that depends on the CPU is decided when a kernel is first compiled, never at import.
Numba's cache keys on the host CPU name and features, so a cached kernel never runs on a CPU with
another vector width. It does not key on this module's source: after editing this file, delete
the ``__pycache__/*.nb[ic]`` files of the modules that call it.
"""

from __future__ import annotations

import functools

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic
from numba.np.numpy_support import as_dtype


@functools.cache
def vector_bytes() -> int:
    """Width in bytes of the widest float vector this CPU runs: 64 (AVX-512), 32 (AVX) or 16."""
    import llvmlite.binding as llvm

    features = llvm.get_host_cpu_features()
    if features.get("avx512f", False):
        return 64
    if features.get("avx", False):
        return 32
    return 16


@functools.cache
def vector_registers() -> int:
    """Architectural vector registers: 32 with AVX-512, else 16 (x86-64's ymm/xmm file)."""
    return 32 if vector_bytes() == 64 else 16


@functools.cache
def gemm_tile(dtype) -> tuple[int, int, int]:
    """The micro-kernel's register tile for ``dtype``: ``(mr, nr, lanes)``, ``nr = 2 * lanes``.

    Two B vectors per k step and ``mr`` broadcasts of A give ``2 * mr`` accumulators. They must
    cover the FMA latency times the FMA pipes (4 cycles x 2 pipes = 8 in flight on Zen 3/4/5 and
    on Intel cores), and accumulators + 2 B vectors + 1 broadcast must fit the register file:
    16 registers -> 6 x 2 (12 accumulators, the BLIS Haswell/Zen tile); 32 registers -> 12 x 2
    (24 accumulators; AVX-512 FMAs fold the A broadcast into a memory operand).
    """
    lanes = vector_bytes() // np.dtype(dtype).itemsize
    mr = 12 if vector_registers() == 32 else 6
    return mr, 2 * lanes, lanes


class TileIR:
    """LLVM IR for an ``mr x nvec``-vector register tile of ``dtype``, shared by the
    micro-kernels here and in _simd_conv.py: the vector types, ``llvm.fma`` on vectors, the
    initial tile, the k loop with its accumulators as SSA values (loop phis, so that they live
    in registers, never a stack array) and the final stores."""

    def __init__(self, context, builder, dtype, mr, nvec, lanes):
        self.builder, self.mr, self.nvec, self.lanes = builder, mr, nvec, lanes
        self.int64 = ir.IntType(64)
        self.vector = ir.VectorType(context.get_value_type(dtype), lanes)
        self.vptr = self.vector.as_pointer()
        # Tile rows and input rows are only element-aligned.
        self.itemsize = np.dtype(as_dtype(dtype)).itemsize
        # llvmlite's IRBuilder.fma takes scalars only; declare the vector overload ourselves.
        self.fma = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(self.vector, [self.vector] * 3),
            f"llvm.fma.v{lanes}f{8 * self.itemsize}")

    def load_vector(self, pointer):
        return self.builder.load(self.builder.bitcast(pointer, self.vptr), align=self.itemsize)

    def row_pointer(self, base, ld, r, v):
        """Vector v of tile row r, the rows ``ld`` elements apart from ``base``."""
        b = self.builder
        offset = b.add(b.mul(ld, self.int64(r)), self.int64(v * self.lanes))
        return b.bitcast(b.gep(base, [offset]), self.vptr)

    def initial(self, load, pointer):
        """The accumulators before the first step: the tile at ``pointer(r, v)`` when the i1
        ``load`` is true, else zeros, merged by phis."""
        b, mr, nvec = self.builder, self.mr, self.nvec
        entry = b.block
        with b.if_then(load):
            loaded = [[b.load(pointer(r, v), align=self.itemsize) for v in range(nvec)]
                      for r in range(mr)]
            load_block = b.block
        init = [[b.phi(self.vector) for _ in range(nvec)] for _ in range(mr)]
        for r in range(mr):
            for v in range(nvec):
                init[r][v].add_incoming(ir.Constant(self.vector, None), entry)
                init[r][v].add_incoming(loaded[r][v], load_block)
        return init

    def k_loop(self, init, steps, step, name):
        """``acc[r][v] += a_r * b_v`` for k in [0, steps), from ``init``; ``step(k)`` emits the
        loads of step k and returns (mr scalars of A, nvec vectors of B). Returns the final
        accumulators."""
        b, mr, nvec, int64 = self.builder, self.mr, self.nvec, self.int64
        start = b.block
        loop = b.append_basic_block(f"{name}.loop")
        done = b.append_basic_block(f"{name}.done")
        b.cbranch(b.icmp_signed(">", steps, int64(0)), loop, done)

        b.position_at_end(loop)
        k = b.phi(int64)
        k.add_incoming(int64(0), start)
        acc = [[b.phi(self.vector) for _ in range(nvec)] for _ in range(mr)]
        a_values, b_vectors = step(k)
        undef = ir.Constant(self.vector, ir.Undefined)
        splat = ir.Constant(ir.VectorType(ir.IntType(32), self.lanes), [0] * self.lanes)
        new = []
        for r in range(mr):
            a_vec = b.shuffle_vector(b.insert_element(undef, a_values[r], ir.IntType(32)(0)),
                                     undef, splat)
            new.append([b.call(self.fma, [a_vec, b_vectors[v], acc[r][v]])
                        for v in range(nvec)])
        k_next = b.add(k, int64(1))
        k.add_incoming(k_next, loop)
        for r in range(mr):
            for v in range(nvec):
                acc[r][v].add_incoming(init[r][v], start)
                acc[r][v].add_incoming(new[r][v], loop)
        b.cbranch(b.icmp_signed("<", k_next, steps), loop, done)

        b.position_at_end(done)
        result = [[b.phi(self.vector) for _ in range(nvec)] for _ in range(mr)]
        for r in range(mr):
            for v in range(nvec):
                result[r][v].add_incoming(init[r][v], start)
                result[r][v].add_incoming(new[r][v], loop)
        return result

    def store(self, tile, pointer):
        for r in range(self.mr):
            for v in range(self.nvec):
                self.builder.store(tile[r][v], pointer(r, v), align=self.itemsize)


@intrinsic
def microkernel(typingctx, a_pack, a_start, b_pack, b_start, kc, src, src_start, src_ld, load,
                dst, dst_start, dst_ld):
    """``dst_tile = (src_tile if load else 0) + A_panel @ B_panel``, one ``mr x nr`` tile.

    a_pack: 1-D packed A; from element ``a_start``, ``kc`` groups of ``mr`` values (column k of
            an ``mr``-row panel, k-major).
    b_pack: 1-D packed B; from element ``b_start``, ``kc`` groups of ``nr`` values (row k of an
            ``nr``-column panel, k-major).
    kc:     steps of k (0 gives the initial tile).
    src:    1-D; when ``load``, the initial accumulators: row r of the tile is
            ``src[src_start + r*src_ld : ... + nr]``. Not read otherwise.
    dst:    1-D; the result tile, row r at ``dst[dst_start + r*dst_ld : ... + nr]``.
    src and dst may be the same array (partial sums kept in C between k blocks). All arrays
    share one float dtype; ``(mr, nr)`` is :func:`gemm_tile` of it. Nothing is bounds-checked:
    the caller passes full tiles only.
    """
    dtype = a_pack.dtype
    arrays = (a_pack, b_pack, src, dst)
    integers = (a_start, b_start, kc, src_start, src_ld, dst_start, dst_ld)
    ok = (
        all(isinstance(x, types.Array) and x.ndim == 1 and x.dtype == dtype for x in arrays)
        and dtype in (types.float32, types.float64)
        and all(isinstance(x, types.Integer) for x in integers)
        and isinstance(load, types.Boolean)
    )
    if not ok:
        return None
    mr, nr, lanes = gemm_tile(as_dtype(dtype))
    nvec = nr // lanes

    def codegen(context, builder, sig, args):
        t = TileIR(context, builder, dtype, mr, nvec, lanes)

        def arg_int(index):
            return context.cast(builder, args[index], sig.args[index], types.int64)

        def pointer(index, start_index):
            data = context.make_array(sig.args[index])(context, builder, args[index]).data
            return builder.gep(data, [arg_int(start_index)])

        a_base, b_base = pointer(0, 1), pointer(2, 3)
        src_base, src_ld = pointer(5, 6), arg_int(7)
        init = t.initial(args[8], lambda r, v: t.row_pointer(src_base, src_ld, r, v))

        def step(k):
            b_row = builder.gep(b_base, [builder.mul(k, t.int64(nr))])
            a_col = builder.gep(a_base, [builder.mul(k, t.int64(mr))])
            return ([builder.load(builder.gep(a_col, [t.int64(r)]), align=t.itemsize)
                     for r in range(mr)],
                    [t.load_vector(builder.gep(b_row, [t.int64(v * lanes)]))
                     for v in range(nvec)])

        result = t.k_loop(init, arg_int(4), step, "microkernel")
        dst_base, dst_ld = pointer(9, 10), arg_int(11)
        t.store(result, lambda r, v: t.row_pointer(dst_base, dst_ld, r, v))
        return context.get_dummy_value()

    signature = types.void(a_pack, a_start, b_pack, b_start, kc, src, src_start, src_ld, load,
                           dst, dst_start, dst_ld)
    return signature, codegen
