"""The noise-norm memorization score of Wen et al. (ICLR 2024), measured on the model's own sampling trajectory.

For a prompt c, run classifier-free-guided sampling; at every step the score takes the L2 norm (over all latent
values of one sample) of the text-conditional minus the unconditional noise prediction,
||eps(x_t, c) - eps(x_t, empty)||, and averages it over the steps and over several generations. A memorized
prompt pulls every trajectory toward one training image, so its conditional prediction departs far from the
unconditional one; ordinary prompts give small differences. It needs nothing but the model.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from ..pipelines.text_to_image import initial_latents


@torch.no_grad()
def noise_norm_along_trajectory(
    unet: torch.nn.Module,
    scheduler,
    latents: torch.Tensor,
    conditional: dict[str, Any],
    unconditional: dict[str, Any],
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
) -> torch.Tensor:
    """Per-sample mean over sampling steps of ||eps(x_t, c) - eps(x_t, empty)||; shape (N,), float32 on CPU.

    `conditional` / `unconditional` are the extra UNet arguments of each branch (`encoder_hidden_states=...` for
    a text-to-image UNet, `class_labels=...` for a class-conditional UNet2DModel), each with batch size N.
    `scheduler` is set to `num_inference_steps`; the trajectory follows the guided prediction, as sampling does.
    """
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}.")
    scheduler.set_timesteps(num_inference_steps, device=latents.device)
    sample = latents * scheduler.init_noise_sigma
    total = torch.zeros(latents.shape[0], dtype=torch.float32, device=latents.device)
    both = {key: torch.cat([unconditional[key], conditional[key]]) for key in conditional}
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([sample, sample]), t)
        output = unet(model_input, t, **both)
        prediction = output.sample if hasattr(output, "sample") else output[0]
        uncond, cond = prediction.float().chunk(2)
        total += (cond - uncond).flatten(1).norm(dim=1)
        guided = uncond + guidance_scale * (cond - uncond)
        sample = scheduler.step(guided.to(sample.dtype), t, sample).prev_sample
    return (total / len(scheduler.timesteps)).cpu()


@torch.no_grad()
def noise_norm_per_prompt(
    pipe,
    prompts: Sequence[str],
    num_generations: int = 4,
    seed: int = 0,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    return_per_generation: bool = False,
):
    """The noise-norm score of each prompt for a Stable-Diffusion-style pipeline (its tokenizer, text encoder,
    UNet and scheduler), averaged over `num_generations` seeded generations. Generation i of every prompt starts
    from the same noise, so scores are paired across prompts and across models.

    Returns a list of floats (one per prompt), or with `return_per_generation` a (num_prompts, num_generations)
    tensor.

    Example:
        >>> noise_norm_per_prompt(pipe, ["a handwritten digit seven", "a handwritten digit one"])  # doctest: +SKIP
        [1.93, 0.41]
    """
    from ..pipelines.text_to_image import tokenize

    if num_generations < 1:
        raise ValueError(f"num_generations must be >= 1, got {num_generations}.")
    unet = pipe.unet
    device, dtype = unet.device, unet.dtype
    was_training = unet.training
    unet.eval()
    text_device = pipe.text_encoder.device
    empty = pipe.text_encoder(tokenize(pipe.tokenizer, [""]).to(text_device))[0].to(device, dtype)
    latents = initial_latents(pipe, num_generations, seed).to(device, dtype)
    rows = []
    for prompt in prompts:
        hidden = pipe.text_encoder(tokenize(pipe.tokenizer, [prompt]).to(text_device))[0].to(device, dtype)
        rows.append(
            noise_norm_along_trajectory(
                unet, pipe.scheduler, latents,
                {"encoder_hidden_states": hidden.expand(num_generations, -1, -1)},
                {"encoder_hidden_states": empty.expand(num_generations, -1, -1)},
                num_inference_steps, guidance_scale,
            )
        )
    unet.train(was_training)
    scores = torch.stack(rows) if rows else torch.zeros(0, num_generations)
    return scores if return_per_generation else [float(row.mean()) for row in scores]


@torch.no_grad()
def noise_norm_per_class(
    unet: torch.nn.Module,
    scheduler,
    class_labels: Sequence[int],
    num_generations: int = 4,
    seed: int = 0,
    num_inference_steps: int = 25,
    guidance_scale: float = 3.0,
    null_class_label: Optional[int] = None,
) -> list[float]:
    """The same score for a class-conditional UNet2DModel: the class label against the null label.

    Raises ValueError for an unconditional UNet (it has no conditioning to compare).
    """
    from ..pipelines.ddpm import ddim_scheduler_from, default_null_class_label

    if getattr(unet.config, "num_class_embeds", None) is None:
        raise ValueError(
            "The noise-norm score compares conditional and unconditional predictions; this UNet is unconditional. "
            "Use the memorization rate against the forget images instead."
        )
    null = default_null_class_label(unet) if null_class_label is None else null_class_label
    device, dtype = unet.device, unet.dtype
    size, channels = unet.config.sample_size, unet.config.in_channels
    noise = []
    for index in range(num_generations):
        generator = torch.Generator("cpu").manual_seed((seed * 1_000_003 + index * 7_919 + 17) % (2**63 - 1))
        noise.append(torch.randn((channels, size, size), generator=generator))
    latents = torch.stack(noise).to(device, dtype)
    sampler = ddim_scheduler_from(scheduler)
    was_training = unet.training
    unet.eval()
    scores = []
    for label in class_labels:
        labels = torch.full((num_generations,), int(label), device=device, dtype=torch.long)
        nulls = torch.full((num_generations,), int(null), device=device, dtype=torch.long)
        values = noise_norm_along_trajectory(
            unet, sampler, latents, {"class_labels": labels}, {"class_labels": nulls}, num_inference_steps, guidance_scale
        )
        scores.append(float(values.mean()))
    unet.train(was_training)
    return scores
