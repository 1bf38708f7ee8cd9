"""SISS: Subtracted Importance-Sampled Scores (Alberti et al., ICLR 2025), and two variants.

For every batch element we pair a keep item x with a forget item a, draw one timestep t and
one noise eps, and take m from the defensive mixture

    q_lam(m) = (1 - lam) q(m | x) + lam q(m | a),   q(m | y) = N(gamma_t y, sigma_t^2 I).

One forward pass p = eps_theta(m, t, c) serves both terms, reweighted by importance weights

    w_x = q(m|x) / q_lam(m),   w_a = q(m|a) / q_lam(m),

computed in log space so that lam in {0, 1} and |Delta| in the thousands are exact.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .base import (
    DenoisingBatch,
    Denoiser,
    LossTerms,
    UnlearningObjective,
    check_non_negative,
    check_positive,
    check_unit_interval,
    concat_conditioning,
)


def log_density_ratio(
    m: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    gamma: torch.Tensor,
    sigma: torch.Tensor,
    noise_offset: float = 0.0,
) -> torch.Tensor:
    """Delta = log q(m|x) - log q(m|a) per batch element, in float64.

    ||m - g a||^2 - ||m - g x||^2 = g <x - a, 2m - g (x + a)>, which avoids subtracting two
    huge sums of squares.

    With a noise offset o (`Denoiser.noise_offset`), the noise is eps = z + o w with one w per channel shared by
    the n positions of that channel, so q(m|y) = N(g y, s^2 S) with S = I + o^2 11^T per channel, and
    S^-1 = I - k 11^T with k = o^2 / (1 + o^2 n). The squared Mahalanobis norm of d is ||d||^2 - k sum_c (sum d_c)^2,
    and the difference of the two correction terms factors like the inner product above:
    sum_c (sum g (x - a)_c) (sum (2m - g (x + a))_c).
    """
    m, x, a = m.double(), x.double(), a.double()
    gamma, sigma = gamma.double(), sigma.double()
    inner = (gamma * (x - a) * (2 * m - gamma * (x + a))).flatten(1).sum(dim=1)
    if noise_offset:
        positions = x[0, 0].numel()
        k = noise_offset**2 / (1 + noise_offset**2 * positions)
        first = (gamma * (x - a)).flatten(2).sum(dim=2)  # (batch, channels)
        second = (2 * m - gamma * (x + a)).flatten(2).sum(dim=2)
        inner = inner - k * (first * second).sum(dim=1)
    return inner / (2 * sigma.flatten() ** 2)


def importance_log_weights(delta: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """log w_x and log w_a for the mixture weight `lam`, stable for any Delta and lam in [0, 1].

    w_x = 1 / ((1 - lam) + lam e^{-Delta}),  w_a = 1 / ((1 - lam) e^{Delta} + lam).
    """
    delta = delta.double()
    log_keep = torch.full_like(delta, math.log(1 - lam) if lam < 1 else -math.inf)
    log_forget = torch.full_like(delta, math.log(lam) if lam > 0 else -math.inf)
    log_w_x = -torch.logsumexp(torch.stack([log_keep, log_forget - delta]), dim=0)
    log_w_a = -torch.logsumexp(torch.stack([log_keep + delta, log_forget]), dim=0)
    return log_w_x, log_w_a


def _check_pairing(forget_batch: DenoisingBatch, keep_batch: DenoisingBatch, name: str) -> None:
    if len(forget_batch) != len(keep_batch):
        raise ValueError(
            f"{name} pairs keep and forget items element by element, but got {len(keep_batch)} keep and "
            f"{len(forget_batch)} forget items. Sample the forget set with replacement to the keep batch size."
        )
    if forget_batch.x0.shape != keep_batch.x0.shape:
        raise ValueError(
            f"{name}: keep items {tuple(keep_batch.x0.shape)} and forget items {tuple(forget_batch.x0.shape)} "
            "must have the same shape."
        )


def _predict_for_both(
    denoiser: Denoiser,
    m: torch.Tensor,
    timesteps: torch.Tensor,
    forget_batch: DenoisingBatch,
    keep_batch: DenoisingBatch,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The predictions at m under c_x and c_a (in the loss space) with one model call.

    When keep and forget share their conditioning (unconditional models, or the same prompt)
    one prediction serves both; otherwise the batch is doubled so each term sees its own c.
    """
    if keep_batch.same_conditioning(forget_batch):
        prediction = denoiser.predict(m, timesteps, keep_batch)
        return prediction, prediction
    both = concat_conditioning(keep_batch, forget_batch)
    prediction = denoiser.predict(torch.cat([m, m]), torch.cat([timesteps, timesteps]), both)
    return prediction.chunk(2)


class _SISSWeighting(UnlearningObjective):
    """The two ways SISS's terms are weighted, shared by the SISS family.

    * fixed-norm (default, the reference code's form): keep = L_x, forget = -L_a, and the
      `FixedNormCombiner` rescales the forget gradient to norm `scaling_norm` (or to
      `relative_norm` times the keep gradient norm, measured on the first step).
    * paper form (`weighting="paper"`): minimise n/(n-k) L_x - (1+s) k/(n-k) L_a with a plain sum.
    """

    flag_prefix = "siss"
    flag_aliases = {"lambda": "lam"}

    def __init__(
        self,
        lam: float = 0.5,
        weighting: str = "fixed_norm",
        scaling_norm: Optional[float] = None,
        relative_norm: float = 0.1,
        norm_refresh_every: int = 1,
        n: Optional[int] = None,
        k: Optional[int] = None,
        superfactor: float = 0.0,
        timestep_range: Optional[tuple[int, int]] = None,
    ):
        super().__init__(timestep_range)
        self.lam = check_unit_interval("lam (the SISS mixture weight lambda)", lam)
        if weighting not in ("fixed_norm", "paper"):
            raise ValueError(f"weighting must be 'fixed_norm' or 'paper', got {weighting!r}.")
        self.weighting = weighting
        self.scaling_norm = None if scaling_norm is None else check_non_negative("scaling_norm", scaling_norm)
        self.relative_norm = check_positive("relative_norm", relative_norm)
        if int(norm_refresh_every) < 1:
            raise ValueError(f"norm_refresh_every must be >= 1, got {norm_refresh_every}.")
        self.norm_refresh_every = int(norm_refresh_every)
        self.superfactor = check_non_negative("superfactor", superfactor)
        self.n, self.k = n, k
        if weighting == "paper":
            if n is None or k is None:
                raise ValueError("weighting='paper' needs n (training-set size) and k (forget-set size).")
            if not (int(n) > int(k) > 0):
                raise ValueError(f"weighting='paper' needs n > k > 0, got n={n}, k={k}.")
            self.n, self.k = int(n), int(k)

    def make_combiner(self):
        from ..gradients import FixedNormCombiner, SumCombiner

        if self.weighting == "paper":
            return SumCombiner()
        return FixedNormCombiner(self.scaling_norm, self.relative_norm, self.norm_refresh_every)

    def _weighted_terms(self, keep_loss: torch.Tensor, forget_loss: torch.Tensor, logs: dict) -> LossTerms:
        logs["loss_x"] = keep_loss.detach()
        logs["loss_a"] = forget_loss.detach()
        if self.weighting == "paper":
            n, k = self.n, self.k
            return LossTerms(
                keep=keep_loss * (n / (n - k)),
                forget=-forget_loss * ((1 + self.superfactor) * k / (n - k)),
                logs=logs,
            )
        return LossTerms(keep=keep_loss, forget=-forget_loss, logs=logs)


class SISS(_SISSWeighting):
    """SISS with the defensive mixture and importance weights (one forward pass).

    Example:
        >>> objective = get_objective("siss", lam=0.5, scaling_norm=0.05)
        >>> terms = objective(denoiser, forget_batch, keep_batch, generator=torch.Generator().manual_seed(0))
    """

    name = "siss"

    def __call__(
        self,
        denoiser: Denoiser,
        forget_batch: DenoisingBatch,
        keep_batch: Optional[DenoisingBatch] = None,
        generator: Optional[torch.Generator] = None,
    ) -> LossTerms:
        self._check_batches(forget_batch, keep_batch)
        _check_pairing(forget_batch, keep_batch, self.name)
        schedule = denoiser.schedule
        x, a = keep_batch.x0, forget_batch.x0
        timesteps = schedule.sample_timesteps(len(x), x.device, generator, self.timestep_range)
        noise = denoiser.noise(x, generator)
        from_forget = self._draw_sources(len(x), x.device, generator)
        gamma, sigma = schedule.coefficients(timesteps, x)
        source = torch.where(from_forget.view((-1,) + (1,) * (x.ndim - 1)), a, x)
        m = gamma * source + sigma * noise

        with torch.no_grad():
            delta = log_density_ratio(m, x, a, gamma, sigma, denoiser.noise_offset)
            log_w_x, log_w_a = importance_log_weights(delta, self.lam)
            w_x, w_a = log_w_x.exp().float(), log_w_a.exp().float()
            target_x = denoiser.target(m, x, timesteps)
            target_a = denoiser.target(m, a, timesteps)

        prediction_x, prediction_a = _predict_for_both(denoiser, m, timesteps, forget_batch, keep_batch)
        keep_loss = (w_x * denoiser.loss(prediction_x, target_x, timesteps)).mean()
        forget_loss = (w_a * denoiser.loss(prediction_a, target_a, timesteps)).mean()
        logs = {"w_x_mean": w_x.mean(), "w_a_mean": w_a.mean(), "forget_fraction": from_forget.float().mean()}
        return self._weighted_terms(keep_loss, forget_loss, logs)

    def _draw_sources(self, batch_size: int, device, generator) -> torch.Tensor:
        """True where m is built from the forget item (probability lam)."""
        gen_device = generator.device if generator is not None else "cpu"
        draws = torch.rand(batch_size, generator=generator, device=gen_device)
        return (draws < self.lam).to(device)


class SISSNoIS(_SISSWeighting):
    """SISS without importance sampling: two forward passes, on gamma x + sigma eps and on
    gamma a + sigma eps, each regressed onto eps. `lam` is unused."""

    name = "siss_no_is"

    def __call__(
        self,
        denoiser: Denoiser,
        forget_batch: DenoisingBatch,
        keep_batch: Optional[DenoisingBatch] = None,
        generator: Optional[torch.Generator] = None,
    ) -> LossTerms:
        self._check_batches(forget_batch, keep_batch)
        _check_pairing(forget_batch, keep_batch, self.name)
        schedule = denoiser.schedule
        x, a = keep_batch.x0, forget_batch.x0
        timesteps = schedule.sample_timesteps(len(x), x.device, generator, self.timestep_range)
        noise = denoiser.noise(x, generator)
        x_t = schedule.add_noise(x, noise, timesteps)
        a_t = schedule.add_noise(a, noise, timesteps)
        keep_loss = denoiser.loss(denoiser.predict(x_t, timesteps, keep_batch), denoiser.target(x_t, x, timesteps), timesteps).mean()
        forget_loss = denoiser.loss(denoiser.predict(a_t, timesteps, forget_batch), denoiser.target(a_t, a, timesteps), timesteps).mean()
        return self._weighted_terms(keep_loss, forget_loss, {})


class SISSBernoulli(SISS):
    """The Bernoulli-mixture variant: the same mixed m, both terms regressed onto the drawn eps.

    keep = mean_b [m from x] * loss / (1 - lam),  forget = mean_b [m from a] * loss / lam,
    which are unbiased estimates of the keep and forget denoising losses. Needs 0 < lam < 1.
    """

    name = "siss_bernoulli"

    def __init__(self, lam: float = 0.5, **kwargs):
        check_unit_interval("lam (the SISS mixture weight lambda) for siss_bernoulli", lam, True, True)
        super().__init__(lam=lam, **kwargs)

    def __call__(
        self,
        denoiser: Denoiser,
        forget_batch: DenoisingBatch,
        keep_batch: Optional[DenoisingBatch] = None,
        generator: Optional[torch.Generator] = None,
    ) -> LossTerms:
        self._check_batches(forget_batch, keep_batch)
        _check_pairing(forget_batch, keep_batch, self.name)
        schedule = denoiser.schedule
        x, a = keep_batch.x0, forget_batch.x0
        timesteps = schedule.sample_timesteps(len(x), x.device, generator, self.timestep_range)
        noise = denoiser.noise(x, generator)
        from_forget = self._draw_sources(len(x), x.device, generator)
        gamma, sigma = schedule.coefficients(timesteps, x)
        source = torch.where(from_forget.view((-1,) + (1,) * (x.ndim - 1)), a, x)
        m = gamma * source + sigma * noise

        prediction_x, prediction_a = _predict_for_both(denoiser, m, timesteps, forget_batch, keep_batch)
        target = denoiser.target(m, source, timesteps)  # the drawn eps, in the loss space
        is_forget = from_forget.float()
        keep_loss = ((1 - is_forget) * denoiser.loss(prediction_x, target, timesteps)).mean() / (1 - self.lam)
        forget_loss = (is_forget * denoiser.loss(prediction_a, target, timesteps)).mean() / self.lam
        return self._weighted_terms(keep_loss, forget_loss, {"forget_fraction": is_forget.mean()})
