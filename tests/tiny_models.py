"""Tiny models and batches shared by the tests (built from configs; nothing is downloaded)."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel

from diffusers_unlearn.noise import NoiseSchedule
from diffusers_unlearn.objectives import DenoisingBatch, Denoiser


def tiny_unet(num_class_embeds=None, seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        num_class_embeds=num_class_embeds,
    )


def tiny_condition_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    )


def schedule(prediction_type: str = "epsilon", num_train_timesteps: int = 1000) -> NoiseSchedule:
    return NoiseSchedule.from_scheduler(
        DDPMScheduler(num_train_timesteps=num_train_timesteps, prediction_type=prediction_type)
    )


def batches(kind: str, batch_size: int = 4, seed: int = 0):
    """(denoiser, forget_batch, keep_batch) for 'unconditional', 'class' or 'text' models."""
    g = torch.Generator().manual_seed(seed)
    if kind == "unconditional":
        model = tiny_unet(seed=seed)
        shape = (batch_size, 1, 8, 8)
        forget = DenoisingBatch(torch.randn(shape, generator=g))
        keep = DenoisingBatch(torch.randn(shape, generator=g))
    elif kind == "class":
        model = tiny_unet(num_class_embeds=10, seed=seed)
        shape = (batch_size, 1, 8, 8)
        forget = DenoisingBatch(torch.randn(shape, generator=g), class_labels=torch.full((batch_size,), 3))
        keep = DenoisingBatch(torch.randn(shape, generator=g), class_labels=torch.arange(batch_size) % 10)
    elif kind == "text":
        model = tiny_condition_unet(seed=seed)
        shape = (batch_size, 4, 8, 8)
        prompt = torch.randn(1, 5, 32, generator=g).expand(batch_size, 5, 32)
        forget = DenoisingBatch(torch.randn(shape, generator=g), encoder_hidden_states=prompt)
        keep = DenoisingBatch(torch.randn(shape, generator=g), encoder_hidden_states=prompt.clone())
    else:
        raise ValueError(kind)
    return Denoiser(model, schedule()), forget, keep


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def save_tiny_sd_pipeline(folder, seed: int = 0) -> str:
    """A tiny random StableDiffusionPipeline saved to `folder`: 16x16 RGB images, a VAE with scale factor 2
    (8x8x4 latents), `tiny_condition_unet`, a one-layer CLIP text encoder and a word-level tokenizer."""
    import json
    import os

    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = str(folder)
    tokenizer_dir = os.path.join(folder, "_vocab")
    os.makedirs(tokenizer_dir, exist_ok=True)
    words = ["a</w>", "digit</w>", "seven</w>", "one</w>", "handwritten</w>", "photo</w>", "of</w>", "cat</w>"]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{word: i + 2 for i, word in enumerate(words)}}
    with open(os.path.join(tokenizer_dir, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(tokenizer_dir, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=77)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_attention_heads=4,
            num_hidden_layers=1, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        )
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 8), latent_channels=4,
        norm_num_groups=8, sample_size=16, layers_per_block=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=tiny_condition_unet(seed),
        scheduler=DDPMScheduler(num_train_timesteps=1000),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder
