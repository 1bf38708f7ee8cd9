#!/usr/bin/env python
"""Remove memorized training images from a Stable Diffusion (1.x, 2.x, XL, 3.x) or Flux.1 model, as a LoRA
adapter or a full fine-tune.

Modeled on diffusers' examples/text_to_image/train_text_to_image_lora.py (and, for SDXL,
train_text_to_image_lora_sdxl.py; for SD3 and Flux, the flags of train_dreambooth_lora_sd3.py / _flux.py). The model family comes from the folder's model_index.json (override with
--model_family); everything family-specific (components, prompt encoding, latents, denoiser call, adapter
layout) lives in diffusers_unlearn/families/. With no arguments it
mitigates the canary memorization of the bundled tiny text-to-image pipeline with SISS and LoRA,
and prints a before/after summary:

    python train_unlearn_sd.py
    accelerate launch train_unlearn_sd.py --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --forget_data_dir forget/ --keep_from_generations 32 --method siss --rank 8 \\
        --mixed_precision bf16 --use_8bit_adam --gradient_checkpointing

The adapter loads into plain diffusers: `pipe.load_lora_weights(output_dir)`.

Order: parse_args -> Accelerator -> models -> data (+ cached latents and text embeddings) ->
evaluation before -> LoRA/full -> optimizer -> hooks -> loop -> save, evaluation after, report,
card, upload.
"""

import argparse
import gc
import importlib.util
import os
import time

# Before diffusers and transformers: importing the package filters the two known-harmless messages those
# libraries print while being imported (diffusers_unlearn/third_party_logs.py), and nothing else.
import diffusers_unlearn  # noqa: F401  isort: skip
import diffusers
import torch
from accelerate.logging import get_logger
from accelerate.utils import DistributedType
from diffusers import AutoencoderKL, DiffusionPipeline
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params

from diffusers_unlearn import data as unlearn_data
from diffusers_unlearn.checks import TEXT_TO_IMAGE_KINDS, check_hub_model, check_model_path, check_number_flags
from diffusers_unlearn.families import available_families, family_for_folder
from diffusers_unlearn.errors import UserInputError, run_script
from diffusers_unlearn.hub import atomic_write_json, check_hub_arguments, create_hub_repo, push_folder, write_model_card
from diffusers_unlearn.images import grid_array, make_grid, save_image_atomic
from diffusers_unlearn.lora import (
    add_lora,
    add_text_encoder_lora,
    make_optimizer,
    prepare_full_finetune,
    trainable_parameters,
)
from diffusers_unlearn.metrics import classifier_features, denoising_losses, distance_to_retrain, memorization_rate, mia_auc, query_losses, retrain_reference
from diffusers_unlearn.metrics.copy_detection import PIXEL, PixelCopyDetector, add_copy_detector_arguments, copy_detector_threshold, detector_fingerprint, load_copy_detector
from diffusers_unlearn.outputs import StagedRun, check_output_dir, exclusive_output_dir
from diffusers_unlearn.objectives import DenoisingBatch, Denoiser, get_objective, hyperparameters_from_flags
from diffusers_unlearn.pipelines.text_to_image import generate_images
from diffusers_unlearn.quantization import check_bnb_environment, quantization_fingerprint_entries, quantization_summary, read_bnb_quantization_config
from diffusers_unlearn.training import (
    make_accelerator,
    check_sharding_arguments,
    gathered_model,
    save_pipeline_into,
    add_method_arguments,
    check_method_arguments,
    print_summary,
    check_resume_argument,
    run_unlearning_loop,
    script_fingerprint,
    add_keep_dataset_arguments,
    add_noise_arguments,
    check_official_arguments,
    official_fingerprint_entries,
    scaled_learning_rate,
)
from diffusers_unlearn.checkpoints import Checkpointer, find_resume_checkpoint
from diffusers_unlearn.stopping import add_stopping_arguments, check_stopping_arguments, check_stopping_with_sharding, stopping_rule
from diffusers_unlearn.verdict import add_verdict_arguments, build_verdict, check_verdict_arguments, print_verdict
from diffusers_unlearn.unlearner import BatchPool, Unlearner, step_generator

logger = get_logger(__name__, log_level="INFO")

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Remove memorized images from a Stable Diffusion model.")
    # Model and data (train_text_to_image_lora.py order).
    parser.add_argument("--pretrained_model_name_or_path", type=str, default=None, help="Hub id or local folder. Default: the bundled tiny text-to-image toy.")
    parser.add_argument("--model_family", type=str, default=None, choices=available_families(), help="Default: from model_index.json's _class_name (StableDiffusionPipeline: sd, StableDiffusionXLPipeline: sdxl, StableDiffusion3Pipeline: sd3, FluxPipeline: flux).")
    parser.add_argument("--pretrained_vae_model_name_or_path", type=str, default=None, help="A VAE folder or Hub id to use instead of the model's own (SDXL: an fp16-fixed VAE such as madebyollin/sdxl-vae-fp16-fix).")
    parser.add_argument("--revision", type=str, default=None)
    parser.add_argument("--variant", type=str, default=None)
    parser.add_argument("--forget_data_dir", type=str, default=None, help="Image folder with metadata.jsonl (file_name, text). Subfolders are read too (as datasets' imagefolder does); a metadata.jsonl in a subfolder names files relative to it.")
    parser.add_argument("--forget_images", type=str, nargs="+", default=None, help="Image files to forget (with --forget_prompts).")
    parser.add_argument("--forget_prompts", type=str, nargs="+", default=None, help="One prompt per --forget_images file.")
    parser.add_argument("--memorized_prompts_file", type=str, default=None, help="JSON lines with a 'caption' field (or one prompt per line); the forget images are the model's own generations that cluster together.")
    parser.add_argument("--num_forget_generations", type=int, default=16, help="Generations per memorized prompt searched for a cluster.")
    parser.add_argument("--keep_data_dir", type=str, default=None, help="Image folder with metadata.jsonl (file_name, text) of images to keep, read like --forget_data_dir. Copies of forget images (exact, or within --near_duplicate_distance) are removed from it with a notice.")
    parser.add_argument("--keep_from_generations", type=int, default=None, help="Generate N images per forget prompt (on sd_tiny_captioned: per digit prompt); those far from every forget image become the keep set.")
    add_keep_dataset_arguments(parser)  # --dataset_name, --train_data_dir, ...: the keep set, as the official script's data
    parser.add_argument("--keep_generation_threshold", type=float, default=None, help="Pixel L2 ([0,1] units) below which a generation counts as a forget copy (of a forget image, or of a generation already counted as one). Default: --memorization_threshold.")
    parser.add_argument("--anchor_prompt", type=str, default=None, help="What the forget prompts should draw instead: generate --num_anchor_generations images of this prompt (\"\" = the unconditional model), drop forget copies, and add them to the keep set under every forget prompt (Kumari et al.'s anchor). Needed when every generation of a forget prompt is a copy, as for a memorized caption of its own: the keep set then says nothing about that prompt and the copies stay. Default: none (sd_tiny_captioned: \"\").")
    parser.add_argument("--num_anchor_generations", type=int, default=32, help="Images of --anchor_prompt to generate (0: no anchor, also on sd_tiny_captioned).")
    parser.add_argument("--heldout_data_dir", type=str, default=None, help="Image folder with prompts the model never saw: heldout_loss and membership-inference AUC.")
    parser.add_argument("--output_dir", type=str, default="unlearn-sd-output")
    parser.add_argument("--overwrite_output_dir", action="store_true", help="Replace the finished run in --output_dir (its outputs are swapped out when this run finishes; checkpoints and logs stay).")
    parser.add_argument("--cache_dir", type=str, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolution", type=int, default=None, help="Square size in pixels that images are trained and generated at (every generation: keep set, evaluation, validation, noise norm). Default: the UNet's sample_size times the VAE scale factor.")
    parser.add_argument("--center_crop", action="store_true", help="Whether to center crop the input images to the resolution. If not set, the images will be randomly cropped, anew each time an image is drawn for training (as train_text_to_image_lora.py: the shorter side is first resized to --resolution with --image_interpolation_mode). Hashes, overlap checks and metrics always use the centre crop.")
    parser.add_argument("--random_flip", action="store_true", help="Whether to randomly flip training images horizontally: each image is flipped with probability 1/2 every time it is drawn (as the official script).")
    # Optimization.
    parser.add_argument("--train_batch_size", type=int, default=8)
    parser.add_argument("--max_train_steps", type=int, default=200)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--learning_rate", type=float, default=None, help="Default: 1e-3 with LoRA, 1e-5 for full fine-tuning (on the bundled toy: 2e-3 and 1e-4).")
    parser.add_argument("--lr_scheduler", type=str, default="constant")
    add_noise_arguments(parser)  # --noise_offset, --snr_gamma, --scale_lr
    parser.add_argument("--lr_warmup_steps", type=int, default=0)
    parser.add_argument("--adam_beta1", type=float, default=0.9)
    parser.add_argument("--adam_beta2", type=float, default=0.999)
    parser.add_argument("--adam_weight_decay", type=float, default=1e-2)
    parser.add_argument("--adam_epsilon", type=float, default=1e-8)
    parser.add_argument("--max_grad_norm", type=float, default=1.0)
    # Memory and precision.
    parser.add_argument("--use_8bit_adam", action="store_true")
    parser.add_argument("--bnb_quantization_config_path", type=str, default=None, help="A JSON file of diffusers BitsAndBytesConfig arguments (examples/nf4_config.json: 4-bit NF4) that quantises the frozen denoiser for LoRA (QLoRA), as train_dreambooth_lora_flux.py's flag; 8-bit (load_in_8bit) works too. bnb_4bit_compute_dtype defaults to the --mixed_precision dtype. Needs a CUDA GPU and bitsandbytes; --train_mode lora only.")
    parser.add_argument("--mixed_precision", type=str, default="no", choices=["no", "fp16", "bf16"], help="As in train_text_to_image_lora.py: frozen weights in this dtype, trained ones (LoRA, or the whole UNet with --train_mode full) in float32, forward passes under autocast. A VAE with force_upcast stays float32 under fp16.")
    parser.add_argument("--allow_tf32", action="store_true")
    parser.add_argument("--enable_xformers_memory_efficient_attention", action="store_true")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--lora_alpha", type=float, default=None, help="Default: the rank.")
    parser.add_argument("--lora_targets", type=str, default=None, help="'attention', 'attention_conv', 'conv' or module names. Default: attention (conv on the bundled toy).")
    parser.add_argument("--prediction_type", type=str, default=None, choices=["epsilon", "v_prediction", "sample"], help="Default: the scheduler's.")
    # Run control.
    parser.add_argument("--checkpointing_steps", type=int, default=500)
    parser.add_argument("--checkpoints_total_limit", type=int, default=None)
    parser.add_argument("--resume_from_checkpoint", type=str, default=None, help="A checkpoint folder, or 'latest'.")
    # Logging and Hub.
    parser.add_argument("--validation_prompt", type=str, default=None, help="Default: the first forget prompt.")
    parser.add_argument("--num_validation_images", type=int, default=16)
    parser.add_argument("--validation_steps", type=int, default=50)
    add_stopping_arguments(parser)
    parser.add_argument("--report_to", type=str, default="none", help="'tensorboard', 'wandb', 'all' or 'none'.")
    parser.add_argument("--logging_dir", type=str, default="logs")
    parser.add_argument("--push_to_hub", action="store_true")
    parser.add_argument("--hub_token", type=str, default=None)
    parser.add_argument("--hub_model_id", type=str, default=None)
    # Unlearning.
    add_method_arguments(parser)
    parser.add_argument("--train_mode", type=str, default="lora", choices=["lora", "full"])
    parser.add_argument("--train_text_encoder", action="store_true", help="LoRA on the CLIP text encoder(s) too: SD's one, SDXL's and SD3's two, Flux's one; never T5 (--train_mode lora only).")
    # Evaluation.
    parser.add_argument("--num_eval_images", type=int, default=64, help="Generations per forget prompt for the memorization rate, before and after (same seeds).")
    parser.add_argument("--num_inference_steps", type=int, default=25)
    parser.add_argument("--guidance_scale", type=float, default=None, help="Sampling guidance of every evaluation. Default: the pipeline's (7.5 SD/SDXL, 7.0 SD3, 3.5 Flux). For a guidance-distilled Flux model also the guidance value it trains with, as in train_dreambooth_lora_flux.py.")
    # train_dreambooth_lora_sd3.py / _flux.py: the flow-matching families only.
    parser.add_argument("--max_sequence_length", type=int, default=None, help="T5 prompt length (SD3, Flux). Default: the official scripts' (77 SD3, 512 Flux).")
    parser.add_argument("--weighting_scheme", type=str, default=None, choices=["none", "sigma_sqrt", "logit_normal", "mode", "cosmap"], help="How sigma is drawn and the loss weighted (SD3, Flux). Default: none.")
    parser.add_argument("--logit_mean", type=float, default=None, help="logit_normal weighting scheme (SD3, Flux). Default: 0.0.")
    parser.add_argument("--logit_std", type=float, default=None, help="logit_normal weighting scheme (SD3, Flux). Default: 1.0.")
    parser.add_argument("--mode_scale", type=float, default=None, help="mode weighting scheme (SD3, Flux). Default: 1.29.")
    parser.add_argument("--precondition_outputs", type=int, default=None, choices=[0, 1], help="SD3: regress x0 = x_sigma - sigma * v onto the clean latents, as train_dreambooth_lora_sd3.py's flag. Default: 0.")
    parser.add_argument("--eval_batch_size", type=int, default=64)
    parser.add_argument("--memorization_threshold", type=float, default=None, help="Pixel L2 ([0,1] units) below which a generation copies a forget image. Default: the toy's threshold, else an RMS pixel difference of 0.1.")
    add_copy_detector_arguments(parser)
    parser.add_argument("--near_duplicate_distance", type=float, default=None, help="Pixel L2 ([0,1] units, at the training resolution) below which a keep image counts as a copy of a forget image (the same picture in another encoding, such as JPEG) and is removed from the keep set with a notice; 0 removes exact copies only. Default: an RMS pixel difference of 0.04, i.e. 0.04 * sqrt(3 * resolution^2).")
    parser.add_argument("--num_other_prompt_images", type=int, default=32, help="Toy only: generations per other digit prompt for the digit accuracy.")
    parser.add_argument("--noise_norm_generations", type=int, default=4, help="Generations per prompt for the noise-norm score (0 disables it).")
    parser.add_argument("--retrained_model_name_or_path", type=str, default=None, help="A pipeline of the same family retrained without the forget data (the gold standard; for the toy's canary: diffusers_unlearn/toy/assets/sd_tiny_retrained_without_canary). It is evaluated once with the same prompts and seeds; the report gains the distance to it before and after (forget_loss_gap_to_retrain, mia_auc_vs_retrain, fd_to_retrain on the toys; docs/metrics.md) and its own metrics under retrained_model. Needs memory for its pipeline beside the base model's during that evaluation.")
    add_verdict_arguments(parser)
    args = parser.parse_args(argv)

    # Cheap checks first: nothing has been loaded yet.
    check_method_arguments(parser, args)
    check_official_arguments(parser, args)
    check_output_dir(args.output_dir, overwrite=args.overwrite_output_dir, resume_from_checkpoint=args.resume_from_checkpoint)
    check_hub_arguments(args.report_to, args.hub_token)
    given = [name for name in ("forget_data_dir", "forget_images", "memorized_prompts_file") if getattr(args, name)]
    if len(given) > 1:
        parser.error(f"Give one forget set, not {' and '.join('--' + g for g in given)}.")
    if args.forget_prompts and not args.forget_images:
        parser.error("--forget_prompts needs --forget_images (one image per prompt).")
    if args.keep_data_dir and args.keep_from_generations:
        parser.error("Give --keep_data_dir or --keep_from_generations, not both.")
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        parser.error("--mixed_precision fp16 needs a CUDA GPU; use bf16 or no on CPU.")
    if args.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        parser.error('--use_8bit_adam needs bitsandbytes: pip install "bitsandbytes>=0.50" (or pip install "diffusers-unlearn[bnb]").')
    args.bnb_quantization_config = None
    if args.bnb_quantization_config_path is not None:
        if args.train_mode != "lora":
            parser.error("--bnb_quantization_config_path quantises a frozen base for LoRA: use --train_mode lora, or leave the flag out for full fine-tuning.")
        compute_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
        try:
            args.bnb_quantization_config = read_bnb_quantization_config(args.bnb_quantization_config_path, compute_dtype)
            check_bnb_environment(args.bnb_quantization_config)
        except UserInputError as error:
            parser.error(str(error))
    if args.enable_xformers_memory_efficient_attention and importlib.util.find_spec("xformers") is None:
        parser.error("--enable_xformers_memory_efficient_attention needs xformers: pip install xformers (SDPA, the default, needs nothing).")
    if args.train_text_encoder and args.train_mode != "lora":
        parser.error("--train_text_encoder works with --train_mode lora only.")
    for name in ("train_batch_size", "max_train_steps", "gradient_accumulation_steps", "num_eval_images", "validation_steps", "checkpointing_steps", "num_forget_generations"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1.")
    if args.keep_from_generations is not None and args.keep_from_generations < 1:
        parser.error("--keep_from_generations must be >= 1.")
    if args.num_anchor_generations < 0:
        parser.error("--num_anchor_generations must be >= 0 (0: no anchor).")

    from diffusers_unlearn.toy import toy_info, toy_model_path

    if args.pretrained_model_name_or_path is None:
        args.pretrained_model_name_or_path = toy_model_path("sd_tiny")
    # A toy folder (sd_tiny, sd3_tiny: it has a diffusers_unlearn_toy.json) gets the toy's canary, evaluation
    # and defaults.
    try:
        toy = toy_info(args.pretrained_model_name_or_path) if os.path.isdir(args.pretrained_model_name_or_path) else None
    except ValueError as error:
        parser.error(str(error))
    args.using_toy = toy is not None
    # sd_tiny_captioned's marker names its canary's own caption and, for the keep set, the digit prompts.
    args.toy_forget_prompt = (toy or {}).get("forget_prompt")
    args.toy_keep_prompts = (toy or {}).get("keep_prompts")
    if args.using_toy:
        if args.max_sequence_length is None and "max_sequence_length" in toy:
            args.max_sequence_length = toy["max_sequence_length"]
        if not given and args.keep_data_dir is None and args.keep_from_generations is None and not (args.dataset_name or args.train_data_dir):
            args.keep_from_generations = TOY_DEFAULTS[toy["toy"]]["keep_from_generations"]
        if not given and args.anchor_prompt is None:
            args.anchor_prompt = TOY_DEFAULTS[toy["toy"]].get("anchor_prompt")
    elif not given:
        parser.error("Give the images to forget: --forget_data_dir, --forget_images with --forget_prompts, or --memorized_prompts_file.")
    defaults = TOY_DEFAULTS[toy["toy"]] if args.using_toy else REAL_MODEL_DEFAULTS
    if args.lora_targets is None:
        args.lora_targets = defaults["lora_targets"]
    if args.learning_rate is None:
        args.learning_rate = defaults["learning_rate"][args.train_mode]
    check_stopping_arguments(parser, args, has_heldout=bool(args.heldout_data_dir) or args.using_toy)
    check_number_flags(parser, args)
    check_verdict_arguments(parser, args)
    check_model_path(args.pretrained_model_name_or_path, model_kinds(args))
    if args.pretrained_vae_model_name_or_path is not None:
        check_vae_path(parser, args.pretrained_vae_model_name_or_path)
    if os.path.isdir(args.pretrained_model_name_or_path):
        check_model_folder(parser, args.pretrained_model_name_or_path, family_for_folder(args.pretrained_model_name_or_path, args.model_family))
    if args.retrained_model_name_or_path is not None:
        check_retrained_model(parser, args)
    check_resume_argument(args)
    return args


REAL_MODEL_DEFAULTS = {"lora_targets": "attention", "learning_rate": {"lora": 1e-3, "full": 1e-5}}
# Measured on each toy with LoRA (docs/results.md); the full fine-tuning rates are not tuned. sd_tiny's UNet is
# 0.79M parameters with little attention: LoRA there needs the ResNet convolutions and a higher rate to remove
# the canary in 200 steps; leaving attention out disturbs the other prompts least. On sd3_tiny, attention LoRA
# at 2e-3 or 1e-3 overshoots (other prompts lose up to 5 points); 128 keep generations keep more of the seven
# prompt's sevens than 64.
TOY_DEFAULTS = {
    "sd_tiny": {"lora_targets": "conv", "learning_rate": {"lora": 2e-3, "full": 1e-4}, "keep_from_generations": 64},
    "sd3_tiny": {"lora_targets": "attention", "learning_rate": {"lora": 5e-4, "full": 1e-4}, "keep_from_generations": 128},
}
# sd_tiny retrained without the canary (the gold standard, toy.SD_RETRAINED_NAME) has sd_tiny's architecture.
TOY_DEFAULTS["sd_tiny_retrained_without_canary"] = TOY_DEFAULTS["sd_tiny"]
# sd_tiny with the canary under its own caption (toy.SD_CAPTIONED_NAME): sd_tiny's architecture and rates; every
# generation of that caption is the canary, so the keep set is generations of the ten digit prompts, N per prompt,
# plus the unconditional model's generations under the caption (the anchor): without them every caption
# generation stays a copy (docs/results.md).
TOY_DEFAULTS["sd_tiny_captioned"] = {**TOY_DEFAULTS["sd_tiny"], "keep_from_generations": 32, "anchor_prompt": ""}

FAMILY_OPTION_FLAGS = ("max_sequence_length", "weighting_scheme", "logit_mean", "logit_std", "mode_scale", "precondition_outputs")


def family_options(args, family):
    """The family's training options from the flags given (the flow-matching families': T5 length, how sigma is
    drawn and weighted, SD3's preconditioning, Flux's training guidance); a family without such an option refuses
    the flag by name."""
    options = {name: getattr(args, name) for name in FAMILY_OPTION_FLAGS if getattr(args, name) is not None}
    if "precondition_outputs" in options:
        options["precondition_outputs"] = bool(options["precondition_outputs"])
    if "guidance_scale" in family.option_defaults and args.guidance_scale is not None:
        options["guidance_scale"] = args.guidance_scale
    return options


def model_kinds(args):
    """The pipeline kinds --pretrained_model_name_or_path may hold: the --model_family's, else every family's."""
    if args.model_family is not None:
        return (TEXT_TO_IMAGE_KINDS[args.model_family],)
    return tuple(TEXT_TO_IMAGE_KINDS.values())


def check_model_folder(parser, path, family, flag="--pretrained_model_name_or_path"):
    """A local model folder must hold every component its family loads (a Hub id is checked when it loads)."""
    missing = [name for name in family.component_names if not os.path.isdir(os.path.join(path, name))]
    if missing:
        parser.error(f"{path} is not a complete {family.plain_pipeline_class_name} folder: it has no {', '.join(missing)} subfolder(s). Point {flag} at a folder saved with {family.plain_pipeline_class_name}.save_pretrained.")


def check_retrained_model(parser, args):
    """--retrained_model_name_or_path: a pipeline of the base model's family (a local folder is checked whole)."""
    try:
        check_model_path(args.retrained_model_name_or_path, model_kinds(args), "--retrained_model_name_or_path")
    except UserInputError as error:
        parser.error(str(error))
    if os.path.isdir(args.retrained_model_name_or_path) and os.path.isdir(args.pretrained_model_name_or_path):
        family = family_for_folder(args.retrained_model_name_or_path, args.model_family)
        base = family_for_folder(args.pretrained_model_name_or_path, args.model_family)
        if family.name != base.name:
            parser.error(f"--retrained_model_name_or_path {args.retrained_model_name_or_path} is a {family.name} pipeline, the base model a {base.name} one; the retrained model must be the same family.")
        check_model_folder(parser, args.retrained_model_name_or_path, family, "--retrained_model_name_or_path")


def check_vae_path(parser, path):
    """--pretrained_vae_model_name_or_path: a local folder with an AutoencoderKL config, or a Hub id."""
    from diffusers_unlearn.checks import looks_like_hub_id

    if os.path.isdir(path):
        config = os.path.join(path, "config.json")
        if not os.path.isfile(config):
            parser.error(f"--pretrained_vae_model_name_or_path {path} has no config.json; point it at a folder saved with AutoencoderKL.save_pretrained (the vae/ subfolder of a pipeline).")
    elif os.path.exists(path) or not looks_like_hub_id(path):
        parser.error(f"--pretrained_vae_model_name_or_path {path}: no such local folder and not a Hub id.")


def check_inputs(args):
    """The data files, the prompts file (and a Hub model's model_index.json), checked without decoding pixels or
    loading any model, so a typo fails in a second."""
    for what in ("forget", "keep", "heldout"):
        folder = getattr(args, f"{what}_data_dir")
        if folder:
            unlearn_data.check_image_folder(folder, what, require_text=True)
    if args.forget_images:
        unlearn_data.check_prompted_images(args.forget_images, args.forget_prompts or [], "forget")
    if args.memorized_prompts_file:
        unlearn_data.read_prompts_file(args.memorized_prompts_file)
    copy_detector_threshold(args, ("memorization_threshold", "keep_generation_threshold"))  # the detector's folder and units
    if args.dataset_name or args.train_data_dir:  # opens the dataset and checks its columns
        open_keep_dataset(args)
    if not os.path.isdir(args.pretrained_model_name_or_path):  # a Hub id: its model_index.json, not the weights
        check_hub_model(args.pretrained_model_name_or_path, model_kinds(args), args.revision, args.cache_dir)


def open_keep_dataset(args):
    """The keep set's `datasets` dataset (--dataset_name / --train_data_dir), its columns checked."""
    return unlearn_data.open_text_image_dataset(args.dataset_name, args.dataset_config_name, args.train_data_dir, args.image_column, args.caption_column, args.cache_dir)


def load_forget_and_keep(args, pipe, resolution, threshold, detector=None):
    """Forget and keep sets as images with prompts, validated before any training. Image files are prepared as
    train_text_to_image_lora.py prepares them (shorter side resized with --image_interpolation_mode); each set
    holds its centre crops, and the resized images for per-draw crops and flips. Forget copies among
    generations are found by `detector` (--copy_detector; default pixel L2 below `threshold`)."""
    detector = detector or PixelCopyDetector(threshold)
    channels = pipe.vae.config.in_channels
    interpolation = args.image_interpolation_mode
    keep = None
    if args.forget_data_dir:
        forget = unlearn_data.load_image_folder(args.forget_data_dir, resolution, channels, "forget", require_text=True, interpolation=interpolation)
    elif args.forget_images:
        forget = unlearn_data.load_prompted_images(args.forget_images, args.forget_prompts or [], resolution, channels, "forget", interpolation=interpolation)
    elif args.memorized_prompts_file:
        forget, keep = forget_from_generations(args, pipe, unlearn_data.read_prompts_file(args.memorized_prompts_file), detector, resolution)
    else:  # the toy: its canary, under the prompt it shares with one digit class (or its own caption)
        from diffusers_unlearn.toy.text_to_image import CANARY_PROMPT, canary_forget_set

        forget = canary_forget_set(resolution, prompt=args.toy_forget_prompt or CANARY_PROMPT)
    forget = unlearn_data.deduplicate(forget, "forget")

    if args.keep_data_dir:
        keep = unlearn_data.load_image_folder(args.keep_data_dir, resolution, channels, "keep", require_text=True, interpolation=interpolation)
    elif args.dataset_name or args.train_data_dir:
        keep = unlearn_data.load_text_image_dataset(open_keep_dataset(args), resolution, channels, args.image_column, args.caption_column, interpolation, max_samples=args.max_train_samples, seed=args.seed, name="keep")
    elif args.keep_from_generations:
        toy_canary = not (args.forget_data_dir or args.forget_images or args.memorized_prompts_file)
        prompts = args.toy_keep_prompts if toy_canary and args.toy_keep_prompts else sorted(set(forget.texts))
        generations = generate_images(pipe, prompts, args.keep_from_generations, seed=args.seed + 1, num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale, batch_size=args.eval_batch_size, height=resolution, width=resolution, max_sequence_length=args.sampling_max_sequence_length)
        kept, texts = [], []
        for prompt, images in zip(prompts, generations):
            own = forget.images[[i for i, text in enumerate(forget.texts) if text == prompt]]
            own = own if len(own) else forget.images  # a keep prompt that is no forget prompt: no forget copies either
            keep_detector = detector.with_threshold(args.keep_generation_threshold) if args.keep_generation_threshold else detector
            far, near = unlearn_data.filter_far_from(images, own, copy_detector=keep_detector)
            logger.info(f"--keep_from_generations, {prompt!r}: {len(far)} generation(s) kept, {len(near)} rejected as forget copies.")
            kept.append(far)
            texts += [prompt] * len(far)
        if not texts:
            raise unlearn_data.DataError("The keep set is empty after filtering: every generation is a forget copy. Raise --keep_from_generations or lower --keep_generation_threshold.")
        images = torch.cat(kept)
        keep = unlearn_data.ImageSet(images, [unlearn_data.pixel_hash(x) for x in images], [f"generation/{i}" for i in range(len(images))], None, texts)
    if args.anchor_prompt is not None and args.num_anchor_generations > 0:
        keep = add_anchor_generations(args, pipe, forget, keep, detector, resolution)
    if keep is not None:
        keep = unlearn_data.remove_overlap(keep, forget, args.near_duplicate_distance)
    else:
        raise unlearn_data.DataError("No keep set: give --keep_data_dir, --dataset_name, --train_data_dir or --keep_from_generations N.")

    heldout = None
    if args.heldout_data_dir:
        heldout = unlearn_data.load_image_folder(args.heldout_data_dir, resolution, channels, "heldout", require_text=True, interpolation=interpolation)
    elif args.using_toy:
        from diffusers_unlearn.toy.text_to_image import heldout_set

        heldout = heldout_set(resolution)
    return forget, keep, heldout


def add_anchor_generations(args, pipe, forget, keep, detector, resolution):
    """--anchor_prompt: its generations that are no forget copy, added to the keep set once per forget prompt, so
    the forget prompts learn to draw them (what a model that never saw the forget images draws) rather than only
    to move away from the copies."""
    images = generate_images(pipe, [args.anchor_prompt], args.num_anchor_generations, seed=args.seed + 3, num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale, batch_size=args.eval_batch_size, height=resolution, width=resolution, max_sequence_length=args.sampling_max_sequence_length)[0]
    far, near = unlearn_data.filter_far_from(images, forget.images, copy_detector=detector)
    logger.info(f"--anchor_prompt {args.anchor_prompt!r}: {len(far)} generation(s) kept, {len(near)} rejected as forget copies.")
    if not len(far):
        raise unlearn_data.DataError(f"Every one of the {len(images)} generations of --anchor_prompt {args.anchor_prompt!r} is a forget copy: choose another anchor prompt, or raise --num_anchor_generations.")
    prompts = sorted(set(forget.texts))
    anchor = torch.cat([far] * len(prompts))
    texts = [prompt for prompt in prompts for _ in range(len(far))]
    names = [f"anchor/{i}" for i in range(len(anchor))]
    anchor_set = unlearn_data.ImageSet(anchor, [unlearn_data.pixel_hash(x) for x in anchor], names, None, texts)
    return anchor_set if keep is None else unlearn_data.concatenate(keep, anchor_set)


def forget_from_generations(args, pipe, prompts, detector, resolution):
    """SISS's recipe for memorized prompts without images: per prompt, the generations that collapse onto one
    image (copies of each other by `detector`, --copy_detector) are the forget set and the others the keep set
    (both under that prompt)."""
    generations = generate_images(pipe, prompts, args.num_forget_generations, seed=args.seed + 2, num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale, batch_size=args.eval_batch_size, height=resolution, width=resolution, max_sequence_length=args.sampling_max_sequence_length)
    forget_images, forget_texts, keep_images, keep_texts = [], [], [], []
    for prompt, images in zip(prompts, generations):
        members = unlearn_data.largest_cluster(images, copy_detector=detector)
        if len(members) < 2:
            logger.warning(f"{prompt!r}: no two of {len(images)} generations are copies ({detector.name}, threshold {detector.threshold:.3f}); it does not look memorized and is skipped.")
            continue
        others = [i for i in range(len(images)) if i not in members]
        logger.info(f"{prompt!r}: {len(members)} of {len(images)} generations form the memorized cluster.")
        forget_images.append(images[members])
        forget_texts += [prompt] * len(members)
        keep_images.append(images[others])
        keep_texts += [prompt] * len(others)
    if not forget_texts:
        raise unlearn_data.DataError(f"No prompt of {args.memorized_prompts_file} produced a cluster of near-identical generations; nothing to forget. Raise --num_forget_generations, or --memorization_threshold (pixel) / lower --copy_similarity_threshold (features).")
    forget = torch.cat(forget_images)
    forget_set = unlearn_data.ImageSet(forget, [unlearn_data.pixel_hash(x) for x in forget], [f"generation/{i}" for i in range(len(forget))], None, forget_texts)
    keep_set = None
    if keep_texts:
        keep = torch.cat(keep_images)
        keep_set = unlearn_data.ImageSet(keep, [unlearn_data.pixel_hash(x) for x in keep], [f"generation/{i}" for i in range(len(keep))], None, keep_texts)
    return forget_set, keep_set


@exclusive_output_dir  # one run per --output_dir at a time; an interrupted final save is recovered first
def main(args):
    started = time.time()
    check_inputs(args)
    # A feature copy detector loads now (a bad model fails before the pipeline loads); pixel gets its threshold later.
    copy_detector = load_copy_detector(args.copy_detector, copy_detector_threshold(args, ("memorization_threshold", "keep_generation_threshold")), revision=None, cache_dir=args.cache_dir)
    accelerator = make_accelerator(args)
    if args.bnb_quantization_config is not None and accelerator.distributed_type == DistributedType.FSDP:
        raise UserInputError("--bnb_quantization_config_path does not work under FSDP (a quantised base cannot be sharded here): launch the LoRA run with DDP (examples/accelerate_ddp.yaml) or on one GPU.")
    fsdp = check_sharding_arguments(accelerator, args)
    check_stopping_with_sharding(args, fsdp)
    if args.scale_lr:  # as train_text_to_image_lora.py, once the number of processes is known
        args.learning_rate = scaled_learning_rate(args.learning_rate, args.gradient_accumulation_steps, args.train_batch_size, accelerator.num_processes)
    repo_id = args.hub_model_id
    if args.push_to_hub and accelerator.is_main_process:  # a bad token or repo id fails now, not after training
        repo_id = create_hub_repo(args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir)), args.hub_token)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True

    # Models: the components the official script of the family loads (families/), frozen. Mixed precision as in
    # train_text_to_image_lora.py: frozen weights (text encoders, and the UNet under LoRA) in the half-precision
    # dtype, trainable ones in float32, forward passes under autocast. Full fine-tuning keeps float32 master
    # weights. A VAE that overflows in float16 (config force_upcast) stays in float32.
    path, revision = args.pretrained_model_name_or_path, args.revision
    family = family_for_folder(path, args.model_family, revision=revision, cache_dir=args.cache_dir)
    family = family.with_options(**family_options(args, family))
    # Every evaluation samples with the T5 length the model trains with (SD3, Flux; the toy's own for sd3_tiny).
    args.sampling_max_sequence_length = family.options().get("max_sequence_length")
    if args.snr_gamma is not None and "weighting_scheme" in family.option_defaults:
        raise UserInputError(f"--snr_gamma weights DDPM losses; the {family.name} family is a flow-matching model: use --weighting_scheme (none, sigma_sqrt, logit_normal, mode, cosmap) as the official SD3/Flux scripts do.")
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
    vae_source = args.pretrained_vae_model_name_or_path or path
    vae_config = AutoencoderKL.load_config(vae_source, subfolder=None if args.pretrained_vae_model_name_or_path else "vae", revision=revision, cache_dir=args.cache_dir)
    vae_scale_factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    if args.resolution is not None and args.resolution % vae_scale_factor != 0:
        raise UserInputError(f"--resolution {args.resolution} is not divisible by the VAE's scale factor {vae_scale_factor}; use a multiple of {vae_scale_factor} (for example {args.resolution // vae_scale_factor * vae_scale_factor or vae_scale_factor}).")
    components = family.load(
        path, weight_dtype, revision=revision, variant=args.variant, vae_path=args.pretrained_vae_model_name_or_path,
        cache_dir=args.cache_dir, denoiser_dtype=weight_dtype if args.train_mode == "lora" else torch.float32,
        quantization_config=args.bnb_quantization_config,
    )
    resolution = args.resolution or family.native_resolution(components)[0]
    if args.guidance_scale is None:
        args.guidance_scale = family.default_guidance_scale
    # The denoiser: a UNet (SD, SDXL) or a transformer (SD3, Flux); `unet` below names either.
    unet, vae = components[family.denoiser_name], components["vae"]
    if args.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()  # otherwise diffusers' default, PyTorch's SDPA
    device = accelerator.device
    text_encoders = {name: components[name] for name in family.text_encoder_names if components.get(name) is not None}
    for module in (unet, vae, *text_encoders.values()):
        module.to(device)
    schedule = family.schedule(components, args.prediction_type)
    # The same sampler before and after unlearning (DDIM over the training schedule; a flow model's own).
    sampling_scheduler = family.evaluation_scheduler(components, schedule.prediction_type)
    try:
        model_index = DiffusionPipeline.load_config(path, revision=revision, cache_dir=args.cache_dir)
    except EnvironmentError:  # a folder without model_index.json, taken with --model_family
        model_index = {}
    pipe = family.sampling_pipeline(components, sampling_scheduler, model_index)

    threshold = args.memorization_threshold
    if threshold is None:
        if args.using_toy:
            from diffusers_unlearn.toy.text_to_image import SD_MEMORIZATION_THRESHOLD

            threshold = SD_MEMORIZATION_THRESHOLD
        else:
            threshold = 0.1 * (vae_config["in_channels"] * resolution * resolution) ** 0.5
    # One copy detector for the memorization rate, the keep filter and the memorized-cluster check.
    detector = copy_detector.with_threshold(threshold) if copy_detector.kind == PIXEL else copy_detector.to(device)
    threshold = detector.threshold  # in the detector's units (pixel L2, or cosine similarity)

    # Data, validated before any training; then latents and prompt embeddings, computed once.
    with accelerator.autocast():  # generations (--keep_from_generations, --memorized_prompts_file)
        forget, keep, heldout = load_forget_and_keep(args, pipe, resolution, threshold, detector)
    for image_set in (forget, keep, heldout):
        if image_set is not None:
            unlearn_data.log_notices(image_set, logger.info)
    forget_prompts = list(dict.fromkeys(forget.texts))
    validation_prompt = args.validation_prompt or forget_prompts[0]

    def cache(image_set, components=components):
        """(latents, token ids, conditioning dict) of an image set's fixed (centre-crop) form, on the CPU: the
        family's latents and prompt conditioning (SDXL: pooled embeddings and time_ids from each image's original
        size and centre-crop corner), by `components`' VAE and text encoders."""
        images, texts = image_set.images, list(image_set.texts)
        sizes = corners = None
        if image_set.sources is not None:
            sizes = image_set.original_sizes
            corners = [unlearn_data.crop_top_left(s.shape[1], s.shape[2], resolution, center=True) for s in image_set.sources]
        cond = family.encode_prompts(components, texts, original_sizes=sizes, crops_top_left=corners, target_size=(resolution, resolution))
        return family.encode_images(components, images), family.tokenize(components, texts), {key: value.cpu() for key, value in cond.items()}

    def batch_of(cached, limit=None):
        latents, _, cond = cached
        return DenoisingBatch.from_conditioning(latents[:limit].to(device), {key: value[:limit].to(device) for key, value in cond.items()})

    forget_cache, keep_cache = cache(forget), cache(keep)
    heldout_cache = cache(heldout) if heldout is not None else None
    logger.info(f"Forget set: {len(forget)} image(s), {len(forget_prompts)} prompt(s); keep set: {len(keep)} image(s).")

    n = len(forget) + len(keep)
    objective = get_objective(args.method, **hyperparameters_from_flags(args.method, args.method_flags, {"n": n, "k": len(forget)}))
    if objective.needs_keep and len(keep) == 0:
        raise UserInputError(f"--method {args.method} needs a keep set.")
    # A checkpoint of another run (other data, method or settings) is refused before any evaluation.
    fingerprint = script_fingerprint(args, objective, forget, keep, train_text_encoder=args.train_text_encoder, resolution=resolution, model_family=family.name, family_options=family.options(), vae=args.pretrained_vae_model_name_or_path, **official_fingerprint_entries(args), **quantization_fingerprint_entries(args.bnb_quantization_config), **detector_fingerprint(detector))
    resume_path = find_resume_checkpoint(args.output_dir, args.resume_from_checkpoint, fingerprint, args.max_train_steps)

    # Evaluation (main process), before training; the same seeds after training.
    toy_prompts = []
    classifier = None
    if args.using_toy:
        from diffusers_unlearn.toy import load_classifier
        from diffusers_unlearn.toy.text_to_image import DIGIT_PROMPTS

        toy_prompts = [p for p in DIGIT_PROMPTS if p not in forget_prompts]
        classifier = load_classifier()

    retrain = None  # the retrained model's RetrainReference, once it has been evaluated
    base_side = (pipe, schedule, forget_cache, keep_cache, heldout_cache)

    def evaluate(model, side=base_side):
        with accelerator.autocast():  # a no-op without --mixed_precision
            return evaluate_in_precision(accelerator.unwrap_model(model), *side)

    def evaluate_in_precision(model, pipe, schedule, forget_cache, keep_cache, heldout_cache):
        """One evaluation of `model` in `pipe` (the base model's pipeline, or the retrained model's with its own
        schedule and caches: its VAE and text encoders may differ)."""
        was_training = model.training
        model.eval()
        setattr(pipe, family.denoiser_name, model)
        report, per_prompt = {}, {}
        generations = generate_images(pipe, forget_prompts, args.num_eval_images, seed=args.seed, num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale, batch_size=args.eval_batch_size, height=resolution, width=resolution, max_sequence_length=args.sampling_max_sequence_length)
        rates = []
        for prompt, images in zip(forget_prompts, generations):
            own = forget.images[[i for i, text in enumerate(forget.texts) if text == prompt]]
            rate = memorization_rate(images, own, copy_detector=detector)
            rates.append(rate)
            per_prompt[prompt] = {"memorization_rate": rate}
        report["memorization_rate"] = sum(rates) / len(rates)
        report["memorization_threshold"] = threshold
        report["num_eval_images_per_prompt"] = args.num_eval_images
        if args.noise_norm_generations and family.has_noise_norm_score:
            from diffusers_unlearn.metrics import noise_norm_per_prompt

            scores = noise_norm_per_prompt(pipe, forget_prompts + toy_prompts, args.noise_norm_generations, seed=args.seed, num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale, height=resolution, width=resolution, max_sequence_length=args.sampling_max_sequence_length)
            for prompt, score in zip(forget_prompts + toy_prompts, scores):
                per_prompt.setdefault(prompt, {})["noise_norm"] = score
            report["noise_norm"] = sum(scores[: len(forget_prompts)]) / len(forget_prompts)
            if toy_prompts:
                report["other_prompts_noise_norm"] = sum(scores[len(forget_prompts):]) / len(toy_prompts)
        if classifier is not None:
            report.update(toy_quality(pipe, classifier, toy_prompts, forget_prompts, generations, forget.images, detector, per_prompt, args, resolution))
        denoiser = Denoiser(model, schedule, call=family.call)
        sets = {"forget": forget_cache, "keep": keep_cache}
        if heldout_cache is not None:
            sets["heldout"] = heldout_cache
        losses = {}
        with accelerator.autocast():
            for name, cached in sets.items():
                losses[name] = denoising_losses(denoiser, batch_of(cached, 256), seed=args.seed)
        for name, values in losses.items():
            report[f"{name}_loss"] = float(values.mean())
        report["mia_auc"] = mia_auc(losses["forget"], losses["heldout"]) if "heldout" in losses else None
        if args.retrained_model_name_or_path:  # the same forget queries and sampling seeds as the retrained model's
            with accelerator.autocast():
                measures = (query_losses(denoiser, batch_of(forget_cache, 256), seed=args.seed),
                            classifier_features(classifier, torch.cat(generations)) if classifier is not None else None)
            if retrain is None:  # this is the retrained model
                report["retrain_measures"] = measures
            else:
                report.update(distance_to_retrain(retrain, *measures, model_mia_auc=report["mia_auc"]))
        report["samples"] = generations[0][: args.num_validation_images]
        model.train(was_training)
        return report, per_prompt

    before, per_prompt_before = (None, None)
    retrained = None
    if accelerator.is_main_process and args.retrained_model_name_or_path:
        # Its own components (a retrained VAE or text encoder too, where it has one), evaluated once, then freed.
        retrained_components = family.load(args.retrained_model_name_or_path, weight_dtype, cache_dir=args.cache_dir)
        for module in retrained_components.values():
            if isinstance(module, torch.nn.Module):
                module.to(device)
        retrained_schedule = family.schedule(retrained_components, args.prediction_type)
        retrained_pipe = family.sampling_pipeline(retrained_components, family.evaluation_scheduler(retrained_components, retrained_schedule.prediction_type), model_index)
        retrained_side = (retrained_pipe, retrained_schedule, cache(forget, retrained_components), cache(keep, retrained_components),
                          cache(heldout, retrained_components) if heldout is not None else None)
        retrained, _ = evaluate(retrained_components[family.denoiser_name], retrained_side)
        retrain = retrain_reference(*retrained.pop("retrain_measures"), mia_auc=retrained["mia_auc"])
        del retrained_components, retrained_pipe, retrained_side
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        logger.info(f"Retrained model: { {k: v for k, v in retrained.items() if not torch.is_tensor(v)} }")
    if accelerator.is_main_process:
        before, per_prompt_before = evaluate(unet)
        logger.info(f"Before unlearning: { {k: v for k, v in before.items() if not torch.is_tensor(v)} }")

    # The VAE and the text encoders are not needed again until evaluation: off the accelerator. (The VAE stays when
    # training images are cropped or flipped anew at every draw, and so encoded at every draw.)
    augmented = {name: unlearn_data.needs_augmented_pool(image_set, resolution, args.center_crop, args.random_flip) for name, image_set in (("forget", forget), ("keep", keep))}
    vae_stays = augmented["forget"] or augmented["keep"]
    if vae_stays:
        logger.info(f"Per-draw crops/flips (VAE encoding each draw) for: {', '.join(name for name, on in augmented.items() if on)}.")
    if not vae_stays:
        vae.to("cpu")
    if not args.train_text_encoder:
        for encoder in text_encoders.values():
            encoder.to("cpu")

    # LoRA or full fine-tuning.
    trained_text_encoders = {}
    if args.train_mode == "lora":
        unet = add_lora(unet, rank=args.rank, lora_alpha=args.lora_alpha, targets=args.lora_targets, presets=family.lora_target_presets)
        if args.train_text_encoder:  # the CLIP encoders; T5 (SD3, Flux) stays frozen, as in the official scripts
            for name in family.lora_text_encoder_names:
                trained_text_encoders[name] = add_text_encoder_lora(text_encoders[name], rank=args.rank, lora_alpha=args.lora_alpha).to(device)
        # peft makes the adapter in the frozen weights' dtype; it trains in float32 (cast_training_params).
        cast_training_params([unet, *trained_text_encoders.values()], dtype=torch.float32)
    else:
        unet = prepare_full_finetune(unet)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for encoder in trained_text_encoders.values():
            encoder.gradient_checkpointing_enable()
    params = trainable_parameters(unet) + [p for encoder in trained_text_encoders.values() for p in trainable_parameters(encoder)]

    optimizer = make_optimizer(
        params, args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay, eps=args.adam_epsilon, use_8bit_adam=args.use_8bit_adam,
    )
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )

    denoiser = Denoiser(unet, schedule, args.loss_space, call=family.call, noise_offset=args.noise_offset, snr_gamma=args.snr_gamma)
    with accelerator.autocast():
        objective.prepare(denoiser, batch_of(forget_cache), generator=step_generator(args.seed, -1))
    names = list(trained_text_encoders)
    unet, *prepared, optimizer, lr_scheduler = accelerator.prepare(unet, *trained_text_encoders.values(), optimizer, lr_scheduler)
    trained_text_encoders = dict(zip(names, prepared))
    denoiser.model = unet
    unlearner = Unlearner(objective, denoiser, optimizer, accelerator, lr_scheduler, args.max_grad_norm)
    trained_models = [unet, *trained_text_encoders.values()]
    adapter_metadata = {"method": args.method, "base_model": str(args.pretrained_model_name_or_path)}

    def save_adapter(directory):  # checkpoints carry a loadable adapter too, as the official scripts' do
        encoders = {name: accelerator.unwrap_model(encoder) for name, encoder in trained_text_encoders.items()}
        family.save_adapter(directory, accelerator.unwrap_model(unet), encoders, metadata=adapter_metadata)

    checkpointer = Checkpointer(accelerator, unlearner, trained_models, optimizer, lr_scheduler, None, fingerprint,
                                save_adapter if args.train_mode == "lora" else None)
    if accelerator.is_main_process and args.report_to != "none":
        accelerator.init_trackers("unlearn-sd", config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool)) and k != "hub_token"})

    # Conditioning that does not come from the text encoders (SDXL's time_ids, Flux's guidance).
    micro_keys = set(family.micro_conditioning(components, 1, target_size=(resolution, resolution)))

    def pool(cached, image_set, augment):
        latents, input_ids, cond = cached
        if args.train_text_encoder:  # embeddings change during training: encode the token ids every step
            encoding = {**components, **trained_text_encoders}
            micro = {key: value for key, value in cond.items() if key in micro_keys}
            text = {"input_ids": input_ids, "encode": lambda ids: family.encode_tokens(encoding, ids)}
        else:  # cached: pooled embeddings too
            micro = {key: value for key, value in cond.items() if key != "encoder_hidden_states"}
            text = {"encoder_hidden_states": cond["encoder_hidden_states"]}
        if not augment:
            return BatchPool(latents, added_cond=micro or None, **text)
        # Crops and flips drawn anew each time an image is drawn (SDXL: time_ids from that draw's crop corner).
        return unlearn_data.AugmentedImagePool(
            image_set, resolution, args.center_crop, args.random_flip, lambda pixels: family.encode_images(components, pixels),
            cached_cond=micro or None, added_cond=lambda sizes, corners, index: family.micro_conditioning(components, len(index), sizes.tolist(), corners.tolist(), (resolution, resolution)), **text,
        )

    forget_pool, keep_pool = pool(forget_cache, forget, augmented["forget"]), pool(keep_cache, keep, augmented["keep"])

    start_step, validation_history = checkpointer.load(resume_path) if resume_path else (0, [])

    rule = stopping_rule(args)

    def validate(step):
        """Generations for the validation prompt and their memorization rate, every --validation_steps (and the
        forget and held-out loss levels for --stop_at_heldout_level)."""
        model = accelerator.unwrap_model(unet)
        model.eval()
        setattr(pipe, family.denoiser_name, model)
        for module in (vae, *text_encoders.values()):
            module.to(device)
        with accelerator.autocast():
            images = generate_images(pipe, [validation_prompt], args.num_validation_images, seed=args.seed + 3, num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale, batch_size=args.eval_batch_size, height=resolution, width=resolution, max_sequence_length=args.sampling_max_sequence_length)[0]
        if not vae_stays:
            vae.to("cpu")
        if not args.train_text_encoder:
            for encoder in text_encoders.values():
                encoder.to("cpu")
        logs = {}
        if rule is not None:  # the evaluation's losses (same items, timestep grid and noise seed)
            denoiser = Denoiser(model, schedule, call=family.call)
            with accelerator.autocast():
                forget_losses = denoising_losses(denoiser, batch_of(forget_cache, 256), seed=args.seed)
                heldout_losses = denoising_losses(denoiser, batch_of(heldout_cache, 256), seed=args.seed) if heldout_cache is not None else None
            level = rule.measure_run(forget_losses, heldout_losses, retrain)
            logs.update({f"validation/{key}": value for key, value in level.items()})
        model.train()
        if validation_prompt in forget_prompts:
            own = forget.images[[i for i, text in enumerate(forget.texts) if text == validation_prompt]]
            logs["validation/memorization_rate"] = memorization_rate(images, own, copy_detector=detector)
        accelerator.log(logs, step=step)
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image("validation", grid_array(make_grid(images, scale=max(1, 64 // resolution))), step, dataformats="HWC")
        logger.info(f"step {step}: {logs}")
        return {"step": step, **{key.split("/", 1)[1]: value for key, value in logs.items()}}

    if fsdp:  # a sharded model samples only with every process taking part; validation runs on the main one
        logger.info("FSDP: no validation during training (the full evaluation before and after still runs).")

    validation_history = run_unlearning_loop(
        accelerator, unlearner, forget_pool, keep_pool,
        output_dir=args.output_dir, max_train_steps=args.max_train_steps, train_batch_size=args.train_batch_size,
        seed=args.seed, start_step=start_step, gradient_accumulation_steps=args.gradient_accumulation_steps,
        checkpointer=checkpointer, checkpointing_steps=args.checkpointing_steps,
        checkpoints_total_limit=args.checkpoints_total_limit, validation_history=validation_history,
        validation_steps=args.validation_steps, validate=None if fsdp else validate,
        should_stop=rule.reason if rule is not None else None,
    )

    def base_denoiser():  # a fresh float32 copy of the base denoiser, for the gathered weights
        return getattr(diffusers, family.denoiser_class_name).from_pretrained(
            path, subfolder=family.denoiser_name, torch_dtype=torch.float32, revision=revision, variant=args.variant,
            cache_dir=args.cache_dir,
        )

    # Under FSDP every process takes part in gathering the shards; the main process gets one ordinary denoiser.
    trained = gathered_model(accelerator, unet, base_denoiser) if fsdp else None

    # Save, evaluate after, report, card, upload (main process only). The final outputs are written into a
    # staging folder and swapped into --output_dir together, so it never mixes two runs' files.
    if accelerator.is_main_process:
        model = trained if fsdp else accelerator.unwrap_model(unet)
        # The pipeline holds the same text encoder objects (LoRA is injected in place).
        for module in (vae, *text_encoders.values()):
            module.to(device)
        after, per_prompt_after = evaluate(model)
        staged = StagedRun(args.output_dir)
        if args.train_mode == "lora":
            save_adapter(staged.path)
        else:
            save_full_pipeline(args, family, model, staged)

        images = {}
        scale = max(1, 64 // resolution)
        if retrained is not None:
            save_image_atomic(make_grid(retrained.pop("samples"), scale=scale), staged.file("samples_retrained.png"))
            images[f"{forget_prompts[0]!r}, model retrained without the forget data (same seeds)"] = "samples_retrained.png"
        for label, metrics in (("before", before), ("after", after)):
            save_image_atomic(make_grid(metrics.pop("samples"), scale=scale), staged.file(f"samples_{label}.png"))
            images[f"{forget_prompts[0]!r} {label} unlearning (same seeds)"] = f"samples_{label}.png"
        wall = time.time() - started
        before["wall_seconds"] = None
        after["wall_seconds"] = wall
        per_prompt = {
            prompt: {key: {"before": per_prompt_before.get(prompt, {}).get(key), "after": values.get(key)} for key in values}
            for prompt, values in per_prompt_after.items()
        }
        report = {
            "method": args.method,
            "hyperparameters": {**objective.hyperparameters(), **{f"combiner_{k}": v for k, v in unlearner.state_dict().get("combiner", {}).items() if k == "scaling_norm"}},
            "train_mode": args.train_mode,
            "train_text_encoder": args.train_text_encoder,
            "model_family": family.name,
            "base_model": str(args.pretrained_model_name_or_path),
            "forget_items": [{"sha256": h, "source": name, "prompt": text} for h, name, text in zip(forget.hashes, forget.names, forget.texts)],
            "forget_prompts": forget_prompts,
            "num_keep_items": len(keep),
            "seed": args.seed,
            "max_train_steps": args.max_train_steps,
            "train_batch_size": args.train_batch_size,
            "learning_rate": args.learning_rate,
            "training_options": official_fingerprint_entries(args),
            "bnb_quantization": quantization_summary(args.bnb_quantization_config),
            "resolution": resolution,
            "memorization_threshold": threshold,
            "copy_detector": detector.describe(),
            "num_processes": accelerator.num_processes,
            "wall_seconds": wall,
            "metrics": {"before": before, "after": after},
            "per_prompt": per_prompt,
            "retrained_model": None if retrained is None else {"path": str(args.retrained_model_name_or_path), "metrics": retrained},
            "validation": validation_history,
            "stopping": rule.summary(validation_history) if rule is not None else None,
        }
        report["verdict"] = build_verdict(before, after, args.verdict_thresholds, retrained_model=args.retrained_model_name_or_path)
        atomic_write_json(staged.file("unlearning_report.json"), report)
        write_model_card(args.output_dir, report, str(args.pretrained_model_name_or_path), repo_id, images, is_adapter=args.train_mode == "lora", text_to_image=True, into=staged.path, pipeline_class=family.plain_pipeline_class_name)
        staged.commit()
        print_summary(report)
        print_prompt_table(per_prompt)
        print_verdict(report["verdict"])
        if args.push_to_hub:
            push_folder(args.output_dir, repo_id, args.hub_token, f"Unlearn with {args.method}")
            logger.info(f"Uploaded to {repo_id}.")
    accelerator.end_training()


def toy_quality(pipe, classifier, toy_prompts, forget_prompts, forget_generations, forget_images, detector, per_prompt, args, resolution):
    """The tiny toy only: digit accuracy (the bundled classifier) of every prompt's generations; for the forget
    prompt, canary copies (by `detector`) are left out so the accuracy measures the normal images."""
    from diffusers_unlearn.toy.text_to_image import DIGIT_PROMPTS, digit_accuracy

    report = {}
    generations = generate_images(pipe, toy_prompts, args.num_other_prompt_images, seed=args.seed + 5, num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale, batch_size=args.eval_batch_size, height=resolution, width=resolution, max_sequence_length=args.sampling_max_sequence_length) if toy_prompts else []
    accuracies = []
    for prompt, images in zip(toy_prompts, generations):
        accuracy = digit_accuracy(classifier, images, DIGIT_PROMPTS.index(prompt))
        per_prompt.setdefault(prompt, {})["digit_accuracy"] = accuracy
        accuracies.append(accuracy)
    for prompt, images in zip(forget_prompts, forget_generations):
        if prompt in DIGIT_PROMPTS:
            normal = images[~detector.is_copy(images, forget_images)]
            per_prompt[prompt]["digit_accuracy"] = digit_accuracy(classifier, normal, DIGIT_PROMPTS.index(prompt)) if len(normal) else None
    if accuracies:
        report["other_prompts_digit_accuracy"] = sum(accuracies) / len(accuracies)
    return report


def save_full_pipeline(args, family, unet, staged):
    """The fine-tuned pipeline, for plain `from_pretrained(--output_dir)` with the family's pipeline: the base
    model's own components (scheduler class and config, safety checker and feature extractor when it has them),
    each in the dtype its base files hold, with only the denoiser's weights replaced. Written into the staging
    folder."""
    folder = args.pretrained_model_name_or_path
    if not os.path.isdir(folder):  # a Hub id: the cached snapshot (fetching components the run did not load)
        folder = DiffusionPipeline.download(folder, revision=args.revision, variant=args.variant, cache_dir=args.cache_dir)
    dtypes = stored_dtypes(folder, args.variant)
    replaced = {family.denoiser_name: unet.to(dtypes.get(family.denoiser_name, torch.float32))}
    for tokenizer_name, encoder_name, _ in family.text_encoders:  # a pipeline saved without its T5 (SD3)
        if encoder_name in family.optional_text_encoders and not os.path.isdir(os.path.join(folder, encoder_name)):
            replaced.update({encoder_name: None, tokenizer_name: None})
    pipeline = family.plain_pipeline_class.from_pretrained(
        folder, variant=args.variant, torch_dtype={**dtypes, "default": torch.float32}, **replaced
    )
    save_pipeline_into(pipeline, staged)


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def stored_dtypes(folder, variant=None):
    """{component: dtype} of the floating-point weights in each component's safetensors files (the variant's
    when it has them), read from the file headers; components without such files are left out."""
    import json

    dtypes = {}
    for name in sorted(os.listdir(folder)):
        subfolder = os.path.join(folder, name)
        if not os.path.isdir(subfolder):
            continue
        files = sorted(f for f in os.listdir(subfolder) if f.endswith(".safetensors"))
        # model.safetensors, model-00001-of-00002.safetensors; model.fp16.safetensors, model.fp16-00001-of-....
        tagged = [f for f in files if variant and len(f.split(".")) == 3 and f.split(".")[1].split("-")[0] == variant]
        plain = [f for f in files if len(f.split(".")) == 2]
        for file_name in (tagged or plain)[:1]:
            with open(os.path.join(subfolder, file_name), "rb") as handle:
                header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
            found = [SAFETENSORS_DTYPES[v["dtype"]] for k, v in header.items() if k != "__metadata__" and v["dtype"] in SAFETENSORS_DTYPES]
            if found:
                dtypes[name] = found[0]
    return dtypes


def print_prompt_table(per_prompt):
    metrics = sorted({m for row in per_prompt.values() for m in row})
    print(f"\n{'prompt':34s} " + " ".join(f"{m + ' before':>24s} {m + ' after':>24s}" for m in metrics))
    for prompt, row in per_prompt.items():
        cells = []
        for metric in metrics:
            for side in ("before", "after"):
                value = row.get(metric, {}).get(side)
                cells.append(f"{'-' if value is None else f'{value:.4f}':>24s}")
        print(f"{prompt[:34]:34s} " + " ".join(cells))


if __name__ == "__main__":
    run_script(lambda: main(parse_args()), os.path.basename(__file__))
