"""What a model family is: the data and small methods that adapt one diffusers pipeline type to the objectives.

A family knows, for the pipelines it serves, how to load their components, encode prompts and images, build the
training noise schedule, call the denoiser, which LoRA targets to use and how to save an adapter that the plain
diffusers pipeline loads with `load_lora_weights`. Everything else (objectives, combiners, the training loop)
sees only `Denoiser` and `DenoisingBatch`, so it never asks which family it runs on.

Components are a dict keyed by the pipeline's own component names ("unet", "vae", "text_encoder",
"tokenizer", "scheduler", ...), so `family.load(...)` and an already built pipeline's `pipe.components` are
interchangeable.

Example:
    >>> from diffusers_unlearn import families
    >>> family = families.family_for_folder("path/to/sdxl")  # doctest: +SKIP
    >>> components = family.load("path/to/sdxl", torch.bfloat16)  # doctest: +SKIP
    >>> cond = family.encode_prompts(components, ["a photo of a cat"])  # doctest: +SKIP
    >>> batch = DenoisingBatch.from_conditioning(family.encode_images(components, images), cond)  # doctest: +SKIP
    >>> denoiser = family.denoiser(components)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from ..errors import UserInputError
from ..lora import DEFAULT_WEIGHT_NAME, LORA_TARGET_PRESETS, save_lora_weights
from ..noise import NoiseSchedule
from ..objectives.base import Denoiser

Components = Mapping[str, Any]


class ModelFamily:
    """Base class of the model families. A family is a stateless object; subclasses set the class attributes
    and override the methods whose behaviour differs.

    Class attributes:
        name: the registry name and the value of `--model_family`.
        pipeline_class_names: the `_class_name`s in `model_index.json` this family serves.
        plain_pipeline_class_name: the diffusers pipeline whose `load_lora_weights` accepts the family's adapters.
        text_encoders: (tokenizer name, text encoder name, transformers class name) per text encoder, in order.
        tokenizer_class_names: the transformers tokenizer class of a tokenizer, by name, where it is not
            `CLIPTokenizer` (T5's `T5TokenizerFast`).
        optional_text_encoders: text encoders a pipeline may lack (`null` in `model_index.json`, no subfolder),
            as SD3's T5; `load` then gives None for them and their tokenizers.
        denoiser_name: the denoiser's component name, "unet" or "transformer" (also its LoRA key prefix).
        denoiser_class_name: the diffusers class `load` builds the denoiser with.
        lora_prefixes: the key prefixes of the family's LoRA files (the denoiser's, "text_encoder", ...).
        lora_target_presets: LoRA target presets for the denoiser, by name.
    """

    name: str = ""
    pipeline_class_names: tuple[str, ...] = ()
    plain_pipeline_class_name: str = ""
    text_encoders: tuple[tuple[str, str, str], ...] = ()
    tokenizer_class_names: Mapping[str, str] = {}
    optional_text_encoders: tuple[str, ...] = ()
    denoiser_name: str = "unet"
    denoiser_class_name: str = "UNet2DConditionModel"
    lora_prefixes: tuple[str, ...] = ()
    lora_target_presets: Mapping[str, tuple[str, ...]] = LORA_TARGET_PRESETS
    #: Training options the family takes (`with_options`), with their defaults; none for the DDPM families.
    option_defaults: Mapping[str, Any] = {}
    #: Whether `metrics.noise_norm_per_prompt` scores the family's pipelines.
    has_noise_norm_score: bool = True

    def options(self) -> dict[str, Any]:
        """The family's training options, by name (for run fingerprints); none here."""
        return {}

    def with_options(self, **changes: Any) -> "ModelFamily":
        """The family with training options changed; a family without options refuses any, naming them."""
        if changes:
            flags = ", ".join(f"--{name}" for name in sorted(changes))
            raise UserInputError(
                f"{flags}: the {self.name} family takes no such option (they belong to the flow-matching families "
                "sd3 and flux)."
            )
        return self

    def native_resolution(self, components: Components) -> tuple[int, int]:
        """(height, width) the denoiser was built for: its latent `sample_size` times the VAE's scale factor."""
        scale = 2 ** (len(components["vae"].config.block_out_channels) - 1)
        size = components[self.denoiser_name].config.sample_size
        height, width = (size, size) if isinstance(size, int) else size
        return int(height) * scale, int(width) * scale

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"

    @property
    def plain_pipeline_class(self) -> type:
        """The plain diffusers pipeline class, imported on first use (importing every pipeline is slow)."""
        return getattr(importlib.import_module("diffusers"), self.plain_pipeline_class_name)

    @property
    def text_encoder_names(self) -> tuple[str, ...]:
        return tuple(encoder for _, encoder, _ in self.text_encoders)

    @property
    def lora_text_encoder_names(self) -> tuple[str, ...]:
        """The text encoders whose LoRA the family's adapter files hold (`save_adapter` accepts these)."""
        return tuple(prefix for prefix in self.lora_prefixes if prefix != self.denoiser_name)

    @property
    def component_names(self) -> tuple[str, ...]:
        """The components `load` returns, which a pipeline folder of the family must hold as subfolders (optional
        text encoders and their tokenizers left out)."""
        names = [self.denoiser_name, "vae", "scheduler"]
        for tokenizer_name, encoder_name, _ in self.text_encoders:
            if encoder_name not in self.optional_text_encoders:
                names += [tokenizer_name, encoder_name]
        return tuple(names)

    def pipeline_options(self, model_index: Mapping[str, Any]) -> dict[str, Any]:
        """The plain pipeline's constructor arguments besides its components, for sampling from a
        training run: no safety checker (the metrics need the model's own images) and the base model's
        registered settings from its `model_index.json` where they change what it generates."""
        return {}

    #: The classifier-free guidance scale evaluations sample with when none is given (the pipeline's default).
    default_guidance_scale: float = 7.5

    def evaluation_scheduler(self, components: Components, prediction_type: Optional[str] = None) -> Any:
        """The sampler evaluations use, the same before and after unlearning: DDIM over the training schedule
        (steps_offset 1, the prediction type the model trains with)."""
        from diffusers import DDIMScheduler

        config = components["scheduler"].config
        return DDIMScheduler.from_config(config, steps_offset=1, prediction_type=prediction_type or config.get("prediction_type", "epsilon"))

    def latents_to_pipeline(self, latents: torch.Tensor) -> torch.Tensor:
        """Initial noise (N, C, h, w) in the layout the pipeline's `latents=` argument takes (unchanged here)."""
        return latents

    def latents_from_pipeline(self, latents: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
        """The pipeline's `output_type="latent"` result as (N, C, rows, columns) latents (unchanged here)."""
        return latents

    def sampling_pipeline(
        self, components: Components, scheduler: Any, model_index: Optional[Mapping[str, Any]] = None
    ) -> Any:
        """The family's plain diffusers pipeline over `components`, sampling with `scheduler`.

        Example:
            >>> pipe = family.sampling_pipeline(components, DDIMScheduler.from_config(config))  # doctest: +SKIP
        """
        parts = {name: components[name] for name in self.component_names if name != "scheduler"}
        for tokenizer_name, encoder_name, _ in self.text_encoders:
            if encoder_name in self.optional_text_encoders:
                parts[tokenizer_name] = components.get(tokenizer_name)
                parts[encoder_name] = components.get(encoder_name)
        pipe = self.plain_pipeline_class(**parts, scheduler=scheduler, **self.pipeline_options(model_index or {}))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    # -- loading ---------------------------------------------------------------------------------------------

    def load(
        self,
        path: str | os.PathLike,
        dtype: torch.dtype = torch.float32,
        revision: Optional[str] = None,
        variant: Optional[str] = None,
        vae_path: Optional[str | os.PathLike] = None,
        cache_dir: Optional[str] = None,
        denoiser_dtype: Optional[torch.dtype] = None,
        quantization_config: Optional[Any] = None,
    ) -> dict[str, Any]:
        """Load the components the family trains with, frozen (`requires_grad=False`), on the CPU.

        The denoiser and the text encoders get `dtype` (the denoiser `denoiser_dtype` when given: full
        fine-tuning keeps float32 master weights). The VAE gets `dtype` too, except that under float16 a VAE whose
        config says `force_upcast` (AutoencoderKL's default) stays in float32: SD's and SDXL's VAEs overflow. `vae_path` loads
        the VAE from a separate folder or repository without a subfolder, as the official scripts'
        `--pretrained_vae_model_name_or_path` does (for example an fp16-fixed SDXL VAE). The scheduler is the
        pipeline's own, so a pipeline rebuilt from these components samples like the original.

        `quantization_config` (a `diffusers.BitsAndBytesConfig`) quantises the denoiser only, for LoRA on a
        4-bit or 8-bit base (`diffusers_unlearn.quantization`); diffusers then places it on the GPU, and its
        non-quantised weights get `denoiser_dtype`/`dtype`.

        Example:
            >>> components = get_family("sd").load("path/to/sd15", torch.float16)  # doctest: +SKIP
            >>> sorted(components)  # doctest: +SKIP
            ['scheduler', 'text_encoder', 'tokenizer', 'unet', 'vae']
        """
        import diffusers
        import transformers
        from diffusers import AutoencoderKL

        path = os.fspath(path)
        where = {"revision": revision, "cache_dir": cache_dir}
        weights = {**where, "variant": variant}
        components: dict[str, Any] = {}

        scheduler_config = diffusers.DDPMScheduler.load_config(path, subfolder="scheduler", **where)
        scheduler_class = getattr(diffusers, scheduler_config.get("_class_name", ""), diffusers.DDPMScheduler)
        components["scheduler"] = scheduler_class.from_config(scheduler_config)

        absent = self._absent_text_encoders(path, where)
        for tokenizer_name, encoder_name, encoder_class in self.text_encoders:
            if encoder_name in absent:
                components[tokenizer_name] = components[encoder_name] = None
                continue
            tokenizer_class = getattr(transformers, self.tokenizer_class_names.get(tokenizer_name, "CLIPTokenizer"))
            components[tokenizer_name] = tokenizer_class.from_pretrained(path, subfolder=tokenizer_name, **where)
            # `dtype`, transformers 5's name for diffusers' `torch_dtype`.
            encoder = getattr(transformers, encoder_class).from_pretrained(
                path, subfolder=encoder_name, dtype=dtype, **weights
            )
            components[encoder_name] = encoder.requires_grad_(False)

        denoiser_class = getattr(diffusers, self.denoiser_class_name)
        components[self.denoiser_name] = denoiser_class.from_pretrained(
            path, subfolder=self.denoiser_name, torch_dtype=denoiser_dtype or dtype,
            quantization_config=quantization_config, **weights,
        ).requires_grad_(False)

        if vae_path is None:
            vae_source, vae_subfolder = path, "vae"
        else:
            vae_source, vae_subfolder = os.fspath(vae_path), None
        vae_config = AutoencoderKL.load_config(vae_source, subfolder=vae_subfolder, **where)
        vae_dtype = torch.float32 if _vae_needs_upcast(vae_config, dtype) else dtype
        # The dtype at loading, not vae.to(dtype) afterwards: diffusers logs a message on every such cast.
        components["vae"] = AutoencoderKL.from_pretrained(
            vae_source, subfolder=vae_subfolder, torch_dtype=vae_dtype, **weights
        ).requires_grad_(False)
        return components

    def _absent_text_encoders(self, path: str, where: Mapping[str, Any]) -> set[str]:
        """The optional text encoders the pipeline at `path` lacks (`null` or missing in its model_index.json)."""
        if not self.optional_text_encoders:
            return set()
        from diffusers import DiffusionPipeline

        index = DiffusionPipeline.load_config(path, **where)
        return {name for name in self.optional_text_encoders if not (index.get(name) or [None])[0]}

    # -- conditioning ----------------------------------------------------------------------------------------

    def tokenize(self, components: Components, prompts: Sequence[str]) -> torch.Tensor:
        """Token ids of `prompts`, padded to each tokenizer's `model_max_length` (77 for CLIP).

        With one text encoder the shape is (N, length); with several it is (N, encoders, length), so one tensor
        can be cached and sampled (`BatchPool.input_ids`) whatever the family.
        """
        ids = [
            components[tokenizer_name](
                list(prompts),
                padding="max_length",
                max_length=components[tokenizer_name].model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            for tokenizer_name, _, _ in self.text_encoders
        ]
        return ids[0] if len(ids) == 1 else torch.stack(ids, dim=1)

    def encode_tokens(self, components: Components, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """The prompt conditioning of token ids from `tokenize`, with gradients if the text encoders train."""
        raise NotImplementedError

    def micro_conditioning(
        self,
        components: Components,
        count: int,
        original_sizes: Optional[Sequence[tuple[int, int]]] = None,
        crops_top_left: Optional[Sequence[tuple[int, int]]] = None,
        target_size: Optional[tuple[int, int]] = None,
    ) -> dict[str, torch.Tensor]:
        """Conditioning on image sizes and crops for `count` items (SDXL's `time_ids`); none by default."""
        return {}

    def encode_prompts(
        self,
        components: Components,
        prompts: Sequence[str],
        original_sizes: Optional[Sequence[tuple[int, int]]] = None,
        crops_top_left: Optional[Sequence[tuple[int, int]]] = None,
        target_size: Optional[tuple[int, int]] = None,
    ) -> dict[str, torch.Tensor]:
        """The conditioning for `prompts`, as a dict for `DenoisingBatch.from_conditioning`, without gradients.

        `original_sizes`, `crops_top_left` (both (height, width) / (top, left) per prompt) and `target_size`
        are the micro-conditioning of families that have it (SDXL); other families ignore them. Tensors come
        back in float32 on the text encoder's device.

        Example:
            >>> cond = get_family("sd").encode_prompts(components, ["a photo of a cat"])  # doctest: +SKIP
            >>> cond["encoder_hidden_states"].shape  # doctest: +SKIP
            torch.Size([1, 77, 768])
        """
        with torch.no_grad():
            cond = self.encode_tokens(components, self.tokenize(components, prompts))
        cond = {key: value.float() for key, value in cond.items()}
        device = cond["encoder_hidden_states"].device
        extra = self.micro_conditioning(components, len(prompts), original_sizes, crops_top_left, target_size)
        cond.update({key: value.to(device) for key, value in extra.items()})
        return cond

    # -- latents and the forward process ---------------------------------------------------------------------

    @torch.no_grad()
    def encode_images(self, components: Components, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        """VAE latents of images in [-1, 1], (N, 3, H, W), as the denoiser sees them, float32 on the CPU.

        The mode of the latent distribution, not a sample, so cached latents are deterministic. Normalised as
        the family's pipeline un-normalises them before decoding: `(z - latents_mean) * scaling_factor /
        latents_std` when the VAE config has `latents_mean`/`latents_std`, else `(z - shift_factor) *
        scaling_factor` (shift 0 when absent). A float16 VAE whose config says `force_upcast` encodes in float32
        (and is put back in float16 afterwards), as diffusers' SDXL pipeline decodes.

        Example:
            >>> latents = get_family("sdxl").encode_images(components, images)  # doctest: +SKIP
        """
        vae = components["vae"]
        upcast = vae.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
        if upcast:
            # float()/half(), not to(dtype): diffusers logs a warning on every to(dtype) of a model.
            vae.float()
        try:
            latents = []
            for start in range(0, len(images), batch_size):
                chunk = images[start : start + batch_size].to(vae.device, vae.dtype)
                latents.append(vae.encode(chunk).latent_dist.mode().float().cpu())
        finally:
            if upcast:
                vae.half()
        return normalize_latents(torch.cat(latents), vae.config)

    def schedule(self, components: Components, prediction_type: Optional[str] = None) -> NoiseSchedule:
        """The training noise schedule: the DDPM schedule of the pipeline's scheduler config, as the official
        training scripts build it (`DDPMScheduler.from_pretrained(path, subfolder="scheduler")`), whatever
        scheduler the pipeline samples with. `prediction_type` overrides the config's, as `--prediction_type`.
        """
        from diffusers import DDPMScheduler

        training_scheduler = DDPMScheduler.from_config(components["scheduler"].config)
        return NoiseSchedule.from_scheduler(training_scheduler, prediction_type)

    def call(self, model: nn.Module, x_t: torch.Tensor, timesteps: torch.Tensor, cond: Mapping[str, torch.Tensor]):
        """The denoiser's raw output (of its own prediction type) for noisy inputs and a conditioning dict."""
        raise NotImplementedError

    def denoiser(
        self, components: Components, loss_space: str = "native", prediction_type: Optional[str] = None
    ) -> Denoiser:
        """A `Denoiser` over the components' denoiser (UNet or transformer) that calls it the family's way.

        Example:
            >>> denoiser = get_family("sdxl").denoiser(components)  # doctest: +SKIP
            >>> terms = get_objective("naive_deletion")(denoiser, None, keep_batch)  # doctest: +SKIP
        """
        return Denoiser(
            components[self.denoiser_name],
            self.schedule(components, prediction_type),
            loss_space=loss_space,
            call=self.call,
        )

    # -- LoRA ------------------------------------------------------------------------------------------------

    def lora_targets(self, preset: str) -> tuple[str, ...]:
        """The denoiser's module names for a LoRA target preset (for `lora.add_lora(..., targets=...)`).

        Example:
            >>> from diffusers_unlearn.families import get_family
            >>> get_family("sdxl").lora_targets("attention")
            ('to_q', 'to_k', 'to_v', 'to_out.0')
        """
        if preset not in self.lora_target_presets:
            raise UserInputError(
                f"Unknown LoRA target preset {preset!r} for the {self.name} family; "
                f"choose one of {', '.join(self.lora_target_presets)}."
            )
        return tuple(self.lora_target_presets[preset])

    def save_adapter(
        self,
        out_dir: str | os.PathLike,
        unet: nn.Module,
        text_encoders: Optional[Mapping[str, nn.Module]] = None,
        adapter_name: str = "default",
        metadata: Optional[Mapping[str, Any]] = None,
        weight_name: str = DEFAULT_WEIGHT_NAME,
    ) -> str:
        """Write the adapter of `unet` (the family's denoiser: a UNet or a transformer) and of any trained text
        encoders, by component name, as one LoRA file that `plain_pipeline_class.load_lora_weights(out_dir)`
        loads; return its path. The denoiser's keys carry its component name ("unet." or "transformer.").
        The write is atomic.

        Example:
            >>> family.save_adapter("out", unet, {"text_encoder": te, "text_encoder_2": te2})  # doctest: +SKIP
        """
        text_encoders = dict(text_encoders or {})
        unknown = sorted(set(text_encoders) - set(self.lora_text_encoder_names))
        if unknown:
            raise ValueError(
                f"The {self.name} family has no text encoder(s) {unknown} in its adapters; they hold "
                f"{list(self.lora_text_encoder_names)}."
            )
        return save_lora_weights(
            unet,
            out_dir,
            adapter_name=adapter_name,
            metadata=metadata,
            weight_name=weight_name,
            pipeline_class=self.plain_pipeline_class,
            denoiser_prefix=self.denoiser_name,
            **text_encoders,
        )


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's weights; also for a wrapped module (DDP) that has no `.device`."""
    return next(module.parameters()).device


def _vae_needs_upcast(vae_config: Mapping[str, Any], dtype: torch.dtype) -> bool:
    # A config without the key gets AutoencoderKL's default, True.
    return dtype == torch.float16 and bool(vae_config.get("force_upcast", True))


def normalize_latents(latents: torch.Tensor, vae_config: Any) -> torch.Tensor:
    """Raw VAE latents (N, C, h, w) to the denoiser's latent space (see `ModelFamily.encode_images`).

    Example:
        >>> from types import SimpleNamespace
        >>> config = SimpleNamespace(scaling_factor=2.0, shift_factor=0.5, latents_mean=None, latents_std=None)
        >>> normalize_latents(torch.ones(1, 1, 1, 1), config).item()
        1.0
    """
    scaling = float(vae_config.scaling_factor)
    mean = getattr(vae_config, "latents_mean", None)
    std = getattr(vae_config, "latents_std", None)
    if mean is not None and std is not None:
        shape = (1, -1, 1, 1)
        mean = torch.tensor(mean, dtype=latents.dtype).reshape(shape)
        std = torch.tensor(std, dtype=latents.dtype).reshape(shape)
        return (latents - mean) * scaling / std
    shift = getattr(vae_config, "shift_factor", None) or 0.0
    return (latents - shift) * scaling


__all__ = ["Components", "ModelFamily", "module_device", "normalize_latents"]
