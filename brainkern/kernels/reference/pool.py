"""The ``torch`` backend's pool family: the kernel interface in torch's own ops.

The kernels get the output's size, not ceil_mode: torch's ceil_mode is recovered as "out is
larger than the floor-mode size" (the ops layer resolved it with torch's rule, so the two agree).
"""

import torch
import torch.nn.functional as F

DEVICES = ("cpu", "cuda")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _ceil_mode(x, out, kernel_size, stride, padding, dilation=(1, 1)) -> bool:
    """Whether ``out``'s spatial size is torch's ceil_mode size (larger than the floor one)."""
    for size, out_size, k, s, p, d in zip(x.shape[2:], out.shape[2:], kernel_size, stride,
                                          padding, dilation):
        if out_size > (size + 2 * p - d * (k - 1) - 1) // s + 1:
            return True
    return False


def max_pool2d_forward(x, out, indices, kernel_size, stride, padding, dilation):
    """out = each window's maximum, indices its flat tap ``h * W + w`` (kernels/__init__.py)."""
    ceil_mode = _ceil_mode(x, out, kernel_size, stride, padding, dilation)
    values, argmax = F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode,
                                  return_indices=True)
    out.copy_(values)
    if indices is not None:
        indices.copy_(argmax)


def max_pool2d_backward(grad_out, indices, grad_x, kernel_size, stride, padding, dilation):
    """grad_x = grad_out summed into each window's winning tap, zeros elsewhere.

    torch's scatter_add: deterministic on the CPU; on CUDA it adds with atomics, so overlapping
    windows may sum in any order there, as torch's own max_pool2d backward does.
    """
    n, c, h, w = grad_x.shape
    flat = torch.zeros((n * c, h * w), dtype=grad_x.dtype, device=grad_x.device)
    if flat.numel():
        flat.scatter_add_(1, indices.reshape(n * c, -1), grad_out.reshape(n * c, -1))
    grad_x.copy_(flat.view(n, c, h, w))


def avg_pool2d_forward(x, out, kernel_size, stride, padding, count_include_pad, divisor):
    """out = each window's sum / its divisor (divisor > 0: divisor_override)."""
    ceil_mode = _ceil_mode(x, out, kernel_size, stride, padding)
    out.copy_(F.avg_pool2d(x, kernel_size, stride, padding, ceil_mode, count_include_pad,
                           divisor if divisor > 0 else None))


def avg_pool2d_backward(grad_out, grad_x, kernel_size, stride, padding, count_include_pad,
                        divisor):
    """The adjoint of avg_pool2d_forward: each tap gets grad_out / its window's divisor."""
    ceil_mode = _ceil_mode(grad_x, grad_out, kernel_size, stride, padding)
    # aten reads only the input's shape and format from ``self``: grad_x stands in for x.
    grad_x.copy_(torch.ops.aten.avg_pool2d_backward(
        grad_out, grad_x, list(kernel_size), list(stride), list(padding), ceil_mode,
        count_include_pad, divisor if divisor > 0 else None))


def adaptive_avg_pool2d_forward(x, out):
    """out[i, j] = the mean of x over torch's adaptive window (i, j)."""
    out.copy_(F.adaptive_avg_pool2d(x, out.shape[2:]))


def adaptive_avg_pool2d_backward(grad_out, grad_x):
    """The adjoint of adaptive_avg_pool2d_forward."""
    grad_x.copy_(torch.ops.aten._adaptive_avg_pool2d_backward(grad_out, grad_x))
