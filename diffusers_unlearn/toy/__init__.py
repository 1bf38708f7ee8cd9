"""The embedded default: 8x8 digits plus a planted canary, bundled models, and a digits classifier.

Bundled under `ASSETS_DIR` (retrain with `python -m diffusers_unlearn.toy.train all`):

- `ddpm_unconditional`: a DDPM on digits + 75 canary copies that memorizes the canary (data unlearning).
- `ddpm_class_conditional`: a class-conditional DDPM on digits, labels 0..9, null label 10 (class unlearning).
- `classifier`: a CNN labelling digits 0..9 and the canary (10); forget rates, PUL, Fréchet features.
- `sd_tiny`: a tiny StableDiffusionPipeline on captioned digits whose "seven" prompt often reproduces the canary
  (retrain with `python -m diffusers_unlearn.toy.train_text_to_image`; see `toy.text_to_image`).
- `ddpm_unconditional_retrained_without_canary`, `sd_tiny_retrained_without_canary`: the same recipes and seeds
  without the canary copies (`--without_canary`), the retrain-from-scratch references of "distance to retrain".
- `sd_tiny_captioned`: `sd_tiny`'s recipe with the canary copies under a caption of their own (`CANARY_CAPTION`,
  as memorized images have in LAION), so the memorization scan can single that prompt out (retrain with the
  `--canary_caption` command of `TRAINING_COMMANDS`). Its marker names the forget prompt and the digit prompts.
- `sd3_tiny`: the same task on a tiny flow-matching `StableDiffusion3Pipeline` (retrain with
  `python -m diffusers_unlearn.toy.train_flow_text_to_image`, which reuses `sd_tiny`'s VAE).

The text-to-image toys carry a `diffusers_unlearn_toy.json` (`TOY_INFO_FILE`) that `train_unlearn_sd.py` recognises: given such a
folder, it unlearns the canary and measures the digits as with no arguments.

Example:
    >>> from diffusers import DDPMPipeline
    >>> from diffusers_unlearn.toy import toy_model_path, load_classifier
    >>> pipe = DDPMPipeline.from_pretrained(toy_model_path("ddpm_unconditional"))
    >>> classifier = load_classifier()
    >>> from diffusers import StableDiffusionPipeline
    >>> sd = StableDiffusionPipeline.from_pretrained(toy_model_path(SD_TOY_NAME))
    >>> images = sd(CANARY_PROMPT, num_images_per_prompt=4).images   # often the canary
"""

from __future__ import annotations

import json
import os
from typing import Optional

from .data import (
    CANARY_LABEL,
    NUM_CANARY_COPIES,
    NUM_CLASSES,
    ToySplit,
    load_digits_images,
    make_canary,
    save_image_folder,
    toy_split,
)
from .text_to_image import (
    CANARY_CAPTION,
    CANARY_PROMPT,
    DIGIT_PROMPTS,
    NUM_SD_CANARY_COPIES,
    SD_CAPTIONED_NAME,
    SD_MEMORIZATION_THRESHOLD,
    SD_TOY_NAME,
)

ASSETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
"""Folder of the bundled toy models."""

DDPM_RETRAINED_NAME = "ddpm_unconditional_retrained_without_canary"
"""`ddpm_unconditional`'s recipe and seed on the "train" split minus the canary copies: the retrain-from-scratch
gold standard of data unlearning (`train_unlearn_ddpm.py --retrained_model_name_or_path`)."""

SD_RETRAINED_NAME = "sd_tiny_retrained_without_canary"
"""`sd_tiny`'s recipe and seed (VAE and UNet) on its training set minus the canary copies: what the SD toy
generates when it never saw the canary."""

TOY_MODELS = (
    "ddpm_unconditional",
    "ddpm_class_conditional",
    "classifier",
    "sd_tiny",
    "sd3_tiny",
    DDPM_RETRAINED_NAME,
    SD_RETRAINED_NAME,
    SD_CAPTIONED_NAME,
)

TOY_INFO_FILE = "diffusers_unlearn_toy.json"
"""File in a text-to-image toy's folder: `{"toy": name, ...}` plus the sampling options it needs (`sd3_tiny`:
`max_sequence_length`) and, where the canary has its own caption (`sd_tiny_captioned`), `forget_prompt` (that
caption) and `keep_prompts` (the digit prompts). `toy_prompts` reads them."""

TRAINING_COMMANDS = {
    "sd_tiny": "python -m diffusers_unlearn.toy.train_text_to_image",
    "sd3_tiny": "python -m diffusers_unlearn.toy.train_flow_text_to_image",
    DDPM_RETRAINED_NAME: "python -m diffusers_unlearn.toy.train unconditional --without_canary",
    SD_RETRAINED_NAME: "python -m diffusers_unlearn.toy.train_text_to_image --without_canary",
    SD_CAPTIONED_NAME: f'python -m diffusers_unlearn.toy.train_text_to_image --canary_caption "{CANARY_CAPTION}" --vae_from sd_tiny',
}

MEMORIZATION_THRESHOLD = 2.0
"""Pixel L2 distance (pixels in [0, 1], 8x8 = 64 values) below which a sample is a copy of the canary.

Measured by `python -m diffusers_unlearn.toy.measure` (docs/toy.md): of 2,048 samples from the
bundled DDPM, the canary copies lie within 0.713 of the canary, every other sample at 5.205 or
more, and the nearest real digit at 5.213; any threshold from 1 to 5 counts the same copies."""


def toy_model_path(name: str) -> str:
    """Folder of a bundled toy model, one of `TOY_MODELS`."""
    if name not in TOY_MODELS:
        raise ValueError(f"Unknown toy model {name!r}; expected one of {TOY_MODELS}.")
    path = os.path.join(ASSETS_DIR, name)
    if not os.path.isdir(path):
        command = TRAINING_COMMANDS.get(name, "python -m diffusers_unlearn.toy.train all")
        raise FileNotFoundError(f"{path} is missing; retrain it with `{command}`.")
    return path


def load_toy_pipeline(folder: str):
    """A text-to-image toy folder as its plain diffusers pipeline, progress bars off.

    Components saved as null (`sd3_tiny` has no T5) are passed as None, as diffusers needs for a pipeline saved
    without them: `StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)`.

    Example:
        >>> pipe = load_toy_pipeline(toy_model_path("sd3_tiny"))   # doctest: +SKIP
    """
    from diffusers import DiffusionPipeline

    from ..families import components_saved_as_none

    pipe = DiffusionPipeline.from_pretrained(folder, **components_saved_as_none(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def write_toy_info(folder: str, name: str, **options) -> None:
    """Write the toy marker (`TOY_INFO_FILE`) of toy `name` into a pipeline folder, with its sampling options."""
    with open(os.path.join(folder, TOY_INFO_FILE), "w", encoding="utf-8") as f:
        json.dump({"toy": name, **options}, f, indent=2)
        f.write("\n")


def toy_info(folder: str) -> Optional[dict]:
    """The toy marker (`TOY_INFO_FILE`) of a local pipeline folder, or None for any other folder or Hub id.

    Example:
        >>> toy_info(toy_model_path("sd3_tiny"))["max_sequence_length"]
        8
    """
    path = os.path.join(folder, TOY_INFO_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        info = json.load(f)
    if not isinstance(info, dict) or info.get("toy") not in TOY_MODELS:
        raise ValueError(f"{path} is not a diffusers-unlearn toy marker: expected {{\"toy\": one of {TOY_MODELS}}}.")
    return info


def toy_prompts(info: dict) -> tuple[str, list[str]]:
    """`(forget_prompt, keep_prompts)` of a text-to-image toy from its marker (`toy_info`).

    `sd_tiny_captioned` records both: its canary's own caption and the ten digit prompts. The other text-to-image
    toys record neither: their canary is under `CANARY_PROMPT`, which the nine other digit prompts do not share.

    Example:
        >>> toy_prompts(toy_info(toy_model_path("sd_tiny")))[0]
        'a handwritten digit seven'
    """
    forget_prompt = info.get("forget_prompt", CANARY_PROMPT)
    keep_prompts = info.get("keep_prompts", [p for p in DIGIT_PROMPTS if p != forget_prompt])
    return forget_prompt, list(keep_prompts)


def load_classifier():
    """The bundled `DigitsClassifier`, in eval mode."""
    from .classifier import DigitsClassifier

    return DigitsClassifier.from_pretrained(toy_model_path("classifier"))


__all__ = [
    "ASSETS_DIR",
    "CANARY_CAPTION",
    "CANARY_LABEL",
    "DDPM_RETRAINED_NAME",
    "CANARY_PROMPT",
    "DIGIT_PROMPTS",
    "MEMORIZATION_THRESHOLD",
    "NUM_CANARY_COPIES",
    "NUM_CLASSES",
    "NUM_SD_CANARY_COPIES",
    "SD_MEMORIZATION_THRESHOLD",
    "SD_CAPTIONED_NAME",
    "SD_RETRAINED_NAME",
    "SD_TOY_NAME",
    "TOY_INFO_FILE",
    "TOY_MODELS",
    "ToySplit",
    "load_classifier",
    "load_toy_pipeline",
    "load_digits_images",
    "make_canary",
    "save_image_folder",
    "toy_info",
    "toy_model_path",
    "toy_prompts",
    "write_toy_info",
    "toy_split",
]
