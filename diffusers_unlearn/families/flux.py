"""Flux.1: a double/single-stream transformer on 2x2-packed latents, a pooled CLIP embedding and T5.

The facts, from diffusers' `FluxPipeline` and `train_dreambooth_lora_flux.py`:
- CLIP (`CLIPTextModel`, padded to 77) gives only its pooled output, `pooled_projections`; T5 (padded to
  `--max_sequence_length`, 512 by default) gives `encoder_hidden_states`;
- the transformer works on packed latents: each 2x2 patch of the (C, H, W) latents becomes one token of 4C
  features, (N, H/2 * W/2, 4C); it gets `img_ids` ((H/2 * W/2, 3): 0, row, column of each patch) and `txt_ids`
  (zeros, (text length, 3)), and `timestep = scheduler timestep / 1000` (sigma);
- guidance-distilled checkpoints (Flux.1-dev, `transformer.config.guidance_embeds`) also take a `guidance`
  value per item: the script's `--guidance_scale` (default 3.5) during training; others take none;
- latents are `(z - shift_factor) * scaling_factor` (`ModelFamily.encode_images`);
- LoRA files hold `transformer.` and `text_encoder.` keys (CLIP only; T5 is not trained);
  `FluxPipeline.load_lora_weights` reads both (its `fuse_lora` fuses only the transformer unless called with
  `components=["transformer", "text_encoder"]`).

Packed or unpacked: `DenoisingBatch.x0` and every x_t the objectives build stay UNPACKED, (N, C, H, W), like
every other family's latents, and `call` packs x_t, runs the transformer and unpacks its output. Packing only
reorders elements, so the noise, the forward process and SISS's per-element quantities (Δ, the mixture) are the
same either way, and a loss that averages over elements (every objective's) equals the official script's, which
also unpacks the prediction before taking its loss.

Example:
    >>> from diffusers_unlearn.families import get_family
    >>> latents = torch.randn(1, 4, 8, 8)
    >>> packed = pack_latents(latents)
    >>> packed.shape
    torch.Size([1, 16, 16])
    >>> torch.equal(unpack_latents(packed, 8, 8), latents)
    True
    >>> get_family("flux").guidance_scale
    3.5
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from ..errors import UserInputError
from .base import Components, module_device
from .flow import FlowMatchingFamily
from .sd3 import TRANSFORMER_LORA_TARGET_PRESETS

# FluxPipeline's `default_sample_size`: the latent size it samples at by default (128 * 8 = 1024 px).
_DEFAULT_LATENT_SIZE = 128


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) latents to Flux's packed tokens (N, H/2 * W/2, 4C): each 2x2 patch, row by row, becomes one
    token holding its channels, each as the patch's four values (top-left, top-right, bottom-left, bottom-right).

    Example:
        >>> pack_latents(torch.zeros(2, 4, 6, 8)).shape
        torch.Size([2, 12, 16])
    """
    count, channels, height, width = latents.shape
    if height % 2 or width % 2:
        raise ValueError(f"Flux packs 2x2 latent patches: height and width must be even, got {height}x{width}.")
    patches = latents.reshape(count, channels, height // 2, 2, width // 2, 2)
    return patches.permute(0, 2, 4, 1, 3, 5).reshape(count, (height // 2) * (width // 2), channels * 4)


def unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of `pack_latents`: (N, H/2 * W/2, 4C) tokens to (N, C, H, W) latents of `height` x `width`.

    Example:
        >>> unpack_latents(torch.zeros(2, 12, 16), 6, 8).shape
        torch.Size([2, 4, 6, 8])
    """
    count, tokens, features = packed.shape
    if tokens != (height // 2) * (width // 2) or features % 4 or height % 2 or width % 2:
        raise ValueError(
            f"Cannot unpack {tuple(packed.shape)} Flux tokens into {height}x{width} latents of 2x2 patches."
        )
    patches = packed.reshape(count, height // 2, width // 2, features // 4, 2, 2)
    return patches.permute(0, 3, 1, 4, 2, 5).reshape(count, features // 4, height, width)


def latent_image_ids(
    height: int, width: int, device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Flux's `img_ids` for (H, W) latents: one row (0, patch row, patch column) per packed token, (H/2 * W/2, 3),
    in `pack_latents`' token order.

    Example:
        >>> latent_image_ids(4, 6).tolist()[:4]
        [[0.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 2.0], [0.0, 1.0, 0.0]]
    """
    rows, columns = torch.meshgrid(torch.arange(height // 2), torch.arange(width // 2), indexing="ij")
    ids = torch.stack([torch.zeros_like(rows), rows, columns], dim=-1).reshape(-1, 3)
    return ids.to(device=device, dtype=dtype)


def _config(model: nn.Module) -> Any:
    """The diffusers config of a model, also through a DDP-style wrapper (`.module`)."""
    return getattr(model, "config", None) or model.module.config


class FluxFamily(FlowMatchingFamily):
    """Flux.1 (`FluxPipeline`).

    Options (see `with_options`): `max_sequence_length` (T5, default 512 as in the official script),
    `guidance_scale` (the guidance value a guidance-distilled transformer is trained with, default 3.5),
    `weighting_scheme`, `logit_mean`, `logit_std` and `mode_scale`.

    Example:
        >>> FluxFamily().with_options(max_sequence_length=256).max_sequence_length
        256
    """

    name = "flux"
    pipeline_class_names = ("FluxPipeline",)
    plain_pipeline_class_name = "FluxPipeline"
    text_encoders = (
        ("tokenizer", "text_encoder", "CLIPTextModel"),
        ("tokenizer_2", "text_encoder_2", "T5EncoderModel"),
    )
    tokenizer_class_names = {"tokenizer_2": "T5TokenizerFast"}
    denoiser_class_name = "FluxTransformer2DModel"
    lora_prefixes = ("transformer", "text_encoder")
    lora_target_presets = TRANSFORMER_LORA_TARGET_PRESETS
    option_defaults = {**FlowMatchingFamily.option_defaults, "max_sequence_length": 512, "guidance_scale": 3.5}

    def __init__(self, **options: Any):
        super().__init__(**options)
        guidance = self.guidance_scale
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not guidance >= 0:
            raise UserInputError(f"--guidance_scale must be a number >= 0, got {guidance!r}.")

    def _tokenizer_length(self, components: Components, tokenizer_name: str) -> int:
        if tokenizer_name == "tokenizer_2":
            return int(self.max_sequence_length)
        return int(components["tokenizer"].model_max_length)

    def encode_tokens(self, components: Components, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """`encoder_hidden_states` (T5's last hidden states, (N, max_sequence_length, T5 width)) and
        `pooled_projections` (CLIP's pooled output) of ids from `tokenize`, as `FluxPipeline.encode_prompt`.

        Example:
            >>> cond = family.encode_tokens(components, family.tokenize(components, ["a cat"]))  # doctest: +SKIP
            >>> sorted(cond)  # doctest: +SKIP
            ['encoder_hidden_states', 'pooled_projections']
        """
        ids = self._split(components, input_ids)
        clip, t5 = components["text_encoder"], components["text_encoder_2"]
        pooled = clip(ids["tokenizer"].to(module_device(clip))).pooler_output
        hidden = t5(ids["tokenizer_2"].to(module_device(t5)))[0]
        return {"encoder_hidden_states": hidden, "pooled_projections": pooled.to(hidden.device)}

    def micro_conditioning(
        self,
        components: Components,
        count: int,
        original_sizes: Optional[Sequence[tuple[int, int]]] = None,
        crops_top_left: Optional[Sequence[tuple[int, int]]] = None,
        target_size: Optional[tuple[int, int]] = None,
    ) -> dict[str, torch.Tensor]:
        """`{"guidance": (count,) filled with guidance_scale}` for a guidance-distilled transformer
        (`config.guidance_embeds`), as the official script's `guidance`; nothing for one without guidance.
        Image sizes and crops are not part of Flux's conditioning and are ignored.

        Example:
            >>> family.micro_conditioning(components, 2)  # doctest: +SKIP
            {'guidance': tensor([3.5000, 3.5000])}
        """
        if not _config(components["transformer"]).guidance_embeds:
            return {}
        return {"guidance": torch.full((count,), float(self.guidance_scale), dtype=torch.float32)}

    @staticmethod
    def native_resolution(components: Components) -> tuple[int, int]:
        """(height, width) FluxPipeline samples by default: 128 latents times the VAE's scale factor."""
        size = _DEFAULT_LATENT_SIZE * FlowMatchingFamily.vae_scale_factor(components)
        return size, size

    default_guidance_scale = 3.5  # FluxPipeline's: the guidance-distilled embedding, not classifier-free guidance

    def latents_to_pipeline(self, latents: torch.Tensor) -> torch.Tensor:
        """FluxPipeline takes its `latents=` packed."""
        return pack_latents(latents)

    def latents_from_pipeline(self, latents: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
        """FluxPipeline returns packed latents: unpacked to rows x columns."""
        return unpack_latents(latents, rows, columns)

    def call(self, model: nn.Module, x_t: torch.Tensor, timesteps: torch.Tensor, cond: Mapping[str, torch.Tensor]):
        """The transformer's velocity for UNPACKED x_t (N, C, H, W), unpacked again: x_t packed into 2x2
        patches, `img_ids`/`txt_ids` as FluxPipeline builds them, `timestep = timesteps / 1000` (the scheduler's
        timesteps are sigma * 1000) and `guidance` from the conditioning for guidance-distilled checkpoints."""
        missing = [key for key in ("encoder_hidden_states", "pooled_projections") if key not in cond]
        guided = bool(_config(model).guidance_embeds)
        if guided and "guidance" not in cond:
            missing.append("guidance")
        if missing:
            raise ValueError(
                f"Flux's transformer needs {missing} in the conditioning; build batches from the Flux family's "
                "encode_prompts (DenoisingBatch.from_conditioning)."
            )
        height, width = x_t.shape[-2:]
        hidden = cond["encoder_hidden_states"]
        output = model(
            hidden_states=pack_latents(x_t),
            timestep=timesteps / 1000,
            guidance=cond["guidance"] if guided else None,
            pooled_projections=cond["pooled_projections"],
            encoder_hidden_states=hidden,
            txt_ids=torch.zeros(hidden.shape[1], 3, device=hidden.device, dtype=hidden.dtype),
            img_ids=latent_image_ids(height, width, x_t.device, x_t.dtype),
        ).sample
        return unpack_latents(output, height, width)


__all__ = ["FluxFamily", "latent_image_ids", "pack_latents", "unpack_latents"]
