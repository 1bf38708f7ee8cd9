"""Time one optimizer step of every unlearning objective on the same model and batch.

Each method gets a fresh copy of the same model. Steps are timed round-robin (one step of
every method per round) after `--warmup` untimed rounds; the median over `--repeats` rounds
is reported, with its ratio to `naive_deletion` (one forward and one backward pass).

    python benchmarks/bench_step.py                      # CPU, the toy-sized UNet, full fine-tuning
    python benchmarks/bench_step.py --train_mode lora --json
    python benchmarks/bench_step.py --device cuda --resolution 32 --batch_size 64
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from diffusers import DDPMScheduler, UNet2DModel

from diffusers_unlearn.lora import add_lora
from diffusers_unlearn.noise import NoiseSchedule
from diffusers_unlearn.objectives import DenoisingBatch, Denoiser, get_objective
from diffusers_unlearn.unlearner import Unlearner

# (label, registry name, hyperparameters)
CASES = [
    ("naive_deletion", "naive_deletion", {}),
    ("neggrad", "neggrad", {}),
    ("neggrad+", "neggrad", {"keep_weight": 1.0}),
    ("siss", "siss", {"scaling_norm": 0.05}),
    ("siss[norm_refresh_every=10]", "siss", {"scaling_norm": 0.05, "norm_refresh_every": 10}),
    ("siss[paper]", "siss", {"weighting": "paper", "n": 1872, "k": 75}),
    ("siss_no_is", "siss_no_is", {"scaling_norm": 0.05}),
    ("siss_bernoulli", "siss_bernoulli", {"scaling_norm": 0.05}),
    ("erasediff", "erasediff", {}),
    ("erasediff[K=1]", "erasediff", {"inner_steps": 1}),
    ("vdu", "vdu", {}),
]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--resolution", type=int, default=8)
    parser.add_argument("--channels", type=int, nargs=2, default=(32, 64), help="block_out_channels")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--train_mode", choices=["full", "lora"], default="full")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--methods", nargs="*", default=None, help="labels to run (default: all)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per method")
    return parser.parse_args()


def build_model(args) -> UNet2DModel:
    torch.manual_seed(0)
    # The embedded default's architecture (0.70M parameters at 32/64 channels).
    return UNet2DModel(
        sample_size=args.resolution,
        in_channels=1,
        out_channels=1,
        block_out_channels=tuple(args.channels),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build_case(args, base_model, schedule, forget, name, hyperparameters) -> Unlearner:
    model = copy.deepcopy(base_model)
    if args.train_mode == "lora":
        model = add_lora(model, rank=args.rank, targets="attention_conv")
    model.to(args.device).train()
    denoiser = Denoiser(model, schedule)
    objective = get_objective(name, **hyperparameters)
    objective.prepare(denoiser, forget)
    params = [p for p in model.parameters() if p.requires_grad]
    return Unlearner(objective, denoiser, torch.optim.AdamW(params, lr=1e-5))


def timed_step(args, unlearner, forget, keep, generator) -> float:
    synchronize(args.device)
    start = time.perf_counter()
    unlearner.step(forget, keep, generator=generator)
    synchronize(args.device)
    return (time.perf_counter() - start) * 1000


def main():
    args = parse_args()
    base_model = build_model(args)
    schedule = NoiseSchedule.from_scheduler(DDPMScheduler(num_train_timesteps=1000))
    g = torch.Generator().manual_seed(0)
    shape = (args.batch_size, 1, args.resolution, args.resolution)
    forget = DenoisingBatch(torch.randn(shape, generator=g).clamp(-1, 1)).to(args.device)
    keep = DenoisingBatch(torch.randn(shape, generator=g).clamp(-1, 1)).to(args.device)

    cases = [c for c in CASES if args.methods is None or c[0] in args.methods]
    unlearners = {label: build_case(args, base_model, schedule, forget, name, kw) for label, name, kw in cases}
    generator = torch.Generator(args.device).manual_seed(0)
    times = {label: [] for label in unlearners}
    # Round-robin: every round times one step of every method, so a change in machine load
    # during the run affects all methods alike and the ratios stay fair.
    for round_index in range(args.warmup + args.repeats):
        for label, unlearner in unlearners.items():
            elapsed = timed_step(args, unlearner, forget, keep, generator)
            if round_index >= args.warmup:
                times[label].append(elapsed)
    results = [{"method": label, "step_ms": statistics.median(times[label])} for label in unlearners]
    naive_ms = times.get("naive_deletion") and statistics.median(times["naive_deletion"])
    for row in results:
        row["ratio_to_naive"] = None if naive_ms is None else row["step_ms"] / naive_ms
        row.update(
            device=args.device,
            train_mode=args.train_mode,
            batch_size=args.batch_size,
            resolution=args.resolution,
            torch_threads=torch.get_num_threads(),
        )

    if args.json:
        for row in results:
            print(json.dumps(row))
        return
    print(
        f"device={args.device} train_mode={args.train_mode} batch={args.batch_size} "
        f"resolution={args.resolution} threads={torch.get_num_threads()} "
        f"median of {args.repeats} round-robin rounds after {args.warmup} warm-up rounds"
    )
    print(f"{'method':32s} {'step_ms':>9s} {'x naive':>8s}")
    for row in results:
        ratio = "-" if row["ratio_to_naive"] is None else f"{row['ratio_to_naive']:.2f}"
        print(f"{row['method']:32s} {row['step_ms']:9.1f} {ratio:>8s}")


if __name__ == "__main__":
    main()
