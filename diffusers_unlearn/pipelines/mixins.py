"""`UnlearningMixin`: attach, weigh and inspect unlearning adapters on a diffusers pipeline.

A small class added by multiple inheritance, in the manner of diffusers' own loader mixins: it
delegates to the pipeline's denoiser, its `unet` (DDPM, SD, SDXL) or its `transformer` (SD3, Flux; the model
family's `denoiser_name`). A pipeline that uses it still saves a folder that plain
diffusers loads, because the saved `_class_name` is the base class's.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Optional, Sequence

import torch

from ..lora import DEFAULT_WEIGHT_NAME, as_plain_unet, load_lora_weights, read_lora_metadata

logger = logging.getLogger(__name__)


def _resolve_adapter_file(path_or_repo: str, weight_name: str, token: Optional[str] = None) -> str:
    """A local file or folder, or a Hub repo id (downloaded; only the safetensors file)."""
    if os.path.isfile(path_or_repo):
        return path_or_repo
    if os.path.isdir(path_or_repo):
        path = os.path.join(path_or_repo, weight_name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No {weight_name} in {path_or_repo}.")
        return path
    from huggingface_hub import hf_hub_download

    return hf_hub_download(path_or_repo, weight_name, token=token)


def _has_pipeline_prefixes(path: str, denoiser_name: str = "unet") -> bool:
    """True unless the file is a bare PEFT state dict (keys such as `down_blocks.0...lora_A.weight`, no component
    prefix), which diffusers' pipeline loader would skip without an error. `denoiser_name` is the denoiser's key
    prefix ("unet", or "transformer" for SD3 and Flux)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt", device="cpu") as handle:
        keys = list(handle.keys())
    bare = all(".lora_A." in k or ".lora_B." in k or ".lora_magnitude_vector" in k for k in keys) and not any(
        k.startswith((f"{denoiser_name}.", "text_encoder.")) for k in keys
    )
    return not bare


class UnlearningMixin:
    """Adds `load_unlearning_adapter`, `set_unlearning_strength`, `memorization_score` and `unlearn` to a
    pipeline with a denoiser (a DDPM pipeline, or a text-to-image pipeline with `text_encoder` and `tokenizer`).
    The denoiser is the component named by the pipeline's model family (`denoiser_name`: "unet", or
    "transformer" for SD3 and Flux); a pipeline no family serves (DDPM) uses its `unet`.

    Subclasses set `_saved_class_name` to the plain diffusers pipeline they extend.
    """

    _saved_class_name: str = ""

    @property
    def _denoiser_name(self) -> str:
        """The denoiser's component name (and LoRA key prefix): "unet", or "transformer" for SD3 and Flux."""
        from ..families import family_of_pipeline

        family = family_of_pipeline(self)
        return family.denoiser_name if family is not None else "unet"

    @property
    def _denoiser(self) -> torch.nn.Module:
        return getattr(self, self._denoiser_name)

    def to_json_string(self) -> str:
        """The pipeline config, naming the plain diffusers class so the saved folder loads without this package."""
        config = json.loads(super().to_json_string())
        if self._saved_class_name:
            config["_class_name"] = self._saved_class_name
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save the pipeline; refuses while an adapter is attached (diffusers would write the adapter's
        layers into the base checkpoint, which plain diffusers cannot load)."""
        if self.unlearning_adapters:
            raise ValueError(
                f"Adapters {self.unlearning_adapters} are attached. Call pipe.{self._denoiser_name}.fuse_lora() and "
                f"pipe.{self._denoiser_name}.unload_lora() to save a merged model, or save the adapter on its own with "
                "diffusers_unlearn.lora.save_lora_weights."
            )
        from diffusers import UNet2DModel

        if isinstance(getattr(self, "unet", None), UNet2DModel):
            self.unet = as_plain_unet(self.unet)  # the config must name UNet2DModel, not our subclass
        return super().save_pretrained(save_directory, *args, **kwargs)

    def load_unlearning_adapter(
        self,
        path_or_repo: str,
        adapter_name: Optional[str] = None,
        strength: float = 1.0,
        weight_name: str = DEFAULT_WEIGHT_NAME,
        token: Optional[str] = None,
    ) -> str:
        """Load an adapter written by the training scripts and activate it at `strength`.

        `path_or_repo` is a folder, a `.safetensors` file or a Hub repo id. The adapter name
        defaults to the unlearning method stored in the file (for example "siss").
        Returns the adapter name.

        For a Stable Diffusion pipeline the file is in diffusers' pipeline LoRA format (`unet.`-prefixed keys, or
        `transformer.`-prefixed ones for SD3 and Flux, and `text_encoder.` ones if the text encoder was trained),
        as written by `StableDiffusionPipeline.save_lora_weights`, `diffusers_unlearn.lora.save_lora_weights`,
        `save_unlearning_adapter` and `train_unlearn_sd.py`; it goes through the pipeline's own
        `load_lora_weights`. A bare PEFT file from `unet.save_lora_adapter` (no prefix) loads into the UNet.
        Keys that match no layer raise `ValueError` (diffusers would only warn) and leave the pipeline unchanged.

        Example:
            >>> pipe = UnlearnDDPMPipeline.from_pretrained(toy_model_path("ddpm_unconditional"))
            >>> name = pipe.load_unlearning_adapter("unlearn-ddpm-output")
            >>> pipe.set_unlearning_strength(0.5)   # halfway between the base and the unlearned model

            >>> sd = UnlearnStableDiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
            >>> sd.load_unlearning_adapter("unlearn-sd-output", adapter_name="forget-podcast")
            'forget-podcast'
        """
        path = _resolve_adapter_file(path_or_repo, weight_name, token)
        name = self._denoiser_name
        metadata = read_lora_metadata(path, denoiser_prefix=name)
        adapter_name = adapter_name or str(metadata.get("method", "unlearning"))
        if adapter_name in (getattr(self._denoiser, "peft_config", None) or {}):
            raise ValueError(f"The pipeline already has an adapter named {adapter_name!r}; pass another adapter_name.")
        if self._is_text_to_image and _has_pipeline_prefixes(path, name):
            # diffusers' own loader: it also restores a text-encoder adapter stored in the same file, and it
            # converts other published formats. It only warns when keys match no layer, so check afterwards.
            self.load_lora_weights(os.path.dirname(path), weight_name=os.path.basename(path), adapter_name=adapter_name)
            self._check_pipeline_adapter_loaded(path, adapter_name)
        else:
            # A DDPM pipeline, or a bare PEFT file (`unet.save_lora_adapter`) without the `unet.` prefix, which the
            # pipeline loader would silently skip. Our loader takes both layouts and fails on unmatched keys.
            setattr(self, name, load_lora_weights(self._denoiser, path, adapter_name=adapter_name, denoiser_prefix=name))
        self._denoiser.requires_grad_(False)
        self._denoiser.eval()
        self.set_unlearning_strength(strength, adapter_name)
        return adapter_name

    def _check_pipeline_adapter_loaded(self, path: str, adapter_name: str) -> None:
        """Raise (and remove the partial adapter) when the denoiser's part of a pipeline LoRA file did not fully load."""
        from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft
        from safetensors import safe_open

        from ..lora import lora_state_dict

        prefix = self._denoiser_name
        with safe_open(path, framework="pt", device="cpu") as handle:
            unet_keys = [k.removeprefix(f"{prefix}.") for k in handle.keys() if k.startswith(f"{prefix}.")]
        if not unet_keys:
            if adapter_name not in self.unlearning_adapters and not self._text_encoder_has(adapter_name):
                raise ValueError(f"{path!r} holds no LoRA weights for this pipeline's {prefix} or text encoder.")
            return
        expected = set(convert_unet_state_dict_to_peft(dict.fromkeys(unet_keys)).keys())
        loaded = set(lora_state_dict(self._denoiser, adapter_name).keys()) if adapter_name in self.unlearning_adapters else set()
        missing = sorted(expected - loaded)
        if missing:
            try:
                self.delete_adapters(adapter_name)  # leave the pipeline as it was, not half adapted
            except Exception:  # noqa: BLE001 - best effort; the error below is what matters
                pass
            raise ValueError(
                f"{len(missing)} LoRA weights in {path!r} match no layer of the pipeline's "
                f"{type(self._denoiser).__name__}, for example {missing[:3]}. Is this adapter for a different model?"
            )

    def _text_encoder_has(self, adapter_name: str) -> bool:
        text_encoder = getattr(self, "text_encoder", None)
        return adapter_name in (getattr(text_encoder, "peft_config", None) or {})

    @property
    def unlearning_adapters(self) -> list[str]:
        """The names of the adapters attached to the denoiser, sorted."""
        return sorted(getattr(self._denoiser, "peft_config", None) or {})

    def set_unlearning_strength(self, strength: float, adapter_name: Optional[str] = None) -> None:
        """Scale an adapter's effect: 0 is the base model, 1 the unlearned model (built on `set_adapters`)."""
        adapters = self.unlearning_adapters
        if not adapters:
            raise ValueError("No unlearning adapter is loaded; call load_unlearning_adapter first.")
        if adapter_name is None:
            if len(adapters) > 1:
                raise ValueError(f"Several adapters are loaded ({adapters}); name one.")
            adapter_name = adapters[0]
        if adapter_name not in adapters:
            raise ValueError(f"No adapter named {adapter_name!r}; loaded: {adapters}.")
        if self._is_text_to_image:
            self.set_adapters([adapter_name], adapter_weights=[float(strength)])  # denoiser and text encoder alike
        else:
            self._denoiser.set_adapters([adapter_name], weights=[float(strength)])

    @property
    def _is_text_to_image(self) -> bool:
        return getattr(self, "text_encoder", None) is not None and getattr(self, "tokenizer", None) is not None

    def memorization_score(
        self,
        prompts: Sequence,
        num_generations: int = 4,
        num_inference_steps: int = 25,
        guidance_scale: Optional[float] = None,
        seed: int = 0,
        batch_size: int = 16,
        return_per_generation: bool = False,
        height: Optional[int] = None,
        width: Optional[int] = None,
        copy_detector=None,
    ):
        """The noise-norm memorization score (Wen et al., ICLR 2024) of each prompt: the mean over the sampling
        steps of ||eps(x_t, prompt) - eps(x_t, "")||, averaged over `num_generations` seeded generations. High for
        prompts whose generations collapse onto a training image; compare prompts of one model, or a prompt before
        and after `load_unlearning_adapter` / `set_unlearning_strength` (the same seed gives the same noise).

        For a Stable Diffusion pipeline `guidance_scale` defaults to 7.5; SD3 and Flux score the velocity
        difference ||v(x, prompt) - v(x, "")|| with their own pipeline defaults (SD3: classifier-free guidance 7.0;
        Flux: the guidance embedding 3.5, the empty prompt through the same guidance-distilled model). For a class-conditional DDPM the "prompts"
        are class labels, scored against the null label with guidance 3.0 by default; an unconditional DDPM has
        nothing to score and raises ValueError. `height` and `width` (text-to-image only) are the image size in
        pixels the trajectories run at; they default to the model's native size, as the pipeline's own call does.
        See `diffusers_unlearn.metrics.noise_norm_scores`.

        With `copy_detector` (a `metrics.copy_detection.CopyDetector`, e.g. `load_copy_detector("pixel", 2.0)`;
        text-to-image only), the score is instead the cluster check: the fraction of the `num_generations` seeded
        generations of each prompt that fall in their largest group of mutual copies (1/num_generations when no
        two are copies, 1 when all are), the same check as `python -m diffusers_unlearn.scan
        --num_cluster_generations` and `train_unlearn_sd.py --memorized_prompts_file`.

        Example:
            >>> pipe = UnlearnStableDiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
            >>> pipe.memorization_score(["The No Limits Business Woman Podcast", "a photo of a dog"])  # doctest: +SKIP
            [5.9, 1.2]
            >>> pipe.load_unlearning_adapter("unlearn-sd-output")
            >>> pipe.memorization_score(["The No Limits Business Woman Podcast"])  # doctest: +SKIP
            [1.4]
            >>> ddpm = UnlearnDDPMPipeline.from_pretrained(toy_model_path("ddpm_class_conditional"))
            >>> ddpm.memorization_score([0, 1, 2])  # class labels  # doctest: +SKIP
        """
        from ..metrics.noise_norm import noise_norm_scores

        if copy_detector is not None:
            from ..metrics.copy_detection import generation_cluster_fractions

            if not self._is_text_to_image or return_per_generation:
                raise ValueError("memorization_score(copy_detector=...) scores text-to-image prompts, one number each.")
            with _autocast_for(self._denoiser):
                return generation_cluster_fractions(
                    self, list(prompts), copy_detector, num_generations=num_generations, seed=seed,
                    num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, batch_size=batch_size,
                    height=height, width=width,
                )
        return noise_norm_scores(
            self, list(prompts), num_generations=num_generations, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, seed=seed, batch_size=batch_size, return_per_generation=return_per_generation,
            height=height, width=width,
        )

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
        anchor_prompt: Optional[str] = None,
        num_anchor_generations: int = 32,
        **hyperparameters,
    ) -> str:
        """Train an unlearning adapter in process and attach it (strength 1); returns the adapter name.

        Runs `diffusers_unlearn.training.train_adapter`, the loop of the training scripts. For a text-to-image
        pipeline `forget` (and `keep`) are `(image, prompt)` pairs, images as PIL or [-1, 1] tensors (C, H, W);
        without `keep`, `keep_from_generations` images per forget prompt are generated and those farther than
        `memorization_threshold` (pixel L2 in [0, 1] units; default an RMS difference of 0.1) from every forget
        image (and from every generation already rejected, see `data.filter_far_from`) form the keep set. A
        near-copy that slips into the keep set teaches the model to keep what it should forget. `resolution` is the
        square image size in pixels the text-to-image adapter trains and generates at (default: the model's
        native size); PIL images are resized to it and tensors must have it. A pipeline loaded in bfloat16 (or
        float16) keeps its weights so; the adapter trains in float32 under autocast. For a DDPM pipeline `forget` and `keep` are image tensors (N, C, H, W) in [-1, 1].
        `copy_detector` (`metrics.copy_detection.load_copy_detector(...)`) replaces the pixel threshold in the
        keep-from-generations filter, for example with DINOv2 features and a cosine-similarity threshold.
        `anchor_prompt` (text-to-image only; `""` is the unconditional model) adds `num_anchor_generations` of its
        generations that are no forget copy to the keep set under every forget prompt: what the forget prompts draw
        instead, needed when every generation of a forget prompt is a copy (`train_unlearn_sd.py --anchor_prompt`).
        `hyperparameters` go to the method (for example `scaling_norm=0.5` for SISS).

        Example:
            >>> pipe = UnlearnStableDiffusionPipeline.from_pretrained(toy_model_path("sd_tiny"))
            >>> canary_image = canary_forget_set().images[0]  # from diffusers_unlearn.toy.text_to_image
            >>> pipe.unlearn(forget=[(canary_image, "a handwritten digit seven")], max_train_steps=200,
            ...              learning_rate=2e-3, lora_targets="conv", keep_from_generations=64,
            ...              memorization_threshold=SD_MEMORIZATION_THRESHOLD)
            'siss'
            >>> from diffusers_unlearn.lora import save_lora_weights
            >>> save_lora_weights(pipe.unet, "forget-canary", adapter_name="siss")  # a file plain diffusers loads
        """
        from ..noise import NoiseSchedule
        from ..training import train_adapter
        from ..unlearner import BatchPool

        adapter_name = adapter_name or method
        if adapter_name in self.unlearning_adapters:
            raise ValueError(f"The pipeline already has an adapter named {adapter_name!r}; pass another adapter_name.")
        schedule = NoiseSchedule.from_scheduler(self.scheduler)
        if self._is_text_to_image:
            from ..data import filter_far_from
            from .text_to_image import encode_latents, encode_prompts, generate_images, latent_size, tokenize

            if resolution is None:
                resolution = latent_size(self)[0] * self.vae_scale_factor
            latent_size(self, resolution, resolution)  # a multiple of the VAE scale factor
            channels = self.vae.config.in_channels
            forget_images, forget_prompts = _pairs(forget, resolution, channels, "forget")
            threshold = memorization_threshold or 0.1 * (channels * resolution * resolution) ** 0.5
            prompts = list(dict.fromkeys(forget_prompts))
            with_anchor = anchor_prompt is not None and num_anchor_generations > 0
            if keep is None:
                with _autocast_for(self.unet):
                    generations = generate_images(self, prompts, keep_from_generations, seed=seed + 1, height=resolution, width=resolution)
                keep_images, kept_prompts = _keep_far_generations(prompts, generations, forget_images, forget_prompts, threshold, copy_detector, allow_empty=with_anchor)
            else:
                keep_images, kept_prompts = _pairs(keep, resolution, channels, "keep")
            if with_anchor:
                with _autocast_for(self.unet):
                    anchors = generate_images(self, [anchor_prompt], num_anchor_generations, seed=seed + 3, height=resolution, width=resolution)[0]
                far, near = filter_far_from(anchors, forget_images, threshold, copy_detector=copy_detector)
                logger.info(f"anchor_prompt {anchor_prompt!r}: {len(far)} generation(s) kept, {len(near)} rejected as forget copies.")
                if not len(far):
                    raise ValueError(f"Every generation of anchor_prompt {anchor_prompt!r} is a forget copy: choose another anchor prompt.")
                keep_images = torch.cat([keep_images.to(far.device, far.dtype)] + [far] * len(prompts))
                kept_prompts = kept_prompts + [prompt for prompt in prompts for _ in range(len(far))]

            def pool(images, prompts):
                latents = encode_latents(self.vae, images)
                hidden = encode_prompts(self.text_encoder, tokenize(self.tokenizer, prompts))
                return BatchPool(latents.to(self.unet.device), encoder_hidden_states=hidden.to(self.unet.device))

            forget_pool, keep_pool = pool(forget_images, forget_prompts), pool(keep_images, kept_prompts)
            targets = lora_targets or "attention"
        else:
            if anchor_prompt is not None:
                raise ValueError("anchor_prompt applies to text-to-image pipelines; an unconditional DDPM has no prompt to anchor.")
            forget_pool = BatchPool(torch.as_tensor(forget).float().to(self.unet.device))
            keep_pool = None if keep is None else BatchPool(torch.as_tensor(keep).float().to(self.unet.device))
            targets = lora_targets or "attention_conv"
        self.unet, _ = train_adapter(
            self.unet, schedule, forget_pool, keep_pool, method=method, hyperparameters=hyperparameters,
            max_train_steps=max_train_steps, train_batch_size=train_batch_size, learning_rate=learning_rate,
            rank=rank, lora_targets=targets, adapter_name=adapter_name, seed=seed,
        )
        self.unet.eval()
        self.set_unlearning_strength(1.0, adapter_name)
        return adapter_name


def _keep_far_generations(
    prompts: list[str], generations: list[torch.Tensor], forget_images: torch.Tensor, forget_prompts: list[str],
    threshold: float,
    copy_detector=None,
    allow_empty: bool = False,
) -> tuple[torch.Tensor, list[str]]:
    """unlearn()'s keep set from generations: per prompt, the generations farther than `threshold` from that
    prompt's forget images (and from every generation already rejected), or not copies of them by
    `copy_detector` when one is given; returns (images, prompts)."""
    from ..data import filter_far_from

    kept, kept_prompts = [], []
    for prompt, images in zip(prompts, generations):
        own = forget_images[[i for i, p in enumerate(forget_prompts) if p == prompt]]
        far, near = filter_far_from(images, own, threshold, copy_detector=copy_detector)
        logger.info(f"keep_from_generations, {prompt!r}: {len(far)} generation(s) kept, {len(near)} rejected as forget copies.")
        kept.append(far)
        kept_prompts += [prompt] * len(far)
    if not kept_prompts and not allow_empty:  # allow_empty: anchor generations follow
        raise ValueError("Every generation is close to a forget image: the keep set is empty. Pass keep=, anchor_prompt=, or raise keep_from_generations.")
    return torch.cat(kept), kept_prompts


def _autocast_for(model: torch.nn.Module):
    """Autocast in the model's dtype when it is half precision (a bfloat16 pipeline with a float32 adapter),
    else nothing: float32 results stay bit for bit as they were."""
    import contextlib

    dtype = model.dtype
    if dtype in (torch.float16, torch.bfloat16):
        return torch.autocast(model.device.type, dtype=dtype)
    return contextlib.nullcontext()


def _pairs(items, resolution: int, channels: int, what: str) -> tuple[torch.Tensor, list[str]]:
    """(image, prompt) pairs -> images (N, C, H, W) in [-1, 1] at the pipeline's resolution, and prompts."""
    from PIL import Image

    from ..data import _to_tensor

    images, prompts = [], []
    for index, pair in enumerate(items):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[1], str) and pair[1].strip()):
            raise ValueError(f"{what}[{index}] must be an (image, prompt) pair with a non-empty prompt.")
        image, prompt = pair
        if isinstance(image, Image.Image):
            image = _to_tensor(image, resolution, channels, f"{what}[{index}]", [])
        image = torch.as_tensor(image).float()
        if image.shape != (channels, resolution, resolution):
            raise ValueError(
                f"{what}[{index}] has shape {tuple(image.shape)}; expected {(channels, resolution, resolution)} "
                "(pass resolution= to train at another square size)."
            )
        images.append(image)
        prompts.append(prompt.strip())
    if not images:
        raise ValueError(f"{what} is empty.")
    return torch.stack(images), prompts
