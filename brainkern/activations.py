"""The one table of fused activations.

Every backend's kernels implement the same activations, selected by an integer ``code`` and one
float ``param`` (leaky_relu's negative slope), so kernels take plain arguments. This module maps
the user-facing spellings (a name or a ``torch.nn`` activation module) onto that table and says
what the backward pass must keep: the output suffices for relu, leaky_relu (slope >= 0), sigmoid
and tanh; gelu and silu need the pre-activation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Codes shared by every kernel (C++, Numba, Triton). Never renumber: kernels switch on them.
NONE = 0
RELU = 1
LEAKY_RELU = 2
SIGMOID = 3
TANH = 4
GELU = 5  # exact, erf form
GELU_TANH = 6
SILU = 7

_NAMES = {
    "relu": RELU,
    "leaky_relu": LEAKY_RELU,
    "sigmoid": SIGMOID,
    "tanh": TANH,
    "gelu": GELU,
    "gelu_tanh": GELU_TANH,
    "silu": SILU,
}


@dataclass(frozen=True)
class Activation:
    """A resolved activation: what kernels are told, and what backward keeps."""

    name: str
    code: int
    param: float = 0.0

    @property
    def saves_output(self) -> bool:
        """True when the derivative can be computed from the activation's output alone."""
        return saves_output(self.code, self.param)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Reference forward in torch (the oracle and the ``torch`` backend)."""
        return _TORCH_FORWARD[self.code](z, self.param)

    def derivative(self, saved: torch.Tensor) -> torch.Tensor:
        """d act / d z, from the output (``saves_output``) or else the pre-activation."""
        return _TORCH_DERIVATIVE[(self.code, self.saves_output)](saved, self.param)


def saves_output(code: int, param: float = 0.0) -> bool:
    """Whether backward keeps the output (True) or the pre-activation (False) for ``code``.

    leaky_relu with a negative slope maps negative inputs to positive outputs, so its output
    no longer tells which branch was taken; it keeps the pre-activation instead.
    """
    if code == LEAKY_RELU:
        return param >= 0.0
    return code in (NONE, RELU, SIGMOID, TANH)


def resolve(activation) -> Activation | None:
    """Turn ``None``, a name or a ``torch.nn`` activation module into an :class:`Activation`."""
    if activation is None:
        return None
    if isinstance(activation, Activation):
        return activation
    if isinstance(activation, str):
        key = activation.lower()
        if key not in _NAMES:
            raise ValueError(
                f"activation: unknown name {activation!r}; expected None, one of "
                f"{sorted(_NAMES)}, or a torch.nn activation module"
            )
        param = 0.01 if key == "leaky_relu" else 0.0
        return Activation(key, _NAMES[key], param)
    nn = torch.nn
    if isinstance(activation, nn.ReLU):
        return Activation("relu", RELU)
    if isinstance(activation, nn.LeakyReLU):
        return Activation("leaky_relu", LEAKY_RELU, float(activation.negative_slope))
    if isinstance(activation, nn.Sigmoid):
        return Activation("sigmoid", SIGMOID)
    if isinstance(activation, nn.Tanh):
        return Activation("tanh", TANH)
    if isinstance(activation, nn.GELU):
        if activation.approximate == "tanh":
            return Activation("gelu_tanh", GELU_TANH)
        return Activation("gelu", GELU)
    if isinstance(activation, nn.SiLU):
        return Activation("silu", SILU)
    raise TypeError(
        f"activation: expected None, a name from {sorted(_NAMES)} or one of nn.ReLU, "
        f"nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.GELU, nn.SiLU; got {type(activation).__name__}"
    )


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)


def _gelu_tanh_derivative(z, _):
    inner = _SQRT_2_OVER_PI * (z + 0.044715 * z**3)
    t = torch.tanh(inner)
    return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * z * z)


def _silu_derivative(z, _):
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


_TORCH_FORWARD = {
    NONE: lambda z, _: z,
    RELU: lambda z, _: torch.relu(z),
    LEAKY_RELU: lambda z, p: torch.nn.functional.leaky_relu(z, p),
    SIGMOID: lambda z, _: torch.sigmoid(z),
    TANH: lambda z, _: torch.tanh(z),
    GELU: lambda z, _: torch.nn.functional.gelu(z),
    GELU_TANH: lambda z, _: torch.nn.functional.gelu(z, approximate="tanh"),
    SILU: lambda z, _: torch.nn.functional.silu(z),
}

# Keyed by (code, saves_output). Derivatives at a kink follow torch: relu'(0) = 0.
_TORCH_DERIVATIVE = {
    (NONE, True): lambda y, _: torch.ones_like(y),
    (RELU, True): lambda y, _: (y > 0).to(y.dtype),
    # full_like keeps the slope in the tensor's dtype: a Python-scalar where() rounds it to fp32.
    (LEAKY_RELU, True): lambda y, p: torch.full_like(y, p).masked_fill_(y > 0, 1.0),
    (LEAKY_RELU, False): lambda z, p: torch.full_like(z, p).masked_fill_(z > 0, 1.0),
    (SIGMOID, True): lambda y, _: y * (1 - y),
    (TANH, True): lambda y, _: 1 - y * y,
    (GELU, False): lambda z, _: 0.5 * (1 + torch.erf(z * _INV_SQRT_2))
    + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi),
    (GELU_TANH, False): _gelu_tanh_derivative,
    (SILU, False): _silu_derivative,
}
