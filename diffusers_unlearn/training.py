"""The parts of a training run that `train_unlearn_ddpm.py` and `train_unlearn_sd.py` share.

The scripts own argument parsing, model loading, data, evaluation and saving. This module owns
what must behave identically in both: the method flags, the optimizer-step loop, checkpoints
(written atomically, pruned to a limit) and exact resumption.

Example:
    >>> history = run_unlearning_loop(
    ...     accelerator, unlearner, forget_pool, keep_pool, output_dir="out", max_train_steps=300,
    ...     train_batch_size=64, seed=0, checkpointing_steps=100, validation_steps=50, validate=my_validation,
    ... )
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
from typing import Any, Callable, Optional

import torch
from tqdm.auto import tqdm

from .noise import LOSS_SPACES
from .objectives import available_objectives, get_objective, hyperparameters_from_flags
from .checkpoints import (
    Checkpointer,
    find_resume_checkpoint,
    list_checkpoints,
    run_fingerprint,
)
from .outputs import StagedRun
from .unlearner import BatchPool, Unlearner, check_distributed_setup, step_generator, trainable_state_dict

logger = logging.getLogger(__name__)

METHOD_FLAGS: dict[str, tuple[type, str]] = {
    # flag: (type, help)
    "siss_lambda": (float, "SISS mixture weight lambda in [0, 1] (default 0.5)."),
    "siss_weighting": (str, "'fixed_norm' (default, reference form) or 'paper'."),
    "siss_scaling_norm": (float, "Fixed norm c of the forget gradient (default: calibrated, see --siss_relative_norm)."),
    "siss_relative_norm": (float, "Calibrate c as this fraction of the first keep-gradient norm (default 0.1)."),
    "siss_norm_refresh_every": (int, "Measure ||grad forget|| every N steps (1 = exact, default)."),
    "siss_superfactor": (float, "Paper form: forget weight multiplier s (default 0)."),
    "neggrad_alpha": (float, "NegGrad forget-loss weight (default 1)."),
    "neggrad_keep_weight": (float, "NegGrad+ keep-loss weight (default 0 = plain NegGrad)."),
    "erasediff_weighting": (str, "'adaptive' (BOME, default) or 'fixed'."),
    "erasediff_eta": (float, "BOME eta (default 1e-3)."),
    "erasediff_lambda": (float, "Fixed forget weight when --erasediff_weighting fixed (default 0.1)."),
    "erasediff_inner_steps": (int, "K inner steps on the forget objective (default 0)."),
    "erasediff_inner_lr": (float, "Inner-loop step size (default 1e-3)."),
    "vdu_gamma": (float, "Weight of VDU's stability regularizer (default 10)."),
    "vdu_precision": (str, "'fisher' (default: a diagonal Fisher from the model's own samples), 'l2' or 'checkpoints'."),
    "vdu_plasticity": (str, "'hinge' (default) or 'log'."),
    "vdu_target_loss": (float, "Forget loss at which VDU's plasticity term stops (default 0.3)."),
}


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    """`--method`, every method hyperparameter flag and `--timestep_range`."""
    parser.add_argument("--method", type=str, default="siss", help=f"One of: {', '.join(available_objectives())}.")
    for flag, (kind, text) in METHOD_FLAGS.items():
        parser.add_argument(f"--{flag}", type=kind, default=None, help=text)
    parser.add_argument("--timestep_range", type=int, nargs=2, default=None, metavar=("LOW", "HIGH"),
                        help="Sample training timesteps in [LOW, HIGH) only (default: all).")
    parser.add_argument("--loss_space", type=str, default="native", choices=list(LOSS_SPACES),
                        help="'native' (default): losses in the model's own prediction space (epsilon, v or x0), so "
                        "plain fine-tuning is its official training loss; 'epsilon': every output converted to a noise "
                        "estimate first (weights timestep t by alpha_bar_t relative to a v-model's loss).")


def check_method_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Validate `--method` and its hyperparameters before anything is loaded; sets `args.method_flags`."""
    if args.method not in available_objectives():
        parser.error(f"--method {args.method!r} is unknown; choose one of: {', '.join(available_objectives())}.")
    args.method_flags = {flag: getattr(args, flag) for flag in METHOD_FLAGS}
    args.method_flags["timestep_range"] = args.timestep_range
    try:
        get_objective(args.method, **hyperparameters_from_flags(args.method, args.method_flags))
    except ValueError as error:
        # n and k come from the data later; every other problem is the user's to fix now.
        if "n > k" not in str(error) and "needs n" not in str(error):
            parser.error(str(error))


def make_accelerator(args: argparse.Namespace):
    """The scripts' Accelerator (from --output_dir, --logging_dir, --gradient_accumulation_steps,
    --mixed_precision, --report_to), with logging set up, the seed set and the output folder created."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    accelerator = Accelerator(
        # accelerate starts no process group for several CPU processes unless told to use the CPU.
        cpu=int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available(),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        # accelerate raises on log_with="none".
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
        ),
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    set_seed(args.seed)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    return accelerator


def check_sharding_arguments(accelerator, args: argparse.Namespace) -> bool:
    """True when the launch uses FSDP; refuses, in one line naming the fix, what FSDP here does not support."""
    from accelerate.utils import DistributedType

    from .errors import UserInputError

    if accelerator.distributed_type != DistributedType.FSDP:
        return False
    check_distributed_setup(accelerator)
    if args.train_mode != "full":
        raise UserInputError(
            "FSDP is for --train_mode full (LoRA training fits one GPU per process): launch LoRA runs with a DDP "
            "config such as examples/accelerate_ddp.yaml, or pass --train_mode full."
        )
    if getattr(args, "use_ema", False):
        raise UserInputError("--use_ema is not supported under FSDP: leave it out, or launch with DDP.")
    return True


def gathered_model(
    accelerator, model: torch.nn.Module, load_base: Callable[[], torch.nn.Module]
) -> Optional[torch.nn.Module]:
    """The FSDP-trained `model` as one ordinary module on the main process (None on the others).

    Every process must call this: the shards are gathered (on the CPU) and loaded into `load_base()`, a fresh copy
    of the base model, which has every weight, so the evaluation and the saved pipeline see whole, unsharded
    weights."""
    state = trainable_state_dict(accelerator.unwrap_model(model))
    if not accelerator.is_main_process:
        return None
    base = load_base()
    missing, unexpected = base.load_state_dict(state, strict=False)
    # A full fine-tune trains (and so gathers) every parameter; buffers (SD3's fixed positional embedding) are
    # not trained and stay the base copy's.
    not_gathered = set(missing) & {name for name, _ in base.named_parameters()}
    if not_gathered or unexpected:
        raise RuntimeError(
            f"The gathered weights do not fit the base model: parameters not gathered {sorted(not_gathered)[:3]}, "
            f"unknown names {sorted(unexpected)[:3]}."
        )
    return base.to(accelerator.device)


def save_pipeline_into(pipeline, staged: StagedRun) -> None:
    """`pipeline.save_pretrained` into a run's staging folder: its components reach `--output_dir` together
    with the report and card when `staged.commit()` swaps them in, so no component is ever half-written or
    mixed with another run's."""
    pipeline.save_pretrained(staged.path)


# ---------------------------------------------------------------------------------------------------------------
# train_text_to_image_lora.py's data and loss flags, with its names and meanings
# ---------------------------------------------------------------------------------------------------------------

#: The keep-set dataset flags (`add_keep_dataset_arguments`).
KEEP_DATASET_FLAGS = ("dataset_name", "train_data_dir")


def add_keep_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """The official script's dataset flags, here describing the KEEP set (the data the model should go on
    modelling): `--dataset_name`, `--dataset_config_name`, `--train_data_dir`, `--image_column`,
    `--caption_column`, `--max_train_samples`, `--image_interpolation_mode`, `--dataloader_num_workers`."""
    from .data import INTERPOLATION_MODES

    parser.add_argument("--dataset_name", type=str, default=None, help="Keep set: a `datasets` dataset (Hub id or local dataset folder), loaded as train_text_to_image_lora.py loads its training data (needs `pip install datasets`).")
    parser.add_argument("--dataset_config_name", type=str, default=None, help="The config of --dataset_name; leave it out if there is only one.")
    parser.add_argument("--train_data_dir", type=str, default=None, help="Keep set: a local imagefolder (images and a metadata.jsonl with file_name and the caption column), read by `datasets` as the official script reads it; with --dataset_name, that dataset's data_dir.")
    parser.add_argument("--image_column", type=str, default="image", help="The dataset column holding the images (--dataset_name / --train_data_dir).")
    parser.add_argument("--caption_column", type=str, default="text", help="The dataset column holding a caption, or a list of captions of which one is drawn per image with --seed (--dataset_name / --train_data_dir).")
    parser.add_argument("--max_train_samples", type=int, default=None, help="Keep at most this many keep-set rows of --dataset_name / --train_data_dir (after a seeded shuffle), as the official flag does.")
    parser.add_argument("--image_interpolation_mode", type=str, default="lanczos", choices=list(INTERPOLATION_MODES), help="The PIL filter that resizes each image's shorter side to --resolution (default lanczos, as train_text_to_image_lora.py).")
    parser.add_argument("--dataloader_num_workers", type=int, default=0, help="Accepted for compatibility with train_text_to_image_lora.py and has no effect: images are decoded, resized and (with fixed crops) encoded once before training, and each step's batch is drawn from that in-memory pool in the training process (per-draw crops and flips, and their VAE encoding, run there too).")


def add_noise_arguments(parser: argparse.ArgumentParser) -> None:
    """`--noise_offset`, `--snr_gamma` and `--scale_lr`, as in train_text_to_image_lora.py."""
    parser.add_argument("--noise_offset", type=float, default=0, help="The scale of noise offset: noise + noise_offset * randn(batch, channels, 1, 1), in every denoising loss of every method (0, the default, is off).")
    parser.add_argument("--snr_gamma", type=float, default=None, help="SNR weighting gamma for rebalancing the loss (Min-SNR, https://huggingface.co/papers/2303.09556; 5.0 is recommended): each per-sample loss is weighted by min(SNR_t, gamma)/SNR_t (epsilon) or min(SNR_t, gamma)/(SNR_t + 1) (v-prediction), in every method's loss terms.")
    parser.add_argument("--scale_lr", action="store_true", help="Scale the learning rate by the number of processes, gradient accumulation steps and batch size.")


def check_official_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Parse-time checks of the flags `add_keep_dataset_arguments` and `add_noise_arguments` add (nothing is
    loaded): values in range, one keep set, and `datasets` installed when a dataset flag needs it."""
    import importlib.util

    from .noise import check_training_noise_options

    try:
        check_training_noise_options(args.noise_offset, args.snr_gamma)
    except ValueError as error:
        parser.error(f"--{error}")
    if args.dataloader_num_workers < 0:
        parser.error("--dataloader_num_workers must be >= 0.")
    if args.max_train_samples is not None and args.max_train_samples < 1:
        parser.error("--max_train_samples must be >= 1.")
    if args.dataset_config_name and not args.dataset_name:
        parser.error("--dataset_config_name needs --dataset_name.")
    given = [flag for flag in KEEP_DATASET_FLAGS if getattr(args, flag)]
    if given:
        others = [flag for flag in ("keep_data_dir", "keep_from_generations") if getattr(args, flag, None)]
        if others:
            parser.error(f"Give one keep set: --{given[0]} or --{others[0]}, not both.")
        if importlib.util.find_spec("datasets") is None:
            parser.error(f"--{given[0]} needs the `datasets` package: pip install datasets (or pip install \"diffusers-unlearn[datasets]\").")
    elif args.max_train_samples is not None:
        parser.error("--max_train_samples applies to --dataset_name / --train_data_dir only.")


def scaled_learning_rate(learning_rate: float, gradient_accumulation_steps: int, train_batch_size: int, num_processes: int) -> float:
    """`--scale_lr`: learning_rate * gradient_accumulation_steps * train_batch_size * num_processes, as
    train_text_to_image_lora.py scales it.

    Example:
        >>> scaled_learning_rate(1e-4, 2, 8, 4)
        0.0064
    """
    return learning_rate * gradient_accumulation_steps * train_batch_size * num_processes


def official_fingerprint_entries(args: argparse.Namespace) -> dict[str, Any]:
    """The entries of these flags that change training, for `script_fingerprint(..., **entries)`: each only when
    it differs from its default, so checkpoints of runs that leave them at their defaults keep their
    fingerprint. (`--scale_lr` acts through the learning rate, which the fingerprint holds already; the keep
    set's items and prompts are in it too.)"""
    defaults = {
        "noise_offset": 0, "snr_gamma": None, "center_crop": False, "random_flip": False,
        "image_interpolation_mode": "lanczos", "dataset_name": None, "dataset_config_name": None,
        "train_data_dir": None, "image_column": "image", "caption_column": "text", "max_train_samples": None,
    }
    return {
        key: getattr(args, key) for key, default in defaults.items()
        if hasattr(args, key) and getattr(args, key) != default
    }


# ---------------------------------------------------------------------------------------------------------------
# Resuming: which checkpoint, and is it this run's
# ---------------------------------------------------------------------------------------------------------------


def check_resume_argument(args: argparse.Namespace) -> None:
    """Parse-time check of `--resume_from_checkpoint` (before any model loads): the folder exists and holds
    only a diffusers-unlearn checkpoint's files."""
    if args.resume_from_checkpoint:
        find_resume_checkpoint(args.output_dir, args.resume_from_checkpoint)


def items_digest(items) -> dict[str, Any]:
    """Count and SHA-256 of a data set's items (pixel hashes, prompts, labels), for run fingerprints."""
    digest = hashlib.sha256()
    labels = items.labels.tolist() if items.labels is not None else [None] * len(items)
    texts = items.texts if items.texts is not None else [None] * len(items)
    for pixel_hash, text, label in zip(items.hashes, texts, labels):
        digest.update(json.dumps([pixel_hash, text, label]).encode())
    return {"count": len(items), "sha256": digest.hexdigest()}


def script_fingerprint(args: argparse.Namespace, objective, forget, keep, **extra: Any) -> dict[str, Any]:
    """The fingerprint both scripts store in their checkpoints: what decides the trained weights.

    `--max_train_steps` is not part of it, so a finished run can be continued for more steps.
    """
    lora = None
    if args.train_mode == "lora":
        lora = {"rank": args.rank, "lora_alpha": args.lora_alpha, "lora_targets": args.lora_targets}
    return run_fingerprint(
        method=args.method, hyperparameters=objective.hyperparameters(),
        forget_items=items_digest(forget), keep_items=items_digest(keep) if keep is not None else None,
        base_model=str(args.pretrained_model_name_or_path), revision=args.revision, variant=args.variant,
        train_mode=args.train_mode, lora=lora, seed=args.seed, train_batch_size=args.train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, learning_rate=args.learning_rate,
        lr_scheduler=args.lr_scheduler, lr_warmup_steps=args.lr_warmup_steps, max_grad_norm=args.max_grad_norm,
        loss_space=args.loss_space,
        use_8bit_adam=args.use_8bit_adam, mixed_precision=args.mixed_precision,
        num_processes=int(os.environ.get("WORLD_SIZE", "1")), **extra,
    )


# ---------------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------------

PROGRESS_KEYS = ("term_keep", "term_forget", "grad_norm", "loss_x", "loss_a", "loss_keep", "loss_forget")


def run_unlearning_loop(
    accelerator,
    unlearner: Unlearner,
    forget_pool: BatchPool,
    keep_pool: Optional[BatchPool],
    *,
    output_dir: str,
    max_train_steps: int,
    train_batch_size: int,
    seed: int,
    start_step: int = 0,
    gradient_accumulation_steps: int = 1,
    checkpointer: Optional[Checkpointer] = None,
    checkpointing_steps: Optional[int] = None,
    checkpoints_total_limit: Optional[int] = None,
    validation_history: Optional[list[dict[str, Any]]] = None,
    validation_steps: Optional[int] = None,
    validate: Optional[Callable[[int], dict[str, Any]]] = None,
    after_optimizer_step: Optional[Callable[[int], None]] = None,
    desc: str = "Unlearning",
    should_stop: Optional[Callable[[Optional[dict[str, Any]]], Optional[str]]] = None,
) -> list[dict[str, Any]]:
    """Optimizer steps from `start_step` to `max_train_steps`; returns the validation history.

    Each optimizer step draws its batches and noise from `step_generator(seed, step, micro_batch, rank)`.
    `validate(step)` runs on the main process every `validation_steps` (never every step, and not at the last
    step, which the scripts evaluate in full); `after_optimizer_step(step)` runs on every process (EMA updates).
    With a `checkpointer`, a checkpoint (holding the validation history so far) is written every
    `checkpointing_steps`. A resumed run passes the history its checkpoint held as `validation_history`.

    `should_stop(entry)` (diffusers_unlearn/stopping.py) runs on the main process after each validation and
    returns a reason to end training there, or None; its decision is broadcast, every process stops at that step,
    which is checkpointed with the reason in its history entry. A history that already holds a stop trains no
    further.
    """
    from .stopping import STOP_KEY, broadcast_stop, stopped_entry

    stopped = stopped_entry(validation_history or [])
    if stopped is not None:
        logger.info(f"This run stopped at step {stopped['step']} ({stopped[STOP_KEY]}); no further training.")
        return list(validation_history)
    progress = tqdm(
        range(start_step, max_train_steps), initial=start_step, total=max_train_steps,
        disable=not accelerator.is_local_main_process, desc=desc,
    )
    device = accelerator.device
    history = list(validation_history or [])
    step = start_step
    while step < max_train_steps:
        for micro in range(gradient_accumulation_steps):
            generator = step_generator(seed, step, micro, accelerator.process_index)
            forget_batch = forget_pool.sample(train_batch_size, generator, device)
            keep_batch = keep_pool.sample(train_batch_size, generator, device) if keep_pool is not None else None
            out = unlearner.step(forget_batch, keep_batch, generator=generator)
        if not out.optimizer_stepped:
            raise RuntimeError("Accumulation did not end in an optimizer step; this is a bug.")
        step += 1
        if after_optimizer_step is not None:
            after_optimizer_step(step)
        progress.update(1)
        progress.set_postfix(**{k: round(v, 4) for k, v in out.logs.items() if k in PROGRESS_KEYS})
        accelerator.log(out.logs, step=step)

        validating = validate is not None and validation_steps and step % validation_steps == 0 and step < max_train_steps
        stop = False
        if validating and accelerator.is_main_process:
            history.append(validate(step))
        if validating and should_stop is not None:
            reason = should_stop(history[-1]) if accelerator.is_main_process else None
            stop = broadcast_stop(accelerator, reason is not None)
            if reason is not None:
                history[-1][STOP_KEY] = reason
                logger.info(f"Stopping: {reason}.")
        if checkpointer is not None and ((checkpointing_steps and step % checkpointing_steps == 0) or stop):
            checkpointer.save(output_dir, step, history, checkpoints_total_limit)
        if stop:
            break
    progress.close()
    accelerator.wait_for_everyone()
    return history


def train_adapter(
    unet: torch.nn.Module,
    schedule,
    forget_pool: BatchPool,
    keep_pool: Optional[BatchPool],
    *,
    method: str = "siss",
    hyperparameters: Optional[dict[str, Any]] = None,
    max_train_steps: int = 100,
    train_batch_size: int = 8,
    learning_rate: float = 1e-3,
    rank: int = 4,
    lora_alpha: Optional[float] = None,
    lora_targets: str = "attention",
    adapter_name: str = "default",
    loss_space: str = "native",
    max_grad_norm: float = 1.0,
    seed: int = 0,
    output_dir: str = ".",
    call=None,
) -> tuple[torch.nn.Module, Unlearner]:
    """Attach a LoRA adapter to `unet` and train it with an unlearning objective: the scripts' loop, in process.

    The pools hold what the scripts cache (images, or VAE latents with prompt embeddings). The objective gets
    `n` and `k` from the pool sizes unless `hyperparameters` sets them. Returns the UNet (with its trained
    adapter) and the unlearner. The pipelines' `unlearn(...)` calls this.

    A UNet in float16 or bfloat16 stays so (frozen); the adapter trains in float32 and the steps run under
    autocast in the UNet's dtype, as diffusers' LoRA scripts do. float16 has no loss scaling here; prefer bfloat16.

    Example:
        >>> unet, _ = train_adapter(unet, schedule, forget_pool, keep_pool, method="siss", max_train_steps=50)
    """
    from accelerate import Accelerator
    from diffusers.training_utils import cast_training_params

    from .lora import add_lora, make_optimizer, trainable_parameters
    from .objectives import OBJECTIVES, Denoiser
    from .objectives import _accepted

    if max_train_steps < 1 or train_batch_size < 1:
        raise ValueError("max_train_steps and train_batch_size must be >= 1.")
    context = {"n": len(forget_pool) + (len(keep_pool) if keep_pool is not None else 0), "k": len(forget_pool)}
    accepted = _accepted(OBJECTIVES[method]) if method in OBJECTIVES else []
    objective = get_objective(method, **{**{k: v for k, v in context.items() if k in accepted}, **(hyperparameters or {})})
    if objective.needs_keep and keep_pool is None:
        raise ValueError(f"Method {method!r} needs a keep set.")
    accelerator = Accelerator(cpu=not next(unet.parameters()).is_cuda)
    base_dtype = unet.dtype
    unet = add_lora(unet, rank=rank, lora_alpha=lora_alpha, targets=lora_targets, adapter_name=adapter_name)
    cast_training_params(unet, torch.float32)  # peft makes the adapter in the base weights' dtype
    optimizer = make_optimizer(trainable_parameters(unet), learning_rate)
    denoiser = Denoiser(unet, schedule, loss_space, call=call)  # `call`: a model family's way to run the UNet
    device = next(unet.parameters()).device
    half = base_dtype in (torch.float16, torch.bfloat16)
    autocast = torch.autocast(device.type, dtype=base_dtype) if half else contextlib.nullcontext()
    first = forget_pool.sample(min(len(forget_pool), 64), step_generator(seed, -1), device)
    with autocast:
        objective.prepare(denoiser, first, generator=step_generator(seed, -1))
    unlearner = Unlearner(objective, denoiser, optimizer, accelerator, None, max_grad_norm)
    was_training = unet.training
    unet.train()
    with autocast:
        run_unlearning_loop(
            accelerator, unlearner, forget_pool, keep_pool, output_dir=output_dir, max_train_steps=max_train_steps,
            train_batch_size=train_batch_size, seed=seed, desc=f"Unlearning ({method})",
        )
    unet.train(was_training)
    unet.requires_grad_(False)
    return unet, unlearner


def print_summary(report: dict[str, Any], keys: Optional[list[str]] = None) -> None:
    """The before/after table both scripts print at the end."""
    before, after = report["metrics"]["before"], report["metrics"]["after"]
    print(f"\nUnlearning summary: {report['method']} ({report['train_mode']}), {report['max_train_steps']} steps, "
          f"{report['wall_seconds']:.0f} s")
    print(f"{'metric':22s} {'before':>12s} {'after':>12s}")

    def fmt(value):
        return "-" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value))

    for key in keys or list(before):
        if key in after and not isinstance(before.get(key), (list, dict)) and key != "wall_seconds":
            print(f"{key:22s} {fmt(before[key]):>12s} {fmt(after[key]):>12s}")


__all__ = [
    "METHOD_FLAGS",
    "make_accelerator",
    "save_pipeline_into",
    "add_method_arguments",
    "check_method_arguments",
    "check_resume_argument",
    "items_digest",
    "list_checkpoints",
    "script_fingerprint",
    "print_summary",
    "run_unlearning_loop",
    "train_adapter",
]
