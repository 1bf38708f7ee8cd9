"""Peak memory and step time of one SISS step on a Stable Diffusion UNet or an SD3/Flux transformer (random
weights, no download).

`--family sd15` (default) builds SD 1.5's published UNet2DConditionModel config; each step trains on one
forget/keep pair (batch 1 each) at 512 px (64x64x4 latents, 77x768 text embeddings).
`--family sdxl` builds SDXL base 1.0's published UNet config (2.57B parameters) and runs it through the SDXL model
family's `call`: 1024 px (128x128x4 latents), 77x2048 text embeddings and `added_cond_kwargs` with 1280-wide
`text_embeds` and 6 `time_ids` per item. Three set-ups:

- `lora`: SISS with LoRA (rank 4, attention), bf16 autocast, 8-bit AdamW, gradient checkpointing
  (target <= 6 GB for SD 1.5, <= 12 GB for SDXL);
- `full`: SISS with full fine-tuning, bf16 autocast, 8-bit AdamW, gradient checkpointing (target <= 16 GB for
  SD 1.5; no target for SDXL);
- `reference`: the reference design: full fine-tuning in fp32, torch AdamW, two backward passes with a retained
  graph, and separate fp32 gradient buffers for the keep and forget gradients.

Each set-up runs in a fresh subprocess, so its peak is its own: on CUDA `torch.cuda.max_memory_allocated`, on
the CPU the process's peak resident memory (which includes the Python runtime, about 0.4 GB).

    python benchmarks/bench_sd_memory.py                       # CUDA if present, else CPU
    python benchmarks/bench_sd_memory.py --scale 0.25 --resolution 256   # scaled down for a CPU
    python benchmarks/bench_sd_memory.py --json
    python benchmarks/bench_sd_memory.py --family sdxl --setups lora     # SDXL base, 1024 px
    python benchmarks/bench_sd_memory.py --family sdxl --count_only      # parameter counts only, no step
    python benchmarks/bench_sd_memory.py --family sd3 --setups lora      # SD3.5 medium, 1024 px
    python benchmarks/bench_sd_memory.py --family flux --setups lora --bnb_4bit   # FLUX.1-dev, NF4 base (GPU)
    python benchmarks/bench_sd_memory.py --family flux --count_only      # + text encoders, VAE, NF4 estimate

`--family sd21` builds SD 2.1's UNet (768 px, 77x1024 text embeddings) with the targets left open.

`--family sd3` builds SD3.5 medium's SD3Transformer2DModel (24 MMDiT layers, 13 of them dual-attention) and
`--family flux` FLUX.1-dev's FluxTransformer2DModel (19 double- and 38 single-stream blocks, guidance embedding),
both from their published configs, and runs them through their model families' `call` on the flow-matching
schedule: 1024 px (128x128x16 latents), SD3 with 77 CLIP + 77 T5 tokens of 4096-wide embeddings and a 2048-wide
pooled projection (`--max_sequence_length 77`, the official SD3 LoRA script's default), Flux with 512 T5 tokens,
a 768-wide pooled CLIP embedding and guidance 3.5. The `lora` set-up uses the family's `attention` LoRA preset
(the script's default). Targets on a GPU: SD3.5 medium <= 12 GB; FLUX.1-dev <= 16 GB with a 4-bit (NF4) base.
`--bnb_4bit` (lora only) saves the built transformer and reloads it through diffusers'
`BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")` before adding LoRA. diffusers' bitsandbytes
loader refuses to run without a GPU ("No GPU found"); on a CPU the benchmark lifts that check while the model
loads (bitsandbytes 0.50 runs NF4 layers on the CPU), so the reduced-width CPU run measures the NF4 set-up too.
Its "params" then count the packed 4-bit weights as stored (two weights per uint8 element).
`--count_only` for these two families also counts the text encoders (CLIP-L, CLIP-G and T5-XXL's encoder for
SD3; CLIP-L and T5-XXL's encoder for Flux) and the 16-channel VAE, and the bytes of the weights in bf16 (and,
for Flux, an NF4 estimate), all on the meta device.

`--scale` multiplies the channel widths (SD 1.5: rounded down to multiples of 32, same head counts; SD 2.1 and
SDXL: rounded down to multiples of 64, at least 64, with one 64-wide head per 64 channels as at full size).
Everything else (depth, transformer layers per block, text-embedding and micro-conditioning widths) stays as
published. For SD3 and Flux `--scale` multiplies the number of attention heads (rounded down, at least 1) and
keeps the head width (64 for SD3, 128 for Flux, whose rotary axes must sum to it), so the hidden width is
heads x head width; the depth, the text-embedding and pooled widths and the latent channels stay as published.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

SD15_UNET_CONFIG = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
# SDXL base 1.0's UNet (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json); the keys left out have
# UNet2DConditionModel's defaults. `attention_head_dim` is, as in that config, the number of heads per level.
SDXL_UNET_CONFIG = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 1280 (pooled text_embeds) + 6 time ids x 256
    "norm_num_groups": 32,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "act_fn": "silu",
    "mid_block_type": "UNetMidBlock2DCrossAttn",
}
# SD 2.1's UNet (stabilityai/stable-diffusion-2-1, 768 px, v-prediction): SD 1.5's layout with 64-wide heads,
# linear projections and 1024-wide (OpenCLIP ViT-H) text embeddings.
SD21_UNET_CONFIG = {
    **SD15_UNET_CONFIG,
    "sample_size": 96,
    "cross_attention_dim": 1024,
    "attention_head_dim": [5, 10, 20, 20],
    "use_linear_projection": True,
    "upcast_attention": True,
}
# SD3.5 medium's transformer (stabilityai/stable-diffusion-3.5-medium, transformer/config.json): 24 layers of
# 24 heads x 64 (1536 wide), dual attention (a second, image-only attention) in layers 0-12, RMS q/k norm.
SD3_TRANSFORMER_CONFIG = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,  # = heads x head width: the text stream's width in the joint blocks
    "pooled_projection_dim": 2048,  # CLIP-L's 768 + CLIP-G's 1280 pooled projections
    "pos_embed_max_size": 384,
    "dual_attention_layers": list(range(13)),
    "qk_norm": "rms_norm",
}
# FLUX.1-dev's transformer (black-forest-labs/FLUX.1-dev, transformer/config.json): 19 double-stream and 38
# single-stream blocks of 24 heads x 128 (3072 wide) on 2x2-packed latents (64 = 16 channels x 4), rotary axes
# 16 + 56 + 56 = 128, and the guidance embedding of the guidance-distilled checkpoint.
FLUX_TRANSFORMER_CONFIG = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}
# The text encoders of SD3 and Flux, as transformers configs: CLIP ViT-L/14's text tower (openai), OpenCLIP
# ViT-bigG/14's (laion), both with their text projections as SD3 loads them (CLIPTextModelWithProjection; Flux
# loads CLIP-L as CLIPTextModel), and T5 v1.1 XXL's encoder (google/t5-v1_1-xxl; T5EncoderModel).
CLIP_L_CONFIG = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                 "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                 "projection_dim": 768}
CLIP_G_CONFIG = {"vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                 "num_attention_heads": 20, "max_position_embeddings": 77, "hidden_act": "gelu",
                 "projection_dim": 1280}
T5_XXL_CONFIG = {"vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
                 "feed_forward_proj": "gated-gelu"}
# The 16-channel VAE of SD3 and Flux (the same AutoencoderKL layout; only scaling and shift factors differ).
FLOW_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 16,
    "norm_num_groups": 32,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
# Per component of a flow family's pipeline: (name, class, config).
FLOW_COMPONENTS = {
    "sd3": (("text_encoder (CLIP-L)", "CLIPTextModelWithProjection", CLIP_L_CONFIG),
            ("text_encoder_2 (CLIP-G)", "CLIPTextModelWithProjection", CLIP_G_CONFIG),
            ("text_encoder_3 (T5-XXL encoder)", "T5EncoderModel", T5_XXL_CONFIG),
            ("vae", "AutoencoderKL", FLOW_VAE_CONFIG)),
    "flux": (("text_encoder (CLIP-L)", "CLIPTextModel", CLIP_L_CONFIG),
             ("text_encoder_2 (T5-XXL encoder)", "T5EncoderModel", T5_XXL_CONFIG),
             ("vae", "AutoencoderKL", FLOW_VAE_CONFIG)),
}
FAMILIES = ("sd15", "sd21", "sdxl", "sd3", "flux")
TRANSFORMER_FAMILIES = ("sd3", "flux")
# Per family: the UNet (or transformer) config, the native resolution, the text-embedding width, and the targets
# (GB). The flow families also give their conditioning: the text tokens (T5's `max_sequence_length` of the
# official LoRA scripts, plus SD3's 77 CLIP tokens), the pooled width and Flux's guidance value.
FAMILY_SPECS = {
    "sd15": {"config": SD15_UNET_CONFIG, "resolution": 512, "text_dim": 768,
             "target_gb": {"lora": 6.0, "full": 16.0, "reference": None}},
    "sd21": {"config": SD21_UNET_CONFIG, "resolution": 768, "text_dim": 1024,
             "target_gb": {"lora": None, "full": None, "reference": None}},
    "sdxl": {"config": SDXL_UNET_CONFIG, "resolution": 1024, "text_dim": 2048,
             "target_gb": {"lora": 12.0, "full": None, "reference": None}},
    "sd3": {"config": SD3_TRANSFORMER_CONFIG, "resolution": 1024, "text_dim": 4096, "clip_tokens": 77, "t5_tokens": 77,
            "pooled_dim": 2048, "guidance": None,
            "target_gb": {"lora": 12.0, "full": None, "reference": None}},
    # Flux's 16 GB target is for a 4-bit (NF4) base (`--bnb_4bit`); a bf16 base alone takes about 22 GiB.
    "flux": {"config": FLUX_TRANSFORMER_CONFIG, "resolution": 1024, "text_dim": 4096, "clip_tokens": 0, "t5_tokens": 512,
             "pooled_dim": 768, "guidance": 3.5,
             "target_gb": {"lora": 16.0, "full": None, "reference": None}},
}
SDXL_TEXT_EMBEDS_DIM = 1280  # text_encoder_2's pooled projection
SETUPS = ("lora", "full", "reference")
TARGET_GB = FAMILY_SPECS["sd15"]["target_gb"]


def unet_config(family: str, scale: float, resolution: int) -> dict:
    """The family's published UNet config with channel widths times `scale` and `sample_size` = resolution / 8."""
    config = dict(FAMILY_SPECS[family]["config"])
    widths = config["block_out_channels"]
    if family in ("sd21", "sdxl"):  # 64-wide heads: keep the head width, scale the head count
        config["block_out_channels"] = [max(64, int(c * scale) // 64 * 64) for c in widths]
        config["attention_head_dim"] = [c // 64 for c in config["block_out_channels"]]
    else:
        config["block_out_channels"] = [int(c * scale) // 32 * 32 for c in widths]
    config["sample_size"] = resolution // 8
    return config


def transformer_config(family: str, scale: float, resolution: int) -> dict:
    """SD3's or Flux's published transformer config with the head count times `scale` (rounded down, at least 1)
    and the head width kept; SD3's text-stream width (`caption_projection_dim`) follows the hidden width and its
    `sample_size` is resolution / 8."""
    config = dict(FAMILY_SPECS[family]["config"])
    heads = max(1, int(config["num_attention_heads"] * scale))
    config["num_attention_heads"] = heads
    if family == "sd3":
        config["caption_projection_dim"] = heads * config["attention_head_dim"]
        config["sample_size"] = resolution // 8
    return config


def model_config(family: str, scale: float, resolution: int) -> dict:
    """The denoiser's config: `transformer_config` for SD3 and Flux, `unet_config` otherwise."""
    if family in TRANSFORMER_FAMILIES:
        return transformer_config(family, scale, resolution)
    return unet_config(family, scale, resolution)


def model_class(family: str):
    import diffusers

    names = {"sd3": "SD3Transformer2DModel", "flux": "FluxTransformer2DModel"}
    return getattr(diffusers, names.get(family, "UNet2DConditionModel"))


def build_model(scale: float, resolution: int, family: str = "sd15"):
    """The family's denoiser (UNet, or SD3's/Flux's transformer) with random weights (seed 0)."""
    config = model_config(family, scale, resolution)
    torch.manual_seed(0)
    return model_class(family)(**config)


def nf4_bytes(model: torch.nn.Module, blocksize: int = 64) -> int:
    """An ESTIMATE of a model's weight bytes with bitsandbytes NF4 on every nn.Linear (what diffusers'
    `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")` converts): 4 bits per Linear weight plus
    one float32 absmax per block of `blocksize` weights (no double quantization, the default), every other
    parameter (biases, norms, embeddings that are not Linear) in bf16. Buffers and bitsandbytes' small per-layer
    quantization state are left out."""
    quantized = set()
    total = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            count = module.weight.numel()
            total += count // 2 + -(-count // blocksize) * 4
            quantized.add(id(module.weight))
    total += sum(p.numel() * 2 for p in model.parameters() if id(p) not in quantized)
    return total


def _component_counts(family: str) -> list[dict]:
    """Parameters and bf16 bytes of a flow family's text encoders and VAE, built on the meta device."""
    import diffusers
    import transformers

    rows = []
    for name, class_name, config in FLOW_COMPONENTS[family]:
        with torch.device("meta"):
            if class_name == "AutoencoderKL":
                module = diffusers.AutoencoderKL(**config)
            elif class_name == "T5EncoderModel":
                module = transformers.T5EncoderModel(transformers.T5Config(**config))
            else:
                module = getattr(transformers, class_name)(transformers.CLIPTextConfig(**config))
        params = sum(p.numel() for p in module.parameters())
        rows.append({"name": name, "class": class_name, "params": params, "bf16_gb": params * 2 / 2**30})
    return rows


def count_parameters(family: str, scale: float, resolution: int, rank: int = 4) -> dict:
    """Total denoiser parameters and LoRA (rank `rank`, attention) parameters, counted on the meta device: nothing
    is allocated and no step runs, so this works at full size on any machine. For SD3 and Flux also the
    transformer's buffers, its NF4 estimate (`nf4_bytes`) and the text encoders' and VAE's counts."""
    from accelerate import init_empty_weights

    from diffusers_unlearn.lora import add_lora, trainable_parameters

    transformer = family in TRANSFORMER_FAMILIES
    # torch.device("meta") also keeps SD3's 384 x 384 positional-embedding table (a buffer) off the CPU.
    with init_empty_weights(include_buffers=transformer), torch.device("meta" if transformer else "cpu"):
        model = model_class(family)(**model_config(family, scale, resolution))
    total = sum(p.numel() for p in model.parameters())
    if not transformer:
        model.requires_grad_(False)
        model = add_lora(model, rank=rank, targets="attention")
        lora = sum(p.numel() for p in trainable_parameters(model))
        return {"family": family, "scale": scale, "unet_params": total, "lora_rank": rank, "lora_params": lora,
                "unet_bf16_gb": total * 2 / 2**30, "unet_fp32_gb": total * 4 / 2**30}
    from diffusers_unlearn.families import get_family

    buffers = sum(b.numel() for b in model.buffers())
    nf4 = nf4_bytes(model)
    model.requires_grad_(False)
    model = add_lora(model, rank=rank, targets="attention", presets=get_family(family).lora_target_presets)
    lora = sum(p.numel() for p in trainable_parameters(model))
    components = _component_counts(family)
    return {"family": family, "scale": scale, "transformer_params": total, "transformer_buffer_elements": buffers,
            "lora_rank": rank, "lora_params": lora, "transformer_bf16_gb": total * 2 / 2**30,
            "transformer_fp32_gb": total * 4 / 2**30, "transformer_buffers_bf16_gb": buffers * 2 / 2**30,
            "transformer_nf4_estimate_gb": nf4 / 2**30, "components": components,
            "pipeline_bf16_gb": (total + sum(c["params"] for c in components)) * 2 / 2**30}


@contextlib.contextmanager
def _cpu_quantization():
    """Let diffusers' 4-bit bitsandbytes loader run on a CPU-only machine, for the reduced-width CPU measurement:
    diffusers 0.42 refuses without a GPU (`validate_environment`: "No GPU found") and would place the model on the
    current CUDA device (`update_device_map`); both are replaced while the model loads, then restored.
    bitsandbytes 0.50 itself runs NF4 layers forward and backward on the CPU."""
    from diffusers.quantizers.bitsandbytes.bnb_quantizer import BnB4BitDiffusersQuantizer as quantizer

    saved = quantizer.validate_environment, quantizer.update_device_map
    quantizer.validate_environment = lambda self, *args, **kwargs: None
    quantizer.update_device_map = lambda self, device_map: device_map or {"": "cpu"}
    try:
        yield
    finally:
        quantizer.validate_environment, quantizer.update_device_map = saved


def load_nf4(folder: str, family: str, device: torch.device) -> torch.nn.Module:
    """The model saved in `folder` loaded through diffusers' `BitsAndBytesConfig(load_in_4bit=True,
    bnb_4bit_quant_type="nf4")` (bf16 compute and non-Linear weights), as diffusers' QLoRA recipes load Flux.
    On a GPU diffusers loads it onto the GPU; on a CPU diffusers' GPU check is lifted (`_cpu_quantization`)."""
    from diffusers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    with _cpu_quantization() if device.type == "cpu" else contextlib.nullcontext():
        return model_class(family).from_pretrained(folder, quantization_config=config, torch_dtype=torch.bfloat16)


def run_one(args) -> dict:
    """One set-up, in this process: warm-up steps, then timed steps; returns the measurements."""
    from accelerate import Accelerator
    from diffusers import DDPMScheduler

    from diffusers_unlearn.lora import add_lora, make_optimizer, prepare_full_finetune, trainable_parameters
    from diffusers_unlearn.noise import NoiseSchedule
    from diffusers_unlearn.objectives import DenoisingBatch, Denoiser, get_objective
    from diffusers_unlearn.unlearner import Unlearner

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    spec = FAMILY_SPECS[args.family]
    flow = args.family in TRANSFORMER_FAMILIES
    bnb_4bit = bool(getattr(args, "bnb_4bit", False))
    unet = build_model(args.scale, args.resolution, args.family)
    if flow:
        from diffusers import FlowMatchEulerDiscreteScheduler

        from diffusers_unlearn.noise import FlowMatchSchedule

        # SD3.5's and FLUX.1-dev's scheduler configs both have shift 3.0 (the grid does not change the memory).
        schedule = FlowMatchSchedule.from_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0))
    else:
        schedule = NoiseSchedule.from_scheduler(DDPMScheduler(num_train_timesteps=1000))
    latent = args.resolution // 8
    channels = 16 if flow else 4
    text_dim = spec["text_dim"]
    g = torch.Generator().manual_seed(0)
    call = None
    if args.family in ("sdxl",) + TRANSFORMER_FAMILIES:
        from diffusers_unlearn.families import get_family

        call = get_family(args.family).call

    def batch():
        x0 = torch.randn(1, channels, latent, latent, generator=g)
        tokens = 77
        if flow:  # SD3: 77 CLIP tokens, then T5's; Flux: T5's only
            tokens = spec["clip_tokens"] + (getattr(args, "max_sequence_length", None) or spec["t5_tokens"])
        hidden = torch.randn(1, tokens, text_dim, generator=g)
        added = None
        if args.family == "sdxl":
            # Pooled text embedding; time ids = an uncropped image at the training resolution.
            size = float(args.resolution)
            added = {"text_embeds": torch.randn(1, SDXL_TEXT_EMBEDS_DIM, generator=g),
                     "time_ids": torch.tensor([[size, size, 0.0, 0.0, size, size]])}
        elif flow:
            added = {"pooled_projections": torch.randn(1, spec["pooled_dim"], generator=g)}
            if spec["guidance"] is not None:
                added["guidance"] = torch.full((1,), spec["guidance"])
        return DenoisingBatch(x0, None, hidden, added)

    forget, keep = batch(), batch()
    objective = get_objective("siss", scaling_norm=1.0)

    if args.setup == "reference":
        unet = prepare_full_finetune(unet).to(device)
        params = trainable_parameters(unet)
        optimizer = torch.optim.AdamW(params, lr=1e-5)
        denoiser = Denoiser(unet, schedule, call=call)

        def step(generator):
            terms = objective(denoiser, forget.to(device), keep.to(device), generator=generator)
            # Two backward passes through one retained graph, each gradient copied into its own fp32 buffer.
            terms.keep.backward(retain_graph=True)
            keep_grads = [p.grad.detach().clone() for p in params]
            optimizer.zero_grad(set_to_none=True)
            terms.forget.backward()
            forget_grads = [p.grad.detach().clone() for p in params]
            norm = torch.sqrt(sum(f.pow(2).sum() for f in forget_grads))
            for p, k, f in zip(params, keep_grads, forget_grads):
                p.grad = k + f * (objective.scaling_norm / norm)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    else:
        bf16 = getattr(args, "mixed_precision", "bf16") == "bf16"
        accelerator = Accelerator(mixed_precision="bf16" if bf16 else "no", cpu=not cuda)
        if args.setup == "lora":
            if bnb_4bit:  # the built model is saved in bf16 (it loads in bf16) and freed before its NF4 copy loads
                import tempfile

                with tempfile.TemporaryDirectory() as folder:
                    unet.to(torch.bfloat16).save_pretrained(folder)  # full-size Flux: 24 GB on disk, not 48
                    del unet
                    unet = load_nf4(folder, args.family, device)
            unet.requires_grad_(False)
            presets = None
            if flow:
                from diffusers_unlearn.families import get_family

                presets = get_family(args.family).lora_target_presets
            unet = add_lora(unet, rank=4, targets="attention", presets=presets)
            # The frozen base is stored in bf16, as the diffusers LoRA scripts store it; adapters stay fp32.
            # (An NF4 base's packed 4-bit weights are not floating point and stay as they are.) Floating buffers
            # (SD3's positional-embedding table) are cast too, as loading the base in bf16 casts them.
            for name, p in unet.named_parameters():
                if bf16 and not p.requires_grad and p.is_floating_point():
                    p.data = p.data.to(torch.bfloat16)
            for buffer in unet.buffers():
                if bf16 and buffer.is_floating_point():
                    buffer.data = buffer.data.to(torch.bfloat16)
        else:
            unet = prepare_full_finetune(unet)
        unet.enable_gradient_checkpointing()
        if not bnb_4bit:  # a quantised model is loaded onto the GPU and stays there
            unet.to(device)
        params = trainable_parameters(unet)
        optimizer = make_optimizer(params, 1e-4 if args.setup == "lora" else 1e-5, use_8bit_adam=args.use_8bit_adam)
        unet, optimizer = accelerator.prepare(unet, optimizer)
        denoiser = Denoiser(unet, schedule, call=call)
        unlearner = Unlearner(objective, denoiser, optimizer, accelerator, max_grad_norm=1.0)

        def step(generator):
            unlearner.step(forget.to(device), keep.to(device), generator=generator)

    times = []
    for index in range(args.warmup + args.repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        step(torch.Generator().manual_seed(index))
        if cuda:
            torch.cuda.synchronize()
        if index >= args.warmup:
            times.append(time.perf_counter() - start)
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**30
        kind = "max_memory_allocated"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
        kind = "peak_rss"
    return {
        "family": args.family,
        "setup": args.setup,
        "device": str(device),
        "scale": args.scale,
        "resolution": args.resolution,
        "trainable_params_m": sum(p.numel() for p in params) / 1e6,
        "total_params_m": sum(p.numel() for p in unet.parameters()) / 1e6,
        "peak_gb": peak,
        "peak_kind": kind,
        "step_s": statistics.median(times),
        "threads": torch.get_num_threads(),
        "eight_bit_adam": bool(args.use_8bit_adam) and args.setup != "reference",
        "mixed_precision": "no" if args.setup == "reference" else getattr(args, "mixed_precision", "bf16"),
        "bnb_4bit": bnb_4bit,
    }


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--family", default="sd15", choices=FAMILIES,
                        help="Denoiser to build: the UNet of SD 1.5 (default), SD 2.1 or SDXL base 1.0, or the "
                             "transformer of SD3.5 medium (sd3) or FLUX.1-dev (flux).")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="Multiply the family's channel widths (UNets) or attention-head count (sd3, flux); "
                             "1.0 = the published model.")
    parser.add_argument("--resolution", type=int, default=None,
                        help="Image resolution; latents are resolution/8. Default: 512 (sd15), 768 (sd21), "
                             "1024 (sdxl, sd3, flux).")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads per set-up (default: torch's). On a shared machine, fewer threads "
                             "than cores avoids oversubscription, which can slow a CPU step down several-fold.")
    parser.add_argument("--mixed_precision", default="bf16", choices=("bf16", "no"),
                        help="bf16 (default, the measured set-ups) or no: float32 throughout, for quick checks "
                             "(lora and full only; the reference design is always float32).")
    parser.add_argument("--count_only", action="store_true",
                        help="Print the denoiser's and the LoRA adapter's parameter counts (meta device) and exit; "
                             "for sd3 and flux also the text encoders', the VAE's and the weights' bytes.")
    parser.add_argument("--max_sequence_length", type=int, default=None,
                        help="sd3 and flux: T5 tokens of the text embeddings (default: the official LoRA scripts' "
                             "77 for sd3, after its 77 CLIP tokens, and 512 for flux).")
    parser.add_argument("--bnb_4bit", action="store_true",
                        help="lora only: reload the built denoiser with an NF4 (4-bit) base through diffusers' "
                             "BitsAndBytesConfig before adding LoRA (on a CPU, diffusers' GPU check is lifted).")
    parser.add_argument("--setups", nargs="*", default=list(SETUPS), choices=SETUPS)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no_8bit_adam", dest="use_8bit_adam", action="store_false", help="Use torch AdamW everywhere.")
    parser.add_argument("--json", action="store_true", help="Print one JSON object per set-up.")
    parser.add_argument("--setup", default=None, help=argparse.SUPPRESS)  # internal: run one set-up
    args = parser.parse_args()
    if args.resolution is None:
        args.resolution = FAMILY_SPECS[args.family]["resolution"]
    if args.resolution % 8 or args.resolution <= 0:
        parser.error("--resolution must be a positive multiple of 8.")
    if args.family in TRANSFORMER_FAMILIES and args.resolution % 16:
        parser.error(f"--family {args.family} patches 2x2 latents: --resolution must be a multiple of 16.")
    if args.bnb_4bit and ({args.setup} if args.setup else set(args.setups)) != {"lora"}:
        parser.error("--bnb_4bit applies to the lora set-up only: pass --setups lora.")
    return args


def print_counts(counts: dict) -> None:
    """`count_parameters`' result as text."""
    if "unet_params" in counts:
        print(f"family={counts['family']} scale={counts['scale']} UNet params={counts['unet_params']:,} "
              f"({counts['unet_fp32_gb']:.2f} GiB fp32, {counts['unet_bf16_gb']:.2f} GiB bf16) "
              f"LoRA rank {counts['lora_rank']} attention params={counts['lora_params']:,}")
        return
    print(f"family={counts['family']} scale={counts['scale']} transformer params={counts['transformer_params']:,} "
          f"({counts['transformer_fp32_gb']:.2f} GiB fp32, {counts['transformer_bf16_gb']:.2f} GiB bf16) "
          f"LoRA rank {counts['lora_rank']} attention params={counts['lora_params']:,}")
    if counts["transformer_buffer_elements"]:
        print(f"  transformer buffers (positional embedding, saved with the weights): "
              f"{counts['transformer_buffer_elements']:,} elements ({counts['transformer_buffers_bf16_gb']:.2f} GiB bf16)")
    if counts["family"] == "flux":
        print(f"  transformer with an NF4 base, ESTIMATE (4-bit Linear weights + one fp32 absmax per 64, "
              f"the rest bf16; not measured): {counts['transformer_nf4_estimate_gb']:.2f} GiB")
    for row in counts["components"]:
        print(f"  {row['name']:32s} {row['class']:28s} params={row['params']:>14,} ({row['bf16_gb']:.2f} GiB bf16)")
    print(f"  parameters of the whole pipeline in bf16 (transformer + text encoders + VAE): {counts['pipeline_bf16_gb']:.2f} GiB")


def main():
    args = parse_args()
    if args.count_only:
        counts = count_parameters(args.family, args.scale, args.resolution)
        if args.json:
            print(json.dumps(counts))
        else:
            print_counts(counts)
        return
    if args.setup:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return
    if args.use_8bit_adam:
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise SystemExit('8-bit AdamW needs bitsandbytes: pip install "bitsandbytes>=0.50" (or pass --no_8bit_adam).')
    rows = []
    for setup in args.setups:
        command = [sys.executable, os.path.abspath(__file__), "--setup", setup, "--device", args.device,
                   "--family", args.family, "--scale", str(args.scale), "--resolution", str(args.resolution),
                   "--warmup", str(args.warmup), "--repeats", str(args.repeats)]
        if args.threads:
            command += ["--threads", str(args.threads)]
        if args.mixed_precision != "bf16":
            command += ["--mixed_precision", args.mixed_precision]
        if not args.use_8bit_adam:
            command.append("--no_8bit_adam")
        if args.bnb_4bit:
            command.append("--bnb_4bit")
        if args.max_sequence_length:
            command += ["--max_sequence_length", str(args.max_sequence_length)]
        completed = subprocess.run(command, capture_output=True, text=True)
        lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
        if completed.returncode != 0 or not lines:
            tail = completed.stderr.strip().splitlines()[-3:]
            rows.append({"setup": setup, "error": " | ".join(tail) or f"exit code {completed.returncode}"})
            continue
        rows.append(json.loads(lines[-1][len("RESULT "):]))
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return
    first = next((r for r in rows if "error" not in r), None)
    if first:
        print(f"family={args.family} device={first['device']} scale={args.scale} resolution={args.resolution} "
              f"{'transformer' if args.family in TRANSFORMER_FAMILIES else 'UNet'} "
              f"params={first['total_params_m']:.0f}M peak={first['peak_kind']} threads={first['threads']} "
              f"mixed_precision={args.mixed_precision} "
              f"{'bnb_4bit=nf4 (packed 4-bit weights counted as stored) ' if args.bnb_4bit else ''}"
              f"median of {args.repeats} steps after {args.warmup} warm-up")
    print(f"{'setup':10s} {'trainable M':>12s} {'peak GB':>9s} {'target GB':>10s} {'step s':>8s}")
    for row in rows:
        if "error" in row:
            print(f"{row['setup']:10s} failed: {row['error']}")
            continue
        target = FAMILY_SPECS[args.family]["target_gb"][row["setup"]]
        if args.family == "flux" and not args.bnb_4bit:
            target = None  # Flux's 16 GB target is for a 4-bit base
        print(f"{row['setup']:10s} {row['trainable_params_m']:12.1f} {row['peak_gb']:9.2f} "
              f"{'-' if target is None else f'{target:.0f}':>10s} {row['step_s']:8.2f}")
    if args.family == "flux" and not args.bnb_4bit:
        print("Flux's target (<= 16 GB) is for a 4-bit base: on a GPU, add --bnb_4bit --setups lora.")
    if args.device != "cuda" and not args.device.startswith("cuda:"):
        print(f"Measured on the {args.device}: 'peak GB' is the process's peak resident memory"
              f"{'' if args.scale == 1.0 else f' at --scale {args.scale}'}, not accelerator memory. "
              "The GPU figures (and the targets) are NOT measured by this run.")


if __name__ == "__main__":
    main()
