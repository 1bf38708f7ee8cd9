"""The embedded default: 8x8 digits plus a planted canary, bundled models, and a digits classifier.

Bundled under `ASSETS_DIR` (retrain with `python -m diffusers_unlearn.toy.train all`):

- `ddpm_unconditional`: a DDPM on digits + 75 canary copies that memorizes the canary (data unlearning).
- `ddpm_class_conditional`: a class-conditional DDPM on digits, labels 0..9, null label 10 (class unlearning).
- `classifier`: a CNN labelling digits 0..9 and the canary (10); forget rates, PUL, Fréchet features.
- `sd_tiny`: a tiny StableDiffusionPipeline on captioned digits whose "seven" prompt often reproduces the canary
  (retrain with `python -m diffusers_unlearn.toy.train_text_to_image`; see `toy.text_to_image`).

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

import os

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
    CANARY_PROMPT,
    DIGIT_PROMPTS,
    NUM_SD_CANARY_COPIES,
    SD_MEMORIZATION_THRESHOLD,
    SD_TOY_NAME,
)

ASSETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
"""Folder of the bundled toy models."""

TOY_MODELS = ("ddpm_unconditional", "ddpm_class_conditional", "classifier", "sd_tiny")

MEMORIZATION_THRESHOLD = 2.0
"""Pixel L2 distance (pixels in [0, 1], 8x8 = 64 values) below which a sample is a copy of the canary.

Measured by `python -m diffusers_unlearn.toy.measure` (docs/toy.md): of 2,048 samples from the
bundled DDPM, the canary copies lie within 0.713 of the canary, every other sample at 5.205 or
more, and the nearest real digit at 5.213; any threshold from 1 to 5 counts the same copies."""


def toy_model_path(name: str) -> str:
    """Folder of a bundled toy model: `"ddpm_unconditional"`, `"ddpm_class_conditional"`, `"classifier"` or `"sd_tiny"`."""
    if name not in TOY_MODELS:
        raise ValueError(f"Unknown toy model {name!r}; expected one of {TOY_MODELS}.")
    path = os.path.join(ASSETS_DIR, name)
    if not os.path.isdir(path):
        command = "train_text_to_image" if name == "sd_tiny" else "train all"
        raise FileNotFoundError(f"{path} is missing; retrain it with `python -m diffusers_unlearn.toy.{command}`.")
    return path


def load_classifier():
    """The bundled `DigitsClassifier`, in eval mode."""
    from .classifier import DigitsClassifier

    return DigitsClassifier.from_pretrained(toy_model_path("classifier"))


__all__ = [
    "ASSETS_DIR",
    "CANARY_LABEL",
    "CANARY_PROMPT",
    "DIGIT_PROMPTS",
    "MEMORIZATION_THRESHOLD",
    "NUM_CANARY_COPIES",
    "NUM_CLASSES",
    "NUM_SD_CANARY_COPIES",
    "SD_MEMORIZATION_THRESHOLD",
    "SD_TOY_NAME",
    "TOY_MODELS",
    "ToySplit",
    "load_classifier",
    "load_digits_images",
    "make_canary",
    "save_image_folder",
    "toy_model_path",
    "toy_split",
]
