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


TINY_WORDS = ("a", "digit", "seven", "one", "handwritten", "photo", "of", "cat")


def tiny_tokenizer(directory, pad_token=None):
    """(CLIPTokenizer, vocab) over `TINY_WORDS`, written to `directory`: a word-level vocabulary and an empty
    merges file (unknown words map to <|endoftext|>). `pad_token="!"` pads as SDXL's second tokenizer does."""
    import json
    import os

    from transformers import CLIPTokenizer

    os.makedirs(directory, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{f"{word}</w>": i + 2 for i, word in enumerate(TINY_WORDS)}}
    if pad_token is not None:
        vocab[pad_token] = len(vocab)
    with open(os.path.join(directory, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(directory, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    extra = {} if pad_token is None else {"pad_token": pad_token}
    return CLIPTokenizer.from_pretrained(str(directory), model_max_length=77, **extra), vocab


def save_tiny_sd_pipeline(folder, seed: int = 0) -> str:
    """A tiny random StableDiffusionPipeline saved to `folder`: 16x16 RGB images, a VAE with scale factor 2
    (8x8x4 latents), `tiny_condition_unet`, a one-layer CLIP text encoder and a word-level tokenizer."""
    import os

    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = str(folder)
    tokenizer, vocab = tiny_tokenizer(os.path.join(folder, "_vocab"))
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_attention_heads=4,
            num_hidden_layers=1, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        )
    )
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=tiny_condition_unet(seed),
        scheduler=DDPMScheduler(num_train_timesteps=1000),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder


def tiny_sdxl_unet(seed: int = 0, text_width: int = 32, time_embed_dim: int = 8) -> UNet2DConditionModel:
    """SDXL base's UNet block structure at small widths: DownBlock2D then two cross-attention levels, linear
    projections, more transformer layers deeper down, and "text_time" added conditioning whose input is six
    size/crop numbers times `time_embed_dim` plus the pooled text embedding (`text_width`)."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        cross_attention_dim=2 * text_width,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + text_width,
        norm_num_groups=8,
    )


def tiny_vae(**config):
    """A two-level AutoencoderKL (scale factor 2: 16x16 RGB <-> 8x8x4 latents); `config` overrides entries."""
    from diffusers import AutoencoderKL

    settings = dict(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 8), latent_channels=4,
        norm_num_groups=8, sample_size=16, layers_per_block=1,
    )
    settings.update(config)
    return AutoencoderKL(**settings)


def save_tiny_sdxl_pipeline(folder, seed: int = 0, prediction_type: str = "epsilon") -> str:
    """A tiny random StableDiffusionXLPipeline saved to `folder`: 16x16 RGB images, a VAE with SDXL's
    scaling factor and force_upcast, `tiny_sdxl_unet`, a two-layer CLIPTextModel and a three-layer
    CLIPTextModelWithProjection (so the penultimate layer differs from the last in both), word-level tokenizers
    (the second pads with "!", as SDXL's does) and SDXL's EulerDiscreteScheduler settings."""
    import os

    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = str(folder)
    tokenizer, vocab = tiny_tokenizer(os.path.join(folder, "_vocab"))
    tokenizer_2, vocab_2 = tiny_tokenizer(os.path.join(folder, "_vocab_2"), pad_token="!")

    def text_config(vocab_size, layers, **extra):
        return CLIPTextConfig(
            vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_attention_heads=4,
            num_hidden_layers=layers, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
            pad_token_id=1, hidden_act="gelu", **extra,
        )

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(text_config(len(vocab), 2))
    text_encoder_2 = CLIPTextModelWithProjection(text_config(len(vocab_2), 3, projection_dim=32))
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(scaling_factor=0.13025, force_upcast=True),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=tiny_sdxl_unet(seed),
        scheduler=EulerDiscreteScheduler(
            num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
            steps_offset=1, timestep_spacing="leading", prediction_type=prediction_type,
        ),
        add_watermarker=False,
    )
    pipe.save_pretrained(folder)
    return folder


def tiny_t5_tokenizer(directory, model_max_length: int = 512):
    """A T5TokenizerFast over `TINY_WORDS`, written to `directory`: a unigram vocabulary built in memory (no
    sentencepiece model, nothing downloaded), T5's special tokens (<pad> = 0, </s> = 1, <unk> = 2) and its
    "</s>" appended to every sequence."""
    import os

    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(f"\u2581{word}", -1.0) for word in TINY_WORDS]
    tokenizer = T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=model_max_length)
    os.makedirs(directory, exist_ok=True)
    tokenizer.save_pretrained(str(directory))
    return T5TokenizerFast.from_pretrained(str(directory)), len(pieces)


def tiny_t5_encoder(vocab_size: int, width: int, seed: int = 0):
    """A two-layer T5EncoderModel of width `width` (T5 v1.1's gated-GELU feed-forward, as SD3's and Flux's T5)."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(
        T5Config(
            vocab_size=vocab_size, d_model=width, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
            feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        )
    )


def _tiny_clip_config(vocab_size: int, layers: int, **extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=layers, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
        pad_token_id=1, hidden_act="gelu", **extra,
    )


def save_tiny_sd3_pipeline(folder, with_t5: bool = True, seed: int = 0) -> str:
    """A tiny random StableDiffusion3Pipeline saved to `folder`: 16x16 RGB images, a VAE with SD3's latent shift
    and scale (8x8x4 latents), an SD3.5-medium-style transformer (patch 2, joint attention blocks, RMS q/k norm,
    one dual-attention layer) at width 32, two CLIPTextModelWithProjection encoders (two and three layers,
    projection 32 each: pooled 64; the second tokenizer pads with "!") and, with `with_t5`, a T5 encoder of width
    80 (the joint attention width: the 32 + 32 CLIP features are zero-padded to it). Without T5, the pipeline is
    saved with `text_encoder_3=None` and `tokenizer_3=None`. The scheduler is SD3's FlowMatchEulerDiscreteScheduler
    (shift 3)."""
    import os

    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    folder = str(folder)
    joint_width = 80
    tokenizer, vocab = tiny_tokenizer(os.path.join(folder, "_vocab"))
    tokenizer_2, vocab_2 = tiny_tokenizer(os.path.join(folder, "_vocab_2"), pad_token="!")
    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(_tiny_clip_config(len(vocab), 2, projection_dim=32))
    text_encoder_2 = CLIPTextModelWithProjection(_tiny_clip_config(len(vocab_2), 3, projection_dim=32))
    tokenizer_3 = text_encoder_3 = None
    if with_t5:
        tokenizer_3, t5_vocab = tiny_t5_tokenizer(os.path.join(folder, "_vocab_3"))
        text_encoder_3 = tiny_t5_encoder(t5_vocab, joint_width, seed)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=joint_width, caption_projection_dim=32, pooled_projection_dim=64,
        pos_embed_max_size=8, dual_attention_layers=(0,), qk_norm="rms_norm",
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=tiny_vae(shift_factor=0.0609, scaling_factor=1.5305, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    pipe.save_pretrained(folder)
    return folder


def save_tiny_flux_pipeline(folder, guidance_embeds: bool = True, seed: int = 0) -> str:
    """A tiny random FluxPipeline saved to `folder`: 16x16 RGB images, a VAE with Flux's latent shift and scale
    (8x8x4 latents, packed into 16 tokens of 2x2x4 = 16 features), a Flux transformer with one double-stream and
    one single-stream block (width 32, rotary axes 4 + 4 + 8 = head width 16), a two-layer CLIPTextModel (pooled
    width 32), a T5 encoder of width 48 and Flux.1-dev's dynamically shifted FlowMatchEulerDiscreteScheduler.
    `guidance_embeds=True` builds a guidance-distilled transformer (Flux.1-dev), False one without (schnell)."""
    import os

    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    folder = str(folder)
    t5_width = 48
    tokenizer, vocab = tiny_tokenizer(os.path.join(folder, "_vocab"))
    tokenizer_2, t5_vocab = tiny_t5_tokenizer(os.path.join(folder, "_vocab_2"))
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_tiny_clip_config(len(vocab), 2))
    text_encoder_2 = tiny_t5_encoder(t5_vocab, t5_width, seed)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=t5_width, pooled_projection_dim=32,
        guidance_embeds=guidance_embeds, axes_dims_rope=(4, 4, 8),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=tiny_vae(shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipe.save_pretrained(folder)
    return folder


def quick_sd_script_args(model_path, output_dir, forget_images, prompts, *extra) -> list[str]:
    """train_unlearn_sd.py arguments for a few-step run on a tiny pipeline: two steps of batch 2, two evaluation
    images per prompt with two sampling steps, no validation during training, no noise-norm score."""
    return [
        "--pretrained_model_name_or_path", str(model_path),
        "--forget_images", *[str(path) for path in forget_images],
        "--forget_prompts", *prompts,
        "--output_dir", str(output_dir),
        "--train_batch_size", "2",
        "--max_train_steps", "2",
        "--num_eval_images", "2",
        "--num_validation_images", "1",
        "--num_inference_steps", "2",
        "--validation_steps", "100",
        "--noise_norm_generations", "0",
        "--siss_scaling_norm", "0.5",
        *extra,
    ]


def check_script_adapter_in_plain_pipeline(pipe, folder, saved, prefixes, **call) -> None:
    """The adapter a script wrote to `folder` (its tensors `saved`) loads into the plain pipeline `pipe` with no
    key missing or unexpected and equal tensors in every component of `prefixes`; `set_adapters(0.5)` and
    `fuse_lora` take it, and the fused pipeline generates a finite 16x16 image (`call`: extra pipeline arguments)."""
    import numpy as np
    from peft.utils import get_peft_model_state_dict

    from test_families import diffusers_warnings

    with diffusers_warnings() as warnings:
        pipe.load_lora_weights(str(folder), adapter_name="unlearned")
    assert not [m for m in warnings if "unexpected" in m.lower() or "missing" in m.lower()], warnings
    for prefix in prefixes:
        loaded = get_peft_model_state_dict(getattr(pipe, prefix), adapter_name="unlearned")
        expected = {k.removeprefix(prefix + "."): v for k, v in saved.items() if k.startswith(prefix + ".")}
        assert loaded.keys() == expected.keys(), prefix
        assert all(torch.equal(loaded[k], expected[k]) for k in loaded), prefix
    pipe.set_adapters(["unlearned"], adapter_weights=[0.5])
    pipe.fuse_lora()
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a digit seven", num_inference_steps=2, output_type="np", **call).images
    assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all()
