"""Seeded generation for text-to-image pipelines, shared by train_unlearn_sd.py, the toy and the mixins.

Every image gets its own initial latent, drawn on the CPU from a seed fixed by (seed, image index), so the
same call gives the same images before and after unlearning, whatever the batch size or device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Optional, Sequence

import torch


def _image_seed(seed: int, index: int) -> int:
    return (seed * 1_000_003 + index * 7_919 + 17) % (2**63 - 1)


def _component(pipe, name: str):
    """A component of a pipeline, or of a mapping of components (None when absent)."""
    if isinstance(pipe, Mapping):
        return pipe.get(name)
    return getattr(pipe, name, None)


def vae_scale_factor(pipe) -> int:
    """Pixels per latent cell: 2^(number of VAE blocks - 1), as diffusers' pipelines compute it; 1 without a VAE
    (a pixel-space UNet). `pipe` is a pipeline or a mapping of its components."""
    vae = _component(pipe, "vae")
    if vae is None:
        return 1
    return 2 ** (len(vae.config.block_out_channels) - 1)


def denoiser_of(pipe):
    """The pipeline's denoiser: its `unet`, or its `transformer` (SD3, Flux)."""
    unet = _component(pipe, "unet")
    return unet if unet is not None else _component(pipe, "transformer")


def latent_size(pipe, height: Optional[int] = None, width: Optional[int] = None) -> tuple[int, int]:
    """(rows, columns) of the latents for images of `height` x `width` pixels. Either defaults to the model's
    native size (the denoiser's `sample_size`, or the pipeline's `default_sample_size`, times the VAE scale
    factor, diffusers' default). Raises ValueError when a size is not a multiple of the VAE scale factor."""
    sample_size = getattr(denoiser_of(pipe).config, "sample_size", None) or _component(pipe, "default_sample_size")
    native = tuple(sample_size) if isinstance(sample_size, (list, tuple)) else (sample_size, sample_size)
    if height is None and width is None:
        return native
    factor = vae_scale_factor(pipe)
    height = native[0] * factor if height is None else int(height)
    width = native[1] * factor if width is None else int(width)
    if height < factor or width < factor or height % factor or width % factor:
        raise ValueError(f"Image size {height}x{width} is not a positive multiple of the VAE scale factor {factor}.")
    return height // factor, width // factor


def initial_latents(
    pipe, count: int, seed: int, start: int = 0, height: Optional[int] = None, width: Optional[int] = None
) -> torch.Tensor:
    """The initial noise of images `start .. start + count - 1` for a given seed, on the CPU, float32.

    `height` and `width` are the image size in pixels (default: the model's native size, see `latent_size`).
    `pipe` is a pipeline or a mapping with its `unet` (and `vae`, to size latents from pixels)."""
    vae = _component(pipe, "vae")
    # The VAE's latent channels (Flux's transformer takes them packed four to a token); a pixel UNet's own.
    channels = vae.config.latent_channels if vae is not None else denoiser_of(pipe).config.in_channels
    rows, columns = latent_size(pipe, height, width)
    latents = []
    for index in range(start, start + count):
        generator = torch.Generator("cpu").manual_seed(_image_seed(seed, index))
        latents.append(torch.randn((channels, rows, columns), generator=generator))
    return torch.stack(latents)


@contextlib.contextmanager
def vae_precision(vae):
    """Run the VAE in its own dtype, outside any autocast; a float16 VAE whose config sets `force_upcast`
    (SD's and SDXL's VAEs overflow in float16) runs in float32 meanwhile, as diffusers' pipelines do."""
    upcast = vae.dtype == torch.float16 and bool(vae.config.get("force_upcast", False))
    if upcast:
        vae.float()  # not to(dtype), on which diffusers logs a warning every time
    try:
        with torch.autocast(vae.device.type, enabled=False):
            yield
    finally:
        if upcast:
            vae.half()


def unscale_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Denoiser latents -> what the VAE decodes: the inverse of `families.base.normalize_latents`
    (`z * latents_std / scaling_factor + latents_mean` with latent statistics, else `z / scaling_factor +
    shift_factor`), as diffusers' pipelines un-normalise before decoding."""
    mean, std = vae.config.get("latents_mean"), vae.config.get("latents_std")
    if mean is not None and std is not None:
        mean, std = (torch.tensor(v).view(1, -1, 1, 1).to(latents.device, latents.dtype) for v in (mean, std))
        return latents * std / vae.config.scaling_factor + mean
    latents = latents / vae.config.scaling_factor
    shift = vae.config.get("shift_factor")
    return latents if shift is None else latents + shift


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Denoiser latents -> images in [-1, 1], float32 on the CPU (see `vae_precision`)."""
    with vae_precision(vae):
        images = vae.decode(unscale_latents(vae, latents.to(vae.device, vae.dtype)), return_dict=False)[0]
    # diffusers' postprocessing to [0, 1] and back, so float32 results equal the pipeline's own "pt" output.
    return (images * 0.5 + 0.5).clamp(0, 1).float().cpu() * 2 - 1


@torch.no_grad()
def generate_images(
    pipe,
    prompts: Sequence[str],
    num_per_prompt: int,
    seed: int = 0,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    batch_size: int = 64,
    height: Optional[int] = None,
    width: Optional[int] = None,
    max_sequence_length: Optional[int] = None,
) -> list[torch.Tensor]:
    """`num_per_prompt` images for each prompt, as one tensor in [-1, 1] of shape (N, C, H, W) per prompt.

    Image i of every prompt starts from the same noise (see `initial_latents`), so prompts and models are
    compared on paired samples. `height` and `width` (pixels) default to the model's native size;
    `max_sequence_length` (SD3, Flux: T5's padded length) is passed to the pipeline when given. The pipeline
    returns latents, which `decode_latents` turns into images: the VAE runs outside autocast (float32 if it
    must be upcast) and no safety checker runs, since the metrics need the model's own images. Run the call
    under autocast for a model whose weights are in several dtypes (half-precision base, float32 adapter).

    Example:
        >>> before = generate_images(pipe, ["a handwritten digit seven"], 64, seed=0)[0]  # doctest: +SKIP
    """
    from ..families import family_of_pipeline

    if num_per_prompt < 1:
        raise ValueError(f"num_per_prompt must be >= 1, got {num_per_prompt}.")
    family = family_of_pipeline(pipe)
    device = denoiser_of(pipe).device
    dtype = denoiser_of(pipe).dtype
    rows, columns = latent_size(pipe, height, width)
    factor = vae_scale_factor(pipe)
    options = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
    results = []
    for prompt in prompts:
        images = []
        for start in range(0, num_per_prompt, batch_size):
            count = min(batch_size, num_per_prompt - start)
            latents = initial_latents(pipe, count, seed, start, rows * factor, columns * factor).to(device, dtype)
            if family is not None:  # Flux takes and returns packed latents
                latents = family.latents_to_pipeline(latents)
            output = pipe(
                [prompt] * count,
                height=rows * factor,
                width=columns * factor,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                latents=latents,
                output_type="latent",
                **options,
            ).images
            if family is not None:
                output = family.latents_from_pipeline(output, rows, columns)
            images.append(decode_latents(pipe.vae, output))
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

    `families.base.normalize_latents` applies the VAE's scaling factor and, when its config has them,
    `shift_factor` or `latents_mean`/`latents_std`; `vae_precision` keeps a float16 VAE that must be upcast in
    float32.
    Computed once before training, so the VAE can leave the accelerator while the UNet trains.
    """
    from ..families.base import normalize_latents

    latents = []
    with vae_precision(vae):
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size].to(vae.device, vae.dtype)
            latents.append(normalize_latents(vae.encode(chunk).latent_dist.mode().float().cpu(), vae.config))
    return torch.cat(latents)


@torch.no_grad()
def encode_prompts(text_encoder, input_ids: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """The text encoder's last hidden states for token ids (Stable Diffusion's conditioning), float32 on CPU."""
    hidden = []
    for start in range(0, len(input_ids), batch_size):
        hidden.append(text_encoder(input_ids[start : start + batch_size].to(text_encoder.device))[0].float().cpu())
    return torch.cat(hidden)
