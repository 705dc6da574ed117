"""Numba CPU kernels for the linear op family (interface: brainkern/kernels/__init__.py).

``linear_forward``: a BLIS-style GEMM of A and B = weight^T (read through weight's strides).
C is split into one rectangle of micro-tiles per thread.
Each thread packs the parts of A and B it reads into zero-padded micro-panels (``mr`` rows of A,
``nr`` columns of B, k-major) block by block: ``kc`` steps of k (a ``kc x nr`` B micro-panel
stays in L1), ``_MC_PANELS * mr`` rows of A (the packed A block stays in L2), with the
register-tiled ``_simd.microkernel`` innermost. Partial sums over k blocks live in ``out``;
after the last k block the epilogue adds the bias, writes ``pre`` and stores ``act`` once.

``activation_backward``: one pass over the (M, N) gradient: ``grad_pre = grad_out * act'(saved)``
and, when asked, the column sums for the bias gradient, accumulated in float64.

Kernels see tensors as flat 1-D numpy views starting at the tensor's first element, plus element
strides: any strides, one compiled signature per dtype. Each ``prange`` kernel has a serial twin
that runs where threads cannot or should not (see _runtime.py, and small problems); twins are
written out because Numba's cache does not key on ``parallel=`` (one function compiled both
ways would share one cache entry).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit, prange

from brainkern.activations import (
    GELU,
    GELU_TANH,
    LEAKY_RELU,
    NONE,
    RELU,
    SIGMOID,
    SILU,
    TANH,
    saves_output,
)
from brainkern.kernels.numba import _runtime, _simd
from brainkern.kernels.numba._simd import microkernel

# Everything of fastmath but nnan/ninf: NaN and inf inputs must come out as torch's do.
FASTMATH = {"contract", "reassoc", "nsz", "arcp", "afn"}

_KC = 256  # k steps per block: a kc x nr B micro-panel (16 KB with AVX2, f32 or f64) fits L1
_MC_PANELS = 16  # A micro-panels per block: mc x kc = 96 x 256 (f32: 96 KB) stays in L2
_BACKWARD_ROWS = 64  # rows per backward block: a fixed split keeps bias sums deterministic
# Below this many multiply-adds a GEMM runs on one thread: waking the pool costs ~10-20 us,
# about what 2^18 FMAs take on one core.
_PARALLEL_MIN_FMAS = 1 << 18
_PARALLEL_MIN_ELEMENTS = 1 << 15  # the same for the elementwise backward pass

_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)

DEVICES = ("cpu",)
DTYPES = (torch.float32, torch.float64)

_NUMPY_DTYPE = {torch.float32: np.float32, torch.float64: np.float64}


def _cdiv(a, b):
    return -(-a // b)


@njit(cache=True, inline="always", fastmath=FASTMATH)
def _activate(z, code, param):
    """act(z) for an activation code of brainkern.activations (NONE falls through)."""
    if code == RELU:
        return 0.0 if z < 0.0 else z  # not max(): a NaN must stay NaN
    if code == LEAKY_RELU:
        return z if z > 0.0 else z * param
    if code == SIGMOID:
        return 1.0 / (1.0 + math.exp(-z))
    if code == TANH:
        return math.tanh(z)
    if code == GELU:
        return 0.5 * z * (1.0 + math.erf(z * _INV_SQRT_2))
    if code == GELU_TANH:
        return 0.5 * z * (1.0 + math.tanh(_SQRT_2_OVER_PI * (z + 0.044715 * z * z * z)))
    if code == SILU:
        return z / (1.0 + math.exp(-z))
    return z


@njit(cache=True, inline="always", fastmath=FASTMATH)
def _derivative(s, code, param):
    """act'(z) from ``s``: the output y for relu/leaky(slope >= 0)/sigmoid/tanh, else z.

    leaky_relu's test ``s > 0`` is right for both: y > 0 exactly when z > 0 if slope >= 0.
    """
    if code == RELU:
        return 1.0 if s > 0.0 else 0.0
    if code == LEAKY_RELU:
        return 1.0 if s > 0.0 else param
    if code == SIGMOID:
        return s * (1.0 - s)
    if code == TANH:
        return 1.0 - s * s
    if code == GELU:
        return 0.5 * (1.0 + math.erf(s * _INV_SQRT_2)) + s * math.exp(-0.5 * s * s) * _INV_SQRT_2PI
    if code == GELU_TANH:
        t = math.tanh(_SQRT_2_OVER_PI * (s + 0.044715 * s * s * s))
        return 0.5 * (1.0 + t) + 0.5 * s * (1.0 - t * t) * _SQRT_2_OVER_PI * (
            1.0 + 3.0 * 0.044715 * s * s
        )
    if code == SILU:
        sig = 1.0 / (1.0 + math.exp(-s))
        return sig * (1.0 + s * (1.0 - sig))
    return 1.0


@njit(cache=True, fastmath=FASTMATH)
def _pack_panels(src, s_row, s_k, rows, p_begin, p_end, width, k0, steps, dst):
    """Pack panels ``[p_begin, p_end)`` of a matrix X into ``dst``, each ``width`` rows, k-major.

    src: flat X, (rows, k) with element (i, kk) at ``i*s_row + kk*s_k``. Panel p holds rows
    ``[p*width, p*width + width)`` and columns ``[k0, k0 + steps)`` at
    ``dst[(p - p_begin)*width*steps:]``, ``width`` values per k; rows past ``rows`` are zeros,
    so the micro-kernel always runs full tiles. Packs A (X = A, width mr) and B (X = B^T:
    s_row = B's column stride, width nr).
    """
    # No division by the (runtime) width per element: an integer divide costs ~25 cycles.
    if s_row <= s_k:
        # Rows are X's fast dimension (row-major B, A^T views): for each k, stream along the
        # rows of all panels, so reads are sequential; one panel at a time would stride a page
        # per k and defeat the prefetchers.
        for kk in range(steps):
            src_k = (k0 + kk) * s_k
            for p in range(p_begin, p_end):
                dst_start = ((p - p_begin) * steps + kk) * width
                first = p * width
                for r in range(min(width, rows - first)):
                    dst[dst_start + r] = src[(first + r) * s_row + src_k]
    else:  # k is the fast dimension (row-major A, B = W^T views): walk each row along k
        for p in range(p_begin, p_end):
            first = p * width
            for r in range(min(width, rows - first)):
                dst_start = (p - p_begin) * steps * width + r
                src_start = (first + r) * s_row + k0 * s_k
                for kk in range(steps):
                    dst[dst_start + kk * width] = src[src_start + kk * s_k]
    last = p_end - 1
    valid = rows - last * width
    for kk in range(steps):
        for r in range(valid, width):
            dst[((last - p_begin) * steps + kk) * width + r] = 0.0


@njit(cache=True, fastmath=FASTMATH)
def _gemm_task(task, a, sa0, sa1, b, sb0, sb1, bias, has_bias, out, pre, has_pre, m, n, k, code,
               param, mr, nr, kc, tasks_m, tasks_n):
    """One task's share of ``out = act(A @ B + bias)``: a rectangle of (mr x nr) micro-tiles.

    a: flat A (m, k), element (i, kk) at ``i*sa0 + kk*sa1``.  b: flat B (k, n), element (kk, j)
    at ``kk*sb0 + j*sb1``.  bias: (n,), read if has_bias.  out, pre: flat (m, n) row-major,
    pre written if has_pre.  code, param: the activation.  (mr, nr): ``_simd.gemm_tile``.
    kc: k steps per block.  task in ``[0, tasks_m * tasks_n)``: its row and column of the task
    grid; rows and columns of panels are split as evenly as panels allow.

    Each task packs the A and B panels it reads (A is repacked once per column task, B once per
    row task: cheap next to the GEMM, and the packed data is hot in this core's caches).
    Between k blocks the partial sums live in ``out``; after the last, the epilogue stores once.
    """
    panels_m, panels_n = (m + mr - 1) // mr, (n + nr - 1) // nr
    row_task, col_task = task // tasks_n, task % tasks_n
    p_begin, p_end = row_task * panels_m // tasks_m, (row_task + 1) * panels_m // tasks_m
    q_begin, q_end = col_task * panels_n // tasks_n, (col_task + 1) * panels_n // tasks_n
    a_pack = np.empty(_MC_PANELS * mr * kc, dtype=out.dtype)
    b_pack = np.empty((q_end - q_begin) * nr * kc, dtype=out.dtype)
    tile = np.empty(mr * nr, dtype=out.dtype)
    plain = code == NONE and not has_bias and not has_pre  # the epilogue would only copy
    for pc in range(0, max(k, 1), kc):  # one pass with k == 0: the epilogue still runs
        steps = min(kc, k - pc)
        first, last = pc == 0, pc + kc >= k
        _pack_panels(b, sb1, sb0, n, q_begin, q_end, nr, pc, steps, b_pack)
        for p_block in range(p_begin, p_end, _MC_PANELS):
            p_block_end = min(p_block + _MC_PANELS, p_end)
            _pack_panels(a, sa0, sa1, m, p_block, p_block_end, mr, pc, steps, a_pack)
            for q in range(q_begin, q_end):  # a B micro-panel stays in L1 across the A block
                j = q * nr
                cols = min(nr, n - j)
                for p in range(p_block, p_block_end):
                    i = p * mr
                    rows = min(mr, m - i)
                    a_start, b_start = (p - p_block) * mr * steps, (q - q_begin) * nr * steps
                    if rows == mr and cols == nr and (not last or plain):
                        # Full tile, and more k to come or nothing to add: straight to out.
                        microkernel(a_pack, a_start, b_pack, b_start, steps,
                                    out, i * n + j, n, not first, out, i * n + j, n)
                        continue
                    if rows == mr and cols == nr:
                        microkernel(a_pack, a_start, b_pack, b_start, steps,
                                    out, i * n + j, n, not first, tile, 0, nr)
                    else:  # an edge tile runs in the scratch tile; only its valid part moves
                        if not first:
                            _copy_tile(out, i * n + j, n, tile, 0, nr, rows, cols)
                        microkernel(a_pack, a_start, b_pack, b_start, steps,
                                    tile, 0, nr, not first, tile, 0, nr)
                        if not last:
                            _copy_tile(tile, 0, nr, out, i * n + j, n, rows, cols)
                            continue
                    _epilogue(tile, nr, rows, cols, bias, has_bias, j, out, pre, has_pre,
                              i * n + j, n, code, param)


@njit(cache=True, inline="always")
def _copy_tile(src, src_start, src_ld, dst, dst_start, dst_ld, rows, cols):
    """Copy a rows x cols tile: row r from ``src[src_start + r*src_ld:]`` (1-D) to
    ``dst[dst_start + r*dst_ld:]`` (1-D). Row slices keep the index a bare loop counter."""
    for r in range(rows):
        src_row = src[src_start + r * src_ld:src_start + r * src_ld + cols]
        dst_row = dst[dst_start + r * dst_ld:dst_start + r * dst_ld + cols]
        for c in range(cols):
            dst_row[c] = src_row[c]


@njit(cache=True, inline="always", fastmath=FASTMATH)
def _epilogue(tile, nr, rows, cols, bias, has_bias, j, out, pre, has_pre, start, n, code, param):
    """out[start + r*n + c] = act(tile[r*nr + c] + bias[j + c]) for the valid rows x cols;
    pre gets the value before the activation.

    Loops index row slices with the bare loop counter: LLVM then proves the index non-negative,
    drops Numba's negative-index wraparound and vectorizes. The activation is chosen per row,
    not per element; relu and leaky_relu get branch-free loops of their own.
    """
    bias_row = bias[j:j + cols]
    for r in range(rows):
        z = tile[r * nr:r * nr + cols]
        dst = out[start + r * n:start + r * n + cols]
        if has_bias:
            for c in range(cols):
                z[c] += bias_row[c]
        if has_pre:
            pre_row = pre[start + r * n:start + r * n + cols]
            for c in range(cols):
                pre_row[c] = z[c]
        if code == NONE:
            for c in range(cols):
                dst[c] = z[c]
        elif code == RELU:
            for c in range(cols):
                dst[c] = max(z[c], 0.0) if z[c] == z[c] else z[c]  # NaN stays NaN
        elif code == LEAKY_RELU:
            for c in range(cols):
                dst[c] = z[c] if z[c] > 0.0 else z[c] * param
        else:
            for c in range(cols):
                dst[c] = _activate(z[c], code, param)


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def _gemm_parallel(a, sa0, sa1, b, sb0, sb1, bias, has_bias, out, pre, has_pre, m, n, k, code,
                   param, mr, nr, kc, tasks_m, tasks_n):
    """All tasks of ``_gemm_task`` (same arguments), one per thread. Its serial twin is
    ``_gemm_task`` with task 0 of a 1 x 1 grid."""
    for task in prange(tasks_m * tasks_n):
        # prange indices are uint64: cast, so _gemm_task compiles once for both callers.
        _gemm_task(np.int64(task), a, sa0, sa1, b, sb0, sb1, bias, has_bias, out, pre, has_pre,
                   m, n, k, code, param, mr, nr, kc, tasks_m, tasks_n)


def _task_grid(panels_m, panels_n, threads):
    """(tasks_m, tasks_n), tasks_m * tasks_n <= threads, with the fewest micro-tiles per task.

    Ties go to more row tasks: each thread then writes whole rows of out.
    """
    best = (1, 1)
    best_cost = panels_m * panels_n
    for tasks_m in range(threads, 0, -1):
        tasks_n = threads // tasks_m
        if tasks_m > panels_m or tasks_n > panels_n:
            continue
        cost = _cdiv(panels_m, tasks_m) * _cdiv(panels_n, tasks_n)
        if cost < best_cost:
            best, best_cost = (tasks_m, tasks_n), cost
    return best


def _flat(t: torch.Tensor) -> np.ndarray:
    """A 1-D numpy view of ``t``'s storage from its first to its last element (t.numel() > 0)."""
    t = t.detach()
    # The fast paths cover dense tensors and their transposes (~1.5 us, not ~8 us).
    if t.is_contiguous():
        return t.numpy().reshape(-1)
    if t.dim() == 2 and t.t().is_contiguous():
        return t.t().numpy().reshape(-1)
    extent = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return torch.as_strided(t, (extent,), (1,)).numpy()


def linear_forward(a, weight, bias, out, pre, act_code, act_param):
    """``out = act(a @ weight^T + bias)``, ``pre`` the same before act (kernels/__init__.py)."""
    m, k = a.shape
    n = weight.shape[0]
    if m == 0 or n == 0:
        return
    mr, nr, _ = _simd.gemm_tile(_NUMPY_DTYPE[out.dtype])
    out_flat = _flat(out)
    # Absent operands are replaced by `out` itself behind a False flag: one signature per dtype.
    a_flat, sa0, sa1 = (_flat(a), *a.stride()) if k else (out_flat, 0, 0)
    # B = weight^T: B[p, j] = weight[j, p], so B's strides are weight's swapped.
    b_flat, sb1, sb0 = (_flat(weight), *weight.stride()) if k else (out_flat, 0, 0)
    bias_flat = out_flat if bias is None else _flat(bias)
    pre_flat = out_flat if pre is None else _flat(pre)
    kc = _cdiv(k, _cdiv(k, _KC)) if k else 1  # equal k blocks: 257 -> 129 + 128, not 256 + 1
    args = (a_flat, sa0, sa1, b_flat, sb0, sb1, bias_flat, bias is not None, out_flat, pre_flat,
            pre is not None, m, n, k, int(act_code), float(act_param), mr, nr, kc)
    threads = _runtime.threads() if m * n * k >= _PARALLEL_MIN_FMAS else 1
    grid = _task_grid(_cdiv(m, mr), _cdiv(n, nr), threads)
    if grid == (1, 1):
        _gemm_task(0, *args, 1, 1)
    else:
        _gemm_parallel(*args, *grid)


@njit(cache=True, fastmath=FASTMATH)
def _backward_block(block, g, sg0, sg1, saved, grad_pre, m, n, code, param, sums, has_sums):
    """Rows ``[block*R, block*R + R)`` (R = _BACKWARD_ROWS) of grad_pre = g * act'(saved).

    g: flat grad_out (m, n), element (i, j) at ``i*sg0 + j*sg1``.  saved, grad_pre: flat (m, n)
    row-major.  sums: float64; with has_sums, ``sums[block*n : (block+1)*n]`` gets the block's
    column sums of grad_pre (of the stored values, as ``grad_pre.sum(0)`` would see them).
    """
    row_end = min(m, (block + 1) * _BACKWARD_ROWS)
    for i in range(block * _BACKWARD_ROWS, row_end):
        for j in range(n):
            grad_pre[i * n + j] = g[i * sg0 + j * sg1] * _derivative(saved[i * n + j], code, param)
    if has_sums:
        base = block * n
        sums[base:base + n] = 0.0
        for i in range(block * _BACKWARD_ROWS, row_end):  # the block is still in L1/L2
            for j in range(n):
                sums[base + j] += grad_pre[i * n + j]


@njit(cache=True, fastmath=FASTMATH)
def _sum_blocks(sums, blocks, n, grad_bias):
    """grad_bias[j] = sum over blocks of sums[block*n + j], in block order (deterministic)."""
    for j in range(n):
        grad_bias[j] = 0.0
    for block in range(blocks):
        for j in range(n):
            grad_bias[j] += sums[block * n + j]


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def _backward_parallel(g, sg0, sg1, saved, grad_pre, grad_bias, has_bias, m, n, code, param):
    """grad_pre = g * act'(saved); with has_bias, grad_bias (n,) = its column sums.

    Arguments as ``_backward_block``. Blocks have a fixed size and their sums are added in
    block order, so grad_bias does not depend on the thread count.
    """
    blocks = (m + _BACKWARD_ROWS - 1) // _BACKWARD_ROWS
    sums = np.empty(blocks * n if has_bias else 0, dtype=np.float64)
    for block in prange(blocks):
        # prange indices are uint64: cast, so _backward_block compiles once for both twins.
        _backward_block(np.int64(block), g, sg0, sg1, saved, grad_pre, m, n, code, param, sums,
                        has_bias)
    if has_bias:
        _sum_blocks(sums, blocks, n, grad_bias)


@njit(cache=True, fastmath=FASTMATH)
def _backward_serial(g, sg0, sg1, saved, grad_pre, grad_bias, has_bias, m, n, code, param):
    """``_backward_parallel``'s serial twin: same blocks, same sums, same order."""
    blocks = (m + _BACKWARD_ROWS - 1) // _BACKWARD_ROWS
    sums = np.empty(blocks * n if has_bias else 0, dtype=np.float64)
    for block in range(blocks):
        _backward_block(block, g, sg0, sg1, saved, grad_pre, m, n, code, param, sums, has_bias)
    if has_bias:
        _sum_blocks(sums, blocks, n, grad_bias)


def activation_backward(grad_out, saved, grad_pre, grad_bias, act_code, act_param,
                        saved_is_output):
    """``grad_pre = grad_out * act'(saved)``, ``grad_bias = grad_pre.sum(0)`` when given."""
    m, n = grad_pre.shape
    if n == 0:
        return
    if m == 0:
        if grad_bias is not None:
            grad_bias.zero_()
        return
    # The formulas follow from the code alone; the flag is the caller's claim, checked here.
    # Not an assert: a contract check must survive python -O.
    expected = saves_output(int(act_code), float(act_param))
    if expected != bool(saved_is_output):
        raise ValueError(f"numba activation_backward: activation {act_code} ({act_param}) saves "
                         f"the {'output' if expected else 'pre-activation'}, but "
                         f"saved_is_output={saved_is_output}")
    grad_pre_flat = _flat(grad_pre)
    args = (_flat(grad_out), *grad_out.stride(), _flat(saved), grad_pre_flat,
            grad_pre_flat if grad_bias is None else _flat(grad_bias), grad_bias is not None,
            m, n, int(act_code), float(act_param))
    if m <= _BACKWARD_ROWS or m * n < _PARALLEL_MIN_ELEMENTS or _runtime.threads() == 1:
        _backward_serial(*args)
    else:
        _backward_parallel(*args)
