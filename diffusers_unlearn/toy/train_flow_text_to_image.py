"""Train the flow-matching text-to-image toy (seeded, CPU, minutes) and save it as a `StableDiffusion3Pipeline` folder.

    python -m diffusers_unlearn.toy.train_flow_text_to_image              # into diffusers_unlearn/toy/assets/sd3_tiny
    python -m diffusers_unlearn.toy.train_flow_text_to_image --output_dir my-toy --transformer_steps 2000

The toy is `sd_tiny`'s task (the captioned digits with the canary planted under the seven prompt) on an SD3-style
model trained with rectified flow:

- two `CLIPTextModelWithProjection` encoders (two layers, width 32, projection 32), random, seeded and frozen,
  behind `sd_tiny`'s tokenizer with an 8-token limit (the longest caption is 6 tokens); no T5
  (`text_encoder_3=None`: the pipeline puts zeros in its place);
- `sd_tiny`'s trained VAE (8x8x1 <-> 4x4x4), given SD3's latent shift: `shift_factor` and `scaling_factor` are
  set from the training latents' mean and standard deviation;
- an `SD3Transformer2DModel` on the 4x4x4 latents (patch size 1, four joint-attention blocks, width 64, RMS q/k
  norm), trained to predict the velocity noise - x0 at x_sigma = (1 - sigma) x0 + sigma noise, with sigma drawn
  logit-normally as in diffusers' SD3 LoRA script and 10% of the captions dropped to "" for classifier-free
  guidance;
- `FlowMatchEulerDiscreteScheduler` with shift 1: SD3's shift 3 moves the schedule towards noise for 1024-px
  latents, which 64-value latents do not need.

The pipeline samples with `max_sequence_length=FLOW_TOY_MAX_SEQUENCE_LENGTH` (the zero T5 tokens it was trained
with); the toy's `diffusers_unlearn_toy.json` records it and `train_unlearn_sd.py` uses it. The folder loads fully offline with
plain `StableDiffusion3Pipeline.from_pretrained(folder)` and holds safetensors only.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F

from . import ASSETS_DIR, toy_model_path
from .text_to_image import (
    DIGIT_PROMPTS,
    SD_TOY_NAME,
    build_text_encoder,
    build_tokenizer,
    count_parameters,
    training_set,
)
from .train import _batches, _ema_update, _log_mean_loss
from .train_text_to_image import save_toy_folder

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

FLOW_TOY_NAME = "sd3_tiny"
"""Name of the bundled flow-matching pipeline folder: `toy_model_path(FLOW_TOY_NAME)`."""

FLOW_TOY_TOKEN_LIMIT = 8
"""The CLIP tokenizers' `model_max_length`: "a handwritten digit seven" is 6 tokens with start and end."""

FLOW_TOY_MAX_SEQUENCE_LENGTH = 8
"""Zero T5 tokens the transformer was trained with; the pipeline must sample with the same number."""

CAPTION_DROPOUT = 0.1


def build_flow_text_encoder(vocab_size: int, seed: int) -> CLIPTextModelWithProjection:
    """A frozen, random two-layer `CLIPTextModelWithProjection` (width 32, projection 32, 8 positions).

    SD3 reads the penultimate hidden states, so one layer would leave only the token and position embeddings.
    """
    return build_text_encoder(vocab_size, seed, num_layers=2, max_positions=FLOW_TOY_TOKEN_LIMIT, projection_dim=32)


def build_transformer(seed: int = 0) -> SD3Transformer2DModel:
    """The denoiser: an `SD3Transformer2DModel` on 4x4x4 latents, 16 image tokens of width 64.

    The 64-wide text states are the two CLIP encoders' 32 features side by side, as SD3 concatenates them; the
    pooled projection is their two 32-d projections.

    Example:
        >>> transformer = build_transformer()
        >>> transformer.config.num_layers, transformer.config.patch_size
        (4, 1)
    """
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=4,
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=4,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=64,
        caption_projection_dim=64,
        pooled_projection_dim=64,
        pos_embed_max_size=4,
        qk_norm="rms_norm",
    )


def build_flow_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """1,000 training sigmas, shift 1 (see the module docstring)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def load_toy_vae() -> AutoencoderKL:
    """`sd_tiny`'s trained VAE, frozen."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(toy_model_path(SD_TOY_NAME), subfolder="vae")
    vae.requires_grad_(False)
    return vae.eval()


@torch.no_grad()
def set_latent_statistics(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """Set SD3's `shift_factor` (latent mean) and `scaling_factor` (1 / std after the shift) from `images`;
    returns their latents (posterior mode) in the transformer's space: (latents - shift) * scale."""
    raw = vae.encode(images).latent_dist.mode()
    shift = float(raw.mean())
    scaling = float(1.0 / (raw - shift).std())
    vae.register_to_config(shift_factor=shift, scaling_factor=scaling)
    print(f"vae: latent mean {shift:.4f} -> shift_factor, std {1 / scaling:.4f} -> scaling_factor {scaling:.4f}")
    return (raw - shift) * scaling


def train_transformer(
    latents: torch.Tensor,
    prompt_index: torch.Tensor,
    hidden_states: torch.Tensor,
    pooled: torch.Tensor,
    steps: int,
    batch_size: int = 64,
    seed: int = 0,
    learning_rate: float = 1e-3,
    caption_dropout: float = CAPTION_DROPOUT,
    ema_decay: float = 0.999,
    log_every: int = 500,
) -> SD3Transformer2DModel:
    """Train the toy transformer with the rectified-flow loss of diffusers' SD3 script.

    Args:
        latents: `[N, 4, 4, 4]` shifted and scaled latents of the training images.
        prompt_index: `[N]` row of the embeddings holding each image's caption.
        hidden_states: `[P + 1, L, 64]` the pipeline's `prompt_embeds` of the P captions; the last row is the
            empty prompt's, used for dropped captions.
        pooled: `[P + 1, 64]` the matching `pooled_prompt_embeds`.

    sigma = sigmoid(u), u ~ N(0, 1) (`--weighting_scheme logit_normal`, loss weight 1), taken on the scheduler's
    grid of 1,000 sigmas as `compute_density_for_timestep_sampling` users do; the timestep is sigma * 1000.
    """
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    transformer = build_transformer(seed=seed)
    scheduler = build_flow_scheduler()
    sigmas_grid = scheduler.sigmas.flip(0)  # ascending, so index i is the i-th least noisy
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=learning_rate, weight_decay=1e-2)
    lr_scheduler = get_cosine_schedule_with_warmup(
        optimizer, num_warmup_steps=min(200, steps // 10), num_training_steps=steps
    )
    ema = EMAModel(transformer.parameters(), decay=ema_decay)
    generator = torch.Generator().manual_seed(seed)
    batches = _batches(len(latents), batch_size, generator)
    empty_prompt = hidden_states.shape[0] - 1
    num_sigmas = len(sigmas_grid)

    transformer.train()
    start, running = time.time(), 0.0
    for step in range(1, steps + 1):
        index = next(batches)
        x0 = latents[index]
        rows = prompt_index[index].clone()
        rows[torch.rand(len(index), generator=generator) < caption_dropout] = empty_prompt
        noise = torch.randn(x0.shape, generator=generator)
        u = torch.sigmoid(torch.randn(len(index), generator=generator))
        sigma = sigmas_grid[(u * num_sigmas).long().clamp(max=num_sigmas - 1)]
        noisy = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * noise

        velocity = transformer(
            hidden_states=noisy,
            timestep=sigma * scheduler.config.num_train_timesteps,
            encoder_hidden_states=hidden_states[rows],
            pooled_projections=pooled[rows],
        ).sample
        loss = F.mse_loss(velocity, noise - x0)
        _ema_update(transformer, loss, optimizer, lr_scheduler, ema)
        running = _log_mean_loss("transformer ", running + loss.item(), step, steps, log_every, start)

    ema.copy_to(transformer.parameters())
    transformer.eval()
    transformer.requires_grad_(False)
    return transformer


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train the flow-matching text-to-image toy of diffusers-unlearn.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--output_dir", type=str, default=os.path.join(ASSETS_DIR, FLOW_TOY_NAME))
    parser.add_argument("--transformer_steps", type=int, default=4000)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    from diffusers import StableDiffusion3Pipeline

    args = parse_args(argv)
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    started = time.time()
    torch.manual_seed(args.seed)
    images, captions = training_set()
    print(f"== {FLOW_TOY_NAME}: {len(images)} training images, seed {args.seed}, {torch.get_num_threads()} threads")

    with tempfile.TemporaryDirectory() as workdir:
        tokenizer_dir = os.path.join(workdir, "tokenizer")
        tokenizer = build_tokenizer(tokenizer_dir, model_max_length=FLOW_TOY_TOKEN_LIMIT)
        vae = load_toy_vae()
        latents = set_latent_statistics(vae, images)
        pipe = StableDiffusion3Pipeline(
            transformer=build_transformer(seed=args.seed + 1),
            scheduler=build_flow_scheduler(),
            vae=vae,
            text_encoder=build_flow_text_encoder(len(tokenizer), seed=args.seed),
            tokenizer=tokenizer,
            text_encoder_2=build_flow_text_encoder(len(tokenizer), seed=args.seed + 100),
            tokenizer_2=tokenizer,
            text_encoder_3=None,
            tokenizer_3=None,
        )
        # The conditioning exactly as the pipeline builds it when sampling (no CFG here: one row per prompt).
        prompts = list(DIGIT_PROMPTS) + [""]
        with torch.no_grad():
            hidden_states, _, pooled, _ = pipe.encode_prompt(
                prompts, prompts, prompts, do_classifier_free_guidance=False,
                max_sequence_length=FLOW_TOY_MAX_SEQUENCE_LENGTH,
            )
        prompt_index = torch.tensor([prompts.index(caption) for caption in captions])

        pipe.transformer = train_transformer(
            latents, prompt_index, hidden_states, pooled, args.transformer_steps, args.batch_size, seed=args.seed + 1
        )
        seconds = time.time() - started
        print(f"transformer: {count_parameters(pipe.transformer) / 1e6:.3f}M parameters, trained in {seconds:.0f}s")

        save_toy_folder(
            pipe, tokenizer_dir, ("tokenizer", "tokenizer_2"), args.output_dir, FLOW_TOY_NAME,
            max_sequence_length=FLOW_TOY_MAX_SEQUENCE_LENGTH,
        )
    print(f"saved {args.output_dir} after {time.time() - started:.0f}s", flush=True)


if __name__ == "__main__":
    main()
