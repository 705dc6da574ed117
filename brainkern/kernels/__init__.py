"""Kernels: one package per backend, one module per op family in each, same plain functions.

Layout: ``brainkern/kernels/<backend>/<family>.py`` for backend in triton, numba, native,
reference (the ``torch`` backend) and family in linear, conv, pool. Each family module declares
what it serves, ``DEVICES`` (e.g. ``("cpu",)``) and ``DTYPES`` (a tuple of torch dtypes);
brainkern.backends reads them to choose a backend, so adding an op family adds one module per
backend and touches nothing in backends.py.

Kernels know nothing of autograd, modules or argument checking: the ops layer (brainkern/ops/)
validates, allocates outputs and calls them, and they trust what it passes. The native core sees
only addresses, so a broken contract there reads or writes out of bounds: each native family
module has a ``check_<kernel>`` function per kernel that names what is wrong with arguments it
cannot run, and the test suite runs it before every native call (tests/conftest.py).

One argument convention everywhere: inputs first, then the outputs (allocated by the caller and
passed in; a kernel writes every element of each), then the op's integer parameters, then the
activation as ``(act_code, act_param)`` (brainkern.activations: NONE = 0, leaky_relu's slope as
the param). Kernels validate nothing and raise nothing for arguments the ops layer has checked.

Linear family (``linear``)
--------------------------

``linear_forward(a, weight, bias, out, pre, act_code, act_param) -> None``
    a:      (M, K) tensor, any strides (transposed and sliced views included).
    weight: (N, K) tensor, any strides, same dtype and device as ``a``: nn.Linear's layout,
            so a layer passes its weight as stored (a general ``a @ b`` passes ``b.t()``).
    bias:   (N,) contiguous tensor or None.
    out:    (M, N) contiguous tensor, written with ``act(a @ weight^T + bias)``.
    pre:    (M, N) contiguous tensor or None; when given, also written with
            ``a @ weight^T + bias`` (the pre-activation that gelu/silu's backward needs).
    act_code, act_param: the activation, as in brainkern.activations (NONE = 0 allowed).
    M, N or K may be 0 (K = 0 gives ``act(bias)``, or ``act(0)`` without bias).

``activation_backward(grad_out, saved, grad_pre, grad_bias, act_code, act_param,
                      saved_is_output) -> None``
    grad_out:  (M, N) tensor, any strides.
    saved:     (M, N) contiguous: the activation's output when ``saved_is_output``, else the
               pre-activation.
    grad_pre:  (M, N) contiguous, written with ``grad_out * act'(z)``.
    grad_bias: (N,) contiguous or None; when given, written with ``grad_pre.sum(0)``, reduced in
               at least float32 and in the same pass over the data.
    act_code != NONE.

Optionally, a backend fuses the whole backward of ``out = act(x @ weight^T + bias)``:

``linear_backward(grad_out, x, weight, saved, grad_x, grad_w, grad_bias, act_code, act_param,
                  saved_is_output) -> None``
    grad_out (M, N), x (M, K), weight (N, K): any strides. saved: as for activation_backward,
    None when act_code is NONE. Writes ``dz = grad_out * act'(z)`` (``grad_out`` itself without
    an activation), ``grad_bias = dz.sum(0)``, ``grad_x = dz @ weight`` and ``grad_w = dz^T @ x``
    into the given contiguous outputs, each None when not wanted. A backend without it gets
    :func:`compose_linear_backward` over its two required kernels.

Convolution family (``conv``)
-----------------------------

Shapes: x (N, C_in, H, W); weight (C_out, C_in / groups, kH, kW), as nn.Conv2d stores it;
out (N, C_out, H_out, W_out). ``stride``, ``padding``, ``dilation`` are (h, w) pairs of ints;
``padding`` is the zero padding before the first row and column: the padding after them is
implied by the output's size (so the ops layer expresses "same" with an even kernel, whose
padding is asymmetric, and nothing in a kernel changes). Non-zero padding modes (reflect,
replicate, circular) are applied by the ops layer before the kernel, which then gets padding 0.

Memory formats: the 4-D activation tensors of one call (x, out, pre, grad_out, grad_x) are all
dense in one common format, NCHW (``torch.contiguous_format``) or NHWC (``torch.channels_last``).
A kernel reads them as NHWC when every one of them is contiguous in torch.channels_last, else
as NCHW (then every one is contiguous). Decide it from all of them, not from one: a tensor with
one channel or 1 x 1 planes is contiguous in both formats (the same bytes either way), so it
alone cannot tell which format the others have. weight and grad_weight are contiguous
(C_out, C_in / groups, kH, kW). Any of N, C_in, C_out, H_out, W_out may be 0 (batch 0: nothing is
written but grad_weight, set to 0).

``conv2d_forward(x, weight, bias, out, pre, stride, padding, dilation, groups, act_code,
                 act_param) -> None``
    ``z[n, co, oh, ow] = bias[co] + sum over ci of group g = co // (C_out / groups), kh, kw of
    x[n, g * C_in/groups + ci, oh * sh - ph + kh * dh, ow * sw - pw + kw * dw] * weight[co, ci,
    kh, kw]`` with x read as 0 outside its bounds; ``out = act(z)``, ``pre = z`` when given.
    bias: (C_out,) contiguous or None.

``conv_transpose2d_forward(x, weight, bias, out, pre, stride, padding, dilation, groups,
                           act_code, act_param) -> None``
    The adjoint of conv2d_forward's linear part, with the same epilogue: x here has the shape
    of a convolution's output (N, C_x, H, W), weight (C_x, C_out / groups, kH, kW) (as
    nn.ConvTranspose2d stores it, which is conv2d's layout with C_x as conv2d's C_out), out
    (N, C_out, H_out, W_out): every product ``x[n, c, h, w] * weight[c, co', kh, kw]`` adds to
    ``z[n, g * C_out/groups + co', h * sh - ph + kh * dh, w * sw - pw + kw * dw]`` where that
    lies inside out; then ``out = act(z + bias)``, ``pre = z + bias`` when given. conv2d's input
    gradient is this kernel with bias None and act NONE (grad_x = conv_transpose2d(grad_pre,
    weight)); nn.ConvTranspose2d's forward is it with its bias and activation.

``conv2d_backward_weight(grad_pre, x, grad_weight, stride, padding, dilation, groups) -> None``
    ``grad_weight[co, ci, kh, kw] = sum over n, oh, ow of grad_pre[n, co, oh, ow] *
    x[n, g * C_in/groups + ci, oh * sh - ph + kh * dh, ow * sw - pw + kw * dw]``, accumulated
    in at least float32. grad_pre has out's shape and format. (A transposed convolution's
    weight gradient is this with the roles of its input and output gradient swapped.)

``conv2d_activation_backward(grad_out, saved, grad_pre, grad_bias, act_code, act_param,
                             saved_is_output) -> None``
    The 4-D twin of activation_backward, channel dimension 1: grad_out (N, C, H, W) any
    strides; saved and grad_pre in the format of the layer's output; ``grad_pre = grad_out *
    act'(saved)``; grad_bias (C,) or None, written with ``grad_pre.sum((0, 2, 3))`` in the
    same pass, reduced in at least float32, with the same result on any thread count.
    act_code != NONE (without an activation the ops layer sums grad_out itself).

Optionally, a backend fuses the activation backward into the weight gradient, for layers whose
input needs no gradient (a network's stem: dz is then read by the weight gradient alone):

``conv2d_activation_backward_weight(grad_out, saved, x, grad_weight, grad_bias, stride,
                                    padding, dilation, groups, act_code, act_param,
                                    saved_is_output) -> None``
    grad_out and saved contiguous in x's format; the same results as
    conv2d_activation_backward into a grad_pre followed by conv2d_backward_weight(grad_pre,
    x, ...), with no grad_pre stored.

Optionally, a backend fuses the conv block (brainkern/ops/conv_block.py) into one kernel:

``conv2d_maxpool2d_forward(x, weight, bias, out, indices, pre, conv_hw, stride, padding,
                           dilation, groups, act_code, act_param) -> None``
    With ``y = act(conv2d(x, weight) + bias)`` of size (N, C_out, H_c, W_c), conv_hw = (H_c,
    W_c) >= (2, 2) (y is never stored):
    out (N, C_out, H_c // 2, W_c // 2) = y max-pooled 2x2 with stride 2 (as
    max_pool2d_forward, NaN winning, first maximum on ties); indices (int64, out's shape and
    format) = the winning tap's flat ``h * W_c + w``, or, where the conv module sets
    ``WINDOW_CODES = True``, uint8 window codes ``2u + v`` as the pool family's, or None
    where no gradient will follow (the ops layer's inference path: no winner is recorded, and
    pre is None too); pre (out's shape) or None = the pre-activation at the winning tap (for
    activations whose derivative needs it).

and, where it writes window codes, the block's backward from the pooled gradient:

``conv2d_maxpool2d_backward(grad_pooled, indices, x, weight, grad_x, grad_weight, conv_hw,
                            stride, padding, dilation, groups, *, saved=None,
                            act_code=NONE, act_param=0.0, grad_bias=None) -> bool``
    grad_pooled: ``g * act'`` at the winners (out's shape and format), indices: the forward's
    (window codes or int64). grad_x (x's shape and format) and grad_weight (weight's) or None:
    the gradients of the convolution whose dz is grad_pooled at the winning taps and zero
    elsewhere, written whole. Returns False, having written nothing, for arguments it does not
    take (the ops layer then scatters dz and runs conv2d's backward kernels): a kernel that
    skips the zeros of dz must decline where torch's dense sums keep 0 * inf = NaN. Where the
    conv module lists activation codes in ``POOLED_ACTIVATIONS`` (output-saving ones), it also
    takes ``act_code`` (one of them, with its ``act_param``): grad_pooled is then ``g`` and
    ``saved`` the pooled output, ``dz = g * act'(saved)`` as conv2d_activation_backward computes
    it, and ``grad_bias`` (C_out,) or None gets dz's per-channel sums (grad_weight needed).

Pooling family (``pool``)
-------------------------

x (N, C, H, W) and out (N, C, H_out, W_out), and grad_x / grad_out of the same shapes, all
contiguous in one format (NCHW or NHWC), as for conv; ``kernel_size``, ``stride``, ``padding``,
``dilation`` (h, w) pairs; the output's size (ceil_mode resolved by the ops layer with torch's
rule) is out's shape. Window (oh, ow) starts at ``(oh * sh - ph, ow * sw - pw)``; its taps past
the input are skipped. The ops layer's checks (padding at most half the kernel, a last window
starting inside the input or its left padding) leave every window at least one in-bounds tap.
N may be 0 (nothing to write).

``max_pool2d_forward(x, out, indices, kernel_size, stride, padding, dilation) -> None``
    out = the maximum over each window's in-bounds taps; indices: int64 of out's shape and
    format or None, written with the winning tap's flat index ``h * W + w`` in its (n, c)
    plane (torch's, usable by max_unpool2d). torch's rule and scan order (rows, then columns):
    a tap replaces the best so far when greater or NaN, so the first maximum wins ties, the
    last NaN wins a window with NaNs, and a window of -inf keeps its first in-bounds tap.
    A pool module that sets ``WINDOW_CODES = True`` also takes uint8 indices, "window codes":
    the winning tap's place ``i * kW + j`` in its window (windows of at most 256 taps). The
    backward needs no more, and they are an eighth of the bytes: the ops layer saves them when
    the caller does not ask for the indices.
``max_pool2d_backward(grad_out, indices, grad_x, kernel_size, stride, padding, dilation) ->
    None``
    grad_x (x's shape, NCHW or NHWC) = the sum of grad_out over the taps that won (indices as
    the forward wrote them, int64 or window codes), written whole (zeros elsewhere),
    deterministically (the same bits on any thread count). The window arguments are the
    forward's: codes need them, and non-overlapping windows let each element of grad_x be
    written once.
``avg_pool2d_forward(x, out, kernel_size, stride, padding, count_include_pad, divisor) ->
    None``
    out = sum over the window's in-bounds taps / divisor when divisor > 0 (divisor_override),
    else / the window's tap count: with count_include_pad, per axis ``min(start + k, size +
    pad) - start`` (the padded input, clipped at the far padding as torch's ceil_mode does),
    else the in-bounds taps.
``avg_pool2d_backward(grad_out, grad_x, kernel_size, stride, padding, count_include_pad,
                      divisor) -> None``
    The adjoint: every tap of every window receives grad_out / that window's divisor.
``adaptive_avg_pool2d`` runs on these two: the ops layer computes each output's window
    (``start = floor(i * H / H_out)``, ``end = ceil((i + 1) * H / H_out)``) and, where those
    are not one uniform stride, the pool kernels ``adaptive_avg_pool2d_forward(x, out)`` and
    ``adaptive_avg_pool2d_backward(grad_out, grad_x)`` (any output size, larger than the input
    included: windows then overlap), each window's mean and its adjoint.
"""

import torch

from brainkern.activations import NONE

# Registers the fork handler at brainkern's import (ops import this package): a fork before a
# CPU backend's kernels are first imported must be seen too (brainkern/kernels/_openmp.py).
from brainkern.kernels import _openmp  # noqa: F401


def compose_linear_backward(kern, grad_out, x, weight, saved, grad_x, grad_w, grad_bias, act_code,
                            act_param, saved_is_output) -> None:
    """``linear_backward`` built from a backend's ``activation_backward`` and ``linear_forward``.

    One pass for ``dz`` and the bias gradient, then two GEMMs over strided views (``dz^T``,
    ``W^T`` and ``x^T`` are views: the kernels read any strides, so nothing is copied).
    """
    if act_code == NONE:
        grad_pre = grad_out
        if grad_bias is not None:
            acc = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
            grad_bias.copy_(grad_out.sum(0, dtype=acc))
    else:
        grad_pre = torch.empty(grad_out.shape, dtype=x.dtype, device=x.device)
        kern.activation_backward(grad_out, saved, grad_pre, grad_bias, act_code, act_param,
                                 saved_is_output)
    if grad_x is not None:
        kern.linear_forward(grad_pre, weight.t(), None, grad_x, None, NONE, 0.0)  # dz @ W
    if grad_w is not None:
        kern.linear_forward(grad_pre.t(), x.t(), None, grad_w, None, NONE, 0.0)  # dz^T @ x

