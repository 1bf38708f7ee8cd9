"""Peak memory and step time of one SISS step on a Stable-Diffusion-1.5-sized UNet (random weights, no download).

The UNet is built from SD 1.5's published UNet2DConditionModel config. Each step trains on one forget/keep pair
(batch 1 each) at 512 px (64x64x4 latents, 77x768 text embeddings). Three set-ups:

- `lora`: SISS with LoRA (rank 4, attention), bf16 autocast, 8-bit AdamW, gradient checkpointing (target <= 6 GB);
- `full`: SISS with full fine-tuning, bf16 autocast, 8-bit AdamW, gradient checkpointing (target <= 16 GB);
- `reference`: the reference design: full fine-tuning in fp32, torch AdamW, two backward passes with a retained
  graph, and separate fp32 gradient buffers for the keep and forget gradients.

Each set-up runs in a fresh subprocess, so its peak is its own: on CUDA `torch.cuda.max_memory_allocated`, on
the CPU the process's peak resident memory (which includes the Python runtime, about 0.4 GB).

    python benchmarks/bench_sd_memory.py                       # CUDA if present, else CPU
    python benchmarks/bench_sd_memory.py --scale 0.25 --resolution 256   # scaled down for a CPU
    python benchmarks/bench_sd_memory.py --json
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
SETUPS = ("lora", "full", "reference")
TARGET_GB = {"lora": 6.0, "full": 16.0, "reference": None}


def build_unet(scale: float, resolution: int):
    from diffusers import UNet2DConditionModel

    config = dict(SD15_UNET_CONFIG)
    config["block_out_channels"] = [int(c * scale) // 32 * 32 for c in SD15_UNET_CONFIG["block_out_channels"]]
    config["sample_size"] = resolution // 8
    torch.manual_seed(0)
    return UNet2DConditionModel(**config)


def run_one(args) -> dict:
    """One set-up, in this process: warm-up steps, then timed steps; returns the measurements."""
    from accelerate import Accelerator
    from diffusers import DDPMScheduler

    from diffusers_unlearn.lora import add_lora, make_optimizer, prepare_full_finetune, trainable_parameters
    from diffusers_unlearn.noise import NoiseSchedule
    from diffusers_unlearn.objectives import DenoisingBatch, Denoiser, get_objective
    from diffusers_unlearn.unlearner import Unlearner

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    unet = build_unet(args.scale, args.resolution)
    schedule = NoiseSchedule.from_scheduler(DDPMScheduler(num_train_timesteps=1000))
    latent = args.resolution // 8
    g = torch.Generator().manual_seed(0)

    def batch():
        return DenoisingBatch(torch.randn(1, 4, latent, latent, generator=g), None, torch.randn(1, 77, 768, generator=g))

    forget, keep = batch(), batch()
    objective = get_objective("siss", scaling_norm=1.0)

    if args.setup == "reference":
        unet = prepare_full_finetune(unet).to(device)
        params = trainable_parameters(unet)
        optimizer = torch.optim.AdamW(params, lr=1e-5)
        denoiser = Denoiser(unet, schedule)

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
        accelerator = Accelerator(mixed_precision="bf16", cpu=not cuda)
        if args.setup == "lora":
            unet.requires_grad_(False)
            unet = add_lora(unet, rank=4, targets="attention")
            # The frozen base is stored in bf16, as the diffusers LoRA scripts store it; adapters stay fp32.
            for name, p in unet.named_parameters():
                if not p.requires_grad:
                    p.data = p.data.to(torch.bfloat16)
        else:
            unet = prepare_full_finetune(unet)
        unet.enable_gradient_checkpointing()
        unet.to(device)
        params = trainable_parameters(unet)
        optimizer = make_optimizer(params, 1e-4 if args.setup == "lora" else 1e-5, use_8bit_adam=args.use_8bit_adam)
        unet, optimizer = accelerator.prepare(unet, optimizer)
        denoiser = Denoiser(unet, schedule)
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
        "setup": args.setup,
        "device": str(device),
        "scale": args.scale,
        "resolution": args.resolution,
        "trainable_params_m": sum(p.numel() for p in params) / 1e6,
        "total_params_m": sum(p.numel() for p in unet.parameters()) / 1e6,
        "peak_gb": peak,
        "peak_kind": kind,
        "step_s": statistics.median(times),
        "eight_bit_adam": bool(args.use_8bit_adam) and args.setup != "reference",
    }


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--scale", type=float, default=1.0, help="Multiply SD 1.5's channel widths (1.0 = SD 1.5).")
    parser.add_argument("--resolution", type=int, default=512, help="Image resolution; latents are resolution/8.")
    parser.add_argument("--setups", nargs="*", default=list(SETUPS), choices=SETUPS)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no_8bit_adam", dest="use_8bit_adam", action="store_false", help="Use torch AdamW everywhere.")
    parser.add_argument("--json", action="store_true", help="Print one JSON object per set-up.")
    parser.add_argument("--setup", default=None, help=argparse.SUPPRESS)  # internal: run one set-up
    return parser.parse_args()


def main():
    args = parse_args()
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
                   "--scale", str(args.scale), "--resolution", str(args.resolution),
                   "--warmup", str(args.warmup), "--repeats", str(args.repeats)]
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
        print(f"device={first['device']} scale={args.scale} resolution={args.resolution} "
              f"UNet params={first['total_params_m']:.0f}M peak={first['peak_kind']} "
              f"median of {args.repeats} steps after {args.warmup} warm-up")
    print(f"{'setup':10s} {'trainable M':>12s} {'peak GB':>9s} {'target GB':>10s} {'step s':>8s}")
    for row in rows:
        if "error" in row:
            print(f"{row['setup']:10s} failed: {row['error']}")
            continue
        target = TARGET_GB[row["setup"]]
        print(f"{row['setup']:10s} {row['trainable_params_m']:12.1f} {row['peak_gb']:9.2f} "
              f"{'-' if target is None else f'{target:.0f}':>10s} {row['step_s']:8.2f}")


if __name__ == "__main__":
    main()
