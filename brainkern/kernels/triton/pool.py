"""Triton kernels for the pool op family (interface: brainkern/kernels/__init__.py).

Both memory formats are one layout here, a contiguous (P, H, W, Q) array: NCHW is
(N*C, H, W, 1), NHWC is (N, H, W, C), and torch's flat index ``h * W + w`` names the same tap in
both. Forward kernels and the average pools' backward run one program per block of elements in
memory order (consecutive lanes read consecutive addresses in either format), each computing its
elements whole: the backward gathers, for each input element, the windows that cover it, so no
two programs write one address. Max pooling's backward cannot gather (its kernel knows only the
indices), so each lane owns one (p, q) column of grad_x, zeroes it and adds its outputs' gradients
in order: lanes never share an address, and each sum runs in a fixed order, without atomics.

Without a GPU the same kernels run on CPU tensors through Triton's interpreter.
"""

import torch
import triton
import triton.language as tl

# CPU tensors only through Triton's interpreter (brainkern.backends checks TRITON_INTERPRET).
DEVICES = ("cuda", "cpu")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

BLOCK = 256  # elements per program: 2 per thread with 4 warps
NUM_WARPS = 4
# Max backward: one warp per program, so a small (N*C) still spreads over many SMs; each lane
# walks its column of grad_x serially.
SCATTER_BLOCK = 32
SCATTER_NUM_WARPS = 1


@triton.jit
def _offsets(BLOCK: tl.constexpr, WIDE: tl.constexpr):
    """This program's BLOCK element offsets: int64 when a tensor has 2^31 elements or more,
    else int32, whose divisions (4 per element) cost a fraction of int64's emulated ones."""
    if WIDE:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    else:
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    return offs


@triton.jit
def _split(offs, Q, Wo, Ho):
    """(p, oh, ow, q) of flat offsets into a contiguous (P, Ho, Wo, Q) array."""
    q = offs % Q
    rest = offs // Q
    ow = rest % Wo
    rest = rest // Wo
    return rest // Ho, rest % Ho, ow, q


@triton.jit
def max_pool2d_forward_kernel(
    x_ptr, out_ptr, indices_ptr,
    total, H, W, Q, Ho, Wo,
    KH, KW, SH, SW, PH, PW, DH, DW,
    HAS_INDICES: tl.constexpr,
    WIDE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Max pooling: each output the maximum of its window's in-bounds taps.

    Args:
        x_ptr: Pointer to the input, (P, H, W, Q) contiguous (see the module docstring).
        out_ptr: Pointer to the output, (P, Ho, Wo, Q) contiguous, x's dtype.
        indices_ptr: Pointer to int64 indices, out's layout: the winning tap's ``h * W + w``;
            not written unless HAS_INDICES.
        total: P * Ho * Wo * Q, the number of outputs.
        KH, KW, SH, SW, PH, PW, DH, DW: kernel size, stride, padding, dilation.
        WIDE: int64 offsets (x or out has 2^31 elements or more).
        BLOCK: Outputs per program.

    A tap wins when greater than the best so far or NaN (torch's rule and scan order: the first
    maximum, the last NaN); the index starts at the window's first in-bounds tap, as torch's.
    """
    offs = _offsets(BLOCK, WIDE)
    mask = offs < total
    p, oh, ow, q = _split(offs, Q, Wo, Ho)
    h_start = oh * SH - PH
    w_start = ow * SW - PW
    h_first = tl.where(h_start < 0, h_start + (DH - 1 - h_start) // DH * DH, h_start)
    w_first = tl.where(w_start < 0, w_start + (DW - 1 - w_start) // DW * DW, w_start)
    plane = p * H * W
    # fp16/bf16 compare as fp32: exact, and Triton's interpreter compares bf16 as raw bits.
    acc_dtype = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    best = tl.full((BLOCK,), float("-inf"), acc_dtype)
    best_at = h_first * W + w_first
    for kh in range(KH):
        h = h_start + kh * DH
        row_ok = mask & (h >= 0) & (h < H)
        for kw in range(KW):
            w = w_start + kw * DW
            ok = row_ok & (w >= 0) & (w < W)
            tap = h * W + w
            v = tl.load(x_ptr + (plane + tap) * Q + q, mask=ok, other=float("-inf")).to(acc_dtype)
            wins = ok & ((v > best) | (v != v))
            best = tl.where(wins, v, best)
            best_at = tl.where(wins, tap, best_at)
    tl.store(out_ptr + offs, best.to(out_ptr.dtype.element_ty), mask=mask)
    if HAS_INDICES:
        tl.store(indices_ptr + offs, best_at, mask=mask)


@triton.jit
def max_pool2d_backward_kernel(
    grad_out_ptr, indices_ptr, grad_x_ptr,
    lanes, Q, HW, HoWo,
    WIDE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """grad_x = grad_out added at the taps its indices name, zeros elsewhere.

    Args:
        grad_out_ptr: Pointer to the output's gradient, (P, Ho, Wo, Q) contiguous.
        indices_ptr: Pointer to int64 indices, grad_out's layout, each in [0, H * W).
        grad_x_ptr: Pointer to the input's gradient, (P, H, W, Q) contiguous, written whole.
        lanes: P * Q, the (p, q) columns; each lane of each program owns one.
        HW, HoWo: H * W and Ho * Wo.
        WIDE: int64 offsets (grad_x or grad_out has 2^31 elements or more).
        BLOCK: Columns per program.

    A lane's adds hit only its own column and run in output order: deterministic, no atomics.
    """
    lane = _offsets(BLOCK, WIDE)
    mask = lane < lanes
    p = lane // Q
    q = lane % Q
    x_column = grad_x_ptr + p * HW * Q + q
    # Adds in fp32 for fp16/bf16: one rounding per add, as in the dtype itself, and Triton's
    # interpreter adds bf16 as raw bits.
    acc_dtype = tl.float64 if grad_x_ptr.dtype.element_ty == tl.float64 else tl.float32
    zero = tl.zeros((BLOCK,), grad_x_ptr.dtype.element_ty)
    for i in range(HW):
        tl.store(x_column + i * Q, zero, mask=mask)
    out_offs = p * HoWo * Q + q
    for o in range(HoWo):
        at = tl.load(indices_ptr + out_offs + o * Q, mask=mask, other=0)
        g = tl.load(grad_out_ptr + out_offs + o * Q, mask=mask, other=0.0)
        dst = x_column + at * Q
        # The same lane stored ``dst`` (if at all) in an earlier iteration: its own write.
        total = tl.load(dst, mask=mask).to(acc_dtype) + g.to(acc_dtype)
        tl.store(dst, total.to(grad_x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _window(i, size, out_size, K, S, P, ADAPTIVE: tl.constexpr):
    """(start, end, padded end) of window i along one axis: torch's adaptive window, or the
    strided one (start may be negative; the padded end is clipped to size + padding)."""
    if ADAPTIVE:
        start = i * size // out_size
        end = ((i + 1) * size + out_size - 1) // out_size
        pad_end = end
    else:
        start = i * S - P
        end = tl.minimum(start + K, size)
        pad_end = tl.minimum(start + K, size + P)
    return start, end, pad_end


@triton.jit
def _divisor(h_start, h_end, h_pad_end, w_start, w_end, w_pad_end, divisor,
             COUNT_INCLUDE_PAD: tl.constexpr):
    """A window's divisor: the override when > 0, else its taps counted in the padded input
    (clipped to input + padding) or in bounds."""
    if COUNT_INCLUDE_PAD:
        count = (h_pad_end - h_start) * (w_pad_end - w_start)
    else:
        count = ((h_end - tl.maximum(h_start, 0)) * (w_end - tl.maximum(w_start, 0)))
    return tl.where(divisor > 0, divisor, count)


@triton.jit
def avg_pool2d_forward_kernel(
    x_ptr, out_ptr,
    total, H, W, Q, Ho, Wo,
    KH, KW, SH, SW, PH, PW, divisor,
    COUNT_INCLUDE_PAD: tl.constexpr,
    ADAPTIVE: tl.constexpr,
    WIDE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Average pooling: each output its window's in-bounds sum / the window's divisor.

    Args:
        x_ptr, out_ptr: As max_pool2d_forward_kernel.
        total: P * Ho * Wo * Q.
        KH, KW, SH, SW, PH, PW: kernel size, stride, padding; with ADAPTIVE, KH and KW bound the
            windows' sizes and the rest is unused.
        divisor: divisor_override when > 0.
        COUNT_INCLUDE_PAD: Count padded taps in the divisor.
        ADAPTIVE: torch's adaptive windows (see _window).
        WIDE: int64 offsets (x or out has 2^31 elements or more).
        BLOCK: Outputs per program.
    """
    offs = _offsets(BLOCK, WIDE)
    mask = offs < total
    p, oh, ow, q = _split(offs, Q, Wo, Ho)
    h_start, h_end, h_pad_end = _window(oh, H, Ho, KH, SH, PH, ADAPTIVE)
    w_start, w_end, w_pad_end = _window(ow, W, Wo, KW, SW, PW, ADAPTIVE)
    acc_dtype = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    acc = tl.zeros((BLOCK,), acc_dtype)
    plane = p * H * W
    for kh in range(KH):
        h = h_start + kh
        row_ok = mask & (h >= 0) & (h < h_end)
        for kw in range(KW):
            w = w_start + kw
            ok = row_ok & (w >= 0) & (w < w_end)
            acc += tl.load(x_ptr + (plane + h * W + w) * Q + q, mask=ok, other=0.0).to(acc_dtype)
    div = _divisor(h_start, h_end, h_pad_end, w_start, w_end, w_pad_end, divisor,
                   COUNT_INCLUDE_PAD)
    tl.store(out_ptr + offs, (acc / div.to(acc_dtype)).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _covering(i, size, out_size, K, S, P, ADAPTIVE: tl.constexpr):
    """The first and last (inclusive) windows along one axis that cover input position i."""
    if ADAPTIVE:
        first = i * out_size // size
        last = ((i + 1) * out_size + size - 1) // size - 1
    else:
        reach = i + P - K + 1  # the windows starting from here up to i itself cover i
        first = tl.where(reach <= 0, 0, (reach + S - 1) // S)
        last = tl.minimum((i + P) // S, out_size - 1)
    return first, last


@triton.jit
def avg_pool2d_backward_kernel(
    grad_out_ptr, grad_x_ptr,
    total, H, W, Q, Ho, Wo,
    KH, KW, SH, SW, PH, PW, divisor, MAX_OH, MAX_OW,
    COUNT_INCLUDE_PAD: tl.constexpr,
    ADAPTIVE: tl.constexpr,
    WIDE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Average pooling's adjoint, gathered: each input element sums grad_out / divisor over the
    windows covering it.

    Args:
        grad_out_ptr: Pointer to the output's gradient, (P, Ho, Wo, Q) contiguous.
        grad_x_ptr: Pointer to the input's gradient, (P, H, W, Q) contiguous, written whole.
        total: P * H * W * Q, the number of inputs.
        KH ... divisor, COUNT_INCLUDE_PAD, ADAPTIVE, WIDE: as avg_pool2d_forward_kernel.
        MAX_OH, MAX_OW: the most windows covering one input position along each axis.
        BLOCK: Inputs per program.
    """
    offs = _offsets(BLOCK, WIDE)
    mask = offs < total
    p, h, w, q = _split(offs, Q, W, H)
    oh_first, oh_last = _covering(h, H, Ho, KH, SH, PH, ADAPTIVE)
    ow_first, ow_last = _covering(w, W, Wo, KW, SW, PW, ADAPTIVE)
    acc_dtype = tl.float64 if grad_x_ptr.dtype.element_ty == tl.float64 else tl.float32
    acc = tl.zeros((BLOCK,), acc_dtype)
    plane = p * Ho * Wo
    for i in range(MAX_OH):
        oh = oh_first + i
        h_start, h_end, h_pad_end = _window(oh, H, Ho, KH, SH, PH, ADAPTIVE)
        for j in range(MAX_OW):
            ow = ow_first + j
            ok = mask & (oh <= oh_last) & (ow <= ow_last)
            w_start, w_end, w_pad_end = _window(ow, W, Wo, KW, SW, PW, ADAPTIVE)
            div = _divisor(h_start, h_end, h_pad_end, w_start, w_end, w_pad_end, divisor,
                           COUNT_INCLUDE_PAD)
            g = tl.load(grad_out_ptr + (plane + oh * Wo + ow) * Q + q, mask=ok, other=0.0)
            div = tl.where(ok, div, 1)  # candidates past the last covering one may count 0 taps
            acc += g.to(acc_dtype) / div.to(acc_dtype)
    tl.store(grad_x_ptr + offs, acc.to(grad_x_ptr.dtype.element_ty), mask=mask)


def _wide(*tensors) -> bool:
    return max(t.numel() for t in tensors) >= 2**31


def _layout(*tensors):
    """(P, Q) of the (P, H, W, Q) view: NHWC when any tensor is not NCHW-contiguous (a tensor
    that is both, C == 1 or H == W == 1, has one memory order for the two formats)."""
    n, c = tensors[0].shape[:2]
    if all(t.is_contiguous() for t in tensors):
        return n * c, 1
    return n, c


def max_pool2d_forward(x, out, indices, kernel_size, stride, padding, dilation):
    """out = each window's maximum; indices (or None) its flat tap (kernels/__init__.py)."""
    total = out.numel()
    if total == 0:
        return
    P, Q = _layout(x, out) if indices is None else _layout(x, out, indices)
    max_pool2d_forward_kernel[(triton.cdiv(total, BLOCK),)](
        x, out, out if indices is None else indices,
        total, x.shape[2], x.shape[3], Q, out.shape[2], out.shape[3],
        *kernel_size, *stride, *padding, *dilation,
        HAS_INDICES=indices is not None, WIDE=_wide(x, out), BLOCK=BLOCK, num_warps=NUM_WARPS,
    )


def max_pool2d_backward(grad_out, indices, grad_x, kernel_size, stride, padding, dilation):
    """grad_x = grad_out summed into the taps its indices name, zeros elsewhere (the window
    arguments unused: one scatter serves every window)."""
    if grad_x.numel() == 0:
        return
    if grad_out.numel() == 0:
        grad_x.zero_()
        return
    P, Q = _layout(grad_x, grad_out, indices)
    (H, W), (Ho, Wo) = grad_x.shape[2:], grad_out.shape[2:]
    max_pool2d_backward_kernel[(triton.cdiv(P * Q, SCATTER_BLOCK),)](
        grad_out, indices, grad_x, P * Q, Q, H * W, Ho * Wo,
        WIDE=_wide(grad_x, grad_out), BLOCK=SCATTER_BLOCK, num_warps=SCATTER_NUM_WARPS,
    )


def _avg_forward(x, out, kernel_size, stride, padding, count_include_pad, divisor, adaptive):
    total = out.numel()
    if total == 0:
        return
    _, Q = _layout(x, out)
    avg_pool2d_forward_kernel[(triton.cdiv(total, BLOCK),)](
        x, out, total, x.shape[2], x.shape[3], Q, out.shape[2], out.shape[3],
        *kernel_size, *stride, *padding, divisor,
        COUNT_INCLUDE_PAD=count_include_pad, ADAPTIVE=adaptive, WIDE=_wide(x, out), BLOCK=BLOCK,
        num_warps=NUM_WARPS,
    )


def _avg_backward(grad_out, grad_x, kernel_size, stride, padding, count_include_pad, divisor,
                  adaptive, covering):
    total = grad_x.numel()
    if total == 0:
        return
    if grad_out.numel() == 0:
        grad_x.zero_()
        return
    _, Q = _layout(grad_x, grad_out)
    avg_pool2d_backward_kernel[(triton.cdiv(total, BLOCK),)](
        grad_out, grad_x, total, grad_x.shape[2], grad_x.shape[3], Q, grad_out.shape[2],
        grad_out.shape[3], *kernel_size, *stride, *padding, divisor, *covering,
        COUNT_INCLUDE_PAD=count_include_pad, ADAPTIVE=adaptive, WIDE=_wide(grad_x, grad_out),
        BLOCK=BLOCK,
        num_warps=NUM_WARPS,
    )


def avg_pool2d_forward(x, out, kernel_size, stride, padding, count_include_pad, divisor):
    """out = each window's in-bounds sum / its divisor (divisor > 0: divisor_override)."""
    _avg_forward(x, out, kernel_size, stride, padding, count_include_pad, divisor, False)


def avg_pool2d_backward(grad_out, grad_x, kernel_size, stride, padding, count_include_pad,
                        divisor):
    """The adjoint of avg_pool2d_forward; grad_x written whole."""
    covering = tuple(triton.cdiv(k, s) for k, s in zip(kernel_size, stride))
    _avg_backward(grad_out, grad_x, kernel_size, stride, padding, count_include_pad, divisor,
                  False, covering)


def _adaptive_bounds(x, out):
    """(MAX_KH, MAX_KW): the largest adaptive window along each axis, and (MAX_OH, MAX_OW):
    the most windows covering one input position."""
    sizes, out_sizes = x.shape[2:], out.shape[2:]
    kernel = tuple(triton.cdiv(s, o) + 1 for s, o in zip(sizes, out_sizes))
    covering = tuple(triton.cdiv(o, s) + 1 for s, o in zip(sizes, out_sizes))
    return kernel, covering


def adaptive_avg_pool2d_forward(x, out):
    """out[..., i, j] = the mean of x over torch's adaptive window (i, j)."""
    kernel, _ = _adaptive_bounds(x, out)
    _avg_forward(x, out, kernel, (1, 1), (0, 0), False, 0, True)


def adaptive_avg_pool2d_backward(grad_out, grad_x):
    """The adjoint of adaptive_avg_pool2d_forward; grad_x written whole."""
    kernel, covering = _adaptive_bounds(grad_x, grad_out)
    _avg_backward(grad_out, grad_x, kernel, (1, 1), (0, 0), False, 0, True, covering)
