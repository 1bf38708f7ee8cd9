#!/usr/bin/env python
"""Unlearn training data from a DDPM (UNet2DModel), unconditional or class-conditional.

Modeled on diffusers' examples/unconditional_image_generation/train_unconditional.py.
With no arguments it removes the memorized canary from the bundled toy digits model with
SISS and LoRA, and prints a before/after summary:

    python train_unlearn_ddpm.py
    accelerate launch train_unlearn_ddpm.py --pretrained_model_name_or_path my-ddpm \\
        --forget_data_dir forget/ --keep_data_dir keep/ --method siss --train_mode lora

Several GPUs: `accelerate launch --config_file examples/accelerate_ddp.yaml ...`; a full fine-tune too large for
one GPU: `--config_file examples/accelerate_fsdp.yaml --train_mode full` (FSDP2; docs/multi_gpu.md).

Order: parse_args -> Accelerator -> models -> LoRA/full -> optimizer -> data -> hooks ->
evaluation before -> loop -> save, evaluation after, report, card, upload.
"""

import argparse
import json
import os
import time

# Before diffusers and transformers: importing the package filters the two known-harmless messages those
# libraries print while being imported (diffusers_unlearn/third_party_logs.py), and nothing else.
import diffusers_unlearn  # noqa: F401  isort: skip
import torch
from accelerate.logging import get_logger
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from diffusers_unlearn import data as unlearn_data
from diffusers_unlearn.checks import DDPM, check_hub_model, check_model_path, check_number_flags
from diffusers_unlearn.errors import UserInputError, run_script
from diffusers_unlearn.hub import atomic_write_json, check_hub_arguments, create_hub_repo, push_folder, write_model_card
from diffusers_unlearn.images import grid_array, make_grid, save_image_atomic
from diffusers_unlearn.lora import (
    add_lora,
    as_plain_unet,
    make_optimizer,
    prepare_full_finetune,
    save_lora_weights,
    trainable_parameters,
)
from diffusers_unlearn.metrics import (
    classifier_features,
    class_count,
    denoising_losses,
    distance_to_retrain,
    evaluate_ddpm,
    predict_labels,
    pul,
    query_losses,
    retrain_reference,
)
from diffusers_unlearn.metrics.copy_detection import PIXEL, PixelCopyDetector, add_copy_detector_arguments, copy_detector_threshold, detector_fingerprint, load_copy_detector
from diffusers_unlearn.noise import NoiseSchedule
from diffusers_unlearn.outputs import StagedRun, check_output_dir, exclusive_output_dir
from diffusers_unlearn.objectives import (
    DenoisingBatch,
    Denoiser,
    get_objective,
    hyperparameters_from_flags,
)
from diffusers_unlearn.pipelines.ddpm import ClassConditionalDDPMPipeline, sample_images
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
)
from diffusers_unlearn.checkpoints import Checkpointer, find_resume_checkpoint
from diffusers_unlearn.stopping import add_stopping_arguments, check_stopping_arguments, check_stopping_with_sharding, stopping_rule
from diffusers_unlearn.verdict import add_verdict_arguments, build_verdict, check_verdict_arguments, print_verdict
from diffusers_unlearn.unlearner import BatchPool, Unlearner, step_generator

logger = get_logger(__name__, log_level="INFO")

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Unlearn training data from a DDPM.")
    # Model and data (train_unconditional.py order).
    parser.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        default=None,
        help="Hub id or local DDPM pipeline folder (unet/ + scheduler/). Default: the bundled toy digits model.",
    )
    parser.add_argument("--revision", type=str, default=None)
    parser.add_argument("--variant", type=str, default=None)
    parser.add_argument("--forget_data_dir", type=str, default=None, help="Image folder of the items to forget. Subfolders are read too (as datasets' imagefolder does); a metadata.jsonl in any folder gives file_name and an integer 'label' (needed by a class-conditional model).")
    parser.add_argument("--forget_dataset_name", type=str, default=None, help=f"A datasets name/path, or '{unlearn_data.TOY_DATASET}'.")
    parser.add_argument("--forget_class", type=int, default=None, help="Forget every item of this class. The report counts the class among the samples with the classifier (forget_class_rate, PUL): samples drawn with that label on a class-conditional model, ordinary samples on an unconditional one (VDU's protocol; the toy's canary label stays a copy count).")
    parser.add_argument("--forget_indices", type=int, nargs="+", default=None, help="Forget these dataset indices.")
    parser.add_argument("--keep_data_dir", type=str, default=None, help="Image folder of items to keep, read like --forget_data_dir. Copies of forget images (exact, or within --near_duplicate_distance) are removed from it with a notice.")
    parser.add_argument("--keep_dataset_name", type=str, default=None)
    parser.add_argument("--keep_from_generations", type=int, default=None, help="Generate N samples; those far from every forget image form the keep set.")
    parser.add_argument("--keep_generation_threshold", type=float, default=None, help="Pixel L2 distance (in [0,1] units) below which a generation counts as a forget copy (of a forget image, or of a generation already counted as one). Default: the memorization threshold.")
    parser.add_argument("--heldout_data_dir", type=str, default=None, help="Non-member images for held-out loss and membership inference.")
    parser.add_argument("--output_dir", type=str, default="unlearn-ddpm-output")
    parser.add_argument("--overwrite_output_dir", action="store_true", help="Replace the finished run in --output_dir (its outputs are swapped out when this run finishes; checkpoints and logs stay).")
    parser.add_argument("--cache_dir", type=str, default=None)
    parser.add_argument("--resolution", type=int, default=None, help="Default: the UNet's sample_size.")
    parser.add_argument("--train_batch_size", type=int, default=64)
    parser.add_argument("--eval_batch_size", type=int, default=256)
    parser.add_argument("--max_train_steps", type=int, default=300)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--learning_rate", type=float, default=None, help="Default: 5e-3 with LoRA, 1e-4 for full fine-tuning.")
    parser.add_argument("--lr_scheduler", type=str, default="constant")
    parser.add_argument("--lr_warmup_steps", type=int, default=0)
    parser.add_argument("--adam_beta1", type=float, default=0.9)
    parser.add_argument("--adam_beta2", type=float, default=0.999)
    parser.add_argument("--adam_weight_decay", type=float, default=0.0)
    parser.add_argument("--adam_epsilon", type=float, default=1e-8)
    parser.add_argument("--max_grad_norm", type=float, default=1.0)
    parser.add_argument("--use_ema", action="store_true", help="Keep an EMA of the trained weights and save it.")
    parser.add_argument("--ema_max_decay", type=float, default=0.999)
    parser.add_argument("--push_to_hub", action="store_true")
    parser.add_argument("--hub_token", type=str, default=None)
    parser.add_argument("--hub_model_id", type=str, default=None)
    parser.add_argument("--logging_dir", type=str, default="logs")
    parser.add_argument("--mixed_precision", type=str, default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--prediction_type", type=str, default=None, choices=["epsilon", "v_prediction", "sample"], help="Default: the scheduler's.")
    parser.add_argument("--ddpm_num_inference_steps", type=int, default=50)
    parser.add_argument("--checkpointing_steps", type=int, default=500)
    parser.add_argument("--checkpoints_total_limit", type=int, default=None)
    parser.add_argument("--resume_from_checkpoint", type=str, default=None, help="A checkpoint folder, or 'latest'.")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--use_8bit_adam", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report_to", type=str, default="none", help="'tensorboard', 'wandb', 'all' or 'none'.")
    # Unlearning.
    add_method_arguments(parser)
    parser.add_argument("--train_mode", type=str, default="lora", choices=["lora", "full"])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lora_alpha", type=float, default=None, help="Default: the rank.")
    parser.add_argument("--lora_targets", type=str, default="attention_conv", help="'attention', 'attention_conv' or module names.")
    # Evaluation.
    parser.add_argument("--validation_steps", type=int, default=100)
    add_stopping_arguments(parser)
    parser.add_argument("--num_validation_images", type=int, default=64)
    parser.add_argument("--num_eval_samples", type=int, default=1024)
    parser.add_argument("--memorization_threshold", type=float, default=None, help="Pixel L2 in [0,1] units. Default: toy threshold, else half the forget-to-keep distance.")
    add_copy_detector_arguments(parser)
    parser.add_argument("--near_duplicate_distance", type=float, default=None, help="Pixel L2 ([0,1] units, at the model resolution) below which a keep image counts as a copy of a forget image (the same picture in another encoding, such as JPEG) and is removed from the keep set with a notice; 0 removes exact copies only. Default: an RMS pixel difference of 0.04, i.e. 0.04 * sqrt(channels * resolution^2).")
    parser.add_argument("--guidance_scale", type=float, default=3.0, help="Classifier-free guidance for class-conditional sampling.")
    parser.add_argument("--class_min_confidence", type=float, default=0.5, help="Class unlearning: a sample counts as --forget_class only if the classifier gives it this probability (0: plain arg-max). Keeps noise, which an arg-max labels as some class, out of the count.")
    parser.add_argument("--classifier_dir", type=str, default=None, help="A DigitsClassifier-style folder for FD and class rates (default: the toy classifier for toy-sized images).")
    add_verdict_arguments(parser)
    parser.add_argument("--retrained_model_name_or_path", type=str, default=None, help="A DDPM pipeline retrained without the forget data (the gold standard; for the toy's canary: diffusers_unlearn/toy/assets/ddpm_unconditional_retrained_without_canary). The report gains the distance to it before and after (fd_to_retrain, forget_loss_gap_to_retrain, mia_auc_vs_retrain, ...; docs/metrics.md) and its own metrics under retrained_model.")
    args = parser.parse_args(argv)

    # Cheap checks first: nothing expensive has happened yet.
    check_method_arguments(parser, args)
    check_output_dir(args.output_dir, overwrite=args.overwrite_output_dir, resume_from_checkpoint=args.resume_from_checkpoint)
    check_hub_arguments(args.report_to, args.hub_token)
    if args.forget_data_dir and args.forget_dataset_name:
        parser.error("Give --forget_data_dir or --forget_dataset_name, not both.")
    if (args.forget_class is not None or args.forget_indices) and not args.forget_dataset_name:
        parser.error("--forget_class / --forget_indices select items of --forget_dataset_name.")
    if sum(x is not None for x in (args.keep_data_dir, args.keep_dataset_name, args.keep_from_generations)) > 1:
        parser.error("Give one of --keep_data_dir, --keep_dataset_name, --keep_from_generations.")
    if not 0.0 <= args.class_min_confidence <= 1.0:
        parser.error(f"--class_min_confidence must be in [0, 1], got {args.class_min_confidence}.")
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        parser.error("--mixed_precision fp16 needs a CUDA GPU; use bf16 or no on CPU.")
    for name in ("train_batch_size", "max_train_steps", "gradient_accumulation_steps", "num_eval_samples", "validation_steps", "checkpointing_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1.")
    if args.pretrained_model_name_or_path is None:
        from diffusers_unlearn.toy import toy_model_path

        args.pretrained_model_name_or_path = toy_model_path("ddpm_unconditional")
        args.using_toy = True
    else:
        args.using_toy = False
    if args.forget_data_dir is None and args.forget_dataset_name is None:
        if not args.using_toy:
            parser.error("Give the items to forget: --forget_data_dir, or --forget_dataset_name with --forget_class / --forget_indices.")
        from diffusers_unlearn.toy.data import CANARY_LABEL

        args.forget_dataset_name, args.forget_class = unlearn_data.TOY_DATASET, CANARY_LABEL
        if args.keep_data_dir is None and args.keep_from_generations is None:
            args.keep_dataset_name = args.keep_dataset_name or unlearn_data.TOY_DATASET
    if args.learning_rate is None:
        args.learning_rate = 5e-3 if args.train_mode == "lora" else 1e-4
    if forgets_a_class(args) and (args.stop_at_heldout_level or args.stop_at_retrained_level):
        # Held-out images of every class (and the retrained model's losses) say nothing about when a class is gone:
        # the forget class's loss can sit at that level before training (digits 5, 8, 9 on the toy).
        parser.error("--stop_at_heldout_level / --stop_at_retrained_level calibrate data unlearning; with --forget_class (class unlearning) run without them and read the class rate and PUL.")
    check_stopping_arguments(parser, args, has_heldout=bool(args.heldout_data_dir) or unlearn_data.TOY_DATASET in (args.forget_dataset_name, args.keep_dataset_name))
    check_number_flags(parser, args)
    check_verdict_arguments(parser, args)
    if args.keep_from_generations and not args.using_toy and args.keep_generation_threshold is None and args.memorization_threshold is None and args.copy_detector == PIXEL:
        # Without a keep set there is no distance to derive a threshold from.
        parser.error("--keep_from_generations needs --keep_generation_threshold or --memorization_threshold (pixel L2 in [0,1] units) to tell forget copies apart.")
    check_model_path(args.pretrained_model_name_or_path, DDPM)
    if args.retrained_model_name_or_path is not None:
        check_model_path(args.retrained_model_name_or_path, DDPM, "--retrained_model_name_or_path")
    check_resume_argument(args)
    return args


def check_inputs(args):
    """The data folders (and a Hub model's model_index.json), checked without decoding pixels or loading any
    model, so a typo fails in a second."""
    for what in ("forget", "keep", "heldout"):
        folder = getattr(args, f"{what}_data_dir")
        if folder:
            unlearn_data.check_image_folder(folder, what)
    if not os.path.isdir(args.pretrained_model_name_or_path):  # a Hub id: its model_index.json, not the weights
        check_hub_model(args.pretrained_model_name_or_path, DDPM, args.revision, args.cache_dir)
    elif forgets_a_class(args) and not args.classifier_dir:
        # The toy classifier reads 8x8 grey images only; read the UNet's config (not its weights) to know.
        config_path = os.path.join(args.pretrained_model_name_or_path, "unet", "config.json")
        if os.path.isfile(config_path):
            with open(config_path) as f:
                config = json.load(f)
            size, channels = args.resolution or config.get("sample_size"), config.get("in_channels")
            sizes = list(size) if isinstance(size, (list, tuple)) else [size, size]
            if sizes != [8, 8] or channels != 1:
                raise UserInputError(f"Class unlearning needs a classifier to measure the forget-class rate, and the bundled one reads 8x8 grey images, not this model's {sizes[0]}x{sizes[1]}x{channels}: pass --classifier_dir.")
    copy_detector_threshold(args, ("memorization_threshold", "keep_generation_threshold"))  # the detector's folder and units


def load_sets(args, unet, resolution, channels, is_conditional):
    """Forget, keep and held-out sets, validated before any training."""
    if args.forget_data_dir:
        forget = unlearn_data.load_image_folder(args.forget_data_dir, resolution, channels, "forget")
    else:
        # A class-conditional toy model was trained on digits only (no canary).
        full = unlearn_data.load_dataset_images(args.forget_dataset_name, resolution, channels, "forget", include_canary=not is_conditional)
        forget = unlearn_data.select(full, args.forget_class, args.forget_indices, "forget")
    forget = unlearn_data.deduplicate(forget, "forget")

    keep = None
    if args.keep_data_dir:
        keep = unlearn_data.load_image_folder(args.keep_data_dir, resolution, channels, "keep")
    elif args.keep_dataset_name:
        keep = unlearn_data.load_dataset_images(args.keep_dataset_name, resolution, channels, "keep", include_canary=not is_conditional)
    if keep is not None:
        keep = unlearn_data.remove_overlap(keep, forget, args.near_duplicate_distance)

    heldout = None
    if args.heldout_data_dir:
        heldout = unlearn_data.load_image_folder(args.heldout_data_dir, resolution, channels, "heldout")
    elif unlearn_data.TOY_DATASET in (args.forget_dataset_name, args.keep_dataset_name):
        heldout = unlearn_data.load_dataset_images(unlearn_data.TOY_DATASET, resolution, channels, "heldout", split="heldout")
    if is_conditional:  # a class-conditional UNet needs a label with every image it is trained or evaluated on
        for what, image_set in (("forget", forget), ("keep", keep), ("heldout", heldout)):
            if image_set is not None and image_set.labels is None:
                source = getattr(args, f"{what}_data_dir") or getattr(args, f"{what}_dataset_name", None)
                raise UserInputError(
                    f"{source} has no class labels, but the model is class-conditional (num_class_embeds="
                    f"{unet.config.num_class_embeds}): add a metadata.jsonl with a line per image, like "
                    '{"file_name": "a.png", "label": 3}, or pass an unconditional model.'
                )
    return forget, keep, heldout


def forgets_a_class(args) -> bool:
    """Class unlearning: a class of a class-conditional model, or (VDU's protocol) a class of an unconditional model,
    counted among its unconditional samples. The toy's canary is no class the classifier knows: it stays a copy."""
    from diffusers_unlearn.toy.data import CANARY_LABEL

    toy_canary = args.forget_dataset_name == unlearn_data.TOY_DATASET and args.forget_class == CANARY_LABEL
    return args.forget_class is not None and not toy_canary


def other_class_images(args, resolution: int, channels: int) -> torch.Tensor:
    """The real images of --forget_dataset_name outside --forget_class (no canary): the FD reference of an
    unconditional model's class unlearning, which has no keep set to compare with."""
    full = unlearn_data.load_dataset_images(args.forget_dataset_name, resolution, channels, "forget", include_canary=False)
    return full.images[full.labels != args.forget_class]


def batch_of(images: unlearn_data.ImageSet, with_labels: bool) -> DenoisingBatch:
    return DenoisingBatch(images.images, images.labels if with_labels else None)


@exclusive_output_dir  # one run per --output_dir at a time; an interrupted final save is recovered first
def main(args):
    started = time.time()
    check_inputs(args)
    # A feature copy detector loads now (a bad model fails before the DDPM loads); pixel gets its threshold later.
    copy_detector = load_copy_detector(args.copy_detector, copy_detector_threshold(args, ("memorization_threshold", "keep_generation_threshold")), cache_dir=args.cache_dir)
    accelerator = make_accelerator(args)
    fsdp = check_sharding_arguments(accelerator, args)
    check_stopping_with_sharding(args, fsdp)
    repo_id = args.hub_model_id
    if args.push_to_hub and accelerator.is_main_process:  # a bad token or repo id fails now, not after training
        repo_id = create_hub_repo(args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir)), args.hub_token)

    # Models.
    unet = UNet2DModel.from_pretrained(args.pretrained_model_name_or_path, subfolder="unet", revision=args.revision, variant=args.variant, cache_dir=args.cache_dir)
    scheduler = DDPMScheduler.from_pretrained(args.pretrained_model_name_or_path, subfolder="scheduler", revision=args.revision, cache_dir=args.cache_dir)
    schedule = NoiseSchedule.from_scheduler(scheduler, args.prediction_type)
    is_conditional = unet.config.num_class_embeds is not None
    resolution = args.resolution or unet.config.sample_size
    if resolution != unet.config.sample_size:
        raise UserInputError(f"--resolution {resolution} differs from the UNet's sample_size {unet.config.sample_size}; leave --resolution out.")
    channels = unet.config.in_channels

    # Data, validated before any training.
    forget, keep, heldout = load_sets(args, unet, resolution, channels, is_conditional)
    for image_set in (forget, keep, heldout):
        if image_set is not None:
            unlearn_data.log_notices(image_set, logger.info)
    class_unlearning = forgets_a_class(args)

    threshold = args.memorization_threshold
    if threshold is None and not class_unlearning:
        if args.using_toy:
            from diffusers_unlearn.toy import MEMORIZATION_THRESHOLD

            threshold = MEMORIZATION_THRESHOLD
        elif keep is not None:
            threshold = unlearn_data.memorization_threshold_from_keep(forget, keep)
            logger.info(f"Memorization threshold: {threshold:.3f} (half the forget-to-keep distance).")
    # One copy detector for the memorization rate and the keep filter (pixel L2 at `threshold` by default).
    detector = None
    if copy_detector.kind != PIXEL:
        detector = copy_detector.to(accelerator.device)
        threshold = None if class_unlearning else detector.threshold
    elif threshold is not None:
        detector = copy_detector.with_threshold(threshold)

    classifier = None
    if args.classifier_dir or (resolution == 8 and channels == 1):
        from diffusers_unlearn.toy.classifier import DigitsClassifier

        if args.classifier_dir:
            classifier = DigitsClassifier.from_pretrained(args.classifier_dir)
        else:
            from diffusers_unlearn.toy import load_classifier

            classifier = load_classifier()
    elif class_unlearning:
        raise UserInputError("Class unlearning needs a classifier to measure the forget-class rate: pass --classifier_dir.")

    # The base pipeline, for sampling before training (and keep-set generation).
    def sample(model, count, seed, labels=None):
        model = accelerator.unwrap_model(model)
        return sample_images(
            model, scheduler, num_samples=count, batch_size=args.eval_batch_size, seed=seed,
            num_inference_steps=args.ddpm_num_inference_steps, class_labels=labels,
            guidance_scale=args.guidance_scale if labels is not None else 1.0,
        ).cpu()

    if args.keep_from_generations:
        generations = sample(unet, args.keep_from_generations, args.seed + 1)
        keep_detector = PixelCopyDetector(args.keep_generation_threshold) if args.keep_generation_threshold else detector
        far, near = unlearn_data.filter_far_from(generations, forget.images, copy_detector=keep_detector)
        logger.info(f"--keep_from_generations: {len(far)} generations kept, {len(near)} rejected as forget copies.")
        if len(far) == 0:
            raise UserInputError("Every generation is close to a forget image: the keep set is empty. Raise --keep_from_generations or lower --keep_generation_threshold.")
        keep = unlearn_data.ImageSet(far, [unlearn_data.pixel_hash(x) for x in far], [f"generation/{i}" for i in range(len(far))])

    n = len(forget) + (len(keep) if keep is not None else 0)
    hyperparameters = hyperparameters_from_flags(args.method, args.method_flags, {"n": n, "k": len(forget)})
    objective = get_objective(args.method, **hyperparameters)
    if objective.needs_keep and keep is None:
        raise UserInputError(f"--method {args.method} needs a keep set: --keep_data_dir, --keep_dataset_name or --keep_from_generations.")
    # A checkpoint of another run (other data, method or settings) is refused before any evaluation.
    fingerprint = script_fingerprint(args, objective, forget, keep, use_ema=args.use_ema, ema_max_decay=args.ema_max_decay, **detector_fingerprint(detector))
    resume_path = find_resume_checkpoint(args.output_dir, args.resume_from_checkpoint, fingerprint, args.max_train_steps)

    # Evaluation (main process), before training; same seeds after training.
    keep_classes = sorted(set(range(10)) - {args.forget_class}) if class_unlearning else None
    retrain = None  # the retrained model's RetrainReference, once it has been evaluated
    reference_features = None
    if classifier is not None and class_unlearning and not is_conditional:
        # VDU's protocol has no keep set: the FD is to the real images of the other classes.
        reference_features = classifier_features(classifier, other_class_images(args, resolution, channels))
    elif classifier is not None and keep is not None:
        reference_features = classifier_features(classifier, keep.images)

    def evaluate(model):
        model = accelerator.unwrap_model(model)
        denoiser = Denoiser(model, schedule)
        eval_forget = batch_of(forget, is_conditional)
        eval_keep = batch_of(keep.subset(range(min(len(keep), 512))), is_conditional) if keep is not None else eval_forget
        eval_heldout = batch_of(heldout, is_conditional) if heldout is not None else None
        if class_unlearning and is_conditional:
            labels = torch.tensor([keep_classes[i % len(keep_classes)] for i in range(args.num_eval_samples)])
            samples = sample(model, args.num_eval_samples, args.seed, labels)
        else:
            samples = sample(model, args.num_eval_samples, args.seed, None)
        metrics = evaluate_ddpm(
            samples, denoiser=denoiser, forget=eval_forget, keep=eval_keep, heldout=eval_heldout,
            classifier=classifier, reference_features=reference_features,
            memorization_threshold=None if class_unlearning else threshold, seed=args.seed,
            copy_detector=None if class_unlearning else detector,
        )
        if class_unlearning:
            # Conditional: samples drawn with the forgotten label; unconditional: the samples above.
            forget_samples = sample(model, args.num_eval_samples, args.seed + 7, args.forget_class) if is_conditional else samples
            count = class_count(predict_labels(classifier, forget_samples, min_confidence=args.class_min_confidence), args.forget_class)
            metrics["forget_class_count"] = count
            metrics["forget_class_rate"] = count / len(forget_samples)
            if is_conditional:
                metrics["forget_class_samples"] = forget_samples[: args.num_validation_images]
        if args.retrained_model_name_or_path:  # the same forget queries and sample seeds as the retrained model's
            measures = (query_losses(denoiser, eval_forget, seed=args.seed, batch_size=args.eval_batch_size),
                        classifier_features(classifier, samples) if classifier is not None else None)
            if retrain is None:  # this is the retrained model
                metrics["retrain_measures"] = measures
            else:
                metrics.update(distance_to_retrain(retrain, *measures, model_mia_auc=metrics.get("mia_auc")))
        metrics["samples"] = samples[: args.num_validation_images]
        return metrics

    # LoRA or full fine-tuning.
    if args.train_mode == "lora":
        unet = add_lora(unet, rank=args.rank, lora_alpha=args.lora_alpha, targets=args.lora_targets)
    else:
        unet = prepare_full_finetune(unet)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    params = trainable_parameters(unet)
    ema = EMAModel(params, decay=args.ema_max_decay) if args.use_ema else None

    optimizer = make_optimizer(
        params, args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay, eps=args.adam_epsilon, use_8bit_adam=args.use_8bit_adam,
    )
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )

    before = retrained = None
    if accelerator.is_main_process and args.retrained_model_name_or_path:
        retrained = evaluate(load_retrained_unet(args, unet))
        retrain = retrain_reference(*retrained.pop("retrain_measures"), mia_auc=retrained.get("mia_auc"))
        logger.info(f"Retrained model: { {k: v for k, v in retrained.items() if not torch.is_tensor(v)} }")
    if accelerator.is_main_process:
        before = evaluate(unet)
        logger.info(f"Before unlearning: { {k: v for k, v in before.items() if not torch.is_tensor(v)} }")

    denoiser = Denoiser(unet, schedule, args.loss_space)
    objective.prepare(denoiser, batch_of(forget, is_conditional), generator=step_generator(args.seed, -1))
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    denoiser.model = unet
    unlearner = Unlearner(objective, denoiser, optimizer, accelerator, lr_scheduler, args.max_grad_norm)

    adapter_metadata = {"method": args.method, "base_model": str(args.pretrained_model_name_or_path)}

    def save_adapter(directory):  # checkpoints carry a loadable adapter too, as the official scripts' do
        save_lora_weights(accelerator.unwrap_model(unet), directory, metadata=adapter_metadata)

    checkpointer = Checkpointer(accelerator, unlearner, [unet], optimizer, lr_scheduler, ema, fingerprint,
                                save_adapter if args.train_mode == "lora" else None)

    if accelerator.is_main_process and args.report_to != "none":
        accelerator.init_trackers("unlearn-ddpm", config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool)) and k != "hub_token"})

    forget_pool = BatchPool(forget.images, forget.labels if is_conditional else None)
    keep_pool = BatchPool(keep.images, keep.labels if is_conditional else None) if keep is not None else None

    start_step, validation_history = checkpointer.load(resume_path) if resume_path else (0, [])

    # The loop: each optimizer step draws its batches from a generator fixed by (seed, step, micro-batch, rank).
    def update_ema(step):
        if ema is not None:
            ema.step(trainable_parameters(accelerator.unwrap_model(unet)))

    rule = stopping_rule(args)

    def measure_level(model):  # the evaluation's losses (same timestep grid and noise seed) for the stopping rule
        level_denoiser = Denoiser(model, schedule)
        forget_losses = denoising_losses(level_denoiser, batch_of(forget, is_conditional), seed=args.seed)
        heldout_losses = denoising_losses(level_denoiser, batch_of(heldout, is_conditional), seed=args.seed) if heldout is not None else None
        return rule.measure_run(forget_losses, heldout_losses, retrain)

    def run_validation(step):
        return validate(accelerator, args, unet, ema, sample, forget, None if class_unlearning else detector, step, classifier if class_unlearning else None,
                        measure_level if rule is not None else None)

    if fsdp:  # a sharded model samples only with every process taking part; validation runs on the main one
        logger.info("FSDP: no validation during training (the full evaluation before and after still runs).")

    validation_history = run_unlearning_loop(
        accelerator, unlearner, forget_pool, keep_pool,
        output_dir=args.output_dir, max_train_steps=args.max_train_steps, train_batch_size=args.train_batch_size,
        seed=args.seed, start_step=start_step, gradient_accumulation_steps=args.gradient_accumulation_steps,
        checkpointer=checkpointer, checkpointing_steps=args.checkpointing_steps,
        checkpoints_total_limit=args.checkpoints_total_limit, validation_history=validation_history,
        validation_steps=args.validation_steps, validate=None if fsdp else run_validation, after_optimizer_step=update_ema,
        should_stop=rule.reason if rule is not None else None,
    )
    # Under FSDP every process takes part in gathering the shards; the main process gets one ordinary UNet.
    trained = gathered_model(accelerator, unet, lambda: UNet2DModel.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="unet", revision=args.revision, variant=args.variant,
        cache_dir=args.cache_dir)) if fsdp else None

    # Save, evaluate after, report, card, upload (main process only). The final outputs are written into a
    # staging folder and swapped into --output_dir together, so it never mixes two runs' files.
    if accelerator.is_main_process:
        model = trained if fsdp else accelerator.unwrap_model(unet)
        if ema is not None:
            ema.copy_to(trainable_parameters(model))
        after = evaluate(model)
        staged = StagedRun(args.output_dir)
        if args.train_mode == "lora":
            save_lora_weights(model, staged.path, metadata=adapter_metadata)
        else:
            save_full_pipeline(model, scheduler, staged, is_conditional)

        images = {}
        if retrained is not None:
            save_image_atomic(make_grid(retrained.pop("samples"), scale=4 if resolution <= 32 else 1), staged.file("samples_retrained.png"))
            images["Samples of the model retrained without the forget data (same seeds)"] = "samples_retrained.png"
        for label, metrics in (("before", before), ("after", after)):
            grid = make_grid(metrics.pop("samples"), scale=4 if resolution <= 32 else 1)
            save_image_atomic(grid, staged.file(f"samples_{label}.png"))
            images[f"Samples {label} unlearning (same seeds)"] = f"samples_{label}.png"
            if "forget_class_samples" in metrics:
                grid = make_grid(metrics.pop("forget_class_samples"), scale=4 if resolution <= 32 else 1)
                save_image_atomic(grid, staged.file(f"forget_class_samples_{label}.png"))
                images[f"Class {args.forget_class} prompts {label}"] = f"forget_class_samples_{label}.png"
        if class_unlearning:
            for metrics in (before, after):
                metrics["pul"] = None
            after["pul"] = pul(before["forget_class_count"], after["forget_class_count"]) if before["forget_class_count"] > 0 else None
        wall = time.time() - started
        before["wall_seconds"] = None
        after["wall_seconds"] = wall
        report = {
            "method": args.method,
            "hyperparameters": {**objective.hyperparameters(), **{f"combiner_{k}": v for k, v in unlearner.state_dict().get("combiner", {}).items() if k == "scaling_norm"}},
            "train_mode": args.train_mode,
            "base_model": str(args.pretrained_model_name_or_path),
            "forget_items": [{"sha256": h, "source": name} for h, name in zip(forget.hashes, forget.names)],
            "forget_class": args.forget_class,
            "class_min_confidence": args.class_min_confidence if class_unlearning else None,
            "num_keep_items": len(keep) if keep is not None else 0,
            "seed": args.seed,
            "max_train_steps": args.max_train_steps,
            "train_batch_size": args.train_batch_size,
            "learning_rate": args.learning_rate,
            "memorization_threshold": threshold,
            "copy_detector": detector.describe() if detector is not None and not class_unlearning else None,
            "num_eval_samples": args.num_eval_samples,
            "num_processes": accelerator.num_processes,
            "wall_seconds": wall,
            "metrics": {"before": before, "after": after},
            "retrained_model": None if retrained is None else {"path": str(args.retrained_model_name_or_path), "metrics": retrained},
            "validation": validation_history,
            "stopping": rule.summary(validation_history) if rule is not None else None,
        }
        report["verdict"] = build_verdict(before, after, args.verdict_thresholds, class_unlearning=class_unlearning,
                                          retrained_model=args.retrained_model_name_or_path)
        atomic_write_json(staged.file("unlearning_report.json"), report)
        write_model_card(args.output_dir, report, str(args.pretrained_model_name_or_path), repo_id, images, is_adapter=args.train_mode == "lora", into=staged.path)
        staged.commit()
        print_summary(report)
        print_verdict(report["verdict"])
        if args.push_to_hub:
            push_folder(args.output_dir, repo_id, args.hub_token, f"Unlearn with {args.method}")
            logger.info(f"Uploaded to {repo_id}.")
    accelerator.end_training()


def validate(accelerator, args, unet, ema, sample, forget, detector, step, classifier_for_rate=None, measure_level=None):
    """A small sample grid (and memorization rate, by the run's copy `detector`) every --validation_steps, never every step; with
    `measure_level` (--stop_at_heldout_level) also the forget and held-out loss levels, on the EMA weights too."""
    from diffusers_unlearn.metrics import memorization_rate

    model = accelerator.unwrap_model(unet)
    if ema is not None:
        ema.store(trainable_parameters(model))
        ema.copy_to(trainable_parameters(model))
    images = sample(model, args.num_validation_images, args.seed + 3, args.forget_class if model.config.num_class_embeds is not None and args.forget_class is not None else None)
    level = measure_level(model) if measure_level is not None else {}
    if ema is not None:
        ema.restore(trainable_parameters(model))
    logs = {f"validation/{key}": value for key, value in level.items()}
    if detector is not None:
        logs["validation/memorization_rate"] = memorization_rate(images, forget.images, copy_detector=detector)
    if classifier_for_rate is not None and args.forget_class is not None:
        labels = predict_labels(classifier_for_rate, images, min_confidence=args.class_min_confidence)
        logs["validation/forget_class_rate"] = class_count(labels, args.forget_class) / len(images)
    accelerator.log(logs, step=step)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation", grid_array(make_grid(images, scale=4)), step, dataformats="HWC")
    logger.info(f"step {step}: {logs}")
    return {"step": step, **{key.split("/", 1)[1]: value for key, value in logs.items()}}


def load_retrained_unet(args, unet):
    """The --retrained_model_name_or_path UNet, refused unless it takes the same inputs as the base model's."""
    retrained = UNet2DModel.from_pretrained(args.retrained_model_name_or_path, subfolder="unet", cache_dir=args.cache_dir)
    for key in ("sample_size", "in_channels", "num_class_embeds"):
        if retrained.config[key] != unet.config[key]:
            raise UserInputError(f"--retrained_model_name_or_path {args.retrained_model_name_or_path}: its UNet's {key} is {retrained.config[key]}, the base model's {unet.config[key]}; the retrained model must be the same architecture.")
    return retrained.eval()


def save_full_pipeline(model, scheduler, staged, is_conditional):
    """The fully fine-tuned pipeline, saved with plain diffusers class names into the staging folder."""
    pipeline_cls = ClassConditionalDDPMPipeline if is_conditional else DDPMPipeline
    save_pipeline_into(pipeline_cls(unet=as_plain_unet(model), scheduler=scheduler), staged)


if __name__ == "__main__":
    run_script(lambda: main(parse_args()), os.path.basename(__file__))
