"""The ``torch`` backend: the kernel interface implemented with torch's own ops, one module per
op family. It is the baseline the benchmarks compare against and the backend for dtypes and
devices no hand-written kernel serves. What the families share is here."""

import torch

from brainkern.activations import NONE, Activation


def epilogue(z, out, pre, act_code, act_param) -> None:
    """Write ``pre = z`` (when given) and ``out = act(z)``."""
    if pre is not None:
        pre.copy_(z)
    out.copy_(z if act_code == NONE else Activation("", act_code, act_param).forward(z))


def activation_derivative(saved, act_code, act_param, saved_is_output):
    """``act'(z)`` from the tensor the forward saved (its output, or its pre-activation)."""
    act = Activation("", act_code, act_param)
    if act.saves_output != bool(saved_is_output):
        raise ValueError(f"activation {act_code} ({act_param}) saves the "
                         f"{'output' if act.saves_output else 'pre-activation'}, but "
                         f"saved_is_output={saved_is_output}")
    return act.derivative(saved)


def accumulation_dtype(dtype):
    """The dtype sums are reduced in: float64 for float64, float32 for the rest."""
    return torch.float64 if dtype == torch.float64 else torch.float32
