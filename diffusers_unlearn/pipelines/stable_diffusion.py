"""`UnlearnStableDiffusionPipeline`: Stable Diffusion with unlearning adapters, memorization scores and `unlearn`."""

from __future__ import annotations

from diffusers import StableDiffusionPipeline

from .mixins import UnlearningMixin


class UnlearnStableDiffusionPipeline(UnlearningMixin, StableDiffusionPipeline):
    """`StableDiffusionPipeline` plus `load_unlearning_adapter`, `set_unlearning_strength`, `memorization_score` and
    `unlearn`. Saved folders name `StableDiffusionPipeline`, so they load with plain diffusers, and adapters written
    by `train_unlearn_sd.py` also load with plain `pipe.load_lora_weights(...)`.

    Example:
        >>> pipe = UnlearnStableDiffusionPipeline.from_pretrained(toy_model_path("sd_tiny"))
        >>> pipe.memorization_score(["a handwritten digit seven"])        # high: the prompt is memorized
        >>> pipe.load_unlearning_adapter("unlearn-sd-output")
        >>> pipe.memorization_score(["a handwritten digit seven"])        # lower after unlearning
        >>> pipe.set_unlearning_strength(0.0)                               # the original model again
    """

    _saved_class_name = "StableDiffusionPipeline"
