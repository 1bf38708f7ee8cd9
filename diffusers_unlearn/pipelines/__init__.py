"""Pipelines: class-conditional DDPM sampling with classifier-free guidance, and seeded batch sampling."""

from .mixins import UnlearningMixin
from .ddpm import ClassConditionalDDPMPipeline, UnlearnDDPMPipeline, ddim_scheduler_from, default_null_class_label, denoise, sample_images

__all__ = [
    "UnlearnDDPMPipeline",
    "UnlearningMixin",
    "ClassConditionalDDPMPipeline",
    "ddim_scheduler_from",
    "default_null_class_label",
    "denoise",
    "sample_images",
]
