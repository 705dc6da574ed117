"""torch.nn.functional-style API: the same signatures, plus a fused ``activation``.

``activation`` is None, a name ("relu", "leaky_relu", "sigmoid", "tanh", "gelu", "gelu_tanh",
"silu") or a torch.nn activation module instance (nn.LeakyReLU(0.2) carries its own slope,
nn.GELU(approximate="tanh") selects the tanh form).
"""

from brainkern.ops.conv import conv2d, conv_transpose2d
from brainkern.ops.linear import linear, matmul
from brainkern.ops.pool import adaptive_avg_pool2d, avg_pool2d, max_pool2d

__all__ = ["adaptive_avg_pool2d", "avg_pool2d", "conv2d", "conv_transpose2d", "linear", "matmul",
           "max_pool2d"]
