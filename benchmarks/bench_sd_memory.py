"""Peak memory and step time of one SISS step on a Stable Diffusion UNet (random weights, no download).

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

`--family sd21` builds SD 2.1's UNet (768 px, 77x1024 text embeddings) with the targets left open.

`--scale` multiplies the channel widths (SD 1.5: rounded down to multiples of 32, same head counts; SD 2.1 and
SDXL: rounded down to multiples of 64, at least 64, with one 64-wide head per 64 channels as at full size).
Everything else (depth, transformer layers per block, text-embedding and micro-conditioning widths) stays as
published.
"""

from __future__ import annotations

import argparse
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
FAMILIES = ("sd15", "sd21", "sdxl")
# Per family: the UNet config, the native resolution, the text-embedding width, and the targets (GB).
FAMILY_SPECS = {
    "sd15": {"config": SD15_UNET_CONFIG, "resolution": 512, "text_dim": 768,
             "target_gb": {"lora": 6.0, "full": 16.0, "reference": None}},
    "sd21": {"config": SD21_UNET_CONFIG, "resolution": 768, "text_dim": 1024,
             "target_gb": {"lora": None, "full": None, "reference": None}},
    "sdxl": {"config": SDXL_UNET_CONFIG, "resolution": 1024, "text_dim": 2048,
             "target_gb": {"lora": 12.0, "full": None, "reference": None}},
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


def build_unet(scale: float, resolution: int, family: str = "sd15"):
    from diffusers import UNet2DConditionModel

    config = unet_config(family, scale, resolution)
    torch.manual_seed(0)
    return UNet2DConditionModel(**config)


def count_parameters(family: str, scale: float, resolution: int, rank: int = 4) -> dict:
    """Total UNet parameters and LoRA (rank `rank`, attention) parameters, counted on the meta device: nothing is
    allocated and no step runs, so this works at full size on any machine."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from diffusers_unlearn.lora import add_lora, trainable_parameters

    with init_empty_weights():
        unet = UNet2DConditionModel(**unet_config(family, scale, resolution))
    total = sum(p.numel() for p in unet.parameters())
    unet.requires_grad_(False)
    unet = add_lora(unet, rank=rank, targets="attention")
    lora = sum(p.numel() for p in trainable_parameters(unet))
    return {"family": family, "scale": scale, "unet_params": total, "lora_rank": rank, "lora_params": lora,
            "unet_bf16_gb": total * 2 / 2**30, "unet_fp32_gb": total * 4 / 2**30}


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
    unet = build_unet(args.scale, args.resolution, args.family)
    schedule = NoiseSchedule.from_scheduler(DDPMScheduler(num_train_timesteps=1000))
    latent = args.resolution // 8
    text_dim = FAMILY_SPECS[args.family]["text_dim"]
    g = torch.Generator().manual_seed(0)
    call = None
    if args.family == "sdxl":
        from diffusers_unlearn.families import get_family

        call = get_family("sdxl").call

    def batch():
        x0 = torch.randn(1, 4, latent, latent, generator=g)
        hidden = torch.randn(1, 77, text_dim, generator=g)
        added = None
        if args.family == "sdxl":
            # Pooled text embedding; time ids = an uncropped image at the training resolution.
            size = float(args.resolution)
            added = {"text_embeds": torch.randn(1, SDXL_TEXT_EMBEDS_DIM, generator=g),
                     "time_ids": torch.tensor([[size, size, 0.0, 0.0, size, size]])}
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
            unet.requires_grad_(False)
            unet = add_lora(unet, rank=4, targets="attention")
            # The frozen base is stored in bf16, as the diffusers LoRA scripts store it; adapters stay fp32.
            for name, p in unet.named_parameters():
                if bf16 and not p.requires_grad:
                    p.data = p.data.to(torch.bfloat16)
        else:
            unet = prepare_full_finetune(unet)
        unet.enable_gradient_checkpointing()
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
    }


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--family", default="sd15", choices=FAMILIES,
                        help="UNet to build: SD 1.5 (default), SD 2.1 or SDXL base 1.0.")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="Multiply the family's channel widths (1.0 = the published model).")
    parser.add_argument("--resolution", type=int, default=None,
                        help="Image resolution; latents are resolution/8. Default: 512 (sd15), 768 (sd21), 1024 (sdxl).")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads per set-up (default: torch's). On a shared machine, fewer threads "
                             "than cores avoids oversubscription, which can slow a CPU step down several-fold.")
    parser.add_argument("--mixed_precision", default="bf16", choices=("bf16", "no"),
                        help="bf16 (default, the measured set-ups) or no: float32 throughout, for quick checks "
                             "(lora and full only; the reference design is always float32).")
    parser.add_argument("--count_only", action="store_true",
                        help="Print the UNet's and the LoRA adapter's parameter counts (meta device) and exit.")
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
    return args


def main():
    args = parse_args()
    if args.count_only:
        counts = count_parameters(args.family, args.scale, args.resolution)
        if args.json:
            print(json.dumps(counts))
        else:
            print(f"family={counts['family']} scale={counts['scale']} UNet params={counts['unet_params']:,} "
                  f"({counts['unet_fp32_gb']:.2f} GiB fp32, {counts['unet_bf16_gb']:.2f} GiB bf16) "
                  f"LoRA rank {counts['lora_rank']} attention params={counts['lora_params']:,}")
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
              f"UNet params={first['total_params_m']:.0f}M peak={first['peak_kind']} threads={first['threads']} "
              f"mixed_precision={args.mixed_precision} "
              f"median of {args.repeats} steps after {args.warmup} warm-up")
    print(f"{'setup':10s} {'trainable M':>12s} {'peak GB':>9s} {'target GB':>10s} {'step s':>8s}")
    for row in rows:
        if "error" in row:
            print(f"{row['setup']:10s} failed: {row['error']}")
            continue
        target = FAMILY_SPECS[args.family]["target_gb"][row["setup"]]
        print(f"{row['setup']:10s} {row['trainable_params_m']:12.1f} {row['peak_gb']:9.2f} "
              f"{'-' if target is None else f'{target:.0f}':>10s} {row['step_s']:8.2f}")


if __name__ == "__main__":
    main()
