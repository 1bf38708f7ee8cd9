"""Stable Diffusion 1.x and 2.x: one CLIP text encoder, its last hidden states as the only conditioning.

Matches diffusers' `train_text_to_image.py` / `train_text_to_image_lora.py`: the prompt is padded to 77 tokens,
the UNet is called with `encoder_hidden_states` only, and the prediction type (epsilon for 1.x and 2.x base,
v for 2.x at 768 px) comes from the scheduler config.

Example:
    >>> from diffusers_unlearn.families import get_family
    >>> get_family("sd").plain_pipeline_class_name
    'StableDiffusionPipeline'
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from .base import Components, ModelFamily, module_device


class StableDiffusionFamily(ModelFamily):
    """SD 1.x / 2.x (`StableDiffusionPipeline`)."""

    name = "sd"
    pipeline_class_names = ("StableDiffusionPipeline",)
    plain_pipeline_class_name = "StableDiffusionPipeline"
    text_encoders = (("tokenizer", "text_encoder", "CLIPTextModel"),)
    lora_prefixes = ("unet", "text_encoder")

    def encode_tokens(self, components: Components, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """`{"encoder_hidden_states": last hidden states}` (N, 77, width), as the SD pipeline encodes a prompt."""
        text_encoder = components["text_encoder"]
        return {"encoder_hidden_states": text_encoder(input_ids.to(module_device(text_encoder)))[0]}

    def pipeline_options(self, model_index: Mapping[str, Any]) -> dict[str, Any]:
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    def call(self, model: nn.Module, x_t: torch.Tensor, timesteps: torch.Tensor, cond: Mapping[str, torch.Tensor]):
        """`unet(x_t, t, encoder_hidden_states).sample`, as the official SD training scripts call it."""
        return model(x_t, timesteps, encoder_hidden_states=cond["encoder_hidden_states"]).sample


__all__ = ["StableDiffusionFamily"]
