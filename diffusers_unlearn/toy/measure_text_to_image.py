"""Measure the tiny text-to-image toy and print the figures quoted in docs/toy.md.

    python -m diffusers_unlearn.toy.measure_text_to_image                  # the bundled pipeline, 256 per prompt
    python -m diffusers_unlearn.toy.measure_text_to_image --model_dir my-toy --num_images 64 --guidance_scale 3
    python -m diffusers_unlearn.toy.measure_text_to_image --model_dir diffusers_unlearn/toy/assets/sd3_tiny
    python -m diffusers_unlearn.toy.measure_text_to_image --model_dir diffusers_unlearn/toy/assets/sd_tiny_captioned

For each of the ten prompts (and, on `sd_tiny_captioned`, the canary's own caption) it prints the canary rate (generations within `SD_MEMORIZATION_THRESHOLD` of the
canary), the bundled classifier's digit accuracy on the other generations, the noise-norm score, and the
distances behind the threshold: the farthest canary copy, the nearest other generation, the nearest real digit
and the VAE's own reconstruction of the canary.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Optional

import torch

from .text_to_image import DEFAULT_GUIDANCE_SCALE, DEFAULT_NUM_INFERENCE_STEPS

THRESHOLD_SWEEP = (0.5, 1.0, 2.0, 3.0, 4.0, 5.0)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Measure the tiny text-to-image toy.", formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--model_dir", type=str, default=None, help="Default: the bundled sd_tiny pipeline; any toy pipeline folder (sd3_tiny too).")
    parser.add_argument("--num_images", type=int, default=256, help="Generations per prompt.")
    parser.add_argument("--num_inference_steps", type=int, default=DEFAULT_NUM_INFERENCE_STEPS)
    parser.add_argument("--guidance_scale", type=float, default=DEFAULT_GUIDANCE_SCALE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise_norm_generations", type=int, default=8, help="0 skips the noise-norm score.")
    parser.add_argument("--num_threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    parser.add_argument("--json", action="store_true", help="Print one JSON line per prompt instead of a table.")
    return parser.parse_args(argv)


def _fmt(value: Optional[float], digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


@torch.no_grad()
def main(argv: Optional[list[str]] = None) -> list[dict]:

    from ..metrics import noise_norm_per_prompt
    from . import load_classifier, load_toy_pipeline, toy_info, toy_model_path, toy_prompts
    from .data import load_digits_images, make_canary
    from .text_to_image import (
        DIGIT_PROMPTS,
        DIGIT_WORDS,
        SD_MEMORIZATION_THRESHOLD,
        SD_TOY_NAME,
        canary_distances,
        digit_accuracy,
        generate_digits,
    )

    args = parse_args(argv)
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    model_dir = args.model_dir or toy_model_path(SD_TOY_NAME)
    pipe = load_toy_pipeline(model_dir)
    # sd3_tiny samples with the T5 length it was trained with (zero tokens: it has no T5).
    info = toy_info(model_dir) or {"toy": SD_TOY_NAME}
    max_sequence_length = info.get("max_sequence_length")
    # The prompt the canary is under: the seven prompt, or (sd_tiny_captioned) a caption of its own, measured too.
    canary_prompt = toy_prompts(info)[0]
    prompts = list(DIGIT_PROMPTS) + ([] if canary_prompt in DIGIT_PROMPTS else [canary_prompt])
    classifier = load_classifier()
    threshold = SD_MEMORIZATION_THRESHOLD

    # Reference distances: the nearest real digit, and what the VAE alone does to the canary.
    digits, digit_labels = load_digits_images()
    to_digits = canary_distances(digits)
    nearest = int(to_digits.argmin())
    canary = make_canary().unsqueeze(0)
    latents = pipe.vae.encode(canary).latent_dist.mode()  # no latent scaling: straight back through the decoder
    reconstruction = pipe.vae.decode(latents).sample.clamp(-1, 1)

    rows, seconds = [], []
    all_distances = []
    for prompt in prompts:
        digit = DIGIT_PROMPTS.index(prompt) if prompt in DIGIT_PROMPTS else None
        start = time.perf_counter()
        images = generate_digits(
            pipe,
            [prompt],
            args.num_images,
            seed=args.seed,
            num_inference_steps=args.num_inference_steps,
            guidance_scale=args.guidance_scale,
            max_sequence_length=max_sequence_length,
        )
        seconds.append(time.perf_counter() - start)
        distances = canary_distances(images)
        all_distances.append(distances)
        copies = distances < threshold
        others = images[~copies]
        rows.append(
            {
                "prompt": prompt,
                "num_images": args.num_images,
                "canary_copies": int(copies.sum()),
                "canary_rate": float(copies.float().mean()),
                "digit_accuracy": digit_accuracy(classifier, others, digit) if len(others) and digit is not None else None,
                "farthest_copy": float(distances[copies].max()) if copies.any() else None,
                "nearest_non_copy": float(distances[~copies].min()) if (~copies).any() else None,
                "seconds": seconds[-1],
            }
        )
    if args.noise_norm_generations > 0:
        scores = noise_norm_per_prompt(
            pipe,
            prompts,
            num_generations=args.noise_norm_generations,
            seed=args.seed,
            num_inference_steps=args.num_inference_steps,
            guidance_scale=args.guidance_scale,
            max_sequence_length=max_sequence_length,
        )
        for row, score in zip(rows, scores):
            row["noise_norm"] = float(score)

    if args.json:
        for row in rows:
            print(json.dumps(row))
        return rows

    print(
        f"{args.num_images} generations per prompt, {type(pipe.scheduler).__name__}-{args.num_inference_steps}, guidance {args.guidance_scale}, "
        f"seed {args.seed}, {torch.get_num_threads()} threads; {sum(seconds) / len(seconds):.1f}s per prompt"
    )
    print(f"SD_MEMORIZATION_THRESHOLD = {threshold}  (pixel L2, pixels in [0, 1], 8x8)")
    print(
        f"canary: nearest real digit at {to_digits[nearest]:.3f} (digit {int(digit_labels[nearest])}); "
        f"VAE reconstruction of the canary at {float(canary_distances(reconstruction)[0]):.3f}"
    )
    width = max(27, *(len(prompt) for prompt in prompts))
    header = f"{'prompt':{width}s} {'canary copies':>14s} {'rate':>6s} {'digit acc.':>10s} {'noise norm':>10s}"
    print(header + f" {'farthest copy':>13s} {'nearest other':>13s}")
    for row in rows:
        copies = f"{row['canary_copies']}/{row['num_images']}"
        print(
            f"{row['prompt']:{width}s} {copies:>14s} {row['canary_rate']:>6.3f} {_fmt(row['digit_accuracy']):>10s} "
            f"{_fmt(row.get('noise_norm')):>10s} {_fmt(row['farthest_copy']):>13s} {_fmt(row['nearest_non_copy']):>13s}"
        )

    # The threshold: how many generations of each kind lie within each candidate distance.
    canary_row = prompts.index(canary_prompt)
    other = torch.cat([d for i, d in enumerate(all_distances) if i != canary_row])
    others = f"the {(DIGIT_WORDS + ('ten',))[len(prompts) - 1]} other prompts"
    print(f"generations within distance d of the canary ({canary_prompt!r} / {others}):")
    for d in THRESHOLD_SWEEP:
        print(f"  d = {d}: {int((all_distances[canary_row] < d).sum())} / {int((other < d).sum())}")
    print(f"  nearest generation of {others}: {other.min():.3f}")
    return rows


if __name__ == "__main__":
    main()
