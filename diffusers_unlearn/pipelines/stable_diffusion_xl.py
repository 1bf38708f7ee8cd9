"""`UnlearnStableDiffusionXLPipeline`: SDXL with unlearning adapters, memorization scores and `unlearn`."""

from __future__ import annotations

from diffusers import StableDiffusionXLPipeline

from .family_unlearning import FamilyUnlearningMixin


class UnlearnStableDiffusionXLPipeline(FamilyUnlearningMixin, StableDiffusionXLPipeline):
    """`StableDiffusionXLPipeline` plus `load_unlearning_adapter`, `set_unlearning_strength`, `memorization_score`,
    `unlearn` and `save_unlearning_adapter`, going through the SDXL model family (`diffusers_unlearn.families`,
    see `FamilyUnlearningMixin`) for prompt encoding (both text encoders, pooled `text_embeds`, micro-conditioning
    `time_ids` for an uncropped image at the training resolution), latents, the UNet call and LoRA targets.
    Saved folders name `StableDiffusionXLPipeline`, so they load with plain diffusers.

    Example:
        >>> pipe = UnlearnStableDiffusionXLPipeline.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0")  # doctest: +SKIP
        >>> pipe.memorization_score(["a memorized caption"])  # doctest: +SKIP
        >>> pipe.unlearn(forget=[(image, "a memorized caption")], max_train_steps=200)  # doctest: +SKIP
        'siss'
    """

    _saved_class_name = "StableDiffusionXLPipeline"
    _family_name = "sdxl"

    def _prompt_options(self, resolution: int) -> dict:
        """`time_ids` for an uncropped image at the training resolution."""
        return {"target_size": (resolution, resolution)}
