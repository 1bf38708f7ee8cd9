"""Seeded generation for text-to-image pipelines, shared by train_unlearn_sd.py, the toy and the mixins.

Every image gets its own initial latent, drawn on the CPU from a seed fixed by (seed, image index), so the
same call gives the same images before and after unlearning, whatever the batch size or device.
"""

from __future__ import annotations

from typing import Sequence

import torch


def _image_seed(seed: int, index: int) -> int:
    return (seed * 1_000_003 + index * 7_919 + 17) % (2**63 - 1)


def initial_latents(pipe, count: int, seed: int, start: int = 0) -> torch.Tensor:
    """The initial noise of images `start .. start + count - 1` for a given seed, on the CPU, float32."""
    channels = pipe.unet.config.in_channels
    size = pipe.unet.config.sample_size
    latents = []
    for index in range(start, start + count):
        generator = torch.Generator("cpu").manual_seed(_image_seed(seed, index))
        latents.append(torch.randn((channels, size, size), generator=generator))
    return torch.stack(latents)


@torch.no_grad()
def generate_images(
    pipe,
    prompts: Sequence[str],
    num_per_prompt: int,
    seed: int = 0,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    batch_size: int = 64,
) -> list[torch.Tensor]:
    """`num_per_prompt` images for each prompt, as one tensor in [-1, 1] of shape (N, C, H, W) per prompt.

    Image i of every prompt starts from the same noise (see `initial_latents`), so prompts and models are
    compared on paired samples.

    Example:
        >>> before = generate_images(pipe, ["a handwritten digit seven"], 64, seed=0)[0]  # doctest: +SKIP
    """
    if num_per_prompt < 1:
        raise ValueError(f"num_per_prompt must be >= 1, got {num_per_prompt}.")
    device = pipe.unet.device
    dtype = pipe.unet.dtype
    results = []
    for prompt in prompts:
        images = []
        for start in range(0, num_per_prompt, batch_size):
            count = min(batch_size, num_per_prompt - start)
            latents = initial_latents(pipe, count, seed, start).to(device, dtype)
            output = pipe(
                [prompt] * count,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                latents=latents,
                output_type="pt",
            ).images
            images.append(output.float().cpu() * 2 - 1)
        results.append(torch.cat(images).clamp(-1, 1))
    return results


def tokenize(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """Token ids padded to the tokenizer's `model_max_length` (77 for CLIP), as Stable Diffusion encodes prompts."""
    return tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Scaled VAE latents (the mode of the latent distribution, so caching is deterministic), float32 on CPU.

    Computed once before training, so the VAE can leave the accelerator while the UNet trains.
    """
    latents = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size].to(vae.device, vae.dtype)
        latents.append(vae.encode(chunk).latent_dist.mode().float().cpu() * vae.config.scaling_factor)
    return torch.cat(latents)


@torch.no_grad()
def encode_prompts(text_encoder, input_ids: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """The text encoder's last hidden states for token ids (Stable Diffusion's conditioning), float32 on CPU."""
    hidden = []
    for start in range(0, len(input_ids), batch_size):
        hidden.append(text_encoder(input_ids[start : start + batch_size].to(text_encoder.device))[0].float().cpu())
    return torch.cat(hidden)
