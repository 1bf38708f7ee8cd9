"""How far unlearning moved the weights: the L2 distance between two models' parameters."""

from __future__ import annotations

import math
from typing import Callable, Mapping

import torch
from torch import nn

WeightSource = nn.Module | Mapping[str, torch.Tensor]

_LORA_PARTS = {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector", "base_layer"}


def _module_weights(model: nn.Module) -> dict[str, Callable[[], torch.Tensor]]:
    """Name -> function returning the parameter as the model's forward pass uses it.

    For a layer with a peft LoRA adapter that is not merged, the effective weight is base + B @ A * scaling,
    summed over the active adapters, under the base layer's name; so a base model and its LoRA-adapted copy
    compare name by name. Deltas are computed one layer at a time, when asked for.
    """
    weights: dict[str, Callable[[], torch.Tensor]] = {}
    lora_layers = {}
    if any(hasattr(module, "lora_A") for module in model.modules()):  # import peft only when it is needed
        from peft.tuners.lora import LoraLayer

        lora_layers = {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}
    for name, module in lora_layers.items():
        base = module.get_base_layer()
        for param_name, param in base.named_parameters(recurse=False):
            key = f"{name}.{param_name}" if name else param_name
            if param_name == "weight":
                weights[key] = _lora_effective_weight(name, module, param)
            else:
                weights[key] = lambda p=param: p.detach()
    for name, param in model.named_parameters():
        if _LORA_PARTS.intersection(name.split(".")):
            continue  # adapter factors and wrapped base weights are covered above
        weights[name] = lambda p=param: p.detach()
    return weights


def _lora_effective_weight(name: str, module, base_weight: torch.Tensor) -> Callable[[], torch.Tensor]:
    def effective() -> torch.Tensor:
        weight = base_weight.detach()
        if getattr(module, "merged", False) or getattr(module, "disable_adapters", False):
            return weight  # merged deltas are already in the base weight; disabled ones have no effect
        for adapter in module.active_adapters:
            if adapter not in module.lora_A:
                continue
            if module.use_dora.get(adapter, False):
                raise NotImplementedError(f"weight_distance does not support DoRA adapters (layer {name!r}).")
            weight = weight + module.get_delta_weight(adapter).detach()
        return weight

    return effective


def _named_weights(source: WeightSource, which: str) -> dict[str, Callable[[], torch.Tensor]]:
    if isinstance(source, nn.Module):
        return _module_weights(source)
    if isinstance(source, Mapping):
        return {
            name: (lambda t=tensor: t.detach())
            for name, tensor in source.items()
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point()
        }
    raise TypeError(f"{which} must be an nn.Module or a state dict, got {type(source).__name__}.")


def weight_distance(model_a: WeightSource, model_b: WeightSource) -> dict[str, float]:
    """L2 distance between two models' parameters, absolute and relative to model_a's norm.

    Returns `{"l2": ||theta_b - theta_a||_2, "relative": ||theta_b - theta_a||_2 / ||theta_a||_2}` over all
    floating-point parameters, in float64. Models (or state dicts) must have the same parameter names and shapes.
    A model carrying an unmerged LoRA adapter is compared through its effective weights (base + B @ A * scale of
    the active adapters), so `weight_distance(original_unet, unet_with_adapter)` measures what the adapter changes.

    Example:
        >>> a = nn.Linear(3, 2)
        >>> weight_distance(a, a)
        {'l2': 0.0, 'relative': 0.0}
        >>> b = nn.Linear(3, 2); _ = b.load_state_dict({k: v + 1.0 for k, v in a.state_dict().items()})
        >>> round(weight_distance(a, b)["l2"], 4)     # 8 numbers each moved by 1: sqrt(8)
        2.8284
    """
    weights_a = _named_weights(model_a, "model_a")
    weights_b = _named_weights(model_b, "model_b")
    only_a, only_b = sorted(set(weights_a) - set(weights_b)), sorted(set(weights_b) - set(weights_a))
    if only_a or only_b:
        raise ValueError(
            "The models have different parameters: "
            f"{len(only_a)} only in model_a (for example {only_a[:3]}), "
            f"{len(only_b)} only in model_b (for example {only_b[:3]})."
        )
    diff_sq = norm_sq = 0.0
    for name, get_a in weights_a.items():
        a, b = get_a(), weights_b[name]()
        if a.shape != b.shape:
            raise ValueError(
                f"Parameter {name!r} has shape {tuple(a.shape)} in model_a but {tuple(b.shape)} in model_b."
            )
        a = a.to(torch.float64)
        diff_sq += float((b.to(a.device, torch.float64) - a).pow(2).sum().item())
        norm_sq += float(a.pow(2).sum().item())
    l2 = math.sqrt(diff_sq)
    if norm_sq > 0:
        relative = l2 / math.sqrt(norm_sq)
    else:
        relative = 0.0 if l2 == 0 else math.inf
    return {"l2": l2, "relative": relative}
