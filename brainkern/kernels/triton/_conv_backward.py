"""The convolution's backward kernels that are not a convolution themselves: the weight
gradient (an implicit GEMM reducing over every output pixel) and the activation's backward
with the bias gradient. Both reduce deterministically: each program writes its own partial sums
and the launcher adds them in a fixed order; no atomics.
"""

import triton
import triton.language as tl

from brainkern.kernels.triton._activations import activation_derivative
from brainkern.kernels.triton._conv_forward import AUTOTUNE_CONFIGS, prune_configs


@triton.autotune(
    configs=AUTOTUNE_CONFIGS,
    key=["M_BUCKET", "N_BUCKET", "K_BUCKET", "CHANNELS_LAST", "INPUT_PRECISION"],
    prune_configs_by={"early_config_prune": prune_configs},
    cache_results=True,
)
@triton.jit(do_not_specialize=["M_BUCKET", "N_BUCKET", "K_BUCKET", "CHANNELS_LAST"])
def conv_weight_grad_kernel(
    grad_ptr, x_ptr, partial_ptr,
    H, W, C_group, H_out, W_out, C_out_group, P, KH, KW, splits,
    stride_gn, stride_gc, stride_gh, stride_gw,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    M_BUCKET, N_BUCKET, K_BUCKET, CHANNELS_LAST,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """``partial[s, co, ci, kh, kw] = sum over the pixels p of split s of grad[n, co, oh, ow] *
    x[n, ci, oh * sh - ph + kh * dh, ow * sw - pw + kw * dw]`` (co, ci within group g).

    A GEMM per group: rows are group g's output channels, columns (kh, kw, ci) with ci fastest
    (contiguous in NHWC), the reduction runs over the P = N * H_out * W_out output pixels. Program
    (pid, g, s) takes the BLOCK_K-pixel steps s, s + splits, s + 2 * splits, ...: split-K for
    layers with few channels and many pixels, in a fixed order.

    Args:
        grad_ptr: Gradient w.r.t. the pre-activation, shape [N, C_out_group * groups, H_out,
            W_out], strides [stride_gn, stride_gc, stride_gh, stride_gw].
        x_ptr: Input, shape [N, C_group * groups, H, W], strides [stride_xn, stride_xc,
            stride_xh, stride_xw].
        partial_ptr: Output, shape [splits, C_out_group * groups, C_group, KH, KW], contiguous:
            fp32 partial sums (fp64 for fp64), or the weight gradient itself when splits is 1
            and it has the accumulator's dtype.
        H, W, C_group, H_out, W_out, C_out_group, KH, KW: Sizes as in conv_gemm_kernel.
        P: The reduction length, N * H_out * W_out.
        splits: How many programs share one output tile's reduction (grid axis 2).
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w: The convolution's parameters.
        M_BUCKET, N_BUCKET, K_BUCKET, CHANNELS_LAST: The autotuner's key, not read.
        INPUT_PRECISION: tl.dot's precision for fp32 inputs, "tf32" or "ieee".
        BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M: Tiles and grouped tile order, as matmul_kernel's.
    """
    pid = tl.program_id(axis=0)
    g = tl.program_id(axis=1)
    split = tl.program_id(axis=2)
    columns = C_group * KH * KW
    num_pid_m = tl.cdiv(C_out_group, BLOCK_M)
    num_pid_n = tl.cdiv(columns, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < C_out_group
    channels = g * C_out_group + offs_m
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < columns
    ci = offs_n % C_group
    taps = offs_n // C_group
    kh = taps // KW
    kw = taps % KW
    # Rows and columns past the edge wrap around instead of being masked in the loop (the
    # store skips them); each column's tap offset is added to its pointer once, here.
    tap_h = kh * dil_h
    tap_w = kw * dil_w
    x_cols = x_ptr + (g * C_group + ci) * stride_xc + tap_h * stride_xh + tap_w * stride_xw
    grad_rows = grad_ptr + (g * C_out_group + offs_m % C_out_group) * stride_gc

    acc_dtype = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_dtype)
    for step in range(split, tl.cdiv(P, BLOCK_K), splits):
        offs_p = step * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_p = offs_p < P
        # int64: the batch offset of a large batch passes 2^31 elements.
        n = (offs_p // (H_out * W_out)).to(tl.int64)
        pixel = offs_p % (H_out * W_out)
        oh = pixel // W_out
        ow = pixel % W_out
        a = tl.load(grad_rows[:, None]
                    + (n * stride_gn + oh * stride_gh + ow * stride_gw)[None, :],
                    mask=mask_p[None, :], other=0.0)
        ih0 = oh * stride_h - pad_h
        iw0 = ow * stride_w - pad_w
        ih = ih0[:, None] + tap_h[None, :]
        iw = iw0[:, None] + tap_w[None, :]
        b = tl.load(x_cols[None, :] + (n * stride_xn + ih0 * stride_xh + iw0 * stride_xw)[:, None],
                    mask=mask_p[:, None] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W),
                    other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    weight_offsets = channels[:, None] * columns + (ci * (KH * KW) + kh * KW + kw)[None, :]
    split_offset = split.to(tl.int64) * (C_out_group * tl.num_programs(axis=1) * columns)
    tl.store(partial_ptr + split_offset + weight_offsets, acc.to(partial_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def conv_activation_backward_kernel(
    grad_out_ptr, saved_ptr, grad_pre_ptr, partial_ptr,
    M, C, HW, W,
    stride_gn, stride_gc, stride_gh, stride_gw,
    stride_sn, stride_sc, stride_sh, stride_sw,
    slope: tl.float64,
    rows_per_program,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """``grad_pre = grad_out * act'(saved)`` and, if HAS_BIAS, per-channel partial sums of
    grad_pre over each program's pixels: linear's activation_backward_kernel with the rows being
    the M = N * H * W pixels of a 4-D tensor in any layout.

    Program (pid_c, pid_r) owns channels [pid_c * BLOCK_C, +BLOCK_C) of pixels
    [pid_r * rows_per_program, +rows_per_program) and writes its sums to row pid_r of partial.

    Args:
        grad_out_ptr: Incoming gradient, shape [N, C, H, W], strides [stride_gn, stride_gc,
            stride_gh, stride_gw] (any).
        saved_ptr: The activation's output, or its input for gelu/silu/leaky_relu with a
            negative slope, shape [N, C, H, W], strides [stride_sn, stride_sc, stride_sh,
            stride_sw] (NCHW or NHWC).
        grad_pre_ptr: Output, shape and strides as saved.
        partial_ptr: Partial bias gradients, shape [cdiv(M, rows_per_program), C], contiguous,
            fp32 (fp64 for fp64); written only if HAS_BIAS.
        M, C, HW, W: Pixels (N * H * W), channels, H * W and W.
        slope: leaky_relu's negative slope; read only when ACT is LEAKY_RELU.
        rows_per_program: Pixels per program, a multiple of BLOCK_M.
        ACT: Activation code from brainkern.activations (not NONE).
        HAS_BIAS: Whether to write the partial bias gradients.
        BLOCK_M, BLOCK_C: The tile each loop step loads.
    """
    pid_c = tl.program_id(axis=0)
    pid_r = tl.program_id(axis=1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    acc_dtype = tl.float64 if saved_ptr.dtype.element_ty == tl.float64 else tl.float32
    bias_acc = tl.zeros((BLOCK_C,), dtype=acc_dtype)
    row_start = pid_r * rows_per_program
    row_end = min(row_start + rows_per_program, M)
    for row in range(row_start, row_end, BLOCK_M):
        offs_m = row + tl.arange(0, BLOCK_M)
        n = (offs_m // HW).to(tl.int64)
        h = (offs_m % HW) // W
        w = offs_m % W
        mask = (offs_m < row_end)[:, None] & mask_c[None, :]
        grad_offsets = ((n * stride_gn + h * stride_gh + w * stride_gw)[:, None]
                        + (offs_c * stride_gc)[None, :])
        saved_offsets = ((n * stride_sn + h * stride_sh + w * stride_sw)[:, None]
                         + (offs_c * stride_sc)[None, :])
        grad_out = tl.load(grad_out_ptr + grad_offsets, mask=mask, other=0.0).to(acc_dtype)
        saved = tl.load(saved_ptr + saved_offsets, mask=mask, other=0.0).to(acc_dtype)
        grad_pre = grad_out * activation_derivative(saved, slope, ACT)
        # Masked lanes hold 0 * act'(0) = 0 for every activation: they add nothing to the sum.
        tl.store(grad_pre_ptr + saved_offsets, grad_pre.to(grad_pre_ptr.dtype.element_ty),
                 mask=mask)
        if HAS_BIAS:
            bias_acc += tl.sum(grad_pre, axis=0)
    if HAS_BIAS:
        tl.store(partial_ptr + pid_r * C + offs_c, bias_acc, mask=mask_c)
