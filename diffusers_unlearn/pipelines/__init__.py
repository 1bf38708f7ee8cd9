"""Pipelines: class-conditional DDPM sampling with classifier-free guidance, seeded batch sampling, and the
unlearning pipelines for DDPM and Stable Diffusion."""

from .mixins import UnlearningMixin
from .stable_diffusion import UnlearnStableDiffusionPipeline
from .text_to_image import generate_images
from .ddpm import ClassConditionalDDPMPipeline, UnlearnDDPMPipeline, ddim_scheduler_from, default_null_class_label, denoise, sample_images

__all__ = [
    "UnlearnDDPMPipeline",
    "UnlearnStableDiffusionPipeline",
    "generate_images",
    "UnlearningMixin",
    "ClassConditionalDDPMPipeline",
    "ddim_scheduler_from",
    "default_null_class_label",
    "denoise",
    "sample_images",
]
