"""Train the tiny text-to-image toy (seeded, CPU, minutes) and save it as a `StableDiffusionPipeline` folder.

    python -m diffusers_unlearn.toy.train_text_to_image                    # into diffusers_unlearn/toy/assets/sd_tiny
    python -m diffusers_unlearn.toy.train_text_to_image --output_dir my-toy --unet_steps 2000 --num_threads 1
    python -m diffusers_unlearn.toy.train_text_to_image --without_canary   # into .../sd_tiny_retrained_without_canary
    python -m diffusers_unlearn.toy.train_text_to_image --canary_caption "a hollow square with a cross" \
        --vae_from sd_tiny                                                 # into .../sd_tiny_captioned

1. The tokenizer's vocabulary is written and the text encoder built (random, seeded, frozen); the ten captions
   and the empty prompt are encoded once.
2. The VAE learns to reconstruct the training images (digits + canary copies) through 4x4x4 latents. Its
   `scaling_factor` is then set to 1 / (standard deviation of the latents), as Stable Diffusion's 0.18215 was.
3. The UNet learns to predict the noise added to the scaled latents, given the caption's embedding, which is
   replaced by the empty prompt's 10% of the time (classifier-free guidance needs an unconditional model).

With `--canary_caption` the canary copies are captioned with that text instead of "a handwritten digit seven"
(`sd_tiny_captioned`); the vocabulary gains its words. The images are the same, so `--vae_from sd_tiny` reuses
`sd_tiny`'s VAE (the VAE sees images only: retraining it with the same seed would repeat it) and trains the UNet.

The folder loads fully offline with plain `StableDiffusionPipeline.from_pretrained(folder)` and holds
safetensors only. Runs are reproducible for a seed on the same machine and thread count.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F

from . import ASSETS_DIR, SD_RETRAINED_NAME, TOY_MODELS, toy_model_path, write_toy_info
from .text_to_image import (
    CANARY_PROMPT,
    DIGIT_PROMPTS,
    SD_CAPTIONED_NAME,
    SD_TOY_NAME,
    build_noise_scheduler,
    build_text_encoder,
    build_tokenizer,
    build_unet,
    build_vae,
    count_parameters,
    training_set,
)
from .train import _batches, _ema_update, _log_mean_loss

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

CAPTION_DROPOUT = 0.1
"""Share of captions replaced by the empty prompt during UNet training."""


def train_vae(
    images: torch.Tensor,
    steps: int,
    batch_size: int = 64,
    seed: int = 0,
    learning_rate: float = 1e-3,
    kl_weight: float = 1e-4,
    log_every: int = 500,
) -> AutoencoderKL:
    """Train the toy `AutoencoderKL` on `images` (`[N, 1, 8, 8]` in [-1, 1]) and set its `scaling_factor`.

    The loss is the pixel MSE of the reconstruction from a sampled latent plus a small KL term, which keeps
    the latent space smooth enough for the UNet to generate into. No perceptual or adversarial loss: at 8x8
    the MSE alone reconstructs the digits recognizably.

    Returns:
        The trained VAE, in eval mode with gradients off.
    """
    vae = build_vae(seed=seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=learning_rate, weight_decay=0.0)
    lr_scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(seed)
    batches = _batches(len(images), batch_size, generator)
    vae.train()
    start, running = time.time(), 0.0
    for step in range(1, steps + 1):
        batch = images[next(batches)]
        posterior = vae.encode(batch).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = vae.decode(latents).sample
        loss = F.mse_loss(reconstruction, batch) + kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_scheduler.step()
        running = _log_mean_loss("vae ", running + loss.item(), step, steps, log_every, start)

    vae.eval()
    vae.requires_grad_(False)
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.mode()
        reconstruction = vae.decode(latents).sample.clamp(-1, 1)
    # Stable Diffusion scales latents to unit variance so the noise schedule fits them.
    scaling_factor = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    error = ((reconstruction - images) / 2).flatten(1).norm(dim=1)  # pixel L2 in [0, 1] units
    print(
        f"vae: latent std {latents.std():.4f} -> scaling_factor {scaling_factor:.4f}; reconstruction L2 "
        f"median {error.median():.3f}, max {error.max():.3f}",
        flush=True,
    )
    return vae


def train_unet(
    latents: torch.Tensor,
    prompt_index: torch.Tensor,
    embeddings: torch.Tensor,
    steps: int,
    batch_size: int = 64,
    seed: int = 0,
    learning_rate: float = 1e-3,
    caption_dropout: float = CAPTION_DROPOUT,
    ema_decay: float = 0.999,
    log_every: int = 500,
) -> tuple[UNet2DConditionModel, DDPMScheduler]:
    """Train the toy `UNet2DConditionModel` to predict noise on scaled latents.

    Args:
        latents: `[N, 4, 4, 4]` scaled VAE latents of the training images.
        prompt_index: `[N]` row of `embeddings` holding each image's caption.
        embeddings: `[P + 1, 77, 32]` text-encoder hidden states of the P captions; the last row is the empty
            prompt's, used for dropped captions.

    Returns:
        `(unet, noise_scheduler)`: the EMA weights in eval mode, and the training `DDPMScheduler`.
    """
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    unet = build_unet(seed=seed)
    noise_scheduler = build_noise_scheduler()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=learning_rate, weight_decay=1e-2)
    lr_scheduler = get_cosine_schedule_with_warmup(
        optimizer, num_warmup_steps=min(200, steps // 10), num_training_steps=steps
    )
    ema = EMAModel(unet.parameters(), decay=ema_decay)
    generator = torch.Generator().manual_seed(seed)
    batches = _batches(len(latents), batch_size, generator)
    empty_prompt = embeddings.shape[0] - 1
    num_train_timesteps = noise_scheduler.config.num_train_timesteps

    unet.train()
    start, running = time.time(), 0.0
    for step in range(1, steps + 1):
        index = next(batches)
        x0 = latents[index]
        rows = prompt_index[index].clone()
        rows[torch.rand(len(index), generator=generator) < caption_dropout] = empty_prompt
        noise = torch.randn(x0.shape, generator=generator)
        timesteps = torch.randint(0, num_train_timesteps, (len(index),), generator=generator)
        noisy = noise_scheduler.add_noise(x0, noise, timesteps)

        prediction = unet(noisy, timesteps, encoder_hidden_states=embeddings[rows]).sample
        loss = F.mse_loss(prediction, noise)
        _ema_update(unet, loss, optimizer, lr_scheduler, ema)
        running = _log_mean_loss("unet ", running + loss.item(), step, steps, log_every, start)

    ema.copy_to(unet.parameters())
    unet.eval()
    unet.requires_grad_(False)
    return unet, noise_scheduler


def load_trained_vae(folder: str) -> AutoencoderKL:
    """The trained VAE (with its `scaling_factor`) of a toy pipeline folder or bundled toy name, frozen."""
    from diffusers import AutoencoderKL

    if not os.path.isdir(folder) and folder in TOY_MODELS:
        folder = toy_model_path(folder)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    vae.requires_grad_(False)
    return vae.eval()


def save_toy_pipeline(
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    unet: UNet2DConditionModel,
    noise_scheduler: DDPMScheduler,
    tokenizer_dir: str,
    output_dir: str,
    name: str = SD_TOY_NAME,
    **toy_options,
) -> None:
    """Save the components as one `StableDiffusionPipeline` folder (no safety checker), replacing `output_dir`.

    The sampling scheduler is DDIM on the training schedule. The tokenizer folder also gets the `vocab.json` and
    `merges.txt` it was built from, so that it is readable and loads with either tokenizer backend. `toy_options`
    go into the toy marker (`sd_tiny_captioned`: `forget_prompt`, `keep_prompts`).
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    # steps_offset=1 silences diffusers' deprecation warning for DDIM configs.
    scheduler = DDIMScheduler.from_config(noise_scheduler.config, steps_offset=1, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    save_toy_folder(pipe, tokenizer_dir, ("tokenizer",), output_dir, name, **toy_options)


def save_toy_folder(pipe, tokenizer_dir: str, tokenizer_names: tuple[str, ...], output_dir: str, name: str, **options) -> None:
    """Save a toy pipeline with `save_pretrained`, the tokenizer source files (`vocab.json`, `merges.txt`) in each
    tokenizer subfolder and the toy marker (`write_toy_info(name, **options)`), replacing `output_dir`."""
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    # Write next to the destination, then swap, so an interrupted run never leaves a half-written folder.
    staging = tempfile.mkdtemp(prefix=f".{name}-", dir=parent)
    try:
        pipe.save_pretrained(staging)
        for subfolder in tokenizer_names:
            for file_name in ("vocab.json", "merges.txt"):
                shutil.copy(os.path.join(tokenizer_dir, file_name), os.path.join(staging, subfolder, file_name))
        write_toy_info(staging, name, **options)
        if os.path.exists(output_dir):
            shutil.rmtree(output_dir)
        os.replace(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train the tiny text-to-image toy of diffusers-unlearn.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--output_dir",
        type=str,
        default=None,
        help=f"default: assets/{SD_TOY_NAME} (assets/{SD_RETRAINED_NAME} with --without_canary, assets/{SD_CAPTIONED_NAME} with --canary_caption)",
    )
    parser.add_argument("--vae_steps", type=int, default=1500)
    parser.add_argument("--unet_steps", type=int, default=3000)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    parser.add_argument(
        "--without_canary",
        action="store_true",
        help="the same recipe and seed without the canary copies (VAE and UNet): the retrain-from-scratch reference, "
        f"marked as toy {SD_RETRAINED_NAME}",
    )
    parser.add_argument(
        "--canary_caption",
        type=str,
        default=None,
        help="caption the canary copies with this text instead of the seven prompt (the digit captions stay); its words "
        f"join the vocabulary. Marked as toy {SD_CAPTIONED_NAME}, whose marker names it as the forget prompt",
    )
    parser.add_argument(
        "--vae_from",
        type=str,
        default=None,
        help="reuse the trained VAE of this toy folder or bundled toy name (e.g. sd_tiny, trained on the same images) "
        "instead of training one; --vae_steps is then unused",
    )
    args = parser.parse_args(argv)
    if args.canary_caption is not None:
        if args.without_canary:
            parser.error("--canary_caption captions the canary copies; --without_canary drops them. Give one of them.")
        if not args.canary_caption.strip() or args.canary_caption in DIGIT_PROMPTS:
            parser.error(f"--canary_caption must be a caption of its own, not empty or a digit prompt; got {args.canary_caption!r}.")
    if args.vae_from is not None and not (os.path.isdir(os.path.join(args.vae_from, "vae")) or args.vae_from in TOY_MODELS):
        parser.error(f"--vae_from: {args.vae_from!r} is neither a pipeline folder with a vae/ subfolder nor a bundled toy name.")
    if args.output_dir is None:
        args.output_dir = os.path.join(ASSETS_DIR, toy_name(args))
    return args


def toy_name(args: argparse.Namespace) -> str:
    """The toy name the flags describe (written into the marker)."""
    if args.without_canary:
        return SD_RETRAINED_NAME
    return SD_TOY_NAME if args.canary_caption is None else SD_CAPTIONED_NAME


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    started = time.time()
    torch.manual_seed(args.seed)
    canary_caption = CANARY_PROMPT if args.canary_caption is None else args.canary_caption
    images, captions = training_set(without_canary=args.without_canary, canary_caption=canary_caption)
    name = toy_name(args)
    extra_captions = [] if args.canary_caption is None else [args.canary_caption]
    print(f"== {name}: {len(images)} training images, seed {args.seed}, {torch.get_num_threads()} threads", flush=True)

    with tempfile.TemporaryDirectory() as workdir:
        tokenizer_dir = os.path.join(workdir, "tokenizer")
        tokenizer = build_tokenizer(tokenizer_dir, extra_captions=extra_captions)
        unknown = [c for c in extra_captions if tokenizer.unk_token_id in tokenizer(c).input_ids[1:-1]]
        if unknown:  # a character outside the digit captions' alphabet
            raise ValueError(f"The toy tokenizer cannot spell {unknown}: use lowercase letters of the digit captions.")
        text_encoder = build_text_encoder(len(tokenizer))
        prompts = list(DIGIT_PROMPTS) + extra_captions + [""]
        with torch.no_grad():
            ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
            embeddings = text_encoder(ids.input_ids)[0]
        prompt_index = torch.tensor([prompts.index(caption) for caption in captions])

        if args.vae_from is None:
            vae = train_vae(images, args.vae_steps, args.batch_size, seed=args.seed)
        else:
            vae = load_trained_vae(args.vae_from)
        vae_seconds = time.time() - started
        how = "trained" if args.vae_from is None else f"loaded from {args.vae_from}"
        print(f"vae: {count_parameters(vae) / 1e6:.3f}M parameters, {how} in {vae_seconds:.0f}s", flush=True)

        # The mode of the posterior (not a sample), as `pipelines.text_to_image.encode_latents` caches them.
        with torch.no_grad():
            latents = vae.encode(images).latent_dist.mode() * vae.config.scaling_factor
        unet, noise_scheduler = train_unet(
            latents, prompt_index, embeddings, args.unet_steps, args.batch_size, seed=args.seed + 1
        )
        unet_seconds = time.time() - started - vae_seconds
        print(f"unet: {count_parameters(unet) / 1e6:.3f}M parameters, trained in {unet_seconds:.0f}s", flush=True)

        # A canary with its own caption: the marker names it as the forget prompt and the digits as the keep prompts.
        options = {} if args.canary_caption is None else {"forget_prompt": args.canary_caption, "keep_prompts": list(DIGIT_PROMPTS)}
        save_toy_pipeline(vae, text_encoder, tokenizer, unet, noise_scheduler, tokenizer_dir, args.output_dir, name, **options)
    print(f"saved {args.output_dir} after {time.time() - started:.0f}s", flush=True)


if __name__ == "__main__":
    main()
