"""The ``torch`` backend's conv family: the kernel interface in torch's own ops.

Kernels take padding as the rows and columns before the input; the padding after it is implied
by ``out``'s size (brainkern/kernels/__init__.py). torch's ops take symmetric padding, so these
kernels pad (or crop) explicitly and run unpadded.
"""

import torch
import torch.nn.functional as F

from brainkern.kernels.reference import accumulation_dtype, activation_derivative, epilogue

DEVICES = ("cpu", "cuda")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _reach(out_size, stride, dilation, kernel):
    """How many input rows an output of ``out_size`` rows reads, from the first padded row."""
    return (out_size - 1) * stride + dilation * (kernel - 1) + 1


def _pad_to_out(x, weight, out_hw, stride, padding, dilation):
    """x padded by ``padding`` before and by whatever the output's size needs after (negative:
    cropped), so that an unpadded convolution gives exactly ``out_hw`` rows and columns."""
    (h, w), (kh, kw) = x.shape[-2:], weight.shape[-2:]
    bottom = _reach(out_hw[0], stride[0], dilation[0], kh) - h - padding[0]
    right = _reach(out_hw[1], stride[1], dilation[1], kw) - w - padding[1]
    return F.pad(x, (padding[1], right, padding[0], bottom))


def _empty_reduction(x, weight, bias, c_out, out_hw):
    """An empty sum (no input channels) is 0: torch's convolutions reject or misshape it."""
    z = x.new_zeros((x.shape[0], c_out, *out_hw))
    return z if bias is None else z + bias.view(1, -1, 1, 1)


def conv2d(x, weight, bias, out_hw, stride, padding, dilation, groups):
    """The kernel's convolution (padding before, output size given) in differentiable torch
    ops: what the ``torch`` backend runs, and what the ops layer differentiates twice."""
    if x.shape[1:].numel() == 0:
        return _empty_reduction(x, weight, bias, weight.shape[0], out_hw)
    return F.conv2d(_pad_to_out(x, weight, out_hw, stride, padding, dilation), weight, bias,
                    stride, 0, dilation, groups)


def conv_transpose2d(x, weight, bias, out_hw, stride, padding, dilation, groups):
    """The kernel's transposed convolution in differentiable torch ops (see :func:`conv2d`)."""
    if x.shape[1:].numel() == 0:
        return _empty_reduction(x, weight, bias, weight.shape[1] * groups, out_hw)
    full = F.conv_transpose2d(x, weight, None, stride, 0, 0, groups, dilation)
    (h, w), (ho, wo) = full.shape[-2:], out_hw
    # Rows [padding, padding + ho) of the unpadded result; past its end the sum is empty (0).
    z = F.pad(full, (-padding[1], wo + padding[1] - w, -padding[0], ho + padding[0] - h))
    return z if bias is None else z + bias.view(1, -1, 1, 1)


def conv2d_forward(x, weight, bias, out, pre, stride, padding, dilation, groups, act_code,
                   act_param):
    """``out = act(conv2d(x, weight) + bias)``; see brainkern/kernels/__init__.py."""
    if out.numel() == 0:
        return
    z = conv2d(x, weight, bias, out.shape[-2:], stride, padding, dilation, groups)
    epilogue(z, out, pre, act_code, act_param)


def conv_transpose2d_forward(x, weight, bias, out, pre, stride, padding, dilation, groups,
                             act_code, act_param):
    """``out = act(conv_transpose2d(x, weight) + bias)``, out's size given by ``out``."""
    if out.numel() == 0:
        return
    z = conv_transpose2d(x, weight, bias, out.shape[-2:], stride, padding, dilation, groups)
    epilogue(z, out, pre, act_code, act_param)


def conv2d_backward_weight(grad_pre, x, grad_weight, stride, padding, dilation, groups):
    """``grad_weight = d(sum(grad_pre * conv2d(x, weight))) / d weight``."""
    if grad_pre.numel() == 0 or x.numel() == 0:
        grad_weight.zero_()
        return
    xp = _pad_to_out(x, grad_weight, grad_pre.shape[-2:], stride, padding, dilation)
    grad_weight.copy_(torch.nn.grad.conv2d_weight(xp, grad_weight.shape, grad_pre, stride, 0,
                                                  dilation, groups))


def conv2d_activation_backward(grad_out, saved, grad_pre, grad_bias, act_code, act_param,
                               saved_is_output):
    """``grad_pre = grad_out * act'(saved)``; ``grad_bias = grad_pre.sum((0, 2, 3))``."""
    torch.mul(grad_out, activation_derivative(saved, act_code, act_param, saved_is_output),
              out=grad_pre)
    if grad_bias is not None:
        grad_bias.copy_(grad_pre.sum((0, 2, 3), dtype=accumulation_dtype(grad_pre.dtype)))
