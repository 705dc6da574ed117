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
        int64 = ir.IntType(64)
        scalar = context.get_value_type(dtype)
        vector = ir.VectorType(scalar, lanes)
        vptr = vector.as_pointer()
        itemsize = np.dtype(as_dtype(dtype)).itemsize  # C rows are only element-aligned
        # llvmlite's IRBuilder.fma takes scalars only; declare the vector overload ourselves.
        fma = cgutils.get_or_insert_function(
            builder.module,
            ir.FunctionType(vector, [vector] * 3),
            f"llvm.fma.v{lanes}f{8 * itemsize}",
        )

        def arg_int(index):
            return context.cast(builder, args[index], sig.args[index], types.int64)

        def pointer(index, start_index):
            data = context.make_array(sig.args[index])(context, builder, args[index]).data
            return builder.gep(data, [arg_int(start_index)])

        a_base, b_base = pointer(0, 1), pointer(2, 3)
        steps = arg_int(4)

        def tile_row(base, ld, r, v):
            offset = builder.add(builder.mul(ld, int64(r)), int64(v * lanes))
            return builder.bitcast(builder.gep(base, [offset]), vptr)

        # Initial accumulators: loaded from src or zeros, merged by phis so that they stay SSA
        # values (registers), never a stack array.
        zero = ir.Constant(vector, None)
        init = [[zero] * nvec for _ in range(mr)]
        entry = builder.block
        with builder.if_then(args[8]):
            src_base, src_ld = pointer(5, 6), arg_int(7)
            loaded = [[builder.load(tile_row(src_base, src_ld, r, v), align=itemsize)
                       for v in range(nvec)] for r in range(mr)]
            load_block = builder.block
        start = builder.block
        phis = [[builder.phi(vector) for _ in range(nvec)] for _ in range(mr)]
        for r in range(mr):
            for v in range(nvec):
                phis[r][v].add_incoming(init[r][v], entry)
                phis[r][v].add_incoming(loaded[r][v], load_block)
        init = phis

        loop = builder.append_basic_block("microkernel.loop")
        done = builder.append_basic_block("microkernel.done")
        builder.cbranch(builder.icmp_signed(">", steps, int64(0)), loop, done)

        builder.position_at_end(loop)
        k = builder.phi(int64)
        k.add_incoming(int64(0), start)
        acc = [[builder.phi(vector) for _ in range(nvec)] for _ in range(mr)]
        b_row = builder.gep(b_base, [builder.mul(k, int64(nr))])
        b_vecs = [
            builder.load(builder.bitcast(builder.gep(b_row, [int64(v * lanes)]), vptr),
                         align=itemsize)
            for v in range(nvec)
        ]
        a_col = builder.gep(a_base, [builder.mul(k, int64(mr))])
        undef = ir.Constant(vector, ir.Undefined)
        splat = ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes)
        new = []
        for r in range(mr):
            a_r = builder.load(builder.gep(a_col, [int64(r)]), align=itemsize)
            a_vec = builder.shuffle_vector(
                builder.insert_element(undef, a_r, ir.IntType(32)(0)), undef, splat
            )
            new.append([builder.call(fma, [a_vec, b_vecs[v], acc[r][v]]) for v in range(nvec)])
        k_next = builder.add(k, int64(1))
        k.add_incoming(k_next, loop)
        for r in range(mr):
            for v in range(nvec):
                acc[r][v].add_incoming(init[r][v], start)
                acc[r][v].add_incoming(new[r][v], loop)
        builder.cbranch(builder.icmp_signed("<", k_next, steps), loop, done)

        builder.position_at_end(done)
        result = [[builder.phi(vector) for _ in range(nvec)] for _ in range(mr)]
        dst_base, dst_ld = pointer(9, 10), arg_int(11)
        for r in range(mr):
            for v in range(nvec):
                result[r][v].add_incoming(init[r][v], start)
                result[r][v].add_incoming(new[r][v], loop)
                builder.store(result[r][v], tile_row(dst_base, dst_ld, r, v), align=itemsize)
        return context.get_dummy_value()

    signature = types.void(a_pack, a_start, b_pack, b_start, kc, src, src_start, src_ld, load,
                           dst, dst_start, dst_ld)
    return signature, codegen
