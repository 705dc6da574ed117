"""torch.nn.functional-style API: the same signatures, plus a fused ``activation``.

``activation`` is None, a name ("relu", "leaky_relu", "sigmoid", "tanh", "gelu", "gelu_tanh",
"silu") or a torch.nn activation module instance (nn.LeakyReLU(0.2) carries its own slope,
nn.GELU(approximate="tanh") selects the tanh form).
"""

from brainkern.ops.conv import conv2d, conv_transpose2d
from brainkern.ops.linear import linear, matmul

__all__ = ["conv2d", "conv_transpose2d", "linear", "matmul"]
