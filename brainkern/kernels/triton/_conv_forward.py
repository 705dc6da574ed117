"""The convolution and transposed convolution as @triton.jit kernels: an implicit GEMM (dense
layers) and a direct kernel (one input channel per group: depthwise), sharing one description of
which kernel taps reach which output pixel.

Both directions are one loop nest. Along each spatial dimension an output index is
``o = residue + q * out_step`` and the input row a tap ``j`` (0 <= j < count) reads is
``i = q * in_step + base + j * tap``, with kernel index ``k0 + j * k_step``:

- convolution: one phase (grid axis 2 of size 1, k_step 1 from the launcher), ``residue 0,
  out_step 1, in_step = stride, base = -pad, tap = dil, k0 0, count = kernel size``
  (``i = o * s - p + k * d``);
- transposed convolution, gather form: ``z[o]`` sums ``x[i] * w[k]`` over ``i * s - p + k * d
  == o``, i.e. over the taps with ``(o + p - k * d) % s == 0``. Which taps those are depends only
  on ``o % s``: the outputs split into ``s`` phases (grid axis 2 holds ``s_h * s_w`` of them), and
  within a phase the valid taps are every ``k_step = s / gcd(s, d)``-th from k0, with
  ``i = (o + p - k * d) / s`` exact. A stride-2 upsampling thus runs a quarter of the taps
  instead of masking three quarters of a dense loop.
"""

import torch
import triton
import triton.language as tl

from brainkern.kernels.triton._activations import activation_forward
from brainkern.kernels.triton.linear import _interpreting


def _config(block_m, block_n, block_k, num_warps, num_stages):
    kwargs = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8}
    return triton.Config(kwargs, num_warps=num_warps, num_stages=num_stages)


# Tensor-core tiles (fp16, bf16, fp32 as tf32): M output pixels, N output channels of a group,
# K input channels x taps. Checked by tests/test_triton_aot_conv.py: both fit sm_80's shared
# memory and neither spills on sm_80 or sm_90 with the heaviest epilogue, in both reduction
# loops, both directions and the weight gradient. The gathered A tile carries index math and
# masks per element: 8 warps (with 4 these spill) and two stages, not linear's four. Tiles that
# spilled somewhere in that matrix: 128 x 128 (flattened tf32 loop), 128 x 32 (sm_80 tf32 block
# loop), 64 x 64 (sm_80: at two stages the transposed fp16 block loop, at one the tf32 flat loop).
CONV_CONFIGS = [
    _config(128, 64, 32, num_warps=8, num_stages=2),  # many pixels, up to 64 channels
    _config(64, 128, 32, num_warps=8, num_stages=2),  # wide layers on small images
]
# fp32 without TF32 runs tl.dot on CUDA cores, holding each operand tile in registers: on sm_80
# every larger tile tried spilled in some layout (NCHW worst), as did this one at one stage.
# TF32 is torch's default for convolutions; this precision gets one small tile that does not.
FP32_IEEE_CONFIGS = [_config(32, 32, 16, num_warps=4, num_stages=2)]
# fp64 is for gradcheck, not speed: one small tile that does not spill (as linear's FP64_CONFIG).
FP64_CONFIG = _config(32, 32, 16, num_warps=4, num_stages=1)
# Under the interpreter: one config, with tiles small enough that tiny test layers span several
# programs along M and N, several K steps and partial edge tiles.
INTERPRETER_CONFIG = _config(32, 16, 16, num_warps=4, num_stages=1)

# The direct (depthwise) kernel has no tl.dot, so no tile minimum: pixels x channels. fp64
# takes half the channels: 64 x 32 spills there.
DIRECT_BLOCK_M = 16 if _interpreting() else 64
DIRECT_BLOCK_C = 8 if _interpreting() else 32
DIRECT_BLOCK_C_FP64 = 8 if _interpreting() else 16
DIRECT_NUM_WARPS = 4


def prune_configs(configs, named_args, **kwargs):
    """Autotune pruning shared by the conv GEMMs: each input type and precision gets its list
    (the interpreter's one config stands for all)."""
    if len(configs) == 1:
        return configs
    dtype = next(iter(named_args.values())).dtype
    if dtype == torch.float64:
        return [FP64_CONFIG]
    if dtype == torch.float32 and kwargs["INPUT_PRECISION"] == "ieee":
        return FP32_IEEE_CONFIGS
    return CONV_CONFIGS


AUTOTUNE_CONFIGS = ([INTERPRETER_CONFIG] if _interpreting()
                    else [*CONV_CONFIGS, *FP32_IEEE_CONFIGS, FP64_CONFIG])
# Every config's BLOCK_K divides this (powers of two): a group's channels that are a multiple of
# it come in whole channel blocks under any config (conv_gemm_kernel's CHANNEL_BLOCKS).
CHANNEL_BLOCK = max(config.kwargs["BLOCK_K"] for config in AUTOTUNE_CONFIGS)


@triton.jit
def tap_walk(residue, stride, pad, dil, k_step, inverse, KSIZE, TRANSPOSED: tl.constexpr):
    """One spatial dimension's walk (see the module docstring).

    Returns ``(k0, count, base, tap, in_step, out_step)``. For TRANSPOSED, ``k_step = s / g``
    and ``inverse`` is the inverse of ``d / g`` modulo ``k_step`` (g = gcd(s, d)), both from the
    launcher: the first valid tap solves ``k0 * d == residue + p (mod s)``, which has a
    solution only when g divides ``residue + p``.
    """
    if TRANSPOSED:
        target = residue + pad
        g = stride // k_step
        k0 = ((target // g) * inverse) % k_step
        has_taps = (target % g == 0) & (k0 < KSIZE)
        count = tl.where(has_taps, (KSIZE - k0 + k_step - 1) // k_step, 0)
        # Exact division (target - k0 * d is a multiple of s), so C's truncation is harmless.
        base = (target - k0 * dil) // stride
        return k0, count, base, -(k_step * dil // stride), 1, stride
    else:
        return 0, KSIZE, -pad, dil, stride, 1


@triton.autotune(
    configs=AUTOTUNE_CONFIGS,
    # Power-of-two buckets of the GEMM's M, N, K and the input's layout, not exact sizes.
    key=["M_BUCKET", "N_BUCKET", "K_BUCKET", "CHANNELS_LAST", "CHANNEL_BLOCKS", "INPUT_PRECISION"],
    prune_configs_by={"early_config_prune": prune_configs},
    cache_results=True,
)
@triton.jit(do_not_specialize=["M_BUCKET", "N_BUCKET", "K_BUCKET", "CHANNELS_LAST"])
def conv_gemm_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, pre_ptr,
    H, W, C_group, QH, QW, H_out, W_out, C_out_group, M, KH, KW,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_wg, stride_wc, stride_wn, stride_wh, stride_ww,
    stride_on, stride_oc, stride_oh, stride_ow,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    k_step_h, k_step_w, inverse_h, inverse_w,
    slope: tl.float64,
    M_BUCKET, N_BUCKET, K_BUCKET, CHANNELS_LAST,
    TRANSPOSED: tl.constexpr,
    CHANNEL_BLOCKS: tl.constexpr,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    STORE_PRE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Implicit GEMM: ``out = act(z + bias)``, ``pre = z + bias`` if STORE_PRE, where z is the
    convolution (or, if TRANSPOSED, the transposed convolution) of x with w.

    Program (pid, g, phase) computes a BLOCK_M x BLOCK_N tile of group g's output channels for
    the output pixels of one phase; rows are (n, qh, qw), columns output channels, the reduction
    runs over (tap_h, tap_w, input channel), channel fastest (contiguous in NHWC). No im2col:
    each A tile is gathered from x through its strides, zero outside x (the padding).

    Args:
        x_ptr: Input, shape [N, C_group * groups, H, W], strides [stride_xn, stride_xc,
            stride_xh, stride_xw] (NCHW or NHWC).
        w_ptr: Weight. Element (g, c, co, kh, kw), input channel c and output channel co of
            group g, is at ``g * stride_wg + c * stride_wc + co * stride_wn + kh * stride_wh +
            kw * stride_ww``: conv2d's (C_out, C_in/groups, kH, kW) and conv_transpose2d's
            (C_in, C_out/groups, kH, kW) are both this with their own strides.
        bias_ptr: Bias, shape [C_out_group * groups], contiguous; read only if HAS_BIAS.
        out_ptr, pre_ptr: Outputs, shape [N, C_out_group * groups, H_out, W_out], strides
            [stride_on, stride_oc, stride_oh, stride_ow]; pre written only if STORE_PRE.
        H, W, C_group: x's spatial size and input channels per group.
        QH, QW: Output rows and columns per phase (H_out, W_out for a convolution).
        H_out, W_out, C_out_group: out's spatial size and output channels per group.
        M: Rows of the GEMM per phase, N * QH * QW.
        KH, KW: The kernel size.
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w: The convolution's parameters.
        k_step_h, k_step_w, inverse_h, inverse_w: The transposed walk's (see tap_walk).
        slope: leaky_relu's negative slope; read only when ACT is LEAKY_RELU.
        M_BUCKET, N_BUCKET, K_BUCKET, CHANNELS_LAST: The autotuner's key, not read.
        TRANSPOSED: Which direction this is.
        CHANNEL_BLOCKS: Whether C_group is a multiple of BLOCK_K: the reduction then loops over
            taps and, within each, over whole channel blocks; otherwise over the flattened
            (tap, channel) index, which packs a stem's few channels x taps into full steps.
        ACT, HAS_BIAS, STORE_PRE, INPUT_PRECISION: As in linear's matmul_kernel.
        BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M: Tiles, and the grouped tile order of matmul_kernel.
    """
    pid = tl.program_id(axis=0)
    g = tl.program_id(axis=1)
    phase = tl.program_id(axis=2)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(C_out_group, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    k0_h, count_h, base_h, tap_h, in_step_h, out_step_h = tap_walk(
        phase // stride_w, stride_h, pad_h, dil_h, k_step_h, inverse_h, KH, TRANSPOSED)
    k0_w, count_w, base_w, tap_w, in_step_w, out_step_w = tap_walk(
        phase % stride_w, stride_w, pad_w, dil_w, k_step_w, inverse_w, KW, TRANSPOSED)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q = offs_m % (QH * QW)
    qh = q // QW
    qw = q % QW
    # int64 for the batch offset: a large batch of activations passes 2^31 elements.
    n = (offs_m // (QH * QW)).to(tl.int64)
    oh = phase // stride_w + qh * out_step_h
    ow = phase % stride_w + qw * out_step_w
    mask_m = (offs_m < M) & (oh < H_out) & (ow < W_out)
    ih0 = qh * in_step_h + base_h
    iw0 = qw * in_step_w + base_w
    x_rows = x_ptr + n * stride_xn + (g * C_group) * stride_xc
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < C_out_group
    # Columns past the edge wrap around instead of being masked: the weight loads stay
    # unmasked along N, and the wrapped columns land where the store skips them.
    w_cols = w_ptr + g * stride_wg + (offs_n % C_out_group) * stride_wn
    offs_k = tl.arange(0, BLOCK_K)

    acc_dtype = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_dtype)
    if CHANNEL_BLOCKS:
        # Whole channel blocks per tap: the gather's index math and padding masks are per row
        # (BLOCK_M), once per tap, not per element of every A tile.
        for j_h in range(0, count_h):
            ih = ih0 + j_h * tap_h
            row_in_h = mask_m & (ih >= 0) & (ih < H)
            w_row = w_cols + (k0_h + j_h * k_step_h) * stride_wh
            for j_w in range(0, count_w):
                iw = iw0 + j_w * tap_w
                row_in = row_in_h & (iw >= 0) & (iw < W)
                a_rows = x_rows + ih * stride_xh + iw * stride_xw
                w_tap = w_row + (k0_w + j_w * k_step_w) * stride_ww
                for c_start in range(0, C_group, BLOCK_K):
                    c = c_start + offs_k
                    a = tl.load(a_rows[:, None] + (c * stride_xc)[None, :], mask=row_in[:, None],
                                other=0.0)
                    b = tl.load(w_tap[None, :] + (c * stride_wc)[:, None])
                    acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    else:
        K = count_h * count_w * C_group
        for k_start in range(0, K, BLOCK_K):
            # Reductions of 1-15 (a 1- or 3-channel stem) ride in one 16-wide step, masked.
            k = k_start + offs_k
            mask_k = k < K
            c = k % C_group
            taps = k // C_group
            j_h = taps // count_w
            j_w = taps % count_w
            ih = ih0[:, None] + (j_h * tap_h)[None, :]
            iw = iw0[:, None] + (j_w * tap_w)[None, :]
            a_mask = (mask_m[:, None] & mask_k[None, :]
                      & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W))
            a = tl.load(x_rows[:, None] + (c * stride_xc)[None, :] + ih * stride_xh
                        + iw * stride_xw, mask=a_mask, other=0.0)
            w_offs = (c * stride_wc + (k0_h + j_h * k_step_h) * stride_wh
                      + (k0_w + j_w * k_step_w) * stride_ww)
            b = tl.load(w_cols[None, :] + w_offs[:, None], mask=mask_k[:, None], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    channels = g * C_out_group + offs_n
    if HAS_BIAS:
        acc += tl.load(bias_ptr + channels, mask=mask_n, other=0.0).to(acc_dtype)[None, :]
    out_offsets = ((n * stride_on + oh * stride_oh + ow * stride_ow)[:, None]
                   + (channels * stride_oc)[None, :])
    mask = mask_m[:, None] & mask_n[None, :]
    if STORE_PRE:
        tl.store(pre_ptr + out_offsets, acc.to(pre_ptr.dtype.element_ty), mask=mask)
    acc = activation_forward(acc, slope, ACT)
    tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def conv_direct_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, pre_ptr,
    H, W, C_group, QH, QW, H_out, W_out, C_out_group, C_out, M, KH, KW,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_wg, stride_wc, stride_wn, stride_wh, stride_ww,
    stride_on, stride_oc, stride_oh, stride_ow,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    k_step_h, k_step_w, inverse_h, inverse_w,
    slope: tl.float64,
    TRANSPOSED: tl.constexpr,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    STORE_PRE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """The same result as conv_gemm_kernel, by elementwise FMAs over all output channels at
    once: for groups of one (or a few) input channels, where a GEMM's reduction and its N tile
    would be nearly empty (a depthwise layer is C GEMMs of N = 1, K = kH * kW).

    Program (pid_m, pid_c, phase) owns BLOCK_M output pixels x BLOCK_C output channels, of any
    groups (each channel finds its group). Arguments as conv_gemm_kernel's, plus C_out, the
    output's channel count; BLOCK_M x BLOCK_C is the tile.
    """
    pid_m = tl.program_id(axis=0)
    pid_c = tl.program_id(axis=1)
    phase = tl.program_id(axis=2)
    k0_h, count_h, base_h, tap_h, in_step_h, out_step_h = tap_walk(
        phase // stride_w, stride_h, pad_h, dil_h, k_step_h, inverse_h, KH, TRANSPOSED)
    k0_w, count_w, base_w, tap_w, in_step_w, out_step_w = tap_walk(
        phase % stride_w, stride_w, pad_w, dil_w, k_step_w, inverse_w, KW, TRANSPOSED)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q = offs_m % (QH * QW)
    qh = q // QW
    qw = q % QW
    n = (offs_m // (QH * QW)).to(tl.int64)
    oh = phase // stride_w + qh * out_step_h
    ow = phase % stride_w + qw * out_step_w
    mask_m = (offs_m < M) & (oh < H_out) & (ow < W_out)
    channels = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = channels < C_out
    g = channels // C_out_group
    x_rows = x_ptr + n * stride_xn
    w_cols = w_ptr + g * stride_wg + (channels % C_out_group) * stride_wn

    acc_dtype = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=acc_dtype)
    for j_h in range(0, count_h):
        ih = qh * in_step_h + base_h + j_h * tap_h
        row_ok = mask_m & (ih >= 0) & (ih < H)
        for j_w in range(0, count_w):
            iw = qw * in_step_w + base_w + j_w * tap_w
            pixel = x_rows + ih * stride_xh + iw * stride_xw
            pixel_ok = row_ok & (iw >= 0) & (iw < W)
            tap_offset = ((k0_h + j_h * k_step_h) * stride_wh
                          + (k0_w + j_w * k_step_w) * stride_ww)
            for c in range(0, C_group):
                x = tl.load(pixel[:, None] + ((g * C_group + c) * stride_xc)[None, :],
                            mask=pixel_ok[:, None] & mask_c[None, :], other=0.0)
                w = tl.load(w_cols + c * stride_wc + tap_offset, mask=mask_c, other=0.0)
                acc += x.to(acc_dtype) * w.to(acc_dtype)[None, :]

    if HAS_BIAS:
        acc += tl.load(bias_ptr + channels, mask=mask_c, other=0.0).to(acc_dtype)[None, :]
    out_offsets = ((n * stride_on + oh * stride_oh + ow * stride_ow)[:, None]
                   + (channels * stride_oc)[None, :])
    mask = mask_m[:, None] & mask_c[None, :]
    if STORE_PRE:
        tl.store(pre_ptr + out_offsets, acc.to(pre_ptr.dtype.element_ty), mask=mask)
    acc = activation_forward(acc, slope, ACT)
    tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)
