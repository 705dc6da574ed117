"""The ``torch`` backend's linear family: the kernel interface in torch's own ops."""

import torch

from brainkern.activations import NONE, Activation

DEVICES = ("cpu", "cuda")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _activation(act_code: int, act_param: float) -> Activation:
    return Activation("", act_code, act_param)


def linear_forward(a, weight, bias, out, pre, act_code, act_param):
    """``out = act(a @ weight^T + bias)``; ``pre`` the same before act. See kernels/__init__.py."""
    b = weight.t()
    if bias is None:
        z = torch.mm(a, b, out=pre) if pre is not None else torch.mm(a, b)
    else:
        z = torch.addmm(bias, a, b, out=pre) if pre is not None else torch.addmm(bias, a, b)
    if act_code == NONE:
        out.copy_(z)
    else:
        out.copy_(_activation(act_code, act_param).forward(z))


def activation_backward(grad_out, saved, grad_pre, grad_bias, act_code, act_param, saved_is_output):
    """``grad_pre = grad_out * act'(z)``; ``grad_bias = grad_pre.sum(0)`` when given."""
    act = _activation(act_code, act_param)
    if act.saves_output != bool(saved_is_output):  # not assert: it must survive python -O
        raise ValueError(f"activation_backward: activation {act_code} ({act_param}) saves the "
                         f"{'output' if act.saves_output else 'pre-activation'}, but "
                         f"saved_is_output={saved_is_output}")
    torch.mul(grad_out, act.derivative(saved), out=grad_pre)
    if grad_bias is not None:
        grad_bias.copy_(grad_pre.sum(0, dtype=_accumulation_dtype(grad_pre.dtype)))


def _accumulation_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32
