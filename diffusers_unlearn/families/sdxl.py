"""Stable Diffusion XL: two CLIP text encoders, pooled text embeddings and size/crop micro-conditioning.

The facts, from diffusers' `train_text_to_image_lora_sdxl.py` and `StableDiffusionXLPipeline`:
- each prompt goes through both tokenizers (padded to 77) and both text encoders; the conditioning is the
  PENULTIMATE hidden states of both, concatenated on the feature axis (768 + 1280 = 2048 for SDXL base);
- the pooled, projected embedding of the second encoder (`CLIPTextModelWithProjection`) is `text_embeds`;
- `time_ids` are original size (h, w) + crop top-left (top, left) + target size (h, w), six numbers per image;
- the UNet takes the last two as `added_cond_kwargs={"text_embeds": ..., "time_ids": ...}`;
- the VAE overflows in float16 (`force_upcast` in its config): keep it in float32 or pass an fp16-fixed VAE
  with `vae_path` (the scripts' `--pretrained_vae_model_name_or_path`);
- LoRA files hold `unet.`, `text_encoder.` and `text_encoder_2.` keys; `StableDiffusionXLPipeline.load_lora_weights`
  reads all three.

Example:
    >>> from diffusers_unlearn.families import get_family
    >>> get_family("sdxl").lora_prefixes
    ('unet', 'text_encoder', 'text_encoder_2')
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from .base import Components, ModelFamily, module_device


class StableDiffusionXLFamily(ModelFamily):
    """SDXL (`StableDiffusionXLPipeline`)."""

    name = "sdxl"
    pipeline_class_names = ("StableDiffusionXLPipeline",)
    plain_pipeline_class_name = "StableDiffusionXLPipeline"
    text_encoders = (
        ("tokenizer", "text_encoder", "CLIPTextModel"),
        ("tokenizer_2", "text_encoder_2", "CLIPTextModelWithProjection"),
    )
    lora_prefixes = ("unet", "text_encoder", "text_encoder_2")

    def encode_tokens(self, components: Components, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """`encoder_hidden_states` (both encoders' penultimate hidden states, concatenated) and `text_embeds`
        (text_encoder_2's pooled projection) for ids of shape (N, 2, length) from `tokenize`."""
        if input_ids.ndim != 3 or input_ids.shape[1] != len(self.text_encoders):
            raise ValueError(f"SDXL token ids must have shape (N, 2, length), got {tuple(input_ids.shape)}.")
        hidden_states = []
        pooled = None
        for position, (_, encoder_name, _) in enumerate(self.text_encoders):
            encoder = components[encoder_name]
            output = encoder(input_ids[:, position].to(module_device(encoder)), output_hidden_states=True)
            # SDXL conditions on the layer before the last (no final layer norm), as its pipeline does.
            hidden_states.append(output.hidden_states[-2])
            if encoder_name == "text_encoder_2":
                pooled = output.text_embeds
        return {"encoder_hidden_states": torch.cat(hidden_states, dim=-1), "text_embeds": pooled}

    def pipeline_options(self, model_index: Mapping[str, Any]) -> dict[str, Any]:
        """The base model's `force_zeros_for_empty_prompt` (True when unset, as in SDXL base), which decides
        the unconditional branch of classifier-free guidance; no watermark on the latents we decode ourselves."""
        return {
            "force_zeros_for_empty_prompt": bool(model_index.get("force_zeros_for_empty_prompt", True)),
            "add_watermarker": False,
        }

    def micro_conditioning(
        self,
        components: Components,
        count: int,
        original_sizes: Optional[Sequence[tuple[int, int]]] = None,
        crops_top_left: Optional[Sequence[tuple[int, int]]] = None,
        target_size: Optional[tuple[int, int]] = None,
    ) -> dict[str, torch.Tensor]:
        """`time_ids` (count, 6): original (h, w) + crop (top, left) + target (h, w) per item, as
        train_text_to_image_lora_sdxl.py's `compute_time_ids`. Defaults: the target size is the model's native
        resolution, the original size equals it, the crop is (0, 0) (an uncropped image at that resolution).

        Example:
            >>> family = StableDiffusionXLFamily()
            >>> family.micro_conditioning({}, 1, [(600, 800)], [(10, 20)], (512, 512))["time_ids"].tolist()
            [[600.0, 800.0, 10.0, 20.0, 512.0, 512.0]]
        """
        if target_size is None:
            target_size = self.native_resolution(components)
        target = (int(target_size[0]), int(target_size[1]))
        originals = [target] * count if original_sizes is None else list(original_sizes)
        crops = [(0, 0)] * count if crops_top_left is None else list(crops_top_left)
        if len(originals) != count or len(crops) != count:
            raise ValueError(
                f"Got {len(originals)} original sizes and {len(crops)} crop positions for {count} items."
            )
        rows = [list(original) + list(crop) + list(target) for original, crop in zip(originals, crops)]
        return {"time_ids": torch.tensor(rows, dtype=torch.float32).reshape(count, 6)}

    def call(self, model: nn.Module, x_t: torch.Tensor, timesteps: torch.Tensor, cond: Mapping[str, torch.Tensor]):
        """`unet(x_t, t, encoder_hidden_states, added_cond_kwargs={"text_embeds", "time_ids"}).sample`."""
        missing = [key for key in ("encoder_hidden_states", "text_embeds", "time_ids") if key not in cond]
        if missing:
            raise ValueError(
                f"SDXL's UNet needs {missing} in the conditioning; build batches from the SDXL family's "
                "encode_prompts (DenoisingBatch.from_conditioning)."
            )
        added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
        hidden = cond["encoder_hidden_states"]
        return model(x_t, timesteps, encoder_hidden_states=hidden, added_cond_kwargs=added).sample


__all__ = ["StableDiffusionXLFamily"]
