"""Retrain the bundled toy models (seeded, CPU, minutes).

    python -m diffusers_unlearn.toy.train unconditional       # DDPM on digits + canary copies
    python -m diffusers_unlearn.toy.train class_conditional   # DDPM on digits, labels 0..9, null label 10
    python -m diffusers_unlearn.toy.train classifier          # CNN for digits + canary
    python -m diffusers_unlearn.toy.train all [--seed 0] [--steps N] [--output_dir DIR]
    python -m diffusers_unlearn.toy.train unconditional --without_canary   # the retrain-from-scratch reference

The DDPMs are saved as diffusers pipeline folders that plain `DDPMPipeline.from_pretrained`
loads (the EMA weights); the classifier as `config.json` + `model.safetensors`.
Runs are reproducible for a seed on the same machine and thread count (float reductions
may differ across CPUs).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Optional

import torch
import torch.nn.functional as F
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel

from ..pipelines.ddpm import ClassConditionalDDPMPipeline
from . import ASSETS_DIR, DDPM_RETRAINED_NAME
from .classifier import DigitsClassifier, augment
from .data import CANARY_LABEL, NUM_CLASSES, toy_split

DEFAULT_STEPS = {"unconditional": 3000, "class_conditional": 3000, "classifier": 1500}
NULL_CLASS_LABEL = CANARY_LABEL  # the class-conditional model never sees the canary; 10 is its null label


def toy_unet(num_class_embeds: Optional[int] = None) -> UNet2DModel:
    """The toy DDPM's UNet (0.70M parameters at 8x8; one attention level at 4x4)."""
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        num_class_embeds=num_class_embeds,
    )


def toy_scheduler() -> DDPMScheduler:
    """The training noise schedule: 1,000 linear-beta steps, epsilon prediction."""
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")


def _batches(num_items: int, batch_size: int, generator: torch.Generator):
    """Endless stream of index batches, reshuffled every epoch."""
    while True:
        order = torch.randperm(num_items, generator=generator)
        for start in range(0, num_items - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def _ema_update(model: torch.nn.Module, loss: torch.Tensor, optimizer, lr_scheduler, ema: EMAModel) -> None:
    """One optimizer step with gradient clipping at 1, then the EMA copy follows."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    lr_scheduler.step()
    ema.step(model.parameters())


def _log_mean_loss(label: str, running: float, step: int, steps: int, log_every: int, start: float) -> float:
    """Print the mean loss since the last print every `log_every` steps and at the end; returns the new sum."""
    if step % log_every == 0 or step == steps:
        count = log_every if step % log_every == 0 else step % log_every
        print(f"{label}step {step}/{steps}  loss {running / count:.4f}  {time.time() - start:.0f}s", flush=True)
        return 0.0
    return running


def train_ddpm(
    conditional: bool,
    output_dir: str,
    steps: int,
    seed: int = 0,
    batch_size: int = 128,
    learning_rate: float = 1e-3,
    ema_decay: float = 0.999,
    label_dropout: float = 0.1,
    log_every: int = 250,
    without_canary: bool = False,
) -> None:
    """Train a toy DDPM and save its EMA weights as a pipeline folder.

    Unconditional: trained on the "train" split (digits + canary copies), saved as `DDPMPipeline`.
    Class-conditional: trained on the digits of the "train" split only (no canary), labels 0..9,
    with `label_dropout` of the labels replaced by the null label 10 (for classifier-free guidance),
    saved by `ClassConditionalDDPMPipeline` (its folder names `DDPMPipeline`).
    `without_canary` drops the canary copies from the unconditional model's data and changes nothing else (the
    retrain-from-scratch reference of data unlearning).
    """
    torch.manual_seed(seed)
    split = toy_split("train")
    if conditional or without_canary:
        split = split.digits_only()
    images, labels = split.images, split.labels

    unet = toy_unet(num_class_embeds=NUM_CLASSES if conditional else None)
    scheduler = toy_scheduler()
    ema = EMAModel(unet.parameters(), decay=ema_decay, model_cls=UNet2DModel, model_config=unet.config)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=learning_rate, weight_decay=1e-2)
    lr_scheduler = get_cosine_schedule_with_warmup(
        optimizer, num_warmup_steps=min(100, steps // 10), num_training_steps=steps
    )
    alphas_cumprod = scheduler.alphas_cumprod

    generator = torch.Generator().manual_seed(seed)
    batches = _batches(len(images), batch_size, generator)
    unet.train()
    start, running = time.time(), 0.0
    for step in range(1, steps + 1):
        index = next(batches)
        x0 = images[index]
        noise = torch.randn(x0.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(index),), generator=generator)
        gamma = alphas_cumprod[timesteps].sqrt().view(-1, 1, 1, 1)
        sigma = (1 - alphas_cumprod[timesteps]).sqrt().view(-1, 1, 1, 1)
        noisy = gamma * x0 + sigma * noise

        class_labels = None
        if conditional:
            class_labels = labels[index].clone()
            drop = torch.rand(len(index), generator=generator) < label_dropout
            class_labels[drop] = NULL_CLASS_LABEL

        loss = F.mse_loss(unet(noisy, timesteps, class_labels=class_labels).sample, noise)
        _ema_update(unet, loss, optimizer, lr_scheduler, ema)
        running = _log_mean_loss("", running + loss.item(), step, steps, log_every, start)

    ema.copy_to(unet.parameters())
    unet.eval()
    pipeline_cls = ClassConditionalDDPMPipeline if conditional else DDPMPipeline
    pipeline_cls(unet=unet, scheduler=scheduler).save_pretrained(output_dir)
    print(f"saved {output_dir} after {time.time() - start:.0f}s", flush=True)


def train_classifier(
    output_dir: str,
    steps: int,
    seed: int = 0,
    batch_size: int = 128,
    learning_rate: float = 2e-3,
    log_every: int = 250,
) -> DigitsClassifier:
    """Train `DigitsClassifier` on the "train" split (digits + canary copies) with light augmentation."""
    torch.manual_seed(seed)
    split = toy_split("train")
    heldout = toy_split("heldout")
    model = DigitsClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-2)
    lr_scheduler = get_cosine_schedule_with_warmup(
        optimizer, num_warmup_steps=min(100, steps // 10), num_training_steps=steps
    )

    generator = torch.Generator().manual_seed(seed)
    batches = _batches(len(split), batch_size, generator)
    model.train()
    start = time.time()
    for step in range(1, steps + 1):
        index = next(batches)
        x = augment(split.images[index], generator)
        loss = F.cross_entropy(model(x), split.labels[index], label_smoothing=0.05)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_scheduler.step()
        if step % log_every == 0 or step == steps:
            predicted, _ = model.predict(heldout.images)
            accuracy = (predicted == heldout.labels).float().mean().item()
            model.train()
            print(
                f"step {step}/{steps}  loss {loss.item():.4f}  heldout accuracy {accuracy:.4f}  "
                f"{time.time() - start:.0f}s",
                flush=True,
            )

    model.eval()
    model.save_pretrained(output_dir)
    print(f"saved {output_dir} after {time.time() - start:.0f}s", flush=True)
    return model


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Retrain the bundled toy models of diffusers-unlearn.")
    parser.add_argument("model", choices=["unconditional", "class_conditional", "classifier", "all"])
    parser.add_argument(
        "--steps", type=int, default=None, help="Optimizer steps (default: per model, see DEFAULT_STEPS)."
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", type=str, default=ASSETS_DIR, help="Parent folder of the model folders.")
    parser.add_argument("--num_threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    parser.add_argument(
        "--without_canary",
        action="store_true",
        help=f"unconditional only: the same recipe and seed without the canary copies, saved as {DDPM_RETRAINED_NAME}.",
    )
    args = parser.parse_args(argv)
    if args.without_canary and args.model != "unconditional":
        parser.error("--without_canary works with the unconditional model only (the others never see the canary or need it).")
    return args


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    names = ["unconditional", "class_conditional", "classifier"] if args.model == "all" else [args.model]
    for name in names:
        steps = args.steps if args.steps is not None else DEFAULT_STEPS[name]
        without = " without the canary" if args.without_canary else ""
        print(f"== {name}{without}: {steps} steps, seed {args.seed}, {torch.get_num_threads()} threads", flush=True)
        if name == "classifier":
            train_classifier(os.path.join(args.output_dir, "classifier"), steps, seed=args.seed)
        else:
            folder = "ddpm_unconditional" if name == "unconditional" else "ddpm_class_conditional"
            if args.without_canary:
                folder = DDPM_RETRAINED_NAME
            train_ddpm(
                name == "class_conditional",
                os.path.join(args.output_dir, folder),
                steps,
                seed=args.seed,
                without_canary=args.without_canary,
            )


if __name__ == "__main__":
    main()
