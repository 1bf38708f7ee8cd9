"""The noise-norm memorization score of Wen et al. (ICLR 2024), measured on the model's own sampling trajectory.

For a prompt c, run classifier-free-guided sampling; at every step the score takes the L2 norm (over all latent
values of one sample) of the text-conditional minus the unconditional noise prediction,
||eps(x_t, c) - eps(x_t, empty)||, and averages it over the steps and over several generations. A memorized
prompt pulls every trajectory toward one training image, so its conditional prediction departs far from the
unconditional one; ordinary prompts give small differences. It needs nothing but the model.

Flow-matching models (SD3.x, Flux.1) predict a velocity v, not a noise: their score is the velocity difference
||v(x, c) - v(x, empty)||, averaged the same way over the sampling steps of the pipeline's own flow-matching
scheduler, its timesteps set as the pipeline sets them (Flux's resolution-dependent shift `mu` included):
- SD3: the trajectory is the classifier-free-guided one, v_empty + s * (v_c - v_empty), the empty prompt "" encoded
  as `StableDiffusion3Pipeline` encodes its default negative prompt (no zeroing; the family's `encode_prompts`);
- Flux: a guidance-distilled checkpoint (Flux.1-dev) has no unconditional branch: the guidance scale is the value
  fed to its guidance embedding, the trajectory follows v(x, c) as `FluxPipeline` samples, and v(x, empty) is the
  EMPTY PROMPT through the same model with the same guidance embedding. The score therefore measures how far the
  prompt moves the distilled model away from what it draws for "", not a true unconditional model. A Flux
  without a guidance embedding is scored the same way, without the embedding.
Prompts are encoded by the model family (`families.get_family(...).encode_prompts`) with its default T5 length
(SD3: 77 tokens, the official training script's; Flux: 512) unless `max_sequence_length` is given. The (1 - sigma)
factor that turns a velocity difference into a noise difference at the same x_sigma is NOT applied: the score is
on the velocity, as the metric is defined for flow models in this package.

Entry point: `noise_norm_scores(pipe_or_components, prompts, ...)`. It takes a Stable-Diffusion-style pipeline (or
a mapping with its `unet`, `scheduler`, `tokenizer` and `text_encoder`), an SD3 or Flux pipeline (or a mapping of
its components), or a DDPM pipeline / mapping whose `UNet2DModel` is class-conditional, in which case the
"prompts" are class labels.
"""

from __future__ import annotations

import inspect
import operator
from functools import partial
from collections.abc import Mapping
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import torch

from ..pipelines.text_to_image import _image_seed, denoiser_of, initial_latents, vae_scale_factor

if TYPE_CHECKING:
    from ..families import FlowMatchingFamily

DEFAULT_TEXT_GUIDANCE = 7.5
DEFAULT_CLASS_GUIDANCE = 3.0


def _fresh_scheduler(scheduler):
    """A new scheduler with the same config: sampling state (timesteps, multistep history) never leaks between
    calls, and the caller's pipeline keeps its own scheduler untouched."""
    return type(scheduler).from_config(scheduler.config)


def check_first_steps(num_inference_steps: int, first_steps: Optional[int]) -> None:
    """`first_steps` must be None (every step) or 1..num_inference_steps."""
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}.")
    if first_steps is not None and not 1 <= first_steps <= num_inference_steps:
        raise ValueError(f"first_steps must be in 1..num_inference_steps ({num_inference_steps}), got {first_steps}.")


@torch.no_grad()
def noise_norm_along_trajectory(
    unet: torch.nn.Module,
    scheduler,
    latents: torch.Tensor,
    conditional: dict[str, Any],
    unconditional: dict[str, Any],
    num_inference_steps: int = 25,
    guidance_scale: float = DEFAULT_TEXT_GUIDANCE,
    generator: Optional[torch.Generator] = None,
    first_steps: Optional[int] = None,
) -> torch.Tensor:
    """Per-sample mean over sampling steps of ||eps(x_t, c) - eps(x_t, empty)||; shape (N,), float32 on CPU.

    `latents` is the initial noise (N, C, H, W) at unit variance. `conditional` / `unconditional` are the extra
    UNet arguments of each branch (`encoder_hidden_states=...` for a text-to-image UNet, `class_labels=...` for a
    class-conditional UNet2DModel), each with batch size N. Both branches go through one batched UNet call per
    step. `scheduler` is set to `num_inference_steps`; the trajectory follows the guided prediction, as sampling
    does. `generator` feeds the step noise of stochastic schedulers (ignored by DDIM, PNDM and other
    deterministic ones). `first_steps` scores only the first K steps of the `num_inference_steps` schedule and
    stops there (the cheap form: Wen et al. report that the first step already separates memorized prompts).

    Example:
        >>> score = noise_norm_along_trajectory(pipe.unet, pipe.scheduler, latents,
        ...     {"encoder_hidden_states": prompt_embeds}, {"encoder_hidden_states": empty_embeds})  # doctest: +SKIP
    """
    check_first_steps(num_inference_steps, first_steps)
    scheduler.set_timesteps(num_inference_steps, device=latents.device)
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    sample = latents * scheduler.init_noise_sigma
    total = torch.zeros(latents.shape[0], dtype=torch.float32, device=latents.device)
    both = {key: _cat_branches(unconditional[key], conditional[key]) for key in conditional}
    timesteps = scheduler.timesteps[:first_steps]
    for t in timesteps:
        model_input = scheduler.scale_model_input(torch.cat([sample, sample]), t)
        output = unet(model_input, t, **both)
        prediction = output.sample if hasattr(output, "sample") else output[0]
        uncond, cond = prediction.float().chunk(2)
        total += epsilon_difference_scale(scheduler, t) * (cond - uncond).flatten(1).norm(dim=1)
        guided = uncond + guidance_scale * (cond - uncond)
        sample = scheduler.step(guided.to(sample.dtype), t, sample, **step_kwargs).prev_sample
    return (total / len(timesteps)).cpu()


def _flow_family(pipe_or_components):
    """The flow-matching model family (SD3, Flux) of a pipeline or a mapping of its components; None otherwise.
    A mapping is recognised by its `transformer`'s class."""
    from ..families import FAMILIES, FlowMatchingFamily, family_of_pipeline

    family = None if isinstance(pipe_or_components, Mapping) else family_of_pipeline(pipe_or_components)
    if family is None:
        transformer = _component(pipe_or_components, "transformer")
        if transformer is None:
            return None
        names = {cls.__name__ for cls in type(transformer).__mro__}
        family = next((f for f in FAMILIES.values() if f.denoiser_class_name in names), None)
    return family if isinstance(family, FlowMatchingFamily) else None


def _dynamic_shift(image_seq_len: int, config, default_max_shift: float) -> float:
    """The resolution-dependent shift `mu` of a dynamically shifted flow-matching scheduler: linear in the number
    of image tokens, base_shift at base_image_seq_len and max_shift at max_image_seq_len (the scheduler config's
    values; the pipelines' fallbacks when absent)."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", default_max_shift)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * slope + base_shift - slope * base_len


def set_flow_timesteps(
    family: FlowMatchingFamily, scheduler, transformer: torch.nn.Module, num_inference_steps: int, rows: int,
    columns: int, device: Optional[torch.device] = None,
) -> None:
    """Set a flow-matching scheduler's timesteps for (rows, columns) latents as the family's pipeline does.

    Flux (`FluxPipeline`): sigmas evenly spaced from 1 to 1/steps (unless the scheduler uses its own flow sigmas)
    and the shift `mu` of the packed sequence length, (rows/2)(columns/2). SD3 (`StableDiffusion3Pipeline`): the
    scheduler's own sigmas, with `mu` of the patch count only when the scheduler shifts dynamically.

    Example:
        >>> set_flow_timesteps(get_family("flux"), scheduler, pipe.transformer, 28, 128, 128)  # doctest: +SKIP
    """
    import numpy as np

    config = scheduler.config
    if family.name == "flux":
        sigmas = None if config.get("use_flow_sigmas") else np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        mu = _dynamic_shift((rows // 2) * (columns // 2), config, 1.15)
        if sigmas is None:
            scheduler.set_timesteps(num_inference_steps, device=device, mu=mu)
        else:
            scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)
        return
    extra = {}
    if config.get("use_dynamic_shifting"):
        patch = int(transformer.config.patch_size)
        extra["mu"] = _dynamic_shift((rows // patch) * (columns // patch), config, 1.16)
    scheduler.set_timesteps(num_inference_steps, device=device, **extra)


@torch.no_grad()
def velocity_difference_along_trajectory(
    family: FlowMatchingFamily,
    transformer: torch.nn.Module,
    scheduler,
    latents: torch.Tensor,
    conditional: dict[str, torch.Tensor],
    unconditional: dict[str, torch.Tensor],
    num_inference_steps: int = 28,
    guidance_scale: float = 7.0,
    generator: Optional[torch.Generator] = None,
    first_steps: Optional[int] = None,
) -> torch.Tensor:
    """Per-sample mean over sampling steps of ||v(x, c) - v(x, empty)|| for a flow model; (N,), float32 on CPU.

    `family` is the model family (SD3 or Flux); `latents` the initial noise (N, C, H, W), UNPACKED for Flux too
    (the family's `call` packs). `conditional` / `unconditional` are the family's conditioning dicts
    (`encoder_hidden_states`, `pooled_projections` and, for a guidance-distilled Flux, `guidance`), batch N each;
    both branches run in one transformer call per step. The trajectory follows what the pipeline samples: for
    SD3 the classifier-free-guided velocity with `guidance_scale`; for Flux the conditional velocity (its
    `guidance_scale` is the embedded guidance value, already in the conditioning). `scheduler` (a
    FlowMatchEulerDiscreteScheduler) is set as the pipeline sets it (`set_flow_timesteps`). `first_steps` scores
    only the first K steps, as in `noise_norm_along_trajectory`.

    Example:
        >>> velocity_difference_along_trajectory(get_family("sd3"), pipe.transformer, scheduler, latents,
        ...     cond, uncond, num_inference_steps=28, guidance_scale=7.0)  # doctest: +SKIP
    """
    check_first_steps(num_inference_steps, first_steps)
    rows, columns = latents.shape[-2:]
    set_flow_timesteps(family, scheduler, transformer, num_inference_steps, rows, columns, latents.device)
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    classifier_free = family.name != "flux"
    sample = latents
    count = latents.shape[0]
    total = torch.zeros(count, dtype=torch.float32, device=latents.device)
    both = {key: torch.cat([unconditional[key], conditional[key]]) for key in conditional}
    timesteps = scheduler.timesteps[:first_steps]
    for t in timesteps:
        timestep = t.expand(2 * count).to(latents.device)
        prediction = family.call(transformer, torch.cat([sample, sample]), timestep, both)
        uncond, cond = prediction.float().chunk(2)
        total += (cond - uncond).flatten(1).norm(dim=1)
        velocity = uncond + guidance_scale * (cond - uncond) if classifier_free else cond
        sample = scheduler.step(velocity.to(sample.dtype), t, sample, **step_kwargs).prev_sample
    return (total / len(timesteps)).cpu()


@torch.no_grad()
def _flow_conditioning(
    family, pipe_or_components, prompts: Sequence[str], device, dtype, guidance_scale: float, batch_size: int
) -> dict[str, torch.Tensor]:
    """The family's conditioning of `prompts` (the last one is the empty prompt), in chunks of `batch_size`,
    on `device`; hidden states and pooled embeddings in `dtype`, Flux's `guidance` float32 filled with
    `guidance_scale` (as FluxPipeline feeds it)."""
    components = _component_dict(pipe_or_components)
    parts = []
    for start, stop in _chunks(len(prompts), batch_size):
        parts.append(family.encode_prompts(components, list(prompts[start:stop])))
    cond = {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
    result = {}
    for key, value in cond.items():
        if key == "guidance":
            result[key] = torch.full_like(value, float(guidance_scale), dtype=torch.float32).to(device)
        else:
            result[key] = value.to(device, dtype)
    return result


def _component_dict(pipe_or_components) -> dict:
    if isinstance(pipe_or_components, Mapping):
        return dict(pipe_or_components)
    return dict(pipe_or_components.components)


def _flow_noise_norm_per_prompt(
    family, pipe, prompts, num_generations, seed, num_inference_steps, guidance_scale, batch_size, height, width,
    max_sequence_length, first_steps=None,
) -> torch.Tensor:
    """`noise_norm_per_prompt` for SD3 and Flux: the (num_prompts, num_generations) table."""
    if max_sequence_length is not None:
        family = family.with_options(max_sequence_length=int(max_sequence_length))
    transformer, scheduler = _component(pipe, "transformer"), _component(pipe, "scheduler")
    device, dtype = transformer.device, transformer.dtype
    latents = initial_latents(pipe, num_generations, seed, height=height, width=width).to(device, dtype)
    cond = _flow_conditioning(family, pipe, list(prompts) + [""], device, dtype, guidance_scale, batch_size)
    prompt_cond = {key: value[:-1] for key, value in cond.items()}
    empty_cond = {key: value[-1:] for key, value in cond.items()}

    def condition_batch(index):
        index = index.to(device)
        return (
            {key: value[index] for key, value in prompt_cond.items()},
            {key: value.expand(len(index), *value.shape[1:]) for key, value in empty_cond.items()},
        )

    was_training = transformer.training
    transformer.eval()
    try:
        return _score_pairs(
            transformer, scheduler, latents, len(prompts), condition_batch, num_inference_steps, guidance_scale,
            seed, batch_size, trajectory=partial(velocity_difference_along_trajectory, family), first_steps=first_steps,
        )
    finally:
        transformer.train(was_training)


def _cat_branches(unconditional, conditional):
    """Both branches in one batch; nested dicts (SDXL's `added_cond_kwargs`) entry by entry."""
    if isinstance(conditional, Mapping):
        return {key: torch.cat([unconditional[key], conditional[key]]) for key in conditional}
    return torch.cat([unconditional, conditional])


def _is_sdxl(pipe_or_components) -> bool:
    """An SDXL pipeline or mapping: it has a second text encoder (`text_encoder_2`)."""
    return _component(pipe_or_components, "text_encoder_2") is not None


def _force_zeros_for_empty_prompt(pipe_or_components) -> bool:
    """SDXL's config flag (True unless the pipeline config says otherwise, as in StableDiffusionXLPipeline)."""
    config = None if isinstance(pipe_or_components, Mapping) else getattr(pipe_or_components, "config", None)
    if isinstance(pipe_or_components, Mapping) and "force_zeros_for_empty_prompt" in pipe_or_components:
        return bool(pipe_or_components["force_zeros_for_empty_prompt"])
    return bool(getattr(config, "force_zeros_for_empty_prompt", True)) if config is not None else True


@torch.no_grad()
def _sdxl_conditioning(pipe_or_components, prompts: Sequence[str], device, dtype, target_size) -> tuple[dict, dict]:
    """(conditional kwargs for all prompts, unconditional kwargs for one sample) of SDXL's UNet, as
    StableDiffusionXLPipeline builds them for guidance: the unconditional branch is zeros (hidden states and
    pooled embeddings) when `force_zeros_for_empty_prompt` is set, else the encoded empty prompt; `time_ids`
    describe an uncropped image at `target_size` in both branches."""
    from ..families import get_family

    family = get_family("sdxl")
    names = ("unet", "vae", "tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2")
    components = {name: _component(pipe_or_components, name) for name in names}
    cond = family.encode_prompts(components, list(prompts) + [""], target_size=target_size)
    cond = {key: value.to(device, dtype) for key, value in cond.items()}
    hidden, pooled, time_ids = cond["encoder_hidden_states"], cond["text_embeds"], cond["time_ids"]
    empty_hidden, empty_pooled = hidden[-1:], pooled[-1:]
    if _force_zeros_for_empty_prompt(pipe_or_components):
        empty_hidden, empty_pooled = torch.zeros_like(empty_hidden), torch.zeros_like(empty_pooled)
    conditional = {"encoder_hidden_states": hidden[:-1], "text_embeds": pooled[:-1], "time_ids": time_ids[:-1]}
    unconditional = {"encoder_hidden_states": empty_hidden, "text_embeds": empty_pooled, "time_ids": time_ids[-1:]}
    return conditional, unconditional


def epsilon_difference_scale(scheduler, timestep) -> float:
    """Factor turning a difference of two model outputs at the same x_t into the difference of their noise
    estimates: 1 for epsilon models; sqrt(alpha_bar_t) for v-prediction (eps = sigma x_t + gamma v); and
    -gamma/sigma in size for x0-prediction (eps = (x_t - gamma x0) / sigma). The score is defined on eps."""
    prediction_type = getattr(scheduler.config, "prediction_type", "epsilon")
    if prediction_type == "epsilon":
        return 1.0
    alpha_bar = float(scheduler.alphas_cumprod[int(timestep)])
    if prediction_type == "v_prediction":
        return alpha_bar ** 0.5
    if prediction_type == "sample":
        return (alpha_bar / (1.0 - alpha_bar)) ** 0.5
    raise ValueError(f"The noise-norm score does not know prediction_type {prediction_type!r}.")


def _component(pipe_or_components, name: str):
    if isinstance(pipe_or_components, Mapping):
        return pipe_or_components.get(name)
    return getattr(pipe_or_components, name, None)


def _chunks(count: int, batch_size: int):
    for start in range(0, count, batch_size):
        yield start, min(start + batch_size, count)


@torch.no_grad()
def _encode_text(pipe_or_components, prompts: Sequence[str], device, dtype, batch_size: int) -> torch.Tensor:
    """Prompt embeddings as the pipeline's sampling sees them (its `encode_prompt` when it has one), (P, L, D)."""
    encode_prompt = None if isinstance(pipe_or_components, Mapping) else getattr(pipe_or_components, "encode_prompt", None)
    tokenizer, text_encoder = _component(pipe_or_components, "tokenizer"), _component(pipe_or_components, "text_encoder")
    hidden = []
    for start, stop in _chunks(len(prompts), batch_size):
        chunk = list(prompts[start:stop])
        if encode_prompt is not None:
            embeds = encode_prompt(chunk, text_encoder.device, 1, False)[0]
        else:
            from ..pipelines.text_to_image import tokenize

            embeds = text_encoder(tokenize(tokenizer, chunk).to(text_encoder.device))[0]
        hidden.append(embeds.to(device, dtype))
    return torch.cat(hidden)


def _score_pairs(
    unet,
    scheduler,
    latents: torch.Tensor,
    num_conditions: int,
    condition_batch,
    num_inference_steps: int,
    guidance_scale: float,
    seed: int,
    batch_size: int,
    trajectory=None,
    first_steps: Optional[int] = None,
) -> torch.Tensor:
    """Scores of every (condition, generation) pair, run `batch_size` samples at a time; (num_conditions, G).

    `condition_batch(condition_index_tensor)` returns the (conditional, unconditional) UNet kwargs of a chunk.
    Generation g of every condition starts from `latents[g]`, so conditions are compared on the same noise.
    `trajectory` scores one chunk (default `noise_norm_along_trajectory`; flow models pass
    `velocity_difference_along_trajectory` bound to their family).
    """
    trajectory = trajectory or noise_norm_along_trajectory
    num_generations = latents.shape[0]
    pairs = [(c, g) for c in range(num_conditions) for g in range(num_generations)]
    scores = torch.zeros(num_conditions * num_generations)
    sampler = _fresh_scheduler(scheduler)
    for chunk_index, (start, stop) in enumerate(_chunks(len(pairs), batch_size)):
        condition_index = torch.tensor([pairs[i][0] for i in range(start, stop)])
        generation_index = torch.tensor([pairs[i][1] for i in range(start, stop)])
        conditional, unconditional = condition_batch(condition_index)
        generator = torch.Generator(latents.device).manual_seed(_image_seed(seed, 1_000_000 + chunk_index))
        scores[start:stop] = trajectory(
            unet, sampler, latents[generation_index], conditional, unconditional,
            num_inference_steps, guidance_scale, generator=generator, first_steps=first_steps,
        )
    return scores.reshape(num_conditions, num_generations)


def _check_counts(num_generations: int, batch_size: int) -> None:
    if num_generations < 1:
        raise ValueError(f"num_generations must be >= 1, got {num_generations}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")


@torch.no_grad()
def noise_norm_per_prompt(
    pipe,
    prompts: Sequence[str],
    num_generations: int = 4,
    seed: int = 0,
    num_inference_steps: int = 25,
    guidance_scale: Optional[float] = None,
    return_per_generation: bool = False,
    batch_size: int = 16,
    height: Optional[int] = None,
    width: Optional[int] = None,
    max_sequence_length: Optional[int] = None,
    first_steps: Optional[int] = None,
):
    """The noise-norm score of each prompt for a Stable-Diffusion-style pipeline (or a mapping with its `unet`,
    `scheduler`, `tokenizer` and `text_encoder`), averaged over `num_generations` seeded generations.

    For an SD3 or Flux pipeline (or a mapping of its components) the score is the velocity difference
    ||v(x, c) - v(x, "")|| along the pipeline's own flow-matching trajectory (see the module docstring; for Flux
    the empty prompt goes through the same guidance-distilled model). `guidance_scale` defaults to 7.5 for
    Stable Diffusion and to the family's pipeline default for SD3 (7.0, classifier-free) and Flux (3.5, the
    guidance embedding). `max_sequence_length` (SD3 and Flux only) is T5's padded length, default the family's.
    `first_steps` scores only the first K sampling steps (see `noise_norm_scores`).

    Generation i of every prompt starts from the same noise,
    `initial_latents(pipe, num_generations, seed, height=height, width=width)[i]`, so scores are paired across
    prompts and across models (before/after unlearning). `height` and `width` are the image size in pixels
    (default: the model's native size; a mapping needs its `vae` to size latents from pixels). `batch_size` samples (prompt
    and generation pairs, mixed across prompts) go through the UNet together, twice that with the empty-prompt
    branch. The pipeline's scheduler type is used (a fresh copy; the pipeline's own is not touched).

    Returns a list of floats (one per prompt), or with `return_per_generation` a (num_prompts, num_generations)
    float32 tensor.

    Example:
        >>> noise_norm_per_prompt(pipe, ["a handwritten digit seven", "a handwritten digit one"])  # doctest: +SKIP
        [1.93, 0.41]
    """
    _check_counts(num_generations, batch_size)
    check_first_steps(num_inference_steps, first_steps)
    prompts = list(prompts)
    unet, scheduler = _component(pipe, "unet"), _component(pipe, "scheduler")
    if _component(pipe, "text_encoder") is None or _component(pipe, "tokenizer") is None:
        raise ValueError("noise_norm_per_prompt needs a pipeline (or mapping) with `tokenizer` and `text_encoder`.")
    if not prompts:
        empty_table = torch.zeros(0, num_generations)
        return empty_table if return_per_generation else []
    flow_family = _flow_family(pipe)
    if flow_family is not None:
        if (height is not None or width is not None) and _component(pipe, "vae") is None:
            raise ValueError("Sizing latents from height/width needs the pipeline's `vae` (for its scale factor).")
        guidance = flow_family.default_guidance_scale if guidance_scale is None else float(guidance_scale)
        table = _flow_noise_norm_per_prompt(
            flow_family, pipe, prompts, num_generations, seed, num_inference_steps, guidance, batch_size, height,
            width, max_sequence_length, first_steps,
        )
        return table if return_per_generation else [float(row.mean()) for row in table]
    if max_sequence_length is not None:
        raise ValueError("max_sequence_length applies to SD3 and Flux (their T5 encoder).")
    if guidance_scale is None:
        guidance_scale = DEFAULT_TEXT_GUIDANCE
    device, dtype = unet.device, unet.dtype
    was_training = unet.training
    unet.eval()
    try:
        if (height is not None or width is not None) and _component(pipe, "vae") is None:
            raise ValueError("Sizing latents from height/width needs the pipeline's `vae` (for its scale factor).")
        latents = initial_latents(pipe, num_generations, seed, height=height, width=width).to(device, dtype)
        if _is_sdxl(pipe):
            scale = vae_scale_factor(pipe)
            target = (latents.shape[-2] * scale, latents.shape[-1] * scale)
            cond, uncond = _sdxl_conditioning(pipe, prompts, device, dtype, target)

            def condition_batch(index):
                index = index.to(device)
                added = {key: cond[key][index] for key in ("text_embeds", "time_ids")}
                empty_added = {key: uncond[key].expand(len(index), -1) for key in ("text_embeds", "time_ids")}
                return (
                    {"encoder_hidden_states": cond["encoder_hidden_states"][index], "added_cond_kwargs": added},
                    {"encoder_hidden_states": uncond["encoder_hidden_states"].expand(len(index), -1, -1),
                     "added_cond_kwargs": empty_added},
                )
        else:
            hidden = _encode_text(pipe, prompts + [""], device, dtype, batch_size)
            prompt_hidden, empty = hidden[:-1], hidden[-1:]

            def condition_batch(index):
                return (
                    {"encoder_hidden_states": prompt_hidden[index.to(device)]},
                    {"encoder_hidden_states": empty.expand(len(index), -1, -1)},
                )

        table = _score_pairs(
            unet, scheduler, latents, len(prompts), condition_batch, num_inference_steps, guidance_scale, seed,
            batch_size, first_steps=first_steps,
        )
    finally:
        unet.train(was_training)
    return table if return_per_generation else [float(row.mean()) for row in table]


def _initial_noise(unet, count: int, seed: int) -> torch.Tensor:
    """The same starting noise as `pipelines.text_to_image.initial_latents` (it reads only `pipe.unet.config`)."""
    return initial_latents(SimpleNamespace(unet=unet), count, seed)


@torch.no_grad()
def noise_norm_per_class(
    unet: torch.nn.Module,
    scheduler,
    class_labels: Sequence[int],
    num_generations: int = 4,
    seed: int = 0,
    num_inference_steps: int = 25,
    guidance_scale: float = DEFAULT_CLASS_GUIDANCE,
    null_class_label: Optional[int] = None,
    return_per_generation: bool = False,
    batch_size: int = 64,
    first_steps: Optional[int] = None,
):
    """The same score for a class-conditional UNet2DModel: each class label against the null label.

    Sampling uses DDIM built from `scheduler`'s config (as the package's DDPM sampler does). Raises ValueError for
    an unconditional UNet (it has no conditioning to compare) or a label outside the class embedding.

    Example:
        >>> noise_norm_per_class(pipe.unet, pipe.scheduler, [0, 1, 7], guidance_scale=3.0)  # doctest: +SKIP
        [0.52, 0.48, 0.97]
    """
    from ..pipelines.ddpm import ddim_scheduler_from, default_null_class_label

    _check_counts(num_generations, batch_size)
    num_classes = getattr(unet.config, "num_class_embeds", None)
    if num_classes is None:
        raise ValueError(
            "The noise-norm score compares conditional and unconditional predictions; this UNet is unconditional. "
            "Use the memorization rate against the forget images instead."
        )
    labels = [int(label) for label in class_labels]
    bad = [label for label in labels if not 0 <= label < num_classes]
    if bad:
        raise ValueError(f"Class labels {bad} are outside 0..{num_classes - 1} (the UNet's num_class_embeds).")
    if not labels:
        empty_table = torch.zeros(0, num_generations)
        return empty_table if return_per_generation else []
    null = default_null_class_label(unet) if null_class_label is None else int(null_class_label)
    device, dtype = unet.device, unet.dtype
    latents = _initial_noise(unet, num_generations, seed).to(device, dtype)
    label_tensor = torch.tensor(labels, dtype=torch.long)
    was_training = unet.training
    unet.eval()
    try:

        def condition_batch(index):
            chosen = label_tensor[index].to(device)
            return {"class_labels": chosen}, {"class_labels": torch.full_like(chosen, null)}

        table = _score_pairs(
            unet, ddim_scheduler_from(scheduler), latents, len(labels), condition_batch,
            num_inference_steps, guidance_scale, seed, batch_size, first_steps=first_steps,
        )
    finally:
        unet.train(was_training)
    return table if return_per_generation else [float(row.mean()) for row in table]


def noise_norm_scores(
    pipe_or_components,
    prompts: Sequence[Union[str, int]],
    num_generations: int = 4,
    num_inference_steps: int = 25,
    guidance_scale: Optional[float] = None,
    seed: int = 0,
    batch_size: int = 16,
    return_per_generation: bool = False,
    height: Optional[int] = None,
    width: Optional[int] = None,
    max_sequence_length: Optional[int] = None,
    first_steps: Optional[int] = None,
):
    """Noise-norm memorization score (Wen et al., ICLR 2024) of each prompt, highest for memorized prompts.

    Args:
        pipe_or_components: a text-to-image pipeline (`StableDiffusionPipeline`, `UnlearnStableDiffusionPipeline`)
            or a mapping with `unet`, `scheduler`, `tokenizer`, `text_encoder`; an SD3 or Flux pipeline (or a
            mapping of its components), scored on the velocity difference; or a DDPM pipeline / mapping
            (`unet`, `scheduler`) whose `UNet2DModel` has `num_class_embeds`.
        prompts: text prompts; class labels (ints) for a class-conditional UNet2DModel. The empty prompt "" (or the
            null class label, the last class embedding) is the unconditional branch.
        num_generations: seeded generations per prompt; generation i starts from the same noise for every prompt.
        num_inference_steps: sampling steps; the score is the mean over them.
        guidance_scale: classifier-free guidance of the trajectory (default 7.5 for text, 3.0 for class labels;
            SD3: 7.0; Flux: the guidance embedding's value, 3.5).
        seed: fixes the starting noise (and the step noise of stochastic schedulers): same seed, same scores.
        batch_size: samples per UNet call (each call runs the conditional and unconditional branch together).
        return_per_generation: return the (num_prompts, num_generations) tensor instead of per-prompt means.
        height, width: text-to-image only: the image size in pixels the trajectories run at (default: the
            model's native size, the UNet's `sample_size` times the VAE scale factor).
        max_sequence_length: SD3 and Flux only: T5's padded length (default the family's: 77 / 512).
        first_steps: score only the first K steps of the `num_inference_steps` schedule and stop the trajectory
            there: K / num_inference_steps of the cost. Wen et al. report that the first step already separates
            memorized prompts; `first_steps=1` is that cheap form (its scores are on another scale than the
            full trajectory's mean, so compare them only with each other).

    Cost: num_generations x (first_steps or num_inference_steps) denoiser evaluations of each prompt, each on
    both branches (the conditional and the empty prompt in one batch).

    Returns:
        `list[float]`, one score per prompt (L2 units of the latent; compare prompts of one model, or one prompt
        before and after unlearning), or the per-generation tensor.

    Raises:
        ValueError: for an unconditional UNet2DModel, which has no conditioning to score.

    Example:
        >>> from diffusers import StableDiffusionPipeline
        >>> pipe = StableDiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")  # doctest: +SKIP
        >>> noise_norm_scores(pipe, ["The No Limits Business Woman Podcast", "a photo of a dog"])  # doctest: +SKIP
        [5.9, 1.2]
    """
    unet = denoiser_of(pipe_or_components)
    scheduler = _component(pipe_or_components, "scheduler")
    if unet is None or scheduler is None:
        raise ValueError("noise_norm_scores needs a pipeline or mapping with a `unet` (or `transformer`) and a `scheduler`.")
    if _component(pipe_or_components, "text_encoder") is not None and _component(pipe_or_components, "tokenizer") is not None:
        bad = [p for p in prompts if not isinstance(p, str)]
        if bad:
            raise ValueError(f"A text-to-image pipeline scores text prompts; got {bad[:3]}.")
        return noise_norm_per_prompt(
            pipe_or_components, list(prompts), num_generations, seed, num_inference_steps, guidance_scale,
            return_per_generation=return_per_generation, batch_size=batch_size, height=height, width=width,
            max_sequence_length=max_sequence_length, first_steps=first_steps,
        )
    if height is not None or width is not None:
        raise ValueError("height and width apply to text-to-image pipelines; a UNet2DModel samples at its sample_size.")
    if getattr(unet.config, "num_class_embeds", None) is None:
        raise ValueError(
            "The noise-norm score compares conditional and unconditional predictions, and this UNet is "
            "unconditional (no text encoder, no num_class_embeds): there is nothing to score. Use the memorization "
            "rate against the forget images (metrics.memorization_rate) instead."
        )
    try:
        labels = [operator.index(p) for p in prompts]
    except TypeError:
        raise ValueError(
            f"A class-conditional UNet2DModel scores class labels (ints), not {[p for p in prompts][:3]}."
        ) from None
    return noise_norm_per_class(
        unet, scheduler, labels, num_generations, seed, num_inference_steps,
        DEFAULT_CLASS_GUIDANCE if guidance_scale is None else guidance_scale,
        return_per_generation=return_per_generation, batch_size=batch_size, first_steps=first_steps,
    )


def detection_auc(scores: Sequence[float], memorized: Sequence[bool]) -> float:
    """Area under the ROC curve of flagging prompts as memorized by their score (high = memorized).

    The probability that a randomly chosen known-memorized prompt scores higher than a randomly chosen other
    prompt, ties counting one half (the Mann-Whitney U statistic over both counts). 1.0: every memorized prompt
    outranks every other prompt; 0.5: the score does not tell them apart. With one memorized prompt among N it is
    (N - rank) / (N - 1) for its rank (1 = first), so it says how far down the list one must read.

    Args:
        scores: one score per prompt (`noise_norm_scores`).
        memorized: for each prompt, whether it is known to be memorized.

    Example:
        >>> detection_auc([0.9, 0.3, 0.5], [True, False, False])
        1.0
        >>> detection_auc([0.4, 0.3, 0.5], [True, False, False])   # ranked second of three
        0.5
    """
    from .likelihood import mia_auc

    if len(scores) != len(memorized):
        raise ValueError(f"detection_auc got {len(scores)} scores and {len(memorized)} memorized flags.")
    flags = [bool(flag) for flag in memorized]
    positives = [float(s) for s, flag in zip(scores, flags) if flag]
    negatives = [float(s) for s, flag in zip(scores, flags) if not flag]
    if not positives or not negatives:
        raise ValueError("detection_auc needs at least one memorized and one other prompt.")
    # mia_auc counts a low loss as a member: negate the scores so that a high score counts as memorized.
    return mia_auc(-torch.tensor(positives, dtype=torch.float64), -torch.tensor(negatives, dtype=torch.float64))
