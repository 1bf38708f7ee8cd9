"""Rank prompts by how memorized they look, to find what to unlearn first.

    python -m diffusers_unlearn.scan --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --prompts_file sdv1_500_memorized.jsonl --output_file ranked.jsonl --top_k 20

Each prompt gets the noise-norm score of Wen et al. (ICLR 2024): the mean, over a few seeded generations, of
||eps(x_t, prompt) - eps(x_t, "")|| at the first sampling step (DDIM sampling; `--first_steps K` averages the
first K steps, `--first_steps 0` every step, Wen et al.'s full-trajectory form); for SD3 and Flux folders the velocity
difference ||v(x, prompt) - v(x, "")|| along the pipeline's own flow-matching sampler (for a guidance-distilled
Flux, the empty prompt through the same model with the same guidance embedding; see
`diffusers_unlearn.metrics.noise_norm`). Memorized prompts score high. The output is JSON lines sorted
by score, `{"caption": ..., "noise_norm": ..., "rank": ...}`, which `train_unlearn_sd.py --memorized_prompts_file`
reads directly. The prompts file is JSON lines with a `caption` field or plain text, one prompt per line.

With `--num_cluster_generations N` each prompt also gets the cluster check: the fraction of N seeded generations
in their largest group of mutual copies (`cluster_fraction`; Carlini et al. 2023 flag a prompt whose generations
collapse onto one image), judged by `--copy_detector` (pixel L2 below `--memorization_threshold`, or the cosine
similarity of an image model's features above `--copy_similarity_threshold`), the same detector and check as
`train_unlearn_sd.py --memorized_prompts_file` uses to find the memorized image.

On a text-to-image toy folder (one with a `diffusers_unlearn_toy.json`) the prompts file may be left out: the scan
then ranks the toy's own prompts (the digit prompts and, on `sd_tiny_captioned`, the canary's caption). Give the
prompts known to be memorized (`--known_memorized_file`; on a toy, its forget prompt by default) and the scan also
prints the detection AUC: the probability that a known-memorized prompt outscores another prompt (1.0: it ranks
first). `--adapter` scores the model with a LoRA adapter loaded, e.g. `train_unlearn_sd.py`'s output, to check
that an unlearned prompt no longer stands out:

    python -m diffusers_unlearn.scan --pretrained_model_name_or_path diffusers_unlearn/toy/assets/sd_tiny_captioned
    python -m diffusers_unlearn.scan --pretrained_model_name_or_path diffusers_unlearn/toy/assets/sd_tiny_captioned \
        --adapter unlearned/

Cost: each prompt takes num_generations x first_steps denoiser evaluations on two branches (the prompt and ""),
printed at the end. The first-step form is the default because it costs 1/num_inference_steps of the full form,
Wen et al. report that it already separates memorized prompts, and on the toys it ranks the memorized prompt higher
than the full form does (docs/results.md). The two forms' scores are on their own scales.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from typing import Optional

import torch


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    from .metrics.copy_detection import add_copy_detector_arguments

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained_model_name_or_path", type=str, default=None, help="Hub id or local folder. Default: the bundled tiny text-to-image toy.")
    parser.add_argument("--revision", type=str, default=None)
    parser.add_argument("--variant", type=str, default=None)
    parser.add_argument("--adapter", type=str, default=None, help="LoRA adapter to load first (pipe.load_lora_weights): a .safetensors file, or a folder with pytorch_lora_weights.safetensors (train_unlearn_sd.py's --output_dir).")
    parser.add_argument("--prompts_file", type=str, default=None, help="JSON lines with a 'caption' field, or one prompt per line. Default on a toy folder: the toy's prompts.")
    parser.add_argument("--known_memorized_file", type=str, default=None, help="Prompts known to be memorized (same formats); each must be in the scanned prompts. Adds 'known_memorized' to each row and prints the detection AUC. Default on a toy folder: its forget prompt, when scanned.")
    parser.add_argument("--output_file", type=str, default="memorization_scan.jsonl")
    parser.add_argument("--top_k", type=int, default=None, help="Write only the K highest-scoring prompts.")
    parser.add_argument("--num_generations", type=int, default=4, help="Seeded generations per prompt.")
    parser.add_argument("--num_inference_steps", type=int, default=25)
    parser.add_argument("--guidance_scale", type=float, default=None, help="Default: the pipeline's (7.5 for SD/SDXL, 7.0 for SD3, Flux's guidance embedding 3.5).")
    parser.add_argument("--height", type=int, default=None, help="Image height in pixels the trajectories run at. Default: the model's native size.")
    parser.add_argument("--width", type=int, default=None, help="Image width in pixels. Default: the model's native size.")
    parser.add_argument("--max_sequence_length", type=int, default=None, help="SD3/Flux: T5's padded prompt length (default 77 for SD3, 512 for Flux).")
    parser.add_argument("--first_steps", type=int, default=1, help="Score the first K sampling steps (default 1: the first-step form; 0: every step, the full-trajectory mean).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=16, help="Samples (prompt x generation pairs) per UNet call; each call also runs the empty-prompt branch.")
    parser.add_argument("--num_cluster_generations", type=int, default=0, help="Also run the cluster check on this many seeded generations per prompt (0: off; at least 2). Adds 'cluster_fraction' to each row.")
    add_copy_detector_arguments(parser)
    parser.add_argument("--memorization_threshold", type=float, default=None, help="Pixel L2 ([0,1] units) below which two generations are copies, for --copy_detector pixel. Default: an RMS pixel difference of 0.1.")
    parser.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", type=str, default="float32", choices=["float32", "float16", "bfloat16"])
    return parser.parse_args(argv)


def write_jsonl_atomic(path: str, rows: list[dict]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".jsonl", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def resolve_adapter(path: str) -> tuple[str, Optional[str]]:
    """`(folder, weight_name)` for `load_lora_weights` from an adapter file or folder; a clear error if missing."""
    from .errors import UserInputError
    from .lora import DEFAULT_WEIGHT_NAME

    if os.path.isfile(path):
        if not path.endswith(".safetensors"):
            raise UserInputError(f"--adapter {path}: only safetensors adapters are loaded.")
        return os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    if os.path.isfile(os.path.join(path, DEFAULT_WEIGHT_NAME)):
        return path, DEFAULT_WEIGHT_NAME
    raise UserInputError(f"--adapter {path}: no such .safetensors file, nor a folder with {DEFAULT_WEIGHT_NAME}.")


def scan_prompts(args: argparse.Namespace, toy: Optional[dict]) -> tuple[list[str], list[str]]:
    """`(prompts, known_memorized)`: the prompts to rank and those known to be memorized (possibly none)."""
    from .data import read_prompts_file
    from .errors import UserInputError

    toy_forget, toy_keep = (None, [])
    if toy is not None:
        from .toy import toy_prompts

        toy_forget, toy_keep = toy_prompts(toy)
    if args.prompts_file is not None:
        prompts = read_prompts_file(args.prompts_file)
    elif toy is not None:
        prompts = toy_keep + [toy_forget]
    else:
        raise UserInputError("--prompts_file is needed (only a toy folder has prompts of its own).")
    if args.known_memorized_file is not None:
        known = read_prompts_file(args.known_memorized_file)
        missing = [p for p in known if p not in prompts]
        if missing:
            raise UserInputError(f"--known_memorized_file: {missing[:3]} not among the scanned prompts; add them to --prompts_file.")
        if len(known) == len(prompts):
            raise UserInputError("Every scanned prompt is in --known_memorized_file: the detection AUC needs other prompts too.")
    else:  # a toy's forget prompt, when scanned among others
        known = [toy_forget] if toy_forget in prompts and len(prompts) > 1 else []
    return prompts, known


def main(argv: Optional[list[str]] = None) -> list[dict]:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from .metrics.noise_norm import check_first_steps, detection_auc, noise_norm_scores

    args = parse_args(argv)
    # Cheap checks before the model loads.
    path = args.pretrained_model_name_or_path
    from .toy import toy_info, toy_model_path

    if path is None:
        path = toy_model_path("sd_tiny")
    toy = toy_info(path) if os.path.isdir(path) else None
    prompts, known = scan_prompts(args, toy)
    adapter = resolve_adapter(args.adapter) if args.adapter is not None else None
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top_k must be >= 1, got {args.top_k}.")
    for flag in ("num_generations", "num_inference_steps", "batch_size"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}.")
    if args.first_steps < 0:
        raise ValueError(f"--first_steps must be >= 0 (0: every step), got {args.first_steps}.")
    first_steps = args.first_steps or None  # 0: the whole trajectory
    check_first_steps(args.num_inference_steps, first_steps)
    detector = None
    if args.num_cluster_generations:
        from .metrics.copy_detection import copy_detector_threshold, load_copy_detector

        if args.num_cluster_generations < 2:
            raise ValueError(f"--num_cluster_generations must be 0 (off) or >= 2, got {args.num_cluster_generations}.")
        detector = load_copy_detector(args.copy_detector, copy_detector_threshold(args), device=args.device)
    elif args.copy_detector != "pixel" or args.copy_similarity_threshold is not None or args.memorization_threshold is not None:
        raise ValueError("--copy_detector, --copy_similarity_threshold and --memorization_threshold apply to the cluster check: add --num_cluster_generations N.")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda needs a CUDA GPU; use --device cpu.")
    if toy is not None and args.max_sequence_length is None:  # sd3_tiny samples with its own T5 length
        args.max_sequence_length = toy.get("max_sequence_length")
    dtype = getattr(torch, args.dtype)
    from .families import FlowMatchingFamily, components_saved_as_none, family_for_folder

    family = family_for_folder(path, revision=args.revision)
    pipeline_class = family.plain_pipeline_class
    extra = {"safety_checker": None, "requires_safety_checker": False} if pipeline_class is StableDiffusionPipeline else {}
    extra.update(components_saved_as_none(path))  # e.g. an SD3 pipeline saved without T5
    pipe = pipeline_class.from_pretrained(
        path, revision=args.revision, variant=args.variant, torch_dtype=dtype, **extra
    ).to(args.device)
    if adapter is not None:  # plain diffusers' loader: the denoiser's and any text encoder's LoRA weights
        pipe.load_lora_weights(adapter[0], weight_name=adapter[1], adapter_name="scanned")
        if "scanned" not in pipe.get_active_adapters():
            from .errors import UserInputError

            raise UserInputError(f"--adapter {args.adapter}: no LoRA weight of it matched this model.")
    if isinstance(family, FlowMatchingFamily):
        pipe.scheduler = family.evaluation_scheduler(pipe.components)  # the pipeline's own flow sampler
    else:
        if args.max_sequence_length is not None:
            raise ValueError("--max_sequence_length applies to SD3 and Flux pipelines (their T5 encoder).")
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, steps_offset=1)  # deterministic steps
    pipe.set_progress_bar_config(disable=True)
    guidance_scale = family.default_guidance_scale if args.guidance_scale is None else args.guidance_scale

    scores = noise_norm_scores(
        pipe, prompts, num_generations=args.num_generations, num_inference_steps=args.num_inference_steps,
        guidance_scale=guidance_scale, seed=args.seed, batch_size=args.batch_size, height=args.height,
        width=args.width, max_sequence_length=args.max_sequence_length, first_steps=first_steps,
    )
    order = sorted(range(len(prompts)), key=lambda i: -scores[i])
    rows = [{"caption": prompts[i], "noise_norm": scores[i], "rank": rank + 1} for rank, i in enumerate(order)]
    if known:
        for row in rows:
            row["known_memorized"] = row["caption"] in known
        known_ranks = [row["rank"] for row in rows if row["known_memorized"]]
    if detector is not None:
        from .metrics.copy_detection import generation_cluster_fractions

        fractions = generation_cluster_fractions(
            pipe, prompts, detector, num_generations=args.num_cluster_generations, seed=args.seed,
            num_inference_steps=args.num_inference_steps, guidance_scale=guidance_scale, batch_size=args.batch_size,
            height=args.height, width=args.width, max_sequence_length=args.max_sequence_length,
        )
        description = detector.describe()
        for row, i in zip(rows, order):
            row["cluster_fraction"] = fractions[i]
            row["copy_detector"] = description["name"]
    if args.top_k is not None:
        rows = rows[: args.top_k]
    write_jsonl_atomic(args.output_file, rows)
    cluster = detector is not None
    print(f"{'rank':>4s} {'noise norm':>11s}" + (f"{'cluster':>8s}" if cluster else "") + "  prompt")
    for row in rows:
        fraction = f"{row['cluster_fraction']:8.3f}" if cluster else ""
        mark = "  [known memorized]" if row.get("known_memorized") else ""
        print(f"{row['rank']:4d} {row['noise_norm']:11.4f}{fraction}  {row['caption'][:100]}{mark}")
    if known:
        auc = detection_auc(scores, [p in known for p in prompts])
        print(f"Detection AUC: {auc:.3f} ({len(known)} known memorized prompt(s), at rank(s) {known_ranks}, vs {len(prompts) - len(known)} other(s)).")
    steps = args.first_steps or args.num_inference_steps
    print(
        f"Cost: {args.num_generations * steps} denoiser evaluations per prompt ({args.num_generations} generation(s) x "
        f"{steps} step(s)), each on the prompt and the empty prompt."
    )
    print(f"Wrote {len(rows)} prompt(s) to {args.output_file}.")
    return rows


if __name__ == "__main__":
    from .errors import run_script

    run_script(main, "python -m diffusers_unlearn.scan")
