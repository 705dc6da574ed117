"""Convolution arguments, normalised once for conv2d and conv_transpose2d (and reused by
pooling): torch's rules and error messages for each argument, output sizes, and the memory
format of the output.

Kernels take padding as the rows/columns *before* the input, the padding after it implied by
the output's size: that is how "same" with an even kernel (asymmetric padding) reaches them
without a kernel knowing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from brainkern.ops._checks import check_same_kind, check_tensor

_CHANNELS_LAST = torch.channels_last
_CONTIGUOUS = torch.contiguous_format


@dataclass(frozen=True)
class ConvGeometry:
    """Normalised arguments of one convolution, as the kernels take them.

    ``padding`` is (top, left); ``out_hw`` the output's (H, W), which implies the padding after.
    ``transposed``: a transposed convolution, whose forward is conv2d's input gradient.
    """

    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    out_hw: tuple[int, int]
    transposed: bool = False

    @property
    def kernel_args(self):
        return self.stride, self.padding, self.dilation, self.groups


def pair(name: str, value, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints, each at least ``minimum``, as a pair."""
    items = (value, value) if isinstance(value, int) else value
    try:
        ok = len(items) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                     for v in items)
    except TypeError:
        ok = False
    if not ok:
        raise TypeError(f"{name}: expected an int or a pair of ints, got {value!r}")
    if min(items) < minimum:
        raise ValueError(f"{name}: expected values >= {minimum}, got {value!r}")
    return int(items[0]), int(items[1])


def conv_padding(padding, kernel_hw, stride, dilation) -> tuple[tuple[int, int], tuple[int, int]]:
    """((top, bottom), (left, right)) for an int, a pair, "valid" or "same" (torch's rules:
    "same" needs stride 1 and puts the odd row of an even reach after the input)."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0), (0, 0)
        if padding == "same":
            if stride != (1, 1):
                raise ValueError(f"padding: 'same' is not supported with stride {stride}; "
                                 "it needs stride 1")
            totals = [d * (k - 1) for d, k in zip(dilation, kernel_hw)]
            return tuple((t // 2, t - t // 2) for t in totals)
        raise ValueError(f"padding: expected an int, a pair of ints, 'valid' or 'same', "
                         f"got {padding!r}")
    ph, pw = pair("padding", padding, 0)
    return (ph, ph), (pw, pw)


def conv_output_size(size: int, kernel: int, stride: int, before: int, after: int,
                     dilation: int) -> int:
    return (size + before + after - dilation * (kernel - 1) - 1) // stride + 1


def conv_transpose_output_size(size: int, kernel: int, stride: int, padding: int,
                               dilation: int, output_padding: int) -> int:
    return (size - 1) * stride - 2 * padding + dilation * (kernel - 1) + output_padding + 1


def _check_common(input, weight, bias, groups, weight_channels_name):
    """Ranks, dtypes, devices, layouts and the group arithmetic both ops share."""
    check_tensor("input", input, ndim=(3, 4))
    check_tensor("weight", weight, ndim=(4,))
    if bias is not None:
        check_tensor("bias", bias, ndim=(1,))
    check_same_kind("input", input, weight=weight, bias=bias)
    for name, t in (("input", input), ("weight", weight), ("bias", bias)):
        if t is not None and t.layout != torch.strided:
            raise TypeError(f"{name}: expected a dense (strided) tensor, got layout {t.layout}")
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"groups: expected a positive int, got {groups!r}")
    if input.shape[-3] % groups:
        raise ValueError(f"input: {input.shape[-3]} channels are not divisible by groups={groups}")
    if weight.shape[0] % groups and weight_channels_name:
        raise ValueError(f"weight: {weight_channels_name} {weight.shape[0]} is not divisible by "
                         f"groups={groups}")


def _check_output(out_hw, input, weight, what):
    if min(out_hw) < 1:
        raise ValueError(f"{what}: the output would be {out_hw[0]} x {out_hw[1]} for input "
                         f"{tuple(input.shape[-2:])} and kernel {tuple(weight.shape[-2:])}; "
                         "the kernel is larger than the padded input")


def conv2d_geometry(input, weight, bias, stride, padding, dilation, groups) -> ConvGeometry:
    """Check conv2d's arguments (naming the bad one) and normalise them."""
    _check_common(input, weight, bias, groups, "out_channels")
    stride, dilation = pair("stride", stride, 1), pair("dilation", dilation, 1)
    c_in, (c_out, c_per_group, kh, kw) = input.shape[-3], weight.shape
    if c_per_group * groups != c_in:
        raise ValueError(f"input: {c_in} channels, but weight {tuple(weight.shape)} with "
                         f"groups={groups} expects {c_per_group * groups}")
    if bias is not None and bias.shape[0] != c_out:
        raise ValueError(f"bias: expected shape ({c_out},) to match weight, got "
                         f"{tuple(bias.shape)}")
    (top, bottom), (left, right) = conv_padding(padding, (kh, kw), stride, dilation)
    out_hw = (conv_output_size(input.shape[-2], kh, stride[0], top, bottom, dilation[0]),
              conv_output_size(input.shape[-1], kw, stride[1], left, right, dilation[1]))
    _check_output(out_hw, input, weight, "input")
    return ConvGeometry(stride, (top, left), dilation, groups, out_hw)


def conv_transpose2d_geometry(input, weight, bias, stride, padding, output_padding, groups,
                              dilation, output_size=None) -> ConvGeometry:
    """Check conv_transpose2d's arguments (naming the bad one) and normalise them.

    ``output_size`` (forward's argument of nn.ConvTranspose2d): the wanted (H, W) (or a longer
    size whose last two entries are), which picks output_padding within [0, stride) as torch does.
    """
    _check_common(input, weight, bias, groups, "")
    stride, dilation = pair("stride", stride, 1), pair("dilation", dilation, 1)
    padding = pair("padding", padding, 0)
    c_in, (c_w, c_per_group, kh, kw) = input.shape[-3], weight.shape
    if c_w != c_in:
        raise ValueError(f"weight: {tuple(weight.shape)} expects {c_w} input channels "
                         f"(in_channels first), but input has {c_in}")
    c_out = c_per_group * groups
    if bias is not None and bias.shape[0] != c_out:
        raise ValueError(f"bias: expected shape ({c_out},) to match weight, got "
                         f"{tuple(bias.shape)}")
    kernel_hw, in_hw = (kh, kw), tuple(input.shape[-2:])
    if output_size is not None:
        output_padding = _output_padding_for(output_size, in_hw, kernel_hw, stride, padding,
                                             dilation)
    output_padding = pair("output_padding", output_padding, 0)
    for i, axis in enumerate(("height", "width")):
        if output_padding[i] >= max(stride[i], dilation[i]):
            raise ValueError(f"output_padding: {output_padding} must be smaller than either "
                             f"stride {stride} or dilation {dilation} ({axis})")
    out_hw = tuple(conv_transpose_output_size(in_hw[i], kernel_hw[i], stride[i], padding[i],
                                              dilation[i], output_padding[i]) for i in range(2))
    _check_output(out_hw, input, weight, "padding")
    return ConvGeometry(stride, padding, dilation, groups, out_hw, transposed=True)


def _output_padding_for(output_size, in_hw, kernel_hw, stride, padding, dilation):
    """output_padding giving ``output_size``, which must lie in [smallest, smallest + stride)."""
    try:
        wanted = tuple(int(s) for s in output_size)[-2:]
    except (TypeError, ValueError):
        raise TypeError(f"output_size: expected a sequence of ints, got {output_size!r}") from None
    if len(wanted) != 2:
        raise ValueError(f"output_size: expected (H, W) (optionally after N, C), got "
                         f"{output_size!r}")
    result = []
    for i in range(2):
        smallest = conv_transpose_output_size(in_hw[i], kernel_hw[i], stride[i], padding[i],
                                              dilation[i], 0)
        if not smallest <= wanted[i] < smallest + stride[i]:
            raise ValueError(f"output_size: {tuple(wanted)} is out of range; expected sizes "
                             f"from {smallest} to {smallest + stride[i] - 1} in dimension {i}")
        result.append(wanted[i] - smallest)
    return tuple(result)


try:
    from torch._prims_common import suggest_memory_format as _suggest_memory_format
except ImportError:  # private in torch: the rule it implements, for dense 4-D tensors
    def _suggest_memory_format(t):
        if t.is_contiguous(memory_format=_CHANNELS_LAST) and not t.is_contiguous():
            return _CHANNELS_LAST
        return _CONTIGUOUS


def _format_of(t: torch.Tensor):
    """torch's suggest_memory_format of a 4-D tensor. A tensor dense in exactly one of the two
    formats is that format; torch's Python rule (~50 us an NCHW tensor, a sixth of a small
    pooling layer's training step) decides the rest: both (one channel, or 1 x 1 planes) or
    neither (sliced, permuted)."""
    nchw = t.is_contiguous()
    if nchw != t.is_contiguous(memory_format=_CHANNELS_LAST):
        return _CONTIGUOUS if nchw else _CHANNELS_LAST
    return _suggest_memory_format(t)


def memory_format(x: torch.Tensor, weight: torch.Tensor):
    """torch's rule for a convolution's output: channels_last when the input or the weight is."""
    if _format_of(x) is _CHANNELS_LAST or (weight is not x and _format_of(weight) is _CHANNELS_LAST):
        return _CHANNELS_LAST
    return _CONTIGUOUS
