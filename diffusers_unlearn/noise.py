"""Noise-schedule quantities, prediction-type conversions and the per-sample denoising loss.

The forward process is

    x_t = gamma_t * x_0 + sigma_t * eps,   gamma_t = sqrt(alpha_bar_t),  sigma_t = sqrt(1 - alpha_bar_t)

for DDPM-trained models (`NoiseSchedule`), and gamma_t = 1 - sigma_t for rectified-flow models (SD3, Flux:
`FlowMatchSchedule`, which predicts the velocity eps - x_0). The objectives only use gamma_t, sigma_t, `target`,
`to_epsilon` and `sample_timesteps`, so both run every method unchanged. Integer timesteps index the schedule's
grid with the noise growing with the index; `model_timesteps` turns them into what the model is called with.

Losses are taken in a *loss space*: "native" (the default) regresses the model's own output onto a target of
its own prediction type (epsilon, v or x_0), which makes a plain fine-tuning loss exactly the model's official
training loss; "epsilon" converts every output to a noise estimate first, which weights each timestep by
gamma_t^2 relative to the v-loss of a v-prediction model. Targets are built from the noisy input and the clean
item (`target`), and the prediction is never converted in native space.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
LOSS_SPACES = ("native", "epsilon")


def check_loss_space(loss_space: str) -> str:
    if loss_space not in LOSS_SPACES:
        raise ValueError(f"Unknown loss_space {loss_space!r}; expected one of {LOSS_SPACES}.")
    return loss_space


@dataclass
class NoiseSchedule:
    """gamma_t and sigma_t for every training timestep of a diffusers scheduler.

    Example:
        >>> from diffusers import DDPMScheduler
        >>> schedule = NoiseSchedule.from_scheduler(DDPMScheduler(num_train_timesteps=1000))
        >>> schedule.num_train_timesteps
        1000
    """

    alphas_cumprod: torch.Tensor
    prediction_type: str = "epsilon"

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"Unknown prediction_type {self.prediction_type!r}; expected one of {PREDICTION_TYPES}."
            )
        self.alphas_cumprod = self.alphas_cumprod.detach().to(torch.float64)
        self.gamma = self.alphas_cumprod.sqrt()
        self.sigma = (1.0 - self.alphas_cumprod).sqrt()

    @classmethod
    def from_scheduler(cls, scheduler, prediction_type: Optional[str] = None) -> "NoiseSchedule":
        """Read `alphas_cumprod` (and `prediction_type`, unless given) from any diffusers scheduler."""
        if not hasattr(scheduler, "alphas_cumprod"):
            raise ValueError(
                f"{type(scheduler).__name__} has no `alphas_cumprod`; use a DDPM/DDIM-style scheduler "
                "(for example DDPMScheduler.from_pretrained(model_dir, subfolder='scheduler'))."
            )
        if prediction_type is None:
            prediction_type = getattr(scheduler.config, "prediction_type", "epsilon")
        return cls(torch.as_tensor(scheduler.alphas_cumprod), prediction_type)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def coefficients(self, timesteps: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """gamma_t and sigma_t for a batch of timesteps, shaped to broadcast against `like`."""
        index = timesteps.to(self.gamma.device, torch.long)
        shape = (-1,) + (1,) * (like.ndim - 1)
        gamma = self.gamma[index].to(like.device, like.dtype).reshape(shape)
        sigma = self.sigma[index].to(like.device, like.dtype).reshape(shape)
        return gamma, sigma

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        gamma, sigma = self.coefficients(timesteps, x0)
        return gamma * x0 + sigma * noise

    def model_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The timesteps the model is called with for grid indices `timesteps` (DDPM: the indices themselves)."""
        return timesteps

    def loss_weights(self, timesteps: torch.Tensor) -> Optional[torch.Tensor]:
        """Per-timestep weights of the training loss (None: unweighted, the DDPM scripts' default)."""
        return None

    def to_sample(self, model_output: torch.Tensor, x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The clean-input estimate x_0 implied by a model output of this schedule's prediction type."""
        if self.prediction_type == "sample":
            return model_output
        gamma, sigma = self.coefficients(timesteps, x_t)
        if self.prediction_type == "v_prediction":
            return gamma * x_t - sigma * model_output
        return (x_t - sigma * model_output) / gamma

    def checked_range(self, timestep_range: Optional[tuple[int, int]]) -> tuple[int, int]:
        """(low, high) of a timestep range (the whole grid for None); ValueError outside the grid."""
        low, high = timestep_range if timestep_range is not None else (0, self.num_train_timesteps)
        if not 0 <= low < high <= self.num_train_timesteps:
            raise ValueError(
                f"timestep_range {(low, high)} must satisfy 0 <= low < high <= {self.num_train_timesteps}."
            )
        return low, high

    def sample_timesteps(
        self,
        batch_size: int,
        device: torch.device,
        generator: Optional[torch.Generator] = None,
        timestep_range: Optional[tuple[int, int]] = None,
    ) -> torch.Tensor:
        """Uniform timesteps in [low, high) (the whole schedule by default)."""
        low, high = self.checked_range(timestep_range)
        gen_device = generator.device if generator is not None else "cpu"
        t = torch.randint(low, high, (batch_size,), generator=generator, device=gen_device)
        return t.to(device)

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) = gamma_t^2 / sigma_t^2 per timestep (float64)."""
        index = timesteps.to(self.gamma.device, torch.long)
        return (self.gamma[index] / self.sigma[index]).pow(2).to(timesteps.device)

    def min_snr_weights(self, timesteps: torch.Tensor, snr_gamma: float, space: str) -> torch.Tensor:
        """Min-SNR-gamma loss weights (Hang et al., 2023) for per-sample losses taken in `space` (a prediction
        type), in float32.

        The weight is min(SNR_t, gamma) for an x_0 loss; an epsilon loss is SNR_t times the x_0 loss and a v loss
        (SNR_t + 1) times it, so the same weighting reads min(SNR_t, gamma) / SNR_t and
        min(SNR_t, gamma) / (SNR_t + 1) there, which is what diffusers' train_text_to_image_lora.py applies for
        its epsilon and v_prediction models (`--snr_gamma`). Where SNR_t = 0 (a zero-terminal-SNR schedule) the
        epsilon weight is its limit, 1.

        Example:
            >>> schedule = NoiseSchedule(torch.tensor([0.9, 0.5, 0.1]))
            >>> schedule.min_snr_weights(torch.tensor([0, 2]), 5.0, "epsilon")   # SNR 9 and 1/9
            tensor([0.5556, 1.0000])
        """
        if space not in PREDICTION_TYPES:
            raise ValueError(f"Unknown loss space {space!r}; expected one of {PREDICTION_TYPES}.")
        snr = self.snr(timesteps)
        clipped = torch.clamp(snr, max=float(snr_gamma))
        if space == "epsilon":
            weights = torch.where(snr > 0, clipped / snr.clamp_min(torch.finfo(snr.dtype).tiny), torch.ones_like(snr))
        elif space == "v_prediction":
            weights = clipped / (snr + 1)
        else:
            weights = clipped
        return weights.float()

    def to_epsilon(
        self, model_output: torch.Tensor, x_t: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """Convert a model output of this schedule's prediction type to a noise estimate."""
        if self.prediction_type == "epsilon":
            return model_output
        gamma, sigma = self.coefficients(timesteps, x_t)
        if self.prediction_type == "v_prediction":
            # v = gamma * eps - sigma * x0 and x_t = gamma * x0 + sigma * eps  =>  eps = sigma * x_t + gamma * v
            return sigma * x_t + gamma * model_output
        # sample prediction: the output is x0
        return (x_t - gamma * model_output) / sigma

    def epsilon_to_prediction(
        self, epsilon: torch.Tensor, x_t: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """The inverse of `to_epsilon`: what a model of this prediction type should output."""
        if self.prediction_type == "epsilon":
            return epsilon
        gamma, sigma = self.coefficients(timesteps, x_t)
        if self.prediction_type == "v_prediction":
            return (epsilon - sigma * x_t) / gamma
        return (x_t - sigma * epsilon) / gamma

    def target(
        self, x_t: torch.Tensor, x0: torch.Tensor, timesteps: torch.Tensor, loss_space: str = "native"
    ) -> torch.Tensor:
        """What the model should output at `x_t` if `x_t` was made from the clean item `x0`, in `loss_space`.

        Built from (x_t, x0) directly, without dividing by gamma_t: epsilon = (x_t - gamma x0) / sigma,
        v = gamma eps - sigma x0 = (gamma x_t - x0) / sigma, sample = x0. Taken in float32 at least.

        Example:
            >>> schedule = NoiseSchedule(torch.linspace(0.99, 0.01, 10), "v_prediction")
            >>> x0, eps, t = torch.zeros(1, 2), torch.ones(1, 2), torch.tensor([5])
            >>> torch.allclose(schedule.target(schedule.add_noise(x0, eps, t), x0, t), schedule.gamma[5].float() * eps)
            True
        """
        check_loss_space(loss_space)
        dtype = torch.promote_types(x_t.dtype, torch.float32)
        x_t, x0 = x_t.to(dtype), x0.to(dtype)
        gamma, sigma = self.coefficients(timesteps, x_t)
        kind = "epsilon" if loss_space == "epsilon" else self.prediction_type
        if kind == "epsilon":
            return (x_t - gamma * x0) / sigma
        if kind == "v_prediction":
            return (gamma * x_t - x0) / sigma
        return x0

    def output_in_space(
        self, model_output: torch.Tensor, x_t: torch.Tensor, timesteps: torch.Tensor, loss_space: str = "native"
    ) -> torch.Tensor:
        """The model output as compared in `loss_space`: unchanged in native space, a noise estimate in epsilon."""
        check_loss_space(loss_space)
        return model_output if loss_space == "native" else self.to_epsilon(model_output, x_t, timesteps)


FLOW_PREDICTION = "flow_prediction"
WEIGHTING_SCHEMES = ("none", "sigma_sqrt", "logit_normal", "mode", "cosmap")


class FlowMatchSchedule(NoiseSchedule):
    """The rectified-flow forward process of SD3 and Flux: x_sigma = (1 - sigma) x_0 + sigma eps, and the model
    predicts the velocity v = eps - x_0 ("flow_prediction"), as diffusers' `FlowMatchEulerDiscreteScheduler`.

    So gamma = 1 - sigma and every objective runs unchanged (SISS's q(m|y) = N((1 - sigma) y, sigma^2 I)).
    The grid is the scheduler's training sigmas (its shift applied, as the official SD3/Flux scripts read them),
    ordered so that the noise grows with the index: index i has sigma = `sigmas[i]` and the model gets timestep
    `sigmas[i] * num_train_timesteps` (the scheduler's `timesteps`).

    Timesteps are drawn as train_dreambooth_lora_sd3.py / _flux.py draw them (`--weighting_scheme`,
    `--logit_mean`, `--logit_std`, `--mode_scale`: u from a logit-normal, "mode" or uniform density, then the
    scheduler index floor(u * T)); `loss_weights` is their `compute_loss_weighting_for_sd3` ("sigma_sqrt":
    sigma^-2, "cosmap": 2 / (pi (1 - 2 sigma + 2 sigma^2)), otherwise 1). With `precondition_outputs` (SD3's
    option) the native loss compares x_0 estimates, x_sigma - sigma v, with x_0.

    `alphas_cumprod` holds gamma^2 / (gamma^2 + sigma^2), the variance-preserving process that the flow is a
    rescaling of (same signal-to-noise ratio), so `snr` means the same for both kinds of schedule.

    Example:
        >>> from diffusers import FlowMatchEulerDiscreteScheduler
        >>> schedule = FlowMatchSchedule.from_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0))
        >>> schedule.num_train_timesteps, round(float(schedule.sigma[-1]), 3), schedule.prediction_type
        (1000, 1.0, 'flow_prediction')
    """

    def __init__(
        self,
        sigmas: torch.Tensor,
        num_train_timesteps: Optional[int] = None,
        weighting_scheme: str = "none",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        precondition_outputs: bool = False,
    ):
        sigmas = torch.as_tensor(sigmas).detach().to(torch.float64)
        if sigmas.ndim != 1 or len(sigmas) == 0 or not bool(((sigmas > 0) & (sigmas <= 1)).all()):
            raise ValueError("FlowMatchSchedule needs a 1-D grid of sigmas in (0, 1].")
        if weighting_scheme not in WEIGHTING_SCHEMES:
            raise ValueError(f"Unknown weighting_scheme {weighting_scheme!r}; expected one of {WEIGHTING_SCHEMES}.")
        if not logit_std > 0:
            raise ValueError(f"logit_std must be > 0, got {logit_std}.")
        self.sigma, _ = torch.sort(sigmas)
        self.gamma = 1.0 - self.sigma
        self.alphas_cumprod = self.gamma**2 / (self.gamma**2 + self.sigma**2)
        self.prediction_type = FLOW_PREDICTION
        self.scale = int(num_train_timesteps or len(sigmas))
        self.weighting_scheme = weighting_scheme
        self.logit_mean, self.logit_std, self.mode_scale = float(logit_mean), float(logit_std), float(mode_scale)
        self.precondition_outputs = bool(precondition_outputs)

    @classmethod
    def from_scheduler(
        cls,
        scheduler,
        weighting_scheme: str = "none",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        precondition_outputs: bool = False,
    ) -> "FlowMatchSchedule":
        """The training grid of a `FlowMatchEulerDiscreteScheduler` (or its config): a fresh copy's `sigmas`,
        as the official scripts' `noise_scheduler_copy`, so a scheduler that has sampled gives the same grid."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        config = getattr(scheduler, "config", scheduler)
        fresh = FlowMatchEulerDiscreteScheduler.from_config(config)
        count = int(fresh.config.num_train_timesteps)
        return cls(
            fresh.sigmas[:count], count, weighting_scheme, logit_mean, logit_std, mode_scale, precondition_outputs
        )

    def __repr__(self) -> str:
        return (
            f"FlowMatchSchedule(num_train_timesteps={self.num_train_timesteps}, "
            f"weighting_scheme={self.weighting_scheme!r}, precondition_outputs={self.precondition_outputs})"
        )

    @property
    def num_train_timesteps(self) -> int:
        return int(self.sigma.shape[0])

    def model_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        """sigma * T, the scheduler's `timesteps` value of each grid index, in float32."""
        index = timesteps.to(self.sigma.device, torch.long)
        return (self.sigma[index] * self.scale).float().to(timesteps.device)

    def sample_timesteps(
        self,
        batch_size: int,
        device: torch.device,
        generator: Optional[torch.Generator] = None,
        timestep_range: Optional[tuple[int, int]] = None,
    ) -> torch.Tensor:
        """Grid indices with the official scripts' density over sigma (within [low, high) when given): u from
        the weighting scheme's density, then the scheduler index floor(u * n), counted from the noisy end."""
        low, high = self.checked_range(timestep_range)
        gen_device = generator.device if generator is not None else "cpu"
        # The same float32 draws as diffusers' compute_density_for_timestep_sampling, so a shared seed gives the
        # official scripts' timesteps.
        if self.weighting_scheme == "logit_normal":
            normal = torch.normal(self.logit_mean, self.logit_std, size=(batch_size,), generator=generator, device=gen_device)
            u = torch.sigmoid(normal)
        else:
            u = torch.rand(size=(batch_size,), generator=generator, device=gen_device)
            if self.weighting_scheme == "mode":
                u = 1 - u - self.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        count = high - low
        # The scheduler lists sigmas from 1 down; its index floor(u * n) is our index (n - 1) - floor(u * n).
        from_noisy_end = torch.clamp((u * count).long(), 0, count - 1)
        return (low + count - 1 - from_noisy_end).to(device)

    def loss_weights(self, timesteps: torch.Tensor) -> Optional[torch.Tensor]:
        if self.weighting_scheme not in ("sigma_sqrt", "cosmap"):
            return None
        sigma = self.sigma[timesteps.to(self.sigma.device, torch.long)]
        if self.weighting_scheme == "sigma_sqrt":
            weights = sigma**-2.0
        else:
            weights = 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))
        return weights.float().to(timesteps.device)

    def min_snr_weights(self, timesteps: torch.Tensor, snr_gamma: float, space: str) -> torch.Tensor:
        raise ValueError(
            "--snr_gamma weights DDPM losses; flow-matching models weight theirs with --weighting_scheme "
            f"({', '.join(WEIGHTING_SCHEMES)}), as the official SD3 and Flux scripts do."
        )

    def to_epsilon(self, model_output: torch.Tensor, x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """eps = x_sigma + (1 - sigma) v, without a division."""
        gamma, _ = self.coefficients(timesteps, x_t)
        return x_t + gamma * model_output

    def epsilon_to_prediction(
        self, epsilon: torch.Tensor, x_t: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """v = (eps - x_sigma) / (1 - sigma): undefined at sigma = 1; build targets with `target` instead."""
        gamma, _ = self.coefficients(timesteps, x_t)
        return (epsilon - x_t) / gamma

    def to_sample(self, model_output: torch.Tensor, x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_0 = x_sigma - sigma v."""
        _, sigma = self.coefficients(timesteps, x_t)
        return x_t - sigma * model_output

    def target(
        self, x_t: torch.Tensor, x0: torch.Tensor, timesteps: torch.Tensor, loss_space: str = "native"
    ) -> torch.Tensor:
        """The target for `x_t` made from `x0`, from (x_t, x0) directly so that it stays finite for sigma near 0
        and 1: the velocity (x_t - x0) / sigma (= eps - x0) in native space, x0 with `precondition_outputs`,
        the noise (x_t - (1 - sigma) x0) / sigma in epsilon space. Float32 at least.

        Example:
            >>> schedule = FlowMatchSchedule(torch.linspace(0.001, 1.0, 1000))
            >>> x0, eps, t = torch.zeros(1, 2), torch.ones(1, 2), torch.tensor([999])
            >>> schedule.target(schedule.add_noise(x0, eps, t), x0, t).tolist()
            [[1.0, 1.0]]
        """
        check_loss_space(loss_space)
        dtype = torch.promote_types(x_t.dtype, torch.float32)
        x_t, x0 = x_t.to(dtype), x0.to(dtype)
        gamma, sigma = self.coefficients(timesteps, x_t)
        if loss_space == "epsilon":
            return (x_t - gamma * x0) / sigma
        if self.precondition_outputs:
            return x0
        return (x_t - x0) / sigma

    def output_in_space(
        self, model_output: torch.Tensor, x_t: torch.Tensor, timesteps: torch.Tensor, loss_space: str = "native"
    ) -> torch.Tensor:
        """The velocity as is (native), x_sigma - sigma v (native with `precondition_outputs`, SD3's
        `model_pred * (-sigmas) + noisy_model_input`), or the noise estimate (epsilon)."""
        check_loss_space(loss_space)
        if loss_space == "epsilon":
            return self.to_epsilon(model_output, x_t, timesteps)
        if self.precondition_outputs:
            return self.to_sample(model_output, x_t, timesteps)
        return model_output


def draw_noise(
    like: torch.Tensor, generator: Optional[torch.Generator] = None, noise_offset: float = 0.0
) -> torch.Tensor:
    """Training noise shaped like `like`: standard Gaussian, plus, with `noise_offset`, one Gaussian offset per
    item and channel shared by every position (diffusers' `--noise_offset`:
    noise + noise_offset * randn(batch, channels, 1, 1), drawn after the noise). Drawn on the generator's
    device in float32, so results are seed-stable; with `noise_offset` 0 nothing more is drawn.

    Example:
        >>> noise = draw_noise(torch.zeros(2, 4, 8, 8), torch.Generator().manual_seed(0), noise_offset=0.1)
        >>> noise.shape
        torch.Size([2, 4, 8, 8])
    """
    device = generator.device if generator is not None else like.device
    noise = torch.randn(like.shape, generator=generator, device=device, dtype=torch.float32)
    if noise_offset:
        if like.ndim < 4:
            # (batch, tokens, features) packed latents (Flux) have no channel axis at position 1.
            raise ValueError(
                "noise_offset needs image-shaped inputs (batch, channels, height, width, ...), got shape "
                f"{tuple(like.shape)}."
            )
        offset_shape = tuple(like.shape[:2]) + (1,) * (like.ndim - 2)
        noise = noise + noise_offset * torch.randn(offset_shape, generator=generator, device=device, dtype=torch.float32)
    return noise.to(like.device, like.dtype)


def check_training_noise_options(noise_offset: float, snr_gamma: Optional[float]) -> tuple[float, Optional[float]]:
    """Validate `--noise_offset` (>= 0, finite) and `--snr_gamma` (None or > 0, finite); returns them as floats."""
    noise_offset = float(noise_offset)
    if not (noise_offset >= 0 and noise_offset < float("inf")):
        raise ValueError(f"noise_offset must be a finite number >= 0, got {noise_offset}.")
    if snr_gamma is not None:
        snr_gamma = float(snr_gamma)
        if not (snr_gamma > 0 and snr_gamma < float("inf")):
            raise ValueError(f"snr_gamma must be a finite number > 0 (5.0 is the recommended value), got {snr_gamma}.")
    return noise_offset, snr_gamma


def per_sample_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every non-batch dimension, computed in float32.

    We reduce with the MEAN over pixels (not the sum), so loss values and gradient norms do
    not grow with resolution. SISS's fixed-norm constant is expressed against this reduction.
    """
    diff = prediction.float() - target.float()
    return diff.pow(2).flatten(1).mean(dim=1)
