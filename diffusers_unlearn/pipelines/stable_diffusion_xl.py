"""`UnlearnStableDiffusionXLPipeline`: SDXL with unlearning adapters, memorization scores and `unlearn`."""

from __future__ import annotations

from typing import Optional

import torch
from diffusers import StableDiffusionXLPipeline

from .mixins import UnlearningMixin, _autocast_for, _keep_far_generations, _pairs


class UnlearnStableDiffusionXLPipeline(UnlearningMixin, StableDiffusionXLPipeline):
    """`StableDiffusionXLPipeline` plus `load_unlearning_adapter`, `set_unlearning_strength`, `memorization_score`
    and `unlearn`, going through the SDXL model family (`diffusers_unlearn.families`) for prompt encoding (both
    text encoders, pooled `text_embeds`, micro-conditioning `time_ids`), latents, the UNet call and LoRA targets.
    Saved folders name `StableDiffusionXLPipeline`, so they load with plain diffusers.

    Example:
        >>> pipe = UnlearnStableDiffusionXLPipeline.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0")  # doctest: +SKIP
        >>> pipe.memorization_score(["a memorized caption"])  # doctest: +SKIP
        >>> pipe.unlearn(forget=[(image, "a memorized caption")], max_train_steps=200)  # doctest: +SKIP
        'siss'
    """

    _saved_class_name = "StableDiffusionXLPipeline"

    def _components(self) -> dict:
        return {name: getattr(self, name, None) for name in (
            "unet", "vae", "scheduler", "tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2")}

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
        **hyperparameters,
    ) -> str:
        """Train an unlearning adapter on SDXL in process and attach it (strength 1); returns the adapter name.

        As `UnlearningMixin.unlearn` for a text-to-image pipeline: `forget` (and `keep`) are `(image, prompt)`
        pairs; without `keep`, `keep_from_generations` seeded generations per forget prompt that are farther than
        `memorization_threshold` from every forget image form the keep set. Prompts are encoded by the SDXL
        family (with `time_ids` for an uncropped image at `resolution`, default the native size), and the LoRA
        targets are the family's preset (default "attention").

        Example:
            >>> pipe.unlearn(forget=[(image, "a memorized caption")], keep=[(other, "a dog")])  # doctest: +SKIP
            'siss'
        """
        from ..families import get_family
        from ..training import train_adapter
        from ..unlearner import BatchPool

        family = get_family("sdxl")
        components = self._components()
        adapter_name = adapter_name or method
        if adapter_name in self.unlearning_adapters:
            raise ValueError(f"The pipeline already has an adapter named {adapter_name!r}; pass another adapter_name.")
        if resolution is None:
            resolution = family.native_resolution(components)[0]
        if resolution % self.vae_scale_factor:
            raise ValueError(f"resolution must be a multiple of {self.vae_scale_factor}, got {resolution}.")
        channels = self.vae.config.in_channels
        forget_images, forget_prompts = _pairs(forget, resolution, channels, "forget")
        if keep is None:
            threshold = memorization_threshold or 0.1 * (channels * resolution * resolution) ** 0.5
            prompts = list(dict.fromkeys(forget_prompts))
            generations = []
            for index, prompt in enumerate(prompts):
                generator = torch.Generator(self.unet.device).manual_seed(seed + 1 + index)
                with _autocast_for(self.unet):
                    images = self(
                        prompt, num_images_per_prompt=keep_from_generations, height=resolution, width=resolution,
                        generator=generator, output_type="pt",
                    ).images
                generations.append(images.float().cpu() * 2 - 1)
            keep_images, kept_prompts = _keep_far_generations(prompts, generations, forget_images, forget_prompts, threshold)
        else:
            keep_images, kept_prompts = _pairs(keep, resolution, channels, "keep")
        device = self.unet.device

        def pool(images, prompts):
            latents = family.encode_images(components, images)
            cond = family.encode_prompts(components, prompts, target_size=(resolution, resolution))
            hidden = cond.pop("encoder_hidden_states")
            return BatchPool(
                latents.to(device), encoder_hidden_states=hidden.to(device),
                added_cond={key: value.to(device) for key, value in cond.items()},
            )

        forget_pool, keep_pool = pool(forget_images, forget_prompts), pool(keep_images, kept_prompts)
        self.unet, _ = train_adapter(
            self.unet, family.schedule(components), forget_pool, keep_pool, method=method,
            hyperparameters=hyperparameters, max_train_steps=max_train_steps, train_batch_size=train_batch_size,
            learning_rate=learning_rate, rank=rank, lora_targets=family.lora_targets(lora_targets or "attention"),
            adapter_name=adapter_name, seed=seed, call=family.call,
        )
        self.unet.eval()
        self.set_unlearning_strength(1.0, adapter_name)
        return adapter_name

    def save_unlearning_adapter(self, out_dir: str, adapter_name: Optional[str] = None) -> str:
        """Write an attached adapter as a LoRA file plain `StableDiffusionXLPipeline.load_lora_weights` loads.

        Example:
            >>> pipe.save_unlearning_adapter("forget-caption")  # doctest: +SKIP
            'forget-caption/pytorch_lora_weights.safetensors'
        """
        from ..families import get_family

        adapters = self.unlearning_adapters
        if adapter_name is None:
            if len(adapters) != 1:
                raise ValueError(f"Name the adapter to save; loaded: {adapters}.")
            adapter_name = adapters[0]
        return get_family("sdxl").save_adapter(out_dir, self.unet, adapter_name=adapter_name)
