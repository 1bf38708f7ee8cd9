"""DDPM pipelines: class-conditional sampling with classifier-free guidance, and seeded batch sampling.

`ClassConditionalDDPMPipeline` saves itself under the name `DDPMPipeline`, so its folders load
with plain diffusers (`DDPMPipeline.from_pretrained` and `DiffusionPipeline.from_pretrained`).
Plain `DDPMPipeline.__call__` passes no class labels, though: sample a class-conditional UNet
with this pipeline or with `sample_images`.
"""

from __future__ import annotations

import json
from typing import Optional, Sequence, Union

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from .mixins import UnlearningMixin

ClassLabels = Union[int, Sequence[int], torch.Tensor, None]


def default_null_class_label(unet: UNet2DModel) -> Optional[int]:
    """The label used for the unconditional branch of classifier-free guidance: the last class embedding.

    Returns `None` for an unconditional UNet (no `num_class_embeds`).
    """
    num_class_embeds = getattr(unet.config, "num_class_embeds", None)
    return None if num_class_embeds is None else int(num_class_embeds) - 1


def _as_label_tensor(class_labels: ClassLabels, batch_size: int, device: torch.device) -> Optional[torch.Tensor]:
    if class_labels is None:
        return None
    labels = torch.as_tensor(class_labels, dtype=torch.long, device=device).reshape(-1)
    if labels.numel() == 1:
        labels = labels.expand(batch_size)
    if labels.numel() != batch_size:
        raise ValueError(f"Got {labels.numel()} class labels for a batch of {batch_size}.")
    return labels


@torch.no_grad()
def denoise(
    unet: UNet2DModel,
    scheduler: SchedulerMixin,
    sample: torch.Tensor,
    num_inference_steps: int,
    class_labels: Optional[torch.Tensor] = None,
    guidance_scale: float = 1.0,
    null_class_label: Optional[int] = None,
    generator: Union[torch.Generator, list[torch.Generator], None] = None,
    eta: float = 0.0,
    progress_bar=None,
) -> torch.Tensor:
    """Run the reverse process from `sample` (pure noise) and return x_0 in the model's range.

    With class labels and `guidance_scale != 1`, each step is classifier-free guided,
    eps = eps_uncond + w * (eps_cond - eps_uncond), where eps_uncond uses `null_class_label`.
    Both branches go through one batched forward pass. The scheduler's timesteps are reset.
    """
    if class_labels is not None and getattr(unet.config, "num_class_embeds", None) is None:
        raise ValueError("class_labels were given but the UNet has no class embedding (`num_class_embeds`).")
    guided = class_labels is not None and guidance_scale != 1.0
    if guided:
        if null_class_label is None:
            null_class_label = default_null_class_label(unet)
        labels = torch.cat([torch.full_like(class_labels, null_class_label), class_labels])

    scheduler.set_timesteps(num_inference_steps, device=sample.device)
    step_kwargs = {"generator": generator}
    if isinstance(scheduler, DDIMScheduler):
        # With clip_sample, DDIM's default step combines the clipped x_0 with the unclipped epsilon.
        # Under guidance the extrapolated epsilon is large and this mismatch washes samples out
        # (toy class-conditional DDPM at w=3: classifier accuracy 0.41, against 1.00 when epsilon
        # is re-derived from the clipped x_0 as GLIDE does).
        step_kwargs.update(eta=eta, use_clipped_model_output=True)

    timesteps = scheduler.timesteps
    for t in timesteps if progress_bar is None else progress_bar(timesteps):
        model_input = scheduler.scale_model_input(sample, t)
        if guided:
            eps_uncond, eps_cond = unet(torch.cat([model_input, model_input]), t, class_labels=labels).sample.chunk(2)
            model_output = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
        else:
            model_output = unet(model_input, t, class_labels=class_labels).sample
        sample = scheduler.step(model_output, t, sample, **step_kwargs).prev_sample
    return sample


class ClassConditionalDDPMPipeline(DiffusionPipeline):
    r"""Class-conditional DDPM sampling with classifier-free guidance.

    The UNet is a `UNet2DModel` with `num_class_embeds`; its last class embedding is the null
    (unconditional) label unless `null_class_label` says otherwise. Saved folders name the
    pipeline `DDPMPipeline`, so plain diffusers loads them.

    Args:
        unet ([`UNet2DModel`]): class-conditional denoiser predicting epsilon.
        scheduler ([`SchedulerMixin`]): for example `DDPMScheduler` or, for fewer steps, `DDIMScheduler`.

    Example:
        >>> from diffusers import DDIMScheduler
        >>> from diffusers_unlearn.toy import toy_model_path
        >>> pipe = ClassConditionalDDPMPipeline.from_pretrained(toy_model_path("ddpm_class_conditional"))
        >>> pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, steps_offset=1)
        >>> images = pipe(class_labels=[0, 1, 2], guidance_scale=3.0, num_inference_steps=50).images
    """

    model_cpu_offload_seq = "unet"
    # Written as `_class_name` in model_index.json: a subclass name plain diffusers cannot resolve.
    _saved_class_name = "DDPMPipeline"

    def __init__(self, unet: UNet2DModel, scheduler: SchedulerMixin):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    def to_json_string(self) -> str:
        """The pipeline config as JSON, naming `DDPMPipeline` so that plain diffusers can load the folder."""
        config = json.loads(super().to_json_string())
        config["_class_name"] = self._saved_class_name
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    @torch.no_grad()
    def __call__(
        self,
        class_labels: ClassLabels = None,
        guidance_scale: float = 3.0,
        num_inference_steps: int = 50,
        generator: Union[torch.Generator, list[torch.Generator], None] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        null_class_label: Optional[int] = None,
        batch_size: int = 1,
        eta: float = 0.0,
    ) -> Union[ImagePipelineOutput, tuple]:
        r"""Generate one image per class label.

        Args:
            class_labels (`int`, `list[int]` or `torch.Tensor`, *optional*):
                One label per image. `None` samples unconditionally (the null label) `batch_size` images.
            guidance_scale (`float`, defaults to 3.0):
                Classifier-free guidance weight w; 1.0 disables guidance (one forward pass per step).
            num_inference_steps (`int`, defaults to 50):
                Denoising steps. With the stored `DDPMScheduler` 1000 gives the exact ancestral sampler;
                swap in a `DDIMScheduler` for good samples in 50 steps.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                Makes sampling deterministic.
            output_type (`str`, defaults to `"pil"`):
                `"pil"`, `"np"` (NHWC float in [0, 1]) or `"pt"` (NCHW tensor in [0, 1]).
            return_dict (`bool`, defaults to `True`):
                Return an [`~pipelines.ImagePipelineOutput`] instead of a tuple.
            null_class_label (`int`, *optional*):
                Label of the unconditional branch. Defaults to `unet.config.num_class_embeds - 1`.
            batch_size (`int`, defaults to 1):
                Number of images when `class_labels` is `None` or a single `int`.
            eta (`float`, defaults to 0.0):
                DDIM noise weight (ignored by other schedulers).

        Returns:
            [`~pipelines.ImagePipelineOutput`] or `tuple`: the images, in [0, 1].
        """
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}.")
        if null_class_label is None:
            null_class_label = default_null_class_label(self.unet)
        if class_labels is None:
            # Unconditional sampling: the null label, without guidance.
            class_labels, guidance_scale = null_class_label, 1.0
        if class_labels is not None and not isinstance(class_labels, int):
            batch_size = torch.as_tensor(class_labels).numel()

        device = self._execution_device
        labels = _as_label_tensor(class_labels, batch_size, device)
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (batch_size, self.unet.config.in_channels, *size)
        sample = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)

        image = denoise(
            self.unet,
            self.scheduler,
            sample,
            num_inference_steps,
            class_labels=labels,
            guidance_scale=guidance_scale,
            null_class_label=null_class_label,
            generator=generator,
            eta=eta,
            progress_bar=self.progress_bar,
        )

        image = (image / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            image = image.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                image = self.numpy_to_pil(image)
        self.maybe_free_model_hooks()

        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)


def ddim_scheduler_from(scheduler: SchedulerMixin) -> DDIMScheduler:
    """A fresh `DDIMScheduler` with the same training noise schedule as `scheduler`."""
    # steps_offset=1 silences diffusers' deprecation warning for DDIM configs.
    return DDIMScheduler.from_config(scheduler.config, steps_offset=1)


def _derived_seed(*values: int) -> int:
    # SeedSequence mixes (seed, stream, index) so that nearby seeds give unrelated streams
    # (seed + index would make seed 0's second sample equal seed 1's first).
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(1, dtype=np.uint64)[0] >> 1)


@torch.no_grad()
def sample_images(
    model: Union[DiffusionPipeline, UNet2DModel],
    scheduler: Optional[SchedulerMixin] = None,
    *,
    num_samples: int,
    batch_size: int = 256,
    seed: int = 0,
    num_inference_steps: int = 50,
    class_labels: ClassLabels = None,
    guidance_scale: float = 1.0,
    null_class_label: Optional[int] = None,
    use_ddim: bool = True,
    eta: float = 0.0,
    device: Union[str, torch.device, None] = None,
) -> torch.Tensor:
    """Draw `num_samples` images, deterministically for a seed, as a `[N, C, H, W]` tensor in [-1, 1].

    Works for unconditional UNets (`DDPMPipeline`) and class-conditional ones
    (`ClassConditionalDDPMPipeline`). Each sample's starting noise comes from its own generator
    seeded by `(seed, sample index)`, so with DDIM at `eta=0` (the default) sample i is the same
    for every `batch_size`; before/after comparisons of two models then use identical noise.

    Args:
        model: a pipeline with `unet` and `scheduler`, or a bare `UNet2DModel` (then pass `scheduler`).
        scheduler: overrides the pipeline's scheduler; its config supplies the noise schedule.
        num_samples: number of images.
        batch_size: images per forward pass (twice that with guidance).
        seed: base seed (>= 0).
        num_inference_steps: denoising steps.
        class_labels: one `int` for all samples or `num_samples` labels. `None` on a class-conditional
            UNet samples the null label (unconditional).
        guidance_scale: classifier-free guidance weight (1.0: none).
        null_class_label: defaults to `unet.config.num_class_embeds - 1`.
        use_ddim: sample with a `DDIMScheduler` built from the scheduler's config (the default);
            `False` uses the given scheduler as is.
        eta: DDIM noise weight; > 0 draws step noise from per-batch generators.
        device: defaults to the UNet's device.

    Example:
        >>> from diffusers import DDPMPipeline
        >>> pipe = DDPMPipeline.from_pretrained(toy_model_path("ddpm_unconditional"))
        >>> images = sample_images(pipe, num_samples=16, seed=0)
    """
    if isinstance(model, UNet2DModel):
        unet = model
    else:
        unet = model.unet
        scheduler = scheduler if scheduler is not None else model.scheduler
    if scheduler is None:
        raise ValueError("Pass a scheduler together with a bare UNet2DModel.")
    if seed < 0 or num_samples < 1 or batch_size < 1:
        raise ValueError(
            f"Need seed >= 0, num_samples >= 1 and batch_size >= 1; got {seed}, {num_samples}, {batch_size}."
        )
    # A fresh scheduler: set_timesteps mutates it, and the caller's pipeline stays untouched.
    scheduler = ddim_scheduler_from(scheduler) if use_ddim else type(scheduler).from_config(scheduler.config)
    device = torch.device(device) if device is not None else unet.device
    dtype = unet.dtype

    is_conditional = getattr(unet.config, "num_class_embeds", None) is not None
    if null_class_label is None:
        null_class_label = default_null_class_label(unet)
    if class_labels is None and is_conditional:
        class_labels, guidance_scale = null_class_label, 1.0
    all_labels = _as_label_tensor(class_labels, num_samples, torch.device("cpu"))

    size = unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    shape = (unet.config.in_channels, *size)

    was_training = unet.training
    unet.eval()
    images = []
    for batch_index, start in enumerate(range(0, num_samples, batch_size)):
        stop = min(start + batch_size, num_samples)
        noise = torch.stack(
            [
                torch.randn(shape, generator=torch.Generator().manual_seed(_derived_seed(seed, 0, i)))
                for i in range(start, stop)
            ]
        ).to(device=device, dtype=dtype)
        step_generator = torch.Generator(device=device).manual_seed(_derived_seed(seed, 1, batch_index))
        labels = None if all_labels is None else all_labels[start:stop].to(device)
        batch = denoise(
            unet,
            scheduler,
            noise,
            num_inference_steps,
            class_labels=labels,
            guidance_scale=guidance_scale,
            null_class_label=null_class_label,
            generator=step_generator,
            eta=eta,
        )
        images.append(batch.clamp(-1, 1).float().cpu())
    unet.train(was_training)
    return torch.cat(images)


class UnlearnDDPMPipeline(UnlearningMixin, DDPMPipeline):
    """`DDPMPipeline` that can load an unlearning adapter written by `train_unlearn_ddpm.py`.

    Saved folders name `DDPMPipeline`, so they load with plain diffusers.

    Example:
        >>> pipe = UnlearnDDPMPipeline.from_pretrained(toy_model_path("ddpm_unconditional"))
        >>> pipe.load_unlearning_adapter("unlearn-ddpm-output")        # the canary is gone
        >>> images = pipe(batch_size=16, num_inference_steps=50).images
        >>> pipe.set_unlearning_strength(0.0)                            # the original model again
    """

    _saved_class_name = "DDPMPipeline"
