"""Evaluate a saved DDPM pipeline (optionally with a LoRA adapter) against a forget set; write a JSON report.

    python -m diffusers_unlearn.evaluate --pretrained_model_name_or_path ddpm-dir \\
        --adapter unlearned/pytorch_lora_weights.safetensors --forget_data_dir forget/ \\
        --keep_data_dir keep/ --heldout_data_dir heldout/ --memorization_threshold 2.0 --output report.json

Run it on the original model and on the unlearned one with the same `--seed` and `--num_samples`: the samples
start from the same noise and the denoising losses use the same timesteps and noise, so the two reports compare
pair by pair. The report holds the keys of `diffusers_unlearn.metrics.evaluate_ddpm` plus a few that describe
the run (model, adapter, sampler). Every input is checked before any sampling starts.

Image folders hold PNG/JPEG/BMP/WebP files of the model's size (an optional `metadata.jsonl` with
`{"file_name": ..., "label": ...}` gives class labels, which a class-conditional model needs).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

logger = logging.getLogger("diffusers_unlearn.evaluate")

from .data import DataError, ImageSet, load_image_folder


class EvaluationInputError(DataError):
    """Bad input to the evaluation CLI: a missing folder, an empty or unreadable image set, bad flags."""


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse the command line of `python -m diffusers_unlearn.evaluate` (see the module docstring).

    Example:
        >>> args = parse_args(["--pretrained_model_name_or_path", "ddpm", "--forget_data_dir", "forget"])
        >>> args.num_samples, args.seed
        (256, 0)
    """
    parser = argparse.ArgumentParser(
        prog="python -m diffusers_unlearn.evaluate",
        description="Evaluate a DDPM pipeline folder (optionally with a LoRA adapter) against a forget set.",
    )
    parser.add_argument("--pretrained_model_name_or_path", required=True,
                        help="Folder of a saved DDPM pipeline (model_index.json, unet/, scheduler/).")
    parser.add_argument("--adapter", default=None,
                        help="LoRA adapter: a .safetensors file, or a folder with pytorch_lora_weights.safetensors.")
    parser.add_argument("--forget_data_dir", required=True, help="Folder of the images to forget.")
    parser.add_argument("--keep_data_dir", default=None,
                        help="Folder of images to keep: keep_loss, and the real images for the Fréchet distance.")
    parser.add_argument("--heldout_data_dir", default=None,
                        help="Folder of images the model never saw: heldout_loss and the membership-inference AUC.")
    parser.add_argument("--num_samples", type=int, default=256, help="Number of images to generate.")
    parser.add_argument("--seed", type=int, default=0, help="Seed for the samples and the loss noise.")
    parser.add_argument("--num_inference_steps", type=int, default=50, help="DDIM steps per sample.")
    parser.add_argument("--memorization_threshold", type=float, default=None,
                        help="Pixel L2 distance ([0, 1] pixel units) below which a sample copies a forget image.")
    parser.add_argument("--forget_class", type=int, default=None,
                        help="Class to count among the samples (needs a classifier): forget_class_rate / _count.")
    parser.add_argument("--class_min_confidence", type=float, default=0.5,
                        help="A sample counts as --forget_class only if the classifier gives it this probability "
                             "(0: plain arg-max).")
    parser.add_argument("--class_label", type=int, default=None,
                        help="Class-conditional models: sample every image with this label (default: the null label).")
    parser.add_argument("--guidance_scale", type=float, default=1.0,
                        help="Classifier-free guidance weight with --class_label.")
    parser.add_argument("--classifier_dir", default=None,
                        help="Folder of a saved DigitsClassifier for classifier metrics (default: the toy classifier "
                             "for 8x8 single-channel images).")
    parser.add_argument("--num_timesteps", type=int, default=10, help="Timesteps in the fixed grid for the losses.")
    parser.add_argument("--noise_draws", type=int, default=1, help="Noise draws per timestep for the losses.")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--device", default=None, help="Default: cuda when available, else cpu.")
    parser.add_argument("--output", default=None, help="Write the JSON report here (it is printed either way).")
    from .metrics.copy_detection import add_copy_detector_arguments

    add_copy_detector_arguments(parser)
    return parser.parse_args(argv)


def _check_args(args: argparse.Namespace) -> None:
    for name in ("num_samples", "num_inference_steps", "num_timesteps", "noise_draws", "batch_size"):
        if getattr(args, name) < 1:
            raise EvaluationInputError(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if args.seed < 0:
        raise EvaluationInputError(f"--seed must be >= 0, got {args.seed}.")
    if args.memorization_threshold is not None and not args.memorization_threshold > 0:
        raise EvaluationInputError(f"--memorization_threshold must be > 0, got {args.memorization_threshold}.")
    from .metrics.copy_detection import copy_detector_threshold

    copy_detector_threshold(args)  # the detector's folder and threshold units, before any model loads
    model_dir = Path(args.pretrained_model_name_or_path)
    for required in ("unet", "scheduler"):
        if not (model_dir / required).is_dir():
            raise EvaluationInputError(
                f"--pretrained_model_name_or_path {model_dir}: expected a saved DDPM pipeline folder with "
                f"unet/ and scheduler/ subfolders ({model_dir / required} is missing)."
            )
    if args.adapter is not None and not os.path.exists(args.adapter):
        raise EvaluationInputError(f"--adapter {args.adapter}: no such file or directory.")
    if args.classifier_dir is not None and not os.path.isdir(args.classifier_dir):
        raise EvaluationInputError(f"--classifier_dir {args.classifier_dir}: no such directory.")


def _load_classifier(args: argparse.Namespace, channels: int, size: tuple[int, int]):
    """The classifier for classifier_score, FD and forget-class metrics, or None (with a logged notice)."""
    if args.classifier_dir is not None:
        from .toy.classifier import DigitsClassifier

        return DigitsClassifier.from_pretrained(args.classifier_dir)
    if channels == 1 and tuple(size) == (8, 8):
        try:
            from .toy import load_classifier

            return load_classifier()
        except (ImportError, FileNotFoundError) as error:
            logger.info("The toy classifier is not available (%s): classifier metrics skipped.", error)
            return None
    logger.info(
        "No classifier for %dx%d images with %d channel(s): classifier metrics (fd, classifier_score) skipped. "
        "Pass --classifier_dir for a classifier of this size.", size[0], size[1], channels,
    )
    return None


def _sample(unet, scheduler, args: argparse.Namespace, device: torch.device) -> tuple[torch.Tensor, str]:
    from .pipelines.ddpm import sample_images

    images = sample_images(
        unet, scheduler, num_samples=args.num_samples, batch_size=args.batch_size, seed=args.seed,
        num_inference_steps=args.num_inference_steps, class_labels=args.class_label,
        guidance_scale=args.guidance_scale, device=device,
    )
    return images, "diffusers_unlearn.pipelines.ddpm.sample_images (DDIM, eta=0)"


def _batch(data: Optional[ImageSet], conditional: bool, default_label: Optional[int], flag: str):
    from .objectives.base import DenoisingBatch

    if data is None:
        return None
    labels = data.labels
    if conditional and labels is None:
        if default_label is None:
            raise EvaluationInputError(
                f"The model is class-conditional, but {flag} has no labels: add a metadata.jsonl with "
                '{"file_name": ..., "label": ...} lines.'
            )
        labels = torch.full((len(data),), int(default_label), dtype=torch.long)
    return DenoisingBatch(data.images, class_labels=labels if conditional else None)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Validate the inputs, load the model, sample and compute the report (see `evaluate_ddpm`).

    Example:
        >>> report = run(parse_args(["--pretrained_model_name_or_path", "ddpm", "--forget_data_dir", "forget",
        ...                          "--num_samples", "64"]))  # doctest: +SKIP
    """
    from diffusers import DDPMScheduler, UNet2DModel

    from .metrics import classifier_features, classifier_logits, evaluate_ddpm
    from .noise import NoiseSchedule
    from .objectives.base import Denoiser

    # 1. Everything that can be wrong with the inputs, before any model runs.
    _check_args(args)
    model_dir = args.pretrained_model_name_or_path
    unet_config = UNet2DModel.load_config(model_dir, subfolder="unet")
    channels = int(unet_config.get("in_channels", 3))
    sample_size = unet_config.get("sample_size")
    if sample_size is None:
        raise EvaluationInputError(f"{model_dir}/unet/config.json has no sample_size.")
    size = (sample_size, sample_size) if isinstance(sample_size, int) else tuple(sample_size)
    conditional = unet_config.get("num_class_embeds") is not None

    folders = {}
    for name in ("forget", "keep", "heldout"):
        path = getattr(args, f"{name}_data_dir")
        if path is not None:
            if size[0] != size[1]:
                raise EvaluationInputError(f"Only square models are supported, got sample_size {size}.")
            folders[name] = load_image_folder(path, size[0], channels, name)
            for notice in folders[name].notices:
                logger.info(notice)
    batches = {
        name: _batch(folders.get(name), conditional, args.forget_class if name == "forget" else None,
                     f"--{name}_data_dir")
        for name in ("forget", "keep", "heldout")
    }

    # 2. Models.
    device = torch.device(args.device) if args.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    copy_detector = None  # --copy_detector pixel: the pixel distance at --memorization_threshold, as before
    if args.copy_detector != "pixel":
        from .metrics.copy_detection import load_copy_detector

        copy_detector = load_copy_detector(args.copy_detector, args.copy_similarity_threshold, device=device)
    unet = UNet2DModel.from_pretrained(model_dir, subfolder="unet")
    if args.adapter is not None:
        from .lora import load_lora_weights

        unet = load_lora_weights(unet, args.adapter)
    unet = unet.to(device).eval()
    scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    denoiser = Denoiser(unet, NoiseSchedule.from_scheduler(scheduler))
    classifier = _load_classifier(args, channels, size)
    if classifier is not None:
        classifier = classifier.to(device).eval()
    if args.forget_class is not None:
        if classifier is None:
            raise EvaluationInputError("--forget_class needs a classifier (--classifier_dir, or 8x8 toy images).")
        num_classes = classifier_logits(classifier, folders["forget"].images[:1].to(device)).shape[1]
        if not 0 <= args.forget_class < num_classes:
            raise EvaluationInputError(f"--forget_class {args.forget_class} is not one of the classifier's "
                                       f"{num_classes} classes.")

    reference_features = None
    if classifier is not None and "keep" in folders:
        if len(folders["keep"]) >= 2:
            reference_features = classifier_features(classifier, folders["keep"].images, args.batch_size)
        else:
            logger.info("The keep folder has fewer than 2 images: fd skipped.")
    elif classifier is not None:
        logger.info("No --keep_data_dir: fd (Fréchet distance to real keep images) skipped.")

    # 3. Samples, then metrics.
    samples, sampler = _sample(unet, scheduler, args, device)
    report = evaluate_ddpm(
        samples,
        denoiser=denoiser,
        forget=None if batches["forget"] is None else batches["forget"].to(device),
        keep=None if batches["keep"] is None else batches["keep"].to(device),
        heldout=None if batches["heldout"] is None else batches["heldout"].to(device),
        classifier=classifier,
        reference_features=reference_features,
        memorization_threshold=args.memorization_threshold,
        forget_class=args.forget_class,
        class_min_confidence=args.class_min_confidence,
        seed=args.seed,
        num_timesteps=args.num_timesteps,
        noise_draws=args.noise_draws,
        batch_size=args.batch_size,
        copy_detector=copy_detector,
    )
    report.update(
        {
            **({"copy_detector": copy_detector.describe()} if copy_detector is not None else {}),
            "model": str(model_dir),
            "adapter": args.adapter,
            "sampler": sampler,
            "num_inference_steps": args.num_inference_steps,
            "class_label": args.class_label,
            **{f"num_{name}_images": len(data) for name, data in folders.items()},
        }
    )
    return report


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Entry point: parse `argv`, evaluate, print the JSON report and write it to `--output` if given.

    Example:
        >>> main(["--pretrained_model_name_or_path", "ddpm", "--forget_data_dir", "forget",
        ...       "--output", "report.json"])  # doctest: +SKIP
    """
    args = parse_args(argv)
    report = run(args)
    text = json.dumps(report, indent=2, sort_keys=True)
    if args.output:
        directory = os.path.dirname(os.path.abspath(args.output))
        os.makedirs(directory, exist_ok=True)
        temporary = f"{args.output}.tmp"
        with open(temporary, "w") as handle:
            handle.write(text + "\n")
        os.replace(temporary, args.output)  # no half-written report if the process dies
    print(text)
    return report


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        main()
    except DataError as error:
        sys.exit(f"error: {error}")
