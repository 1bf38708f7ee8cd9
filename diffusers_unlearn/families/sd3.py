"""Stable Diffusion 3 / 3.5: an MMDiT transformer, two CLIP text encoders with projection and an optional T5.

The facts, from diffusers' `StableDiffusion3Pipeline.encode_prompt` and `train_dreambooth_lora_sd3.py`:
- both CLIP tokenizers pad to the first one's `model_max_length` (77); the conditioning takes each CLIP encoder's
  PENULTIMATE hidden states, concatenated on the feature axis, zero-padded on that axis to T5's width, then
  followed on the SEQUENCE axis by T5's last hidden states (T5 padded to `max_sequence_length`);
- a pipeline saved without T5 (`text_encoder_3` null in `model_index.json`) uses zeros of shape
  (max_sequence_length, transformer.config.joint_attention_dim) in T5's place, as the pipeline does;
- `pooled_projections` is both CLIP encoders' pooled, projected `text_embeds`, concatenated;
- the transformer is called as `transformer(hidden_states=x_t, timestep=t, encoder_hidden_states=...,
  pooled_projections=...)` with the scheduler's timesteps (sigma * 1000) and predicts the velocity;
- `--max_sequence_length` defaults to 77 in the official SD3 LoRA script (the pipeline samples with 256 by
  default; pass the same value to both to condition them identically), and `--precondition_outputs` regresses
  x_sigma - sigma * v onto x_0 instead of v onto eps - x_0;
- latents are `(z - shift_factor) * scaling_factor` (`ModelFamily.encode_images`);
- LoRA files hold `transformer.`, `text_encoder.` and `text_encoder_2.` keys (T5 is not trained);
  `StableDiffusion3Pipeline.load_lora_weights` reads all three.

Example:
    >>> from diffusers_unlearn.families import get_family
    >>> family = get_family("sd3")
    >>> family.component_names
    ('transformer', 'vae', 'scheduler', 'tokenizer', 'text_encoder', 'tokenizer_2', 'text_encoder_2')
    >>> family.lora_targets("attention")[-4:]
    ('add_q_proj', 'add_k_proj', 'add_v_proj', 'to_add_out')
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .base import Components, module_device
from .flow import FlowMatchingFamily

# The joint-attention projections of the MMDiT blocks: the image stream's (to_q, to_k, to_v, to_out.0) and the
# text stream's (add_q_proj, add_k_proj, add_v_proj, to_add_out), the default targets of diffusers' SD3 and Flux
# LoRA scripts.
TRANSFORMER_ATTENTION_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
)
# Plus both streams' feed-forward layers (the Flux LoRA script's default target list).
TRANSFORMER_MLP_TARGETS = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")

TRANSFORMER_LORA_TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "attention": TRANSFORMER_ATTENTION_TARGETS,
    "attention_mlp": TRANSFORMER_ATTENTION_TARGETS + TRANSFORMER_MLP_TARGETS,
}


class StableDiffusion3Family(FlowMatchingFamily):
    """SD3 / SD3.5 (`StableDiffusion3Pipeline`).

    Options (see `with_options`): `max_sequence_length` (T5, default 77 as in the official script),
    `weighting_scheme`, `logit_mean`, `logit_std`, `mode_scale` and `precondition_outputs`.

    Example:
        >>> StableDiffusion3Family().with_options(precondition_outputs=True).schedule_options()["precondition_outputs"]
        True
    """

    name = "sd3"
    pipeline_class_names = ("StableDiffusion3Pipeline",)
    plain_pipeline_class_name = "StableDiffusion3Pipeline"
    text_encoders = (
        ("tokenizer", "text_encoder", "CLIPTextModelWithProjection"),
        ("tokenizer_2", "text_encoder_2", "CLIPTextModelWithProjection"),
        ("tokenizer_3", "text_encoder_3", "T5EncoderModel"),
    )
    tokenizer_class_names = {"tokenizer_3": "T5TokenizerFast"}
    optional_text_encoders = ("text_encoder_3",)
    denoiser_class_name = "SD3Transformer2DModel"
    lora_prefixes = ("transformer", "text_encoder", "text_encoder_2")
    lora_target_presets = TRANSFORMER_LORA_TARGET_PRESETS
    option_defaults = {**FlowMatchingFamily.option_defaults, "precondition_outputs": False}

    def schedule_options(self) -> dict[str, Any]:
        return {**super().schedule_options(), "precondition_outputs": bool(self.precondition_outputs)}

    def _tokenizer_length(self, components: Components, tokenizer_name: str) -> int:
        # Both CLIP tokenizers pad to the first one's length, as the pipeline's `tokenizer_max_length`.
        if tokenizer_name == "tokenizer_3":
            return int(self.max_sequence_length)
        return int(components["tokenizer"].model_max_length)

    def encode_tokens(self, components: Components, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """`encoder_hidden_states` (N, 77 + max_sequence_length, T5 width) and `pooled_projections` (N, both
        CLIP projection widths) of ids from `tokenize`, as `StableDiffusion3Pipeline.encode_prompt` builds them.

        Example:
            >>> cond = family.encode_tokens(components, family.tokenize(components, ["a cat"]))  # doctest: +SKIP
            >>> sorted(cond)  # doctest: +SKIP
            ['encoder_hidden_states', 'pooled_projections']
        """
        ids = self._split(components, input_ids)
        hidden_states, pooled = [], []
        for tokenizer_name, encoder_name in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
            encoder = components[encoder_name]
            output = encoder(ids[tokenizer_name].to(module_device(encoder)), output_hidden_states=True)
            hidden_states.append(output.hidden_states[-2])
            pooled.append(output.text_embeds)
        clip = torch.cat(hidden_states, dim=-1)
        t5_encoder = components.get("text_encoder_3")
        if t5_encoder is not None:
            t5 = t5_encoder(ids["tokenizer_3"].to(module_device(t5_encoder)))[0].to(clip.device, clip.dtype)
        else:
            width = components["transformer"].config.joint_attention_dim
            t5 = clip.new_zeros(len(clip), int(self.max_sequence_length), width)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"encoder_hidden_states": torch.cat([clip, t5], dim=-2), "pooled_projections": torch.cat(pooled, -1)}

    @staticmethod
    def native_resolution(components: Components) -> tuple[int, int]:
        """(height, width) the pipeline samples by default: the transformer's `sample_size` times the VAE's scale."""
        size = int(components["transformer"].config.sample_size) * FlowMatchingFamily.vae_scale_factor(components)
        return size, size

    default_guidance_scale = 7.0  # StableDiffusion3Pipeline's

    def call(self, model: nn.Module, x_t: torch.Tensor, timesteps: torch.Tensor, cond: Mapping[str, torch.Tensor]):
        """`transformer(hidden_states=x_t, timestep=t, encoder_hidden_states, pooled_projections).sample`, as the
        official SD3 script calls it; `timesteps` are the scheduler's (sigma * 1000), passed as they are."""
        missing = [key for key in ("encoder_hidden_states", "pooled_projections") if key not in cond]
        if missing:
            raise ValueError(
                f"SD3's transformer needs {missing} in the conditioning; build batches from the SD3 family's "
                "encode_prompts (DenoisingBatch.from_conditioning)."
            )
        return model(
            hidden_states=x_t,
            timestep=timesteps,
            encoder_hidden_states=cond["encoder_hidden_states"],
            pooled_projections=cond["pooled_projections"],
        ).sample


__all__ = ["StableDiffusion3Family", "TRANSFORMER_LORA_TARGET_PRESETS"]
