"""Drop-in replacements for torch.nn layers: thin subclasses whose forward calls functional.

Same constructor signature, parameter names, initialisation and state_dict as the torch.nn class
they subclass, plus an optional fused ``activation``.
"""

from __future__ import annotations

import torch

from brainkern import activations, functional
from brainkern.ops.conv_block import conv2d_maxpool2d


def _activation_repr(activation) -> str:
    if activation is None:
        return ""
    text = f", activation={activation.name}"
    if activation.code == activations.LEAKY_RELU:
        text += f"(negative_slope={activation.param})"
    return text


class Linear(torch.nn.Linear):
    """torch.nn.Linear computed by brainkern, with an optional fused activation."""

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None,
                 activation=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.activation = activations.resolve(activation)

    def forward(self, input):
        return functional.linear(input, self.weight, self.bias, self.activation)

    def extra_repr(self):
        return super().extra_repr() + _activation_repr(self.activation)


class Conv2d(torch.nn.Conv2d):
    """torch.nn.Conv2d computed by brainkern, with an optional fused activation.

    Non-zero padding modes (reflect, replicate, circular) pad with torch's F.pad first, as
    torch.nn.Conv2d does, and the convolution then runs unpadded.

    ``fuses_max_pool`` (set by brainkern.accelerate when a MaxPool2d(2) follows the layer in an
    nn.Sequential, whose slot then holds nn.Identity): the layer's output is max-pooled 2x2 in
    the same op (brainkern/ops/conv_block.py).
    """

    fuses_max_pool = False

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, padding_mode="zeros", device=None, dtype=None,
                 activation=None):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode,
                         device=device, dtype=dtype)
        self.activation = activations.resolve(activation)

    def _conv_forward(self, input, weight, bias):
        if self.padding_mode != "zeros":
            input = torch.nn.functional.pad(input, self._reversed_padding_repeated_twice,
                                            mode=self.padding_mode)
            padding = 0
        else:
            padding = self.padding
        op = conv2d_maxpool2d if self.fuses_max_pool else functional.conv2d
        return op(input, weight, bias, self.stride, padding, self.dilation, self.groups,
                  self.activation)

    def extra_repr(self):
        fused = ", fused max_pool2d(2)" if self.fuses_max_pool else ""
        return super().extra_repr() + _activation_repr(self.activation) + fused


class ConvTranspose2d(torch.nn.ConvTranspose2d):
    """torch.nn.ConvTranspose2d computed by brainkern, with an optional fused activation."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 output_padding=0, groups=1, bias=True, dilation=1, padding_mode="zeros",
                 device=None, dtype=None, activation=None):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         output_padding=output_padding, groups=groups, bias=bias,
                         dilation=dilation, padding_mode=padding_mode, device=device, dtype=dtype)
        self.activation = activations.resolve(activation)

    def forward(self, input, output_size=None):
        if self.padding_mode != "zeros":
            raise ValueError("Only 'zeros' padding mode is supported for ConvTranspose2d")
        return functional.conv_transpose2d(
            input, self.weight, self.bias, self.stride, self.padding, self.output_padding,
            self.groups, self.dilation, self.activation, output_size=output_size)

    def extra_repr(self):
        return super().extra_repr() + _activation_repr(self.activation)


class MaxPool2d(torch.nn.MaxPool2d):
    """torch.nn.MaxPool2d computed by brainkern."""

    def forward(self, input):
        return functional.max_pool2d(input, self.kernel_size, self.stride, self.padding,
                                     self.dilation, self.ceil_mode, self.return_indices)


class AvgPool2d(torch.nn.AvgPool2d):
    """torch.nn.AvgPool2d computed by brainkern."""

    def forward(self, input):
        return functional.avg_pool2d(input, self.kernel_size, self.stride, self.padding,
                                     self.ceil_mode, self.count_include_pad,
                                     self.divisor_override)


class AdaptiveAvgPool2d(torch.nn.AdaptiveAvgPool2d):
    """torch.nn.AdaptiveAvgPool2d computed by brainkern."""

    def forward(self, input):
        return functional.adaptive_avg_pool2d(input, self.output_size)


__all__ = ["AdaptiveAvgPool2d", "AvgPool2d", "Conv2d", "ConvTranspose2d", "Linear", "MaxPool2d"]
