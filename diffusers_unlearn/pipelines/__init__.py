"""Pipelines: class-conditional DDPM sampling with classifier-free guidance, seeded batch sampling, and the
unlearning pipelines for DDPM, Stable Diffusion (1.x/2.x, XL), SD3.x and Flux.1."""

from __future__ import annotations

import importlib

# Public names -> the submodule that defines them, imported on first use. Importing a submodule runs this file
# first, and an eager `from .stable_diffusion import ...` here would make every DDPM user import diffusers' Stable
# Diffusion pipeline (and with it transformers' CLIP classes) for nothing.
_LAZY = {
    "UnlearningMixin": "mixins",
    "UnlearnStableDiffusionPipeline": "stable_diffusion",
    "UnlearnStableDiffusionXLPipeline": "stable_diffusion_xl",
    "UnlearnStableDiffusion3Pipeline": "flow",
    "UnlearnFluxPipeline": "flow",
    "generate_images": "text_to_image",
    "ClassConditionalDDPMPipeline": "ddpm",
    "UnlearnDDPMPipeline": "ddpm",
    "ddim_scheduler_from": "ddpm",
    "default_null_class_label": "ddpm",
    "denoise": "ddpm",
    "sample_images": "ddpm",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
