"""`UnlearnStableDiffusion3Pipeline` and `UnlearnFluxPipeline`: the rectified-flow pipelines with unlearning
adapters, the velocity-difference memorization score and `unlearn`, all through their model families
(`diffusers_unlearn.families.sd3` / `.flux`; see `FamilyUnlearningMixin`).

The denoiser is the pipeline's `transformer`; adapters are LoRA files with `transformer.` keys (and `text_encoder.`
ones when a CLIP encoder was trained), the layout plain `StableDiffusion3Pipeline.load_lora_weights` and
`FluxPipeline.load_lora_weights` read. Saved folders name the plain pipeline class, so they load without this
package.
"""

from __future__ import annotations

from diffusers import FluxPipeline, StableDiffusion3Pipeline

from .family_unlearning import FamilyUnlearningMixin


class _FlowUnlearningMixin(FamilyUnlearningMixin):
    def _resolution_multiple(self) -> int:
        # Flux packs 2x2 latent patches and SD3's transformer patchifies 2x2: the latent size must be even.
        return int(self.vae_scale_factor) * 2


class UnlearnStableDiffusion3Pipeline(_FlowUnlearningMixin, StableDiffusion3Pipeline):
    """`StableDiffusion3Pipeline` plus `load_unlearning_adapter`, `set_unlearning_strength`, `memorization_score`,
    `unlearn` and `save_unlearning_adapter`, through the SD3 model family (two CLIP encoders and an optional T5,
    pooled projections, the flow-matching schedule, the transformer's joint-attention LoRA targets).

    `memorization_score` is the velocity-difference noise norm ||v(x, prompt) - v(x, "")|| averaged over the
    steps of the classifier-free-guided trajectory, the empty prompt encoded as the pipeline encodes it (see
    `diffusers_unlearn.metrics.noise_norm`). Saved folders name `StableDiffusion3Pipeline`.

    Example:
        >>> pipe = UnlearnStableDiffusion3Pipeline.from_pretrained("stabilityai/stable-diffusion-3.5-medium")  # doctest: +SKIP
        >>> pipe.memorization_score(["a memorized caption"])  # doctest: +SKIP
        >>> pipe.load_unlearning_adapter("unlearn-sd3-output")  # doctest: +SKIP
        'siss'
    """

    _saved_class_name = "StableDiffusion3Pipeline"
    _family_name = "sd3"


class UnlearnFluxPipeline(_FlowUnlearningMixin, FluxPipeline):
    """`FluxPipeline` plus `load_unlearning_adapter`, `set_unlearning_strength`, `memorization_score`, `unlearn`
    and `save_unlearning_adapter`, through the Flux model family (pooled CLIP plus T5, packed 2x2 latents,
    `img_ids`/`txt_ids`, the guidance embedding of guidance-distilled checkpoints).

    `memorization_score` is ||v(x, prompt) - v(x, "")|| averaged over the steps of the pipeline's own trajectory.
    A guidance-distilled Flux (Flux.1-dev) has no unconditional branch: the empty prompt goes through the same
    model with the same guidance embedding. Saved folders name `FluxPipeline`.

    Example:
        >>> pipe = UnlearnFluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev")  # doctest: +SKIP
        >>> pipe.memorization_score(["a memorized caption"], height=512, width=512)  # doctest: +SKIP
    """

    _saved_class_name = "FluxPipeline"
    _family_name = "flux"


__all__ = ["UnlearnFluxPipeline", "UnlearnStableDiffusion3Pipeline"]
