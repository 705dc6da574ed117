"""Model patching: swap a model's torch.nn layers for brainkern's, and fuse layer -> activation.

The swap happens in place and shares the original parameters (no copies), so optimisers built
before the call keep working. Inside an nn.Sequential, a swapped layer followed directly by a
supported activation module absorbs it, and the activation's slot becomes nn.Identity.
"""

from __future__ import annotations

import torch

from brainkern import activations
from brainkern import nn as bnn

_TWINS = {
    torch.nn.Linear: bnn.Linear,
    torch.nn.Conv2d: bnn.Conv2d,
    torch.nn.ConvTranspose2d: bnn.ConvTranspose2d,
    torch.nn.MaxPool2d: bnn.MaxPool2d,
    torch.nn.AvgPool2d: bnn.AvgPool2d,
    torch.nn.AdaptiveAvgPool2d: bnn.AdaptiveAvgPool2d,
}
_FUSING = (bnn.Linear, bnn.Conv2d, bnn.ConvTranspose2d)  # can absorb a following activation


def _swap(layer: torch.nn.Module) -> bool:
    """Turn ``layer`` into its brainkern twin in place; False if it has none.

    The twins are subclasses that add at most an ``activation`` attribute, so re-classing the
    object keeps its parameters, buffers and hooks exactly as they are.
    """
    twin = _TWINS.get(type(layer))
    if twin is None:
        return False
    layer.__class__ = twin
    if isinstance(layer, _FUSING):
        layer.activation = None
    return True


def _fusable(module: torch.nn.Module):
    try:
        return activations.resolve(module)
    except TypeError:
        return None


def accelerate(model: torch.nn.Module) -> torch.nn.Module:
    """Swap supported layers of ``model`` for brainkern's in place; returns ``model``."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not _swap(model):
        for child in model.children():
            accelerate(child)
    if isinstance(model, torch.nn.Sequential):
        children = list(model._modules.items())
        for (_, layer), (next_name, following) in zip(children, children[1:]):
            if isinstance(layer, _FUSING) and layer.activation is None:
                act = _fusable(following)
                if act is not None:
                    layer.activation = act
                    model._modules[next_name] = torch.nn.Identity()
        _fuse_max_pools(model)
    return model


def _is_max_pool_2x2(module) -> bool:
    """MaxPool2d(2): 2x2 windows, stride 2, no padding, dilation 1, floor mode, no indices."""
    if not isinstance(module, torch.nn.MaxPool2d):
        return False
    two = (2, (2, 2))
    return (module.kernel_size in two and module.stride in two and module.padding in (0, (0, 0))
            and module.dilation in (1, (1, 1)) and not module.ceil_mode
            and not module.return_indices)


def _fuse_max_pools(model: torch.nn.Sequential) -> None:
    """A Conv2d with its activation fused, then (past the Identity left by that fusion)
    MaxPool2d(2): the pooling joins the convolution's op (brainkern/ops/conv_block.py)."""
    children = [(name, m) for name, m in model._modules.items()
                if not isinstance(m, torch.nn.Identity)]
    for (_, layer), (next_name, following) in zip(children, children[1:]):
        if (type(layer) is bnn.Conv2d and layer.activation is not None
                and not layer.fuses_max_pool and _is_max_pool_2x2(following)):
            layer.fuses_max_pool = True
            model._modules[next_name] = torch.nn.Identity()
