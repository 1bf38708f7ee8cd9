"""Small helpers shared by the metric modules (not public API)."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


def as_float_tensor(name: str, values, min_rows: int = 1) -> torch.Tensor:
    """`values` as a float tensor with at least one dimension and `min_rows` rows; raises ValueError otherwise."""
    tensor = torch.as_tensor(values)
    if tensor.ndim == 0:
        raise ValueError(f"{name} must have a batch dimension, got a scalar.")
    if not tensor.is_floating_point():
        tensor = tensor.float()
    if tensor.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} item(s), got {tensor.shape[0]}.")
    return tensor


def check_finite(name: str, tensor: torch.Tensor) -> None:
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} contains NaN or inf values.")


def model_device(model: nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (CPU for a module without either)."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def model_dtype(model: nn.Module) -> torch.dtype:
    for tensor in model.parameters():
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put `model` in eval mode for the block and restore its previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}.")
    return batch_size
