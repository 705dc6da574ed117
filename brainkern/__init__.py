"""brainkern: hand-written compute kernels for neural networks, as drop-in torch.nn layers."""

from brainkern import functional, nn
from brainkern.accelerate import accelerate
from brainkern.backends import available_backends, use_backend

__version__ = "0.1.0"

__all__ = ["accelerate", "available_backends", "functional", "nn", "use_backend", "__version__"]
