"""`FamilyUnlearningMixin`: `unlearn` and `save_unlearning_adapter` for a pipeline served by a model family
(`diffusers_unlearn.families`): SDXL, SD3.x and Flux.1. Prompts, latents, the training schedule, the denoiser
call, the LoRA targets and the adapter file all come from the family, so one method serves UNet and transformer
pipelines alike."""

from __future__ import annotations

from typing import Any, Optional

import torch

from .mixins import UnlearningMixin, _autocast_for, _keep_far_generations, _pairs


class FamilyUnlearningMixin(UnlearningMixin):
    """`UnlearningMixin` whose `unlearn` and `save_unlearning_adapter` go through the model family named by
    `_family_name`. Subclasses may override `_prompt_options` (extra `encode_prompts` arguments for a training
    resolution) and `_resolution_multiple` (what the image size must divide by)."""

    _family_name: str = ""

    @property
    def _family(self):
        from ..families import get_family

        return get_family(self._family_name)

    def _components(self) -> dict[str, Any]:
        return dict(self.components)

    def _prompt_options(self, resolution: int) -> dict[str, Any]:
        """Extra keyword arguments of the family's `encode_prompts` for images of `resolution` pixels; none here."""
        return {}

    def _resolution_multiple(self) -> int:
        """The training resolution must be a multiple of this (the VAE scale factor here)."""
        return int(self.vae_scale_factor)

    def unlearn(
        self,
        forget,
        keep=None,
        method: str = "siss",
        max_train_steps: int = 100,
        learning_rate: float = 1e-3,
        rank: int = 4,
        lora_targets: Optional[str] = None,
        train_batch_size: int = 8,
        adapter_name: Optional[str] = None,
        keep_from_generations: int = 16,
        memorization_threshold: Optional[float] = None,
        seed: int = 0,
        resolution: Optional[int] = None,
        copy_detector=None,
        **hyperparameters,
    ) -> str:
        """Train an unlearning adapter on the denoiser in process and attach it (strength 1); returns its name.

        As `UnlearningMixin.unlearn` for a text-to-image pipeline: `forget` (and `keep`) are `(image, prompt)`
        pairs, images as PIL or [-1, 1] tensors (C, H, W); without `keep`, `keep_from_generations` seeded
        generations per forget prompt (the pipeline's own sampling) that are farther than `memorization_threshold`
        (pixel L2 in [0, 1] units; default an RMS difference of 0.1) from every forget image form the keep set
        (or, with `copy_detector`, the generations it does not flag as copies). Images and prompts are encoded by the model family with its default options (SDXL: `time_ids` for an
        uncropped image at `resolution`; SD3: T5 padded to 77 tokens; Flux: 512, and the training guidance 3.5
        for a guidance-distilled transformer); the objective runs on the family's schedule (flow matching with
        velocity targets for SD3 and Flux) and calls the denoiser the family's way. The LoRA targets are the
        family's preset (default "attention"). `resolution` is the square image size in pixels (default: the
        pipeline's native size). `hyperparameters` go to the method (for example `scaling_norm=0.5` for SISS).

        Example:
            >>> pipe.unlearn(forget=[(image, "a memorized caption")], keep=[(other, "a dog")])  # doctest: +SKIP
            'siss'
        """
        from ..training import train_adapter
        from ..unlearner import BatchPool

        family = self._family
        components = self._components()
        adapter_name = adapter_name or method
        if adapter_name in self.unlearning_adapters:
            raise ValueError(f"The pipeline already has an adapter named {adapter_name!r}; pass another adapter_name.")
        if resolution is None:
            resolution = family.native_resolution(components)[0]
        multiple = self._resolution_multiple()
        if resolution % multiple:
            raise ValueError(f"resolution must be a multiple of {multiple}, got {resolution}.")
        channels = self.vae.config.in_channels
        forget_images, forget_prompts = _pairs(forget, resolution, channels, "forget")
        denoiser = self._denoiser
        if keep is None:
            threshold = memorization_threshold or 0.1 * (channels * resolution * resolution) ** 0.5
            prompts = list(dict.fromkeys(forget_prompts))
            generations = []
            for index, prompt in enumerate(prompts):
                generator = torch.Generator(denoiser.device).manual_seed(seed + 1 + index)
                with _autocast_for(denoiser):
                    images = self(
                        prompt, num_images_per_prompt=keep_from_generations, height=resolution, width=resolution,
                        generator=generator, output_type="pt",
                    ).images
                generations.append(images.float().cpu() * 2 - 1)
            keep_images, kept_prompts = _keep_far_generations(prompts, generations, forget_images, forget_prompts, threshold, copy_detector)
        else:
            keep_images, kept_prompts = _pairs(keep, resolution, channels, "keep")
        device = denoiser.device

        def pool(images, prompts):
            latents = family.encode_images(components, images)
            cond = family.encode_prompts(components, prompts, **self._prompt_options(resolution))
            hidden = cond.pop("encoder_hidden_states")
            return BatchPool(
                latents.to(device), encoder_hidden_states=hidden.to(device),
                added_cond={key: value.to(device) for key, value in cond.items()},
            )

        forget_pool, keep_pool = pool(forget_images, forget_prompts), pool(keep_images, kept_prompts)
        targets = lora_targets or "attention"
        if targets in family.lora_target_presets:  # otherwise module names, as `lora.resolve_lora_targets` reads them
            targets = family.lora_targets(targets)
        trained, _ = train_adapter(
            denoiser, family.schedule(components), forget_pool, keep_pool, method=method,
            hyperparameters=hyperparameters, max_train_steps=max_train_steps, train_batch_size=train_batch_size,
            learning_rate=learning_rate, rank=rank, lora_targets=targets,
            adapter_name=adapter_name, seed=seed, call=family.call,
        )
        setattr(self, family.denoiser_name, trained)
        trained.eval()
        self.set_unlearning_strength(1.0, adapter_name)
        return adapter_name

    def save_unlearning_adapter(self, out_dir: str, adapter_name: Optional[str] = None) -> str:
        """Write an attached adapter as a LoRA file that the plain pipeline's `load_lora_weights` loads (keys
        prefixed by the denoiser's name, "unet." or "transformer."); returns the file's path.

        Example:
            >>> pipe.save_unlearning_adapter("forget-caption")  # doctest: +SKIP
            'forget-caption/pytorch_lora_weights.safetensors'
        """
        adapters = self.unlearning_adapters
        if adapter_name is None:
            if len(adapters) != 1:
                raise ValueError(f"Name the adapter to save; loaded: {adapters}.")
            adapter_name = adapters[0]
        return self._family.save_adapter(out_dir, self._denoiser, adapter_name=adapter_name)


__all__ = ["FamilyUnlearningMixin"]
