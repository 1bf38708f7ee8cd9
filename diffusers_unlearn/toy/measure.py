"""Measure the bundled toy models and print the figures quoted in docs/toy.md.

    python -m diffusers_unlearn.toy.measure [--num_samples 2048] [--per_class 256] [--seed 0]

Prints: the unconditional DDPM's canary-copy rate (DDIM-50), the canary's distance to the
nearest real digit, the classifier's held-out accuracy and how confidently it labels generated
non-canary samples as digits, and the class-conditional DDPM's per-class accuracy under
classifier-free guidance.
"""

from __future__ import annotations

import argparse
import time
from typing import Optional

import numpy as np
import torch
from diffusers import DDPMPipeline

from ..pipelines.ddpm import ClassConditionalDDPMPipeline, sample_images
from . import MEMORIZATION_THRESHOLD, load_classifier, toy_model_path
from .data import CANARY_LABEL, load_digits_images, make_canary, toy_split

CONFIDENCE = 0.9  # a sample "confidently" shows class c when the classifier gives c at least this probability


def pixel_distances(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """L2 distance of each image to one reference image, in [0, 1] pixel units. Both in [-1, 1]."""
    return ((images - reference) / 2).flatten(1).norm(dim=1)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets `[N, D]`."""
    from scipy import linalg

    a, b = a.double().numpy(), b.double().numpy()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


@torch.no_grad()
def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Measure the bundled toy models.")
    parser.add_argument("--num_samples", type=int, default=2048)
    parser.add_argument("--per_class", type=int, default=256)
    parser.add_argument("--guidance_scales", type=float, nargs="+", default=[1.0, 3.0])
    parser.add_argument("--num_inference_steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    canary = make_canary()
    digits, digit_labels = load_digits_images()
    train, heldout = toy_split("train"), toy_split("heldout")
    classifier = load_classifier()
    steps = args.num_inference_steps
    print(f"MEMORIZATION_THRESHOLD = {MEMORIZATION_THRESHOLD}  (pixel L2, pixels in [0, 1], 8x8)")

    # The canary is far from every real digit, so a nearby sample is a copy.
    to_canary = pixel_distances(digits, canary)
    nearest = int(to_canary.argmin())
    print(
        f"canary: nearest real digit at {to_canary[nearest]:.3f} (digit {int(digit_labels[nearest])}, index {nearest}); "
        f"median digit at {to_canary.median():.3f}"
    )

    # Classifier on real held-out digits.
    predicted, confidence = classifier.predict(heldout.images)
    print(
        f"classifier: heldout accuracy {(predicted == heldout.labels).float().mean():.4f} "
        f"({len(heldout)} real digits); canary -> class {int(classifier.predict(canary[None])[0])}"
    )
    confident_real = ((confidence >= CONFIDENCE) & (predicted < CANARY_LABEL)).float().mean()
    print(
        f"classifier: heldout real digits confidently (p >= {CONFIDENCE}) labelled a digit: {confident_real:.4f}"
    )

    # Unconditional DDPM: canary copies among seeded DDIM samples.
    pipe = DDPMPipeline.from_pretrained(toy_model_path("ddpm_unconditional"))
    pipe.set_progress_bar_config(disable=True)
    start = time.time()
    samples = sample_images(pipe, num_samples=args.num_samples, seed=args.seed, num_inference_steps=steps)
    elapsed = time.time() - start
    distances = pixel_distances(samples, canary)
    copies = distances < MEMORIZATION_THRESHOLD
    print(
        f"unconditional: {args.num_samples} DDIM-{steps} samples (seed {args.seed}) in {elapsed:.1f}s; "
        f"canary copies (L2 < {MEMORIZATION_THRESHOLD}): {int(copies.sum())} = {copies.float().mean():.2%}"
    )
    for threshold in (0.5, 1.0, 2.0, 3.0, 3.5, 4.0, 5.0):
        print(f"  samples within {threshold}: {int((distances < threshold).sum())}")
    print(f"  smallest distance of a non-copy sample to the canary: {distances[~copies].min():.3f}")
    if copies.any():
        print(f"  largest distance of a copy: {distances[copies].max():.3f}")
    sample_labels, sample_conf = classifier.predict(samples)
    labelled_canary = int((sample_labels[copies] == CANARY_LABEL).sum())
    print(f"  copies labelled canary by the classifier: {labelled_canary}/{int(copies.sum())}")
    others = ~copies
    confident_digit = (sample_conf[others] >= CONFIDENCE) & (sample_labels[others] < CANARY_LABEL)
    print(
        f"  non-canary samples confidently (p >= {CONFIDENCE}) labelled a digit: {confident_digit.float().mean():.4f}"
    )
    counts = torch.bincount(sample_labels[others], minlength=CANARY_LABEL + 1).tolist()
    print(f"  classifier labels of non-canary samples (0..10): {counts}")
    # Fréchet distances are biased upward for small sets, so compare equal sizes with the heldout digits.
    real_features = classifier.features(train.digits_only().images)
    sample_features = classifier.features(samples[others])
    n = len(heldout)
    print(
        f"  Fréchet distance (classifier features) to the train digits: heldout real digits ({n}) "
        f"{frechet_distance(classifier.features(heldout.images), real_features):.3f}; first {n} non-canary samples "
        f"{frechet_distance(sample_features[:n], real_features):.3f}; all {int(others.sum())} non-canary samples "
        f"{frechet_distance(sample_features, real_features):.3f}"
    )

    # Class-conditional DDPM: does a requested class come out as that class?
    pipe = ClassConditionalDDPMPipeline.from_pretrained(toy_model_path("ddpm_class_conditional"))
    labels = torch.arange(10).repeat_interleave(args.per_class)
    for guidance_scale in args.guidance_scales:
        start = time.time()
        samples = sample_images(
            pipe,
            num_samples=len(labels),
            seed=args.seed,
            num_inference_steps=steps,
            class_labels=labels,
            guidance_scale=guidance_scale,
        )
        elapsed = time.time() - start
        predicted, confidence = classifier.predict(samples)
        correct = predicted == labels
        per_class = [f"{correct[labels == c].float().mean():.3f}" for c in range(10)]
        print(
            f"class_conditional: guidance {guidance_scale}, {args.per_class} DDIM-{steps} samples per class "
            f"(seed {args.seed}) in {elapsed:.1f}s; accuracy {correct.float().mean():.4f}; "
            f"confident (p >= {CONFIDENCE}) and correct {(correct & (confidence >= CONFIDENCE)).float().mean():.4f}; "
            f"canary copies {int((pixel_distances(samples, canary) < MEMORIZATION_THRESHOLD).sum())}"
        )
        print(f"  per class 0..9: {' '.join(per_class)}")


if __name__ == "__main__":
    main()
