"""Shared pieces of every unlearning objective: batches, the denoiser call and the loss terms."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

import torch

from ..noise import NoiseSchedule, check_loss_space, check_training_noise_options, draw_noise, per_sample_loss


@dataclass
class DenoisingBatch:
    """Clean inputs (images or latents) and their conditioning.

    `class_labels` serve class-conditional UNet2DModels, `encoder_hidden_states` serve UNet2DConditionModels;
    leave both None for an unconditional model. `added_cond` holds any further per-item conditioning a model
    family needs, by name (SDXL: `text_embeds` and `time_ids`); every tensor in it has the batch axis first.

    Example:
        >>> batch = DenoisingBatch(torch.zeros(2, 4, 8, 8), None, torch.zeros(2, 77, 64),
        ...                        {"text_embeds": torch.zeros(2, 32), "time_ids": torch.zeros(2, 6)})
        >>> sorted(batch.conditioning())
        ['encoder_hidden_states', 'text_embeds', 'time_ids']
    """

    x0: torch.Tensor
    class_labels: Optional[torch.Tensor] = None
    encoder_hidden_states: Optional[torch.Tensor] = None
    added_cond: Optional[dict[str, torch.Tensor]] = None

    def __len__(self) -> int:
        return int(self.x0.shape[0])

    @classmethod
    def from_conditioning(cls, x0: torch.Tensor, conditioning: Mapping[str, torch.Tensor]) -> "DenoisingBatch":
        """A batch from clean inputs and a conditioning dict (as a family's `encode_prompts` returns it):
        `class_labels` and `encoder_hidden_states` go to their fields, every other entry to `added_cond`.

        Example:
            >>> cond = {"encoder_hidden_states": torch.zeros(1, 77, 32)}
            >>> DenoisingBatch.from_conditioning(torch.zeros(1, 4, 8, 8), cond).added_cond is None
            True
        """
        extra = {key: value for key, value in conditioning.items() if key not in _FIELD_CONDITIONING}
        return cls(x0, conditioning.get("class_labels"), conditioning.get("encoder_hidden_states"), extra or None)

    def conditioning(self) -> dict[str, torch.Tensor]:
        """Every conditioning tensor by name (the inverse of `from_conditioning`); None fields are left out."""
        named = {"class_labels": self.class_labels, "encoder_hidden_states": self.encoder_hidden_states}
        result = {key: value for key, value in named.items() if value is not None}
        result.update(self.added_cond or {})
        return result

    def to(self, device: torch.device | str, dtype: Optional[torch.dtype] = None) -> "DenoisingBatch":
        """The batch on `device`; with `dtype`, floating-point tensors are cast too (labels and ids stay integer)."""

        def move(tensor, float_like):
            if tensor is None:
                return None
            return tensor.to(device, dtype) if (dtype is not None and float_like) else tensor.to(device)

        added = None
        if self.added_cond is not None:
            added = {key: move(value, value.is_floating_point()) for key, value in self.added_cond.items()}
        return DenoisingBatch(
            move(self.x0, True),
            move(self.class_labels, False),
            move(self.encoder_hidden_states, True),
            added,
        )

    def select(self, index: "slice | torch.Tensor") -> "DenoisingBatch":
        """The items at `index` (a slice, or a tensor of indices, repeats allowed), every conditioning field
        included, so code that slices batches never drops a family's extra conditioning."""

        def pick(tensor):
            return None if tensor is None else tensor[index]

        added = None if self.added_cond is None else {key: value[index] for key, value in self.added_cond.items()}
        return DenoisingBatch(pick(self.x0), pick(self.class_labels), pick(self.encoder_hidden_states), added)

    def same_conditioning(self, other: "DenoisingBatch") -> bool:
        """True when both batches condition the model identically (one forward pass can serve both)."""
        mine_added, theirs_added = self.added_cond or {}, other.added_cond or {}
        if mine_added.keys() != theirs_added.keys():
            return False
        pairs = [
            (self.class_labels, other.class_labels),
            (self.encoder_hidden_states, other.encoder_hidden_states),
        ] + [(mine_added[key], theirs_added[key]) for key in mine_added]
        for mine, theirs in pairs:
            if (mine is None) != (theirs is None):
                return False
            if mine is not None and (mine.shape != theirs.shape or not torch.equal(mine, theirs)):
                return False
        return True


# The conditioning DenoisingBatch keeps in fields of its own; whatever else a family conditions on goes to
# `added_cond`.
_FIELD_CONDITIONING = ("class_labels", "encoder_hidden_states")


def concat_conditioning(first: DenoisingBatch, second: DenoisingBatch) -> DenoisingBatch:
    """Stack the conditioning of two batches along the batch axis (x0 is stacked too)."""

    def cat(a, b):
        return None if a is None else torch.cat([a, b], dim=0)

    added = None
    if first.added_cond is not None or second.added_cond is not None:
        first_added, second_added = first.added_cond or {}, second.added_cond or {}
        if first_added.keys() != second_added.keys():
            raise ValueError(
                "Cannot stack batches with different extra conditioning: "
                f"{sorted(first_added)} and {sorted(second_added)}."
            )
        added = {key: torch.cat([first_added[key], second_added[key]], dim=0) for key in first_added}
    return DenoisingBatch(
        torch.cat([first.x0, second.x0], dim=0),
        cat(first.class_labels, second.class_labels),
        cat(first.encoder_hidden_states, second.encoder_hidden_states),
        added,
    )


class Denoiser:
    """A UNet plus the noise schedule it was trained with.

    Works with unconditional and class-conditional `UNet2DModel`s and with
    `UNet2DConditionModel`s, whatever their `prediction_type`. Calling it returns a noise estimate (for
    metrics and sampling); objectives compare `predict(...)` with `target(...)`, both in `loss_space`
    ("native": the model's own prediction type, its official training loss; "epsilon": noise estimates).

    `call(model, x_t, timesteps, conditioning)` is how a model family runs its model (see
    `diffusers_unlearn.families`); it gets `batch.conditioning()` and returns the raw output. Without it, the
    model is called as a diffusers UNet: `class_labels`, `encoder_hidden_states` and, when the batch has extra
    conditioning, `added_cond_kwargs`.

    Two training options of diffusers' fine-tuning scripts live here, so every objective gets them through the
    same two calls and none branches on them: `noise_offset` (`noise()` adds
    noise_offset * randn(batch, channels, 1, 1) to the Gaussian noise) and `snr_gamma` (`loss()` weights each
    per-sample loss by the min-SNR-gamma weight of its timestep, in the space the loss is taken in). Both may be
    set after construction (`denoiser.snr_gamma = 5.0`); their defaults (0 and None) change nothing.

    Example:
        >>> denoiser = Denoiser(unet, NoiseSchedule.from_scheduler(scheduler))
        >>> eps_hat = denoiser(x_t, timesteps, batch)
        >>> loss = per_sample_loss(denoiser.predict(x_t, timesteps, batch), denoiser.target(x_t, batch.x0, timesteps))
        >>> sdxl = Denoiser(unet, schedule, call=families.get_family("sdxl").call)  # doctest: +SKIP
    """

    def __init__(
        self,
        model: torch.nn.Module,
        schedule: NoiseSchedule,
        loss_space: str = "native",
        call: Optional[Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, dict], torch.Tensor]] = None,
        noise_offset: float = 0.0,
        snr_gamma: Optional[float] = None,
    ):
        self.model = model
        self.schedule = schedule
        self.loss_space = check_loss_space(loss_space)
        self.call = call
        self.noise_offset, self.snr_gamma = check_training_noise_options(noise_offset, snr_gamma)

    def noise(self, like: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The training noise for clean inputs `like` (Gaussian, plus the `noise_offset` term when set)."""
        return draw_noise(like, generator, self.noise_offset)

    def loss_space_kind(self, space: Optional[str] = None) -> str:
        """The prediction type losses in `space` (default: this denoiser's loss space) are taken in."""
        space = self.loss_space if space is None else check_loss_space(space)
        return self.schedule.prediction_type if space == "native" else "epsilon"

    def loss(
        self,
        prediction: torch.Tensor,
        target: torch.Tensor,
        timesteps: torch.Tensor,
        space: Optional[str] = None,
    ) -> torch.Tensor:
        """Per-sample training losses: `per_sample_loss(prediction, target)`, times the min-SNR-gamma weight of
        each timestep when `snr_gamma` is set. `space` is the loss space prediction and target are in (this
        denoiser's by default; "epsilon" for a term an objective always takes on noise estimates).
        """
        losses = per_sample_loss(prediction, target)
        schedule_weights = self.schedule.loss_weights(timesteps)  # a flow model's --weighting_scheme
        if schedule_weights is not None:
            losses = losses * schedule_weights.to(losses.device)
        if self.snr_gamma is None:
            return losses
        weights = self.schedule.min_snr_weights(timesteps, self.snr_gamma, self.loss_space_kind(space))
        return losses * weights.to(losses.device)

    def model_output(self, x_t: torch.Tensor, timesteps: torch.Tensor, batch: DenoisingBatch) -> torch.Tensor:
        """The model's raw output (of its own prediction type). `timesteps` index the schedule's grid; the model
        gets `schedule.model_timesteps(timesteps)` (the same for DDPM models, sigma * 1000 for flow models)."""
        timesteps = self.schedule.model_timesteps(timesteps)
        if self.call is not None:
            return self.call(self.model, x_t, timesteps, batch.conditioning())
        kwargs = {}
        if batch.class_labels is not None:
            kwargs["class_labels"] = batch.class_labels
        if batch.encoder_hidden_states is not None:
            kwargs["encoder_hidden_states"] = batch.encoder_hidden_states
        if batch.added_cond:
            # UNet2DConditionModel's name for extra conditioning; silently dropping it would be worse.
            kwargs["added_cond_kwargs"] = dict(batch.added_cond)
        output = self.model(x_t, timesteps, **kwargs)
        return output.sample if hasattr(output, "sample") else output

    def __call__(self, x_t: torch.Tensor, timesteps: torch.Tensor, batch: DenoisingBatch) -> torch.Tensor:
        """The noise estimate eps_theta(x_t, t, c), whatever the prediction type."""
        return self.schedule.to_epsilon(self.model_output(x_t, timesteps, batch), x_t, timesteps)

    def predict(self, x_t: torch.Tensor, timesteps: torch.Tensor, batch: DenoisingBatch) -> torch.Tensor:
        """The model output as losses compare it (unchanged in native loss space)."""
        return self.schedule.output_in_space(self.model_output(x_t, timesteps, batch), x_t, timesteps, self.loss_space)

    def target(self, x_t: torch.Tensor, x0: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The regression target for `x_t` made from the clean item `x0`, in this denoiser's loss space."""
        return self.schedule.target(x_t, x0, timesteps, self.loss_space)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]


def randn_like(x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Gaussian noise shaped like `x`, drawn on the generator's device so results are seed-stable."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32).to(x.device, x.dtype)


def rand_like(x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Uniform [0, 1) noise shaped like `x` (EraseDiff's target)."""
    device = generator.device if generator is not None else x.device
    return torch.rand(x.shape, generator=generator, device=device, dtype=torch.float32).to(x.device, x.dtype)


def denoising_loss(
    denoiser: Denoiser,
    batch: DenoisingBatch,
    generator: Optional[torch.Generator] = None,
    timestep_range: Optional[tuple[int, int]] = None,
) -> torch.Tensor:
    """Per-sample denoising loss at x_t = gamma_t x + sigma_t eps, one random t and eps, in the denoiser's loss
    space (native: the model's training loss; epsilon: ||eps_theta - eps||^2). The noise and the per-timestep
    weighting are the denoiser's (`Denoiser.noise`, `Denoiser.loss`: `noise_offset`, `snr_gamma`).
    """
    schedule = denoiser.schedule
    timesteps = schedule.sample_timesteps(len(batch), batch.x0.device, generator, timestep_range)
    noise = denoiser.noise(batch.x0, generator)
    x_t = schedule.add_noise(batch.x0, noise, timesteps)
    return denoiser.loss(denoiser.predict(x_t, timesteps, batch), denoiser.target(x_t, batch.x0, timesteps), timesteps)


@dataclass
class LossTerms:
    """What an objective returns: the terms a combiner turns into one update.

    Convention: every term is a loss to MINIMISE; the combiner decides how their
    gradients are weighted (see `diffusers_unlearn.gradients`). Either term may be None.
    """

    keep: Optional[torch.Tensor] = None
    forget: Optional[torch.Tensor] = None
    logs: dict[str, torch.Tensor | float] = field(default_factory=dict)


class UnlearningObjective:
    """Base class. Subclasses set `name`, validate hyperparameters in `__init__`,
    and implement `__call__(denoiser, forget_batch, keep_batch, generator) -> LossTerms`.

    Objectives are pure: they build losses and never step an optimizer.
    """

    name: str = ""
    #: Whether the objective needs a keep batch at every step.
    needs_keep: bool = True
    #: Whether the objective needs a forget batch at every step.
    needs_forget: bool = True
    #: Command-line flags `--{flag_prefix}_{hyperparameter}` set this objective's hyperparameters.
    flag_prefix: str = ""
    #: Flag names that differ from the hyperparameter name, e.g. {"lambda": "lam"}.
    flag_aliases: dict = {}

    def __init__(self, timestep_range: Optional[tuple[int, int]] = None):
        if timestep_range is not None:
            low, high = timestep_range
            if not 0 <= low < high:
                raise ValueError(f"timestep_range must satisfy 0 <= low < high, got {timestep_range}.")
            timestep_range = (int(low), int(high))
        self.timestep_range = timestep_range

    def make_combiner(self):
        """The gradient combiner this objective's terms are meant for (plain sum by default)."""
        from ..gradients import SumCombiner

        return SumCombiner()

    def prepare(
        self,
        denoiser: Denoiser,
        forget_batch: Optional[DenoisingBatch] = None,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        """One-time setup before training (for example reference weights). No-op by default."""

    def hyperparameters(self) -> dict:
        """Plain-data hyperparameters, for reports and model cards."""
        return {
            key: value
            for key, value in vars(self).items()
            if not key.startswith("_")
            and key not in ("needs_keep", "needs_forget")
            and isinstance(value, (int, float, str, bool, tuple, list, type(None)))
        }

    def __call__(
        self,
        denoiser: Denoiser,
        forget_batch: Optional[DenoisingBatch],
        keep_batch: Optional[DenoisingBatch] = None,
        generator: Optional[torch.Generator] = None,
    ) -> LossTerms:
        raise NotImplementedError

    def _check_batches(self, forget_batch, keep_batch) -> None:
        if self.needs_forget and forget_batch is None:
            raise ValueError(f"Objective {self.name!r} needs a forget batch.")
        if self.needs_keep and keep_batch is None:
            raise ValueError(
                f"Objective {self.name!r} needs a keep batch; give a keep set "
                "(for example --keep_data_dir or --keep_from_generations)."
            )

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({params})"


def check_unit_interval(name: str, value: float, open_low: bool = False, open_high: bool = False) -> float:
    value = float(value)
    low_ok = value > 0 if open_low else value >= 0
    high_ok = value < 1 if open_high else value <= 1
    if not (low_ok and high_ok):
        low = "(0" if open_low else "[0"
        high = "1)" if open_high else "1]"
        raise ValueError(f"{name} must be in {low}, {high}, got {value}.")
    return value


def check_non_negative(name: str, value: float) -> float:
    value = float(value)
    if not value >= 0:  # also rejects NaN
        raise ValueError(f"{name} must be >= 0, got {value}.")
    return value


def check_positive(name: str, value: float) -> float:
    value = float(value)
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}.")
    return value
