"""Triton kernels for the convolution op family: convolution and transposed convolution with a
fused bias + activation epilogue, the weight gradient, and the activation's backward with the
bias gradient.

The launchers take the plain arguments documented in brainkern/kernels/__init__.py; the kernels
live in _conv_forward.py (implicit GEMM, direct depthwise) and _conv_backward.py. Activations
(x, out, pre, grad) are NCHW or NHWC, read through their strides. Without a GPU the kernels run
on CPU tensors through Triton's interpreter, with one small config.
"""

import math

import torch
import triton

from brainkern.kernels.triton._conv_backward import (
    conv_activation_backward_kernel,
    conv_weight_grad_kernel,
)
from brainkern.kernels.triton._conv_forward import (
    CHANNEL_BLOCK,
    DIRECT_BLOCK_C,
    DIRECT_BLOCK_C_FP64,
    DIRECT_BLOCK_M,
    DIRECT_NUM_WARPS,
    conv_direct_kernel,
    conv_gemm_kernel,
)
from brainkern.kernels.triton.linear import (
    ACTIVATION_BACKWARD_BLOCK_M,
    ACTIVATION_BACKWARD_NUM_WARPS,
    _interpreting,
    _program_target,
)

# CPU tensors only through Triton's interpreter (brainkern.backends checks TRITON_INTERPRET).
DEVICES = ("cuda", "cpu")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# The weight gradient's split-K: no split gets fewer output pixels than this. On a GPU a split
# should stream enough pixels to hide the cost of its partial tile's store and re-reduction;
# the interpreter's is small so that tiny test layers exercise the second reduction pass.
PIXELS_PER_SPLIT = 32 if _interpreting() else 2048
ACTIVATION_BACKWARD_BLOCK_C = 32


def _input_precision(dtype: torch.dtype) -> str:
    # torch governs convolutions with cuDNN's TF32 switch (on by default), not matmul's.
    if dtype == torch.float32 and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


def _transposed_walk(stride: int, dilation: int) -> tuple[int, int]:
    """(k_step, inverse) of one dimension for tap_walk: valid taps are k_step apart, and the
    first solves ``k0 * (d / g) == (residue + p) / g (mod k_step)`` through ``inverse``."""
    g = math.gcd(stride, dilation)
    k_step = stride // g
    return k_step, (pow(dilation // g, -1, k_step) if k_step > 1 else 0)


def _convolve(x, weight, bias, out, pre, stride, padding, dilation, groups, act_code, act_param,
              transposed):
    n, c_x, h, w = x.shape
    c_out, h_out, w_out = out.shape[1:]
    if n == 0 or c_out == 0 or h_out == 0 or w_out == 0:
        return
    kh, kw = weight.shape[2:]
    c_group, c_out_group = c_x // groups, c_out // groups
    ws = weight.stride()
    if transposed:  # weight (C_x, C_out / groups, kH, kW)
        walk_h, walk_w = _transposed_walk(stride[0], dilation[0]), _transposed_walk(stride[1],
                                                                                    dilation[1])
        qh, qw = triton.cdiv(h_out, stride[0]), triton.cdiv(w_out, stride[1])
        phases = stride[0] * stride[1]
        stride_wg, stride_wc, stride_wn = c_group * ws[0], ws[0], ws[1]
    else:  # weight (C_out, C_x / groups, kH, kW)
        walk_h = walk_w = (1, 0)
        qh, qw, phases = h_out, w_out, 1
        stride_wg, stride_wc, stride_wn = c_out_group * ws[0], ws[1], ws[0]
    m = n * qh * qw
    args = (
        x, weight, out if bias is None else bias, out, out if pre is None else pre,
        h, w, c_group, qh, qw, h_out, w_out, c_out_group,
    )
    strides = (
        *x.stride(), stride_wg, stride_wc, stride_wn, ws[2], ws[3], *out.stride(),
        *stride, *padding, *dilation, walk_h[0], walk_w[0], walk_h[1], walk_w[1],
        float(act_param),
    )
    flags = {"TRANSPOSED": transposed, "ACT": act_code, "HAS_BIAS": bias is not None,
             "STORE_PRE": pre is not None}
    if groups > 1 and c_group == 1:
        block_c = DIRECT_BLOCK_C_FP64 if x.dtype == torch.float64 else DIRECT_BLOCK_C
        grid = (triton.cdiv(m, DIRECT_BLOCK_M), triton.cdiv(c_out, block_c), phases)
        conv_direct_kernel[grid](
            *args, c_out, m, kh, kw, *strides, **flags,
            BLOCK_M=DIRECT_BLOCK_M, BLOCK_C=block_c, num_warps=DIRECT_NUM_WARPS,
        )
        return

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(c_out_group, meta["BLOCK_N"]),
                groups, phases)

    conv_gemm_kernel[grid](
        *args, m, kh, kw, *strides,
        triton.next_power_of_2(m), triton.next_power_of_2(c_out_group),
        triton.next_power_of_2(c_group * kh * kw), int(x.stride(1) == 1),
        **flags, CHANNEL_BLOCKS=c_group % CHANNEL_BLOCK == 0,
        INPUT_PRECISION=_input_precision(x.dtype),
    )


def conv2d_forward(x, weight, bias, out, pre, stride, padding, dilation, groups, act_code,
                   act_param):
    """``out = act(conv2d(x, weight) + bias)``, ``pre`` before act. See kernels/__init__.py."""
    _convolve(x, weight, bias, out, pre, stride, padding, dilation, groups, act_code, act_param,
              transposed=False)


def conv_transpose2d_forward(x, weight, bias, out, pre, stride, padding, dilation, groups,
                             act_code, act_param):
    """``out = act(conv_transpose2d(x, weight) + bias)``, ``pre`` before act; also conv2d's
    input gradient (bias None, act NONE). See kernels/__init__.py."""
    _convolve(x, weight, bias, out, pre, stride, padding, dilation, groups, act_code, act_param,
              transposed=True)


def conv2d_backward_weight(grad_pre, x, grad_weight, stride, padding, dilation, groups):
    """``grad_weight = sum over pixels of grad_pre x x's taps``, fp32 accumulation, split-K
    with a deterministic second pass. See kernels/__init__.py."""
    n, c_in, h, w = x.shape
    c_out, h_out, w_out = grad_pre.shape[1:]
    if grad_weight.numel() == 0:
        return
    pixels = n * h_out * w_out
    if pixels == 0:
        grad_weight.zero_()
        return
    kh, kw = grad_weight.shape[2:]
    c_group, c_out_group = c_in // groups, c_out // groups
    columns = c_group * kh * kw
    # Enough programs to fill the device: split the pixels when the output tiles are few (a
    # stem layer's weight is 32 x 25: one tile, and a reduction over the whole batch's pixels).
    tiles = groups * triton.cdiv(c_out_group, 64) * triton.cdiv(columns, 64)
    splits = max(1, min(triton.cdiv(_program_target(x.device), tiles),
                        pixels // PIXELS_PER_SPLIT))
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    in_place = splits == 1 and grad_weight.dtype == acc_dtype
    partial = grad_weight if in_place else torch.empty(
        (splits, *grad_weight.shape), dtype=acc_dtype, device=x.device)

    def grid(meta):
        return (triton.cdiv(c_out_group, meta["BLOCK_M"]) * triton.cdiv(columns, meta["BLOCK_N"]),
                groups, splits)

    conv_weight_grad_kernel[grid](
        grad_pre, x, partial,
        h, w, c_group, h_out, w_out, c_out_group, pixels, kh, kw, splits,
        *grad_pre.stride(), *x.stride(), *stride, *padding, *dilation,
        triton.next_power_of_2(c_out_group), triton.next_power_of_2(columns),
        triton.next_power_of_2(pixels), int(x.stride(1) == 1),
        INPUT_PRECISION=_input_precision(x.dtype),
    )
    if not in_place:
        # splits x the weight's size, a few copies at most: torch's sum is deterministic.
        grad_weight.copy_(partial.sum(0))


def conv2d_activation_backward(grad_out, saved, grad_pre, grad_bias, act_code, act_param,
                               saved_is_output):
    """``grad_pre = grad_out * act'(saved)``; ``grad_bias = grad_pre.sum((0, 2, 3))`` when
    given. ``saved_is_output`` needs no flag (see linear.activation_backward)."""
    n, c, h, w = grad_out.shape
    if c == 0:
        return
    pixels = n * h * w
    if pixels == 0:
        if grad_bias is not None:
            grad_bias.zero_()
        return
    block_m, block_c = ACTIVATION_BACKWARD_BLOCK_M, ACTIVATION_BACKWARD_BLOCK_C
    column_blocks = triton.cdiv(c, block_c)
    row_blocks = triton.cdiv(pixels, block_m)
    wanted_splits = triton.cdiv(_program_target(grad_out.device), column_blocks)
    rows_per_program = triton.cdiv(row_blocks, min(row_blocks, wanted_splits)) * block_m
    row_splits = triton.cdiv(pixels, rows_per_program)
    partials = None
    if grad_bias is not None:
        acc_dtype = torch.float64 if saved.dtype == torch.float64 else torch.float32
        partials = torch.empty((row_splits, c), dtype=acc_dtype, device=saved.device)
    conv_activation_backward_kernel[(column_blocks, row_splits)](
        grad_out, saved, grad_pre, grad_pre if partials is None else partials,
        pixels, c, h * w, w,
        *grad_out.stride(), *saved.stride(),
        float(act_param),
        rows_per_program,
        ACT=act_code,
        HAS_BIAS=grad_bias is not None,
        BLOCK_M=block_m,
        BLOCK_C=block_c,
        num_warps=ACTIVATION_BACKWARD_NUM_WARPS,
    )
    if grad_bias is not None:
        grad_bias.copy_(partials.sum(0))
