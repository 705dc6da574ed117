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
    return model
