"""VDU: Variational Diffusion Unlearning (Panda et al., 2025), in our reading.

VDU uses ONLY the forget data; there is no keep set.

    loss = plasticity(theta) + gamma * stability(theta)

* plasticity lowers the forget data's likelihood by raising its denoising loss, but bounded so
  it cannot diverge: per item, hinge `relu(target_loss - l)` or log-hinge
  `relu(log target_loss - log l)`. The default target, 0.3, is 30% of the loss of a model that
  predicts zero noise (E||eps||^2 = 1 per pixel); a target of 1.0 collapses the toy DDPM.
* stability is a quadratic pull toward the pretrained weights theta*:
  sum_i pi_i (theta_i - theta*_i)^2 / 2. With LoRA the regularized quantity is the effective
  weight delta B A * scale of every adapted layer (theta* corresponds to a zero delta).

The precision pi comes from
  (a) "checkpoints": 1 / variance over several checkpoints of the same model (the paper's choice),
  (b) "fisher": a diagonal Fisher estimated on samples the model generates itself (data-free),
  (c) "l2": pi = 1.
Estimated precisions are normalised to mean 1, so gamma means the same for every estimator.
The paper has no public code; docs/methods/vdu.md says what we chose and why.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Optional, Sequence

import torch

from .base import (
    DenoisingBatch,
    Denoiser,
    LossTerms,
    UnlearningObjective,
    check_non_negative,
    check_positive,
    denoising_loss,
    randn_like,
)

PRECISIONS = ("l2", "fisher", "checkpoints")
PLASTICITIES = ("hinge", "log")


def has_lora(model: torch.nn.Module) -> bool:
    return any("lora_" in name for name, _ in model.named_parameters())


def _base_name(name: str) -> str:
    """Parameter name as in the model without adapters."""
    return name.replace("base_layer.", "")


def _regularized_base_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters the stability term covers, keyed by their adapter-free name.

    Full fine-tuning: every trainable parameter. LoRA: the base weight of every adapted layer.
    """
    if has_lora(model):
        return {
            _base_name(name): p
            for name, p in model.named_parameters()
            if name.endswith("base_layer.weight")
        }
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def sample_ddim(
    denoiser: Denoiser,
    like: DenoisingBatch,
    num_inference_steps: int = 20,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Deterministic DDIM samples shaped like `like.x0`, with its conditioning."""
    schedule = denoiser.schedule
    x = randn_like(like.x0, generator)
    steps = torch.linspace(schedule.num_train_timesteps - 1, 0, num_inference_steps).round().long()
    for i, t in enumerate(steps):
        timesteps = torch.full((len(x),), int(t), device=x.device, dtype=torch.long)
        output = denoiser.model_output(x, timesteps, like)
        eps = schedule.to_epsilon(output, x, timesteps)
        # x0 from the model output directly: through eps it would divide by gamma, 0 at a flow model's sigma = 1.
        x0 = schedule.to_sample(output, x, timesteps).clamp(-1, 1)
        if i + 1 < len(steps):
            prev = torch.full_like(timesteps, int(steps[i + 1]))
            gamma_prev, sigma_prev = schedule.coefficients(prev, x)
            x = gamma_prev * x0 + sigma_prev * eps
        else:
            x = x0
    return x


def diagonal_fisher(
    denoiser: Denoiser,
    samples: DenoisingBatch,
    parameters: Mapping[str, torch.nn.Parameter],
    generator: Optional[torch.Generator] = None,
) -> dict[str, torch.Tensor]:
    """Mean over samples of the squared per-sample gradient of the denoising loss.

    Gradients are taken with respect to `parameters` even if they are frozen (their
    `requires_grad` is switched on for the estimate and restored afterwards).
    """
    names = list(parameters)
    params = [parameters[n] for n in names]
    was_trainable = [p.requires_grad for p in params]
    fisher = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        for i in range(len(samples)):
            one = samples.select(slice(i, i + 1))
            loss = denoising_loss(denoiser, one, generator).sum()
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for f, g in zip(fisher, grads):
                if g is not None:
                    f.add_(g.detach().float().pow(2))
    finally:
        for p, flag in zip(params, was_trainable):
            p.requires_grad_(flag)
    return {n: f / len(samples) for n, f in zip(names, fisher)}


def precision_from_checkpoints(
    checkpoints: Sequence[Mapping[str, torch.Tensor]], names: Sequence[str], eps: float = 1e-8
) -> dict[str, torch.Tensor]:
    """pi = 1 / (variance over checkpoints + eps) for every name (needs >= 2 checkpoints)."""
    if len(checkpoints) < 2:
        raise ValueError(f"precision='checkpoints' needs at least 2 checkpoints, got {len(checkpoints)}.")
    precision = {}
    for name in names:
        missing = [i for i, ckpt in enumerate(checkpoints) if name not in ckpt]
        if missing:
            raise ValueError(f"Parameter {name!r} is missing from checkpoint(s) {missing}.")
        stacked = torch.stack([ckpt[name].float() for ckpt in checkpoints])
        precision[name] = 1.0 / (stacked.var(dim=0, unbiased=True) + eps)
    return precision


def normalize_precision(precision: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Scale so that the mean precision over all entries is 1."""
    total = sum(float(p.sum()) for p in precision.values())
    count = sum(p.numel() for p in precision.values())
    mean = total / max(count, 1)
    if not mean > 0 or not math.isfinite(mean):
        raise ValueError("The estimated precision is zero or non-finite; use precision='l2'.")
    return {n: p / mean for n, p in precision.items()}


class VDU(UnlearningObjective):
    """Variational Diffusion Unlearning: bounded plasticity on the forget set plus a
    precision-weighted pull toward the pretrained weights. Needs no keep set.

    Args:
        gamma: weight of the stability regularizer.
        precision: "l2", "fisher" or "checkpoints".
        plasticity: "hinge" or "log".
        target_loss: the forget loss level at which the plasticity term stops pushing.
        checkpoints: state dicts for precision="checkpoints" (keys as in the model without adapters).
        fisher_samples: clean samples for precision="fisher"; if None, the model generates
            `fisher_num_samples` itself with `fisher_sampling_steps` DDIM steps.

    The defaults (Fisher precision from the model's own samples, gamma 10, target 0.3) were tuned on the toy DDPM;
    docs/methods/vdu.md says how and what they give.

    Example:
        >>> objective = get_objective("vdu", gamma=10.0, precision="fisher")
        >>> objective.prepare(denoiser, forget_batch)   # snapshot theta*, estimate the precision
        >>> terms = objective(denoiser, forget_batch)
    """

    name = "vdu"
    flag_prefix = "vdu"
    needs_keep = False

    def __init__(
        self,
        gamma: float = 10.0,
        precision: str = "fisher",
        plasticity: str = "hinge",
        target_loss: float = 0.3,
        checkpoints: Optional[Sequence[Mapping[str, torch.Tensor]]] = None,
        fisher_samples: Optional[DenoisingBatch] = None,
        fisher_num_samples: int = 16,
        fisher_sampling_steps: int = 20,
        timestep_range=None,
    ):
        super().__init__(timestep_range)
        self.gamma = check_non_negative("gamma", gamma)
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}.")
        if plasticity not in PLASTICITIES:
            raise ValueError(f"plasticity must be one of {PLASTICITIES}, got {plasticity!r}.")
        if precision == "checkpoints" and not checkpoints:
            raise ValueError("precision='checkpoints' needs `checkpoints` (a list of at least 2 state dicts).")
        self.precision = precision
        self.plasticity = plasticity
        self.target_loss = check_positive("target_loss", target_loss)
        if int(fisher_num_samples) < 1 or int(fisher_sampling_steps) < 1:
            raise ValueError("fisher_num_samples and fisher_sampling_steps must be >= 1.")
        self.fisher_num_samples = int(fisher_num_samples)
        self.fisher_sampling_steps = int(fisher_sampling_steps)
        self._checkpoints = checkpoints
        self._fisher_samples = fisher_samples
        self._reference: Optional[dict[str, torch.Tensor]] = None
        self._precision: Optional[dict[str, torch.Tensor]] = None
        self._lora = False
        self._prepared = False
        self._names: list[str] = []

    # -- setup -------------------------------------------------------------------------------
    def prepare(
        self,
        denoiser: Denoiser,
        forget_batch: Optional[DenoisingBatch] = None,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        """Snapshot theta* and estimate the precision. Call once, before the first step."""
        model = getattr(denoiser.model, "module", denoiser.model)
        self._lora = has_lora(model)
        parameters = _regularized_base_parameters(model)
        if not parameters:
            raise ValueError("VDU found no parameters to regularize: make some parameters trainable or add LoRA.")
        self._names = list(parameters)
        # With LoRA theta* is a zero delta, so no reference copy is needed.
        self._reference = None if self._lora else {n: p.detach().clone() for n, p in parameters.items()}

        if self.precision == "l2":
            self._precision = None
        elif self.precision == "checkpoints":
            self._precision = normalize_precision(precision_from_checkpoints(self._checkpoints, list(parameters)))
        else:
            samples = self._fisher_samples
            if samples is None:
                if forget_batch is None:
                    raise ValueError("precision='fisher' needs fisher_samples or a forget batch to shape samples.")
                like = _repeat_batch(forget_batch, self.fisher_num_samples)
                samples = dataclasses.replace(like, x0=sample_ddim(denoiser, like, self.fisher_sampling_steps, generator))
            self._precision = normalize_precision(diagonal_fisher(denoiser, samples, parameters, generator))
        self._prepared = True

    def regularized_names(self) -> list[str]:
        """Names (as in the model without adapters) of the weights the stability term covers."""
        return list(self._names)

    def precision_of(self, name: str, like: torch.Tensor) -> torch.Tensor | float:
        if self._precision is None:
            return 1.0
        return self._precision[name].to(like.device, like.dtype)

    # -- the two terms -----------------------------------------------------------------------
    def stability_regularizer(self, model: torch.nn.Module) -> torch.Tensor:
        """sum_i pi_i (theta_i - theta*_i)^2 / 2 (over LoRA weight deltas when the model has LoRA)."""
        if not self._prepared:
            raise RuntimeError("Call VDU.prepare(denoiser) before computing the regularizer.")
        model = getattr(model, "module", model)  # DDP-wrapped: names must not carry "module."
        if self._lora:
            from ..lora import lora_weight_deltas

            differences = lora_weight_deltas(model)
        else:
            named = dict(model.named_parameters())
            differences = {n: named[n] - ref.to(named[n].device) for n, ref in self._reference.items()}
        total = None
        for name, diff in differences.items():
            term = (self.precision_of(name, diff) * diff.float().pow(2)).sum() / 2
            total = term if total is None else total + term
        return total

    def __call__(
        self,
        denoiser: Denoiser,
        forget_batch: DenoisingBatch,
        keep_batch: Optional[DenoisingBatch] = None,
        generator: Optional[torch.Generator] = None,
    ) -> LossTerms:
        self._check_batches(forget_batch, keep_batch)
        if not self._prepared:
            self.prepare(denoiser, forget_batch, generator)
        losses = denoising_loss(denoiser, forget_batch, generator, self.timestep_range)
        if self.plasticity == "hinge":
            plasticity = torch.relu(self.target_loss - losses).mean()
        else:
            plasticity = torch.relu(math.log(self.target_loss) - losses.clamp_min(1e-12).log()).mean()
        stability = self.stability_regularizer(denoiser.model)
        logs = {"loss_forget": losses.mean().detach(), "plasticity": plasticity.detach(), "stability": stability.detach()}
        return LossTerms(keep=self.gamma * stability, forget=plasticity, logs=logs)


def _repeat_batch(batch: DenoisingBatch, count: int) -> DenoisingBatch:
    return batch.select(torch.arange(count, device=batch.x0.device) % len(batch))
