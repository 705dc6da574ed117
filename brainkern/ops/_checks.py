"""Argument checks shared by every op: clear errors, raised before any kernel runs."""

from __future__ import annotations

import torch


def check_tensor(name: str, value, *, ndim: tuple[int, ...] | None = None) -> torch.Tensor:
    """``value`` must be a dense floating-point tensor (of one of the ranks ``ndim``)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if value.layout is not torch.strided:
        # Sparse (COO, CSR, ...) and mkldnn tensors have no strided storage for a kernel to read.
        raise TypeError(f"{name}: expected a dense (strided) tensor, got layout {value.layout}")
    if not value.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {value.dtype}")
    if ndim is not None and value.dim() not in ndim:
        ranks = " or ".join(str(n) for n in ndim)
        raise ValueError(f"{name}: expected a {ranks}-D tensor, got shape {tuple(value.shape)}")
    return value


def check_same_kind(reference_name: str, reference: torch.Tensor, **others) -> None:
    """Every tensor in ``others`` (None allowed) has ``reference``'s dtype and device."""
    for name, value in others.items():
        if value is None:
            continue
        if value.dtype != reference.dtype:
            raise TypeError(
                f"{name}: dtype {value.dtype} does not match {reference_name}'s {reference.dtype}"
            )
        if value.device != reference.device:
            raise ValueError(
                f"{name}: on device {value.device}, but {reference_name} is on {reference.device}"
            )
