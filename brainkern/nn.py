"""Drop-in replacements for torch.nn layers: thin subclasses whose forward calls functional.

Same constructor signature, parameter names, initialisation and state_dict as the torch.nn class
they subclass, plus an optional fused ``activation``.
"""

from __future__ import annotations

import torch

from brainkern import activations, functional


class Linear(torch.nn.Linear):
    """torch.nn.Linear computed by brainkern, with an optional fused activation."""

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None,
                 activation=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.activation = activations.resolve(activation)

    def forward(self, input):
        return functional.linear(input, self.weight, self.bias, self.activation)

    def extra_repr(self):
        act = "" if self.activation is None else f", activation={self.activation.name}"
        if self.activation is not None and self.activation.code == activations.LEAKY_RELU:
            act += f"(negative_slope={self.activation.param})"
        return super().extra_repr() + act


__all__ = ["Linear"]
