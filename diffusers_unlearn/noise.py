"""Noise-schedule quantities, prediction-type conversions and the per-sample denoising loss.

The forward process is

    x_t = gamma_t * x_0 + sigma_t * eps,   gamma_t = sqrt(alpha_bar_t),  sigma_t = sqrt(1 - alpha_bar_t).

Losses are taken in a *loss space*: "native" (the default) regresses the model's own output onto a target of
its own prediction type (epsilon, v or x_0), which makes a plain fine-tuning loss exactly the model's official
training loss; "epsilon" converts every output to a noise estimate first, which weights each timestep by
gamma_t^2 relative to the v-loss of a v-prediction model. Targets are built from the noisy input and the clean
item (`target`), and the prediction is never converted in native space.
"""

from __future__ import annotations

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

    def sample_timesteps(
        self,
        batch_size: int,
        device: torch.device,
        generator: Optional[torch.Generator] = None,
        timestep_range: Optional[tuple[int, int]] = None,
    ) -> torch.Tensor:
        """Uniform timesteps in [low, high) (the whole schedule by default)."""
        low, high = timestep_range if timestep_range is not None else (0, self.num_train_timesteps)
        if not 0 <= low < high <= self.num_train_timesteps:
            raise ValueError(
                f"timestep_range {(low, high)} must satisfy 0 <= low < high <= {self.num_train_timesteps}."
            )
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
        if like.ndim < 3:
            raise ValueError(
                f"noise_offset needs inputs shaped (batch, channels, ...), got shape {tuple(like.shape)}."
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
