"""A register-tiled micro-kernel that reads its operands through per-row and per-step offsets.

``_simd.microkernel`` reads packed panels: both operands must first be copied into k-major
micro-panels. For a convolution the patch operand would be gathered from the input for every
panel of output pixels, which costs about as much as the multiply-adds themselves (the 32->64
5x5 layer ran at ~0.55x torch that way). Here each operand is addressed as ``base[row] +
offset[k]`` instead: with a zero-padded input, the patch element of pixel p and reduction index
k = (tap, ci) is ``x[pixel_base[p] + tap_offset[k]]``, so the micro-kernel reads the input where
it lies, and a packed panel is the special case ``base[r] = start + r``, ``offset[k] = k * width``.

As for _simd.py, Numba's cache does not key on this module's source: after editing it, delete
the ``__pycache__/*.nb[ic]`` files of the modules that call it.

The code is ``_simd.microkernel``'s LLVM vector code (``_simd.TileIR``: accumulators as SSA
values, ``llvm.fma`` on ``<lanes x float>``) with other loads, on the tile of :func:`offsets_tile`.
"""

from __future__ import annotations

from numba import types
from numba.extending import intrinsic
from numba.np.numpy_support import as_dtype

from brainkern.kernels.numba._simd import TileIR, gemm_tile, vector_registers


def offsets_tile(dtype, rows_apart: bool, single_row: bool = False) -> tuple[int, int, int]:
    """The ``(mr, nr, lanes)`` tile of :func:`microkernel_offsets` (rows_apart), of
    :func:`microkernel_offsets_packed_a`, or of :func:`microkernel_offsets_row` (single_row).

    With rows apart, LLVM loads the mr broadcasts into registers before the FMAs (it does not
    fold them into the FMAs' memory operands as it does for rows that share a base): 12 x 2
    accumulators + 12 broadcasts + 2 B vectors overflowed the 32 zmm registers and spilled
    accumulators to the stack. 8 rows (AVX-512) or 4 (16 registers) leave them room.
    The single row (1 x 8 vectors) serves layers with one or two output channels, where an mr-row
    tile would be mostly padding: 8 accumulators still cover the FMA latency, and 9 loads per
    8 FMAs keep it near the FMA rate on two load ports.
    """
    mr, nr, lanes = gemm_tile(dtype)
    if single_row:
        return 1, 8 * lanes, lanes
    if rows_apart:
        mr = 8 if vector_registers() == 32 else 4
    return mr, nr, lanes


def _make_kernel(name: str, rows_apart: bool, single_row: bool = False):
    def kernel(typingctx, a, a_base, a_off, b, b_base, b_off, kc, dst, dst_start, dst_ld, load):
        return _typed(rows_apart, single_row, a, a_base, a_off, b, b_base, b_off, kc, dst,
                      dst_start, dst_ld, load)

    # Numba names an intrinsic's typing template after the function: one name per kernel.
    kernel.__name__ = kernel.__qualname__ = name
    kernel.__doc__ = _typed.__doc__
    return intrinsic(kernel)


def _typed(rows_apart, single_row, a, a_base, a_off, b, b_base, b_off, kc, dst, dst_start,
           dst_ld, load):
    """``dst_tile = (dst_tile if load else 0) + A @ B`` for one ``mr x nr`` tile, operands read
    through offsets.

    a:      1-D; ``A[r, k] = a[a_base[r] + a_off[k]]`` (rows_apart: a_base is (mr,) int64) or
            ``a[a_base[0] + r + a_off[k]]`` (a packed panel: a_base is (>= 1,) int64).
    a_off:  (>= kc,) int64.
    b:      1-D; row k of B, vector v (``lanes`` consecutive columns) is
            ``b[b_base[v] + b_off[k] : ... + lanes]``.
    b_base: (nr / lanes,) int64. b_off: (>= kc,) int64.
    kc:     steps of k (0 gives the initial tile).
    dst:    1-D; row r of the tile at ``dst[dst_start + r*dst_ld : ... + nr]``.
    All arrays of values share one float dtype; ``(mr, nr, lanes)`` is :func:`offsets_tile`.
    Nothing is bounds-checked: every address the offsets form must lie inside its array.
    """
    dtype = a.dtype
    value_arrays = (a, b, dst)
    index_arrays = (a_base, a_off, b_base, b_off)
    ok = (
        all(isinstance(x, types.Array) and x.ndim == 1 and x.dtype == dtype for x in value_arrays)
        and dtype in (types.float32, types.float64)
        and all(isinstance(x, types.Array) and x.ndim == 1 and x.dtype == types.int64
                for x in index_arrays)
        and all(isinstance(x, types.Integer) for x in (kc, dst_start, dst_ld))
        and isinstance(load, types.Boolean)
    )
    if not ok:
        return None
    mr, nr, lanes = offsets_tile(as_dtype(dtype), rows_apart, single_row)
    nvec = nr // lanes

    def codegen(context, builder, sig, args):
        t = TileIR(context, builder, dtype, mr, nvec, lanes)
        int64 = t.int64

        def data(index):
            return context.make_array(sig.args[index])(context, builder, args[index]).data

        def arg_int(index):
            return context.cast(builder, args[index], sig.args[index], types.int64)

        a_data, b_data = data(0), data(3)
        a_base, a_off, b_base, b_off = data(1), data(2), data(4), data(5)
        if rows_apart:
            a_rows = [builder.gep(a_data, [builder.load(builder.gep(a_base, [int64(r)]))])
                      for r in range(mr)]
        else:
            a_row0 = builder.gep(a_data, [builder.load(a_base)])
            a_rows = [builder.gep(a_row0, [int64(r)]) for r in range(mr)]
        b_vecs = [builder.gep(b_data, [builder.load(builder.gep(b_base, [int64(v)]))])
                  for v in range(nvec)]
        dst_base = builder.gep(data(7), [arg_int(8)])
        dst_ld = arg_int(9)

        def tile_row(r, v):
            return t.row_pointer(dst_base, dst_ld, r, v)

        init = t.initial(args[10], tile_row)

        def step(k):
            a_k = builder.load(builder.gep(a_off, [k]))
            b_k = builder.load(builder.gep(b_off, [k]))
            return ([builder.load(builder.gep(a_rows[r], [a_k]), align=t.itemsize)
                     for r in range(mr)],
                    [t.load_vector(builder.gep(b_vecs[v], [b_k])) for v in range(nvec)])

        t.store(t.k_loop(init, arg_int(6), step, "microkernel_offsets"), tile_row)
        return context.get_dummy_value()

    signature = types.void(a, a_base, a_off, b, b_base, b_off, kc, dst, dst_start, dst_ld, load)
    return signature, codegen


microkernel_offsets = _make_kernel("microkernel_offsets", rows_apart=True)
microkernel_offsets_packed_a = _make_kernel("microkernel_offsets_packed_a", rows_apart=False)
microkernel_offsets_row = _make_kernel("microkernel_offsets_row", rows_apart=False,
                                       single_row=True)
