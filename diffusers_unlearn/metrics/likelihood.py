"""Likelihood-style metrics: per-item denoising loss (an ELBO proxy), loss-threshold membership inference,
and the KL between the model's noise predictions and N(0, I) (EraseDiff's diagnostic).

Every quantity here is computed on a FIXED grid of timesteps with FIXED, seeded noise, so two models (before and
after unlearning) are scored on exactly the same noisy inputs: their difference is a paired comparison, with no
Monte Carlo noise between them. An item's noise depends only on the seed and the item's index in the batch, not
on `batch_size` or the device.
"""

from __future__ import annotations

from typing import Iterator, Optional

import numpy as np
import torch

from ..noise import per_sample_loss
from ..objectives.base import Denoiser, DenoisingBatch
from ._utils import check_batch_size, check_finite, eval_mode

# Mixes the seed and the item index into one generator seed (a large odd constant; any fixed one would do).
_SEED_STRIDE = 1_000_003


def timestep_grid(
    num_train_timesteps: int, num_timesteps: int, timestep_range: Optional[tuple[int, int]] = None
) -> torch.Tensor:
    """`num_timesteps` evenly spaced timesteps, the midpoints of equal bins of [low, high).

    Example:
        >>> timestep_grid(1000, 4)
        tensor([125, 375, 625, 875])
    """
    low, high = timestep_range if timestep_range is not None else (0, num_train_timesteps)
    if not 0 <= low < high <= num_train_timesteps:
        raise ValueError(f"timestep_range {(low, high)} must satisfy 0 <= low < high <= {num_train_timesteps}.")
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or not 1 <= num_timesteps <= high - low:
        raise ValueError(f"num_timesteps must be an integer in [1, {high - low}], got {num_timesteps!r}.")
    centres = (torch.arange(num_timesteps, dtype=torch.float64) + 0.5) * (high - low) / num_timesteps
    return (low + centres.floor()).long()


def _item_noise(seed: int, index: int, rows: int, shape: torch.Size) -> torch.Tensor:
    generator = torch.Generator().manual_seed((int(seed) * _SEED_STRIDE + index) % (2**63))
    return torch.randn((rows, *shape), generator=generator)


def _fixed_predictions(
    denoiser: Denoiser,
    batch: DenoisingBatch,
    num_timesteps: int,
    noise_draws: int,
    seed: int,
    batch_size: int,
    timestep_range: Optional[tuple[int, int]],
) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """Yield (first item, number of items, noise estimates, true noise) chunk by chunk.

    Each item is evaluated at every (draw, timestep) pair; its rows are contiguous, `num_timesteps *
    noise_draws` of them, so a chunk's outputs reshape to (items, rows_per_item, ...).
    """
    if len(batch) == 0:
        raise ValueError("The batch is empty.")
    if isinstance(noise_draws, bool) or not isinstance(noise_draws, int) or noise_draws < 1:
        raise ValueError(f"noise_draws must be an integer >= 1, got {noise_draws!r}.")
    batch_size = check_batch_size(batch_size)
    schedule = denoiser.schedule
    grid = timestep_grid(schedule.num_train_timesteps, num_timesteps, timestep_range)
    rows_per_item = num_timesteps * noise_draws
    timesteps_per_item = grid.repeat(noise_draws)  # rows ordered (draw, timestep)
    items_per_chunk = max(1, batch_size // rows_per_item)
    x0_all = batch.x0.detach()
    device = x0_all.device

    with torch.no_grad(), eval_mode(denoiser.model):
        for start in range(0, len(batch), items_per_chunk):
            stop = min(start + items_per_chunk, len(batch))
            count = stop - start
            noise = torch.cat([_item_noise(seed, i, rows_per_item, x0_all.shape[1:]) for i in range(start, stop)])
            noise = noise.to(device, x0_all.dtype)
            rows = batch.select(torch.arange(start, stop, device=device).repeat_interleave(rows_per_item))
            x0 = rows.x0
            timesteps = timesteps_per_item.repeat(count).to(device)
            x_t = schedule.add_noise(x0, noise, timesteps)
            predictions = []
            for row in range(0, x0.shape[0], batch_size):
                part = slice(row, row + batch_size)
                sub = rows.select(part)
                predictions.append(denoiser(x_t[part], timesteps[part], sub))
            yield start, count, torch.cat(predictions), noise


def denoising_losses(
    denoiser: Denoiser,
    batch: DenoisingBatch,
    num_timesteps: int = 10,
    noise_draws: int = 1,
    seed: int = 0,
    *,
    batch_size: int = 256,
    timestep_range: Optional[tuple[int, int]] = None,
    per_query: bool = False,
) -> torch.Tensor:
    """Each item's mean denoising loss over a fixed timestep grid and fixed seeded noise (an ELBO proxy).

    For item x the loss is the mean over `num_timesteps` evenly spaced timesteps t (see `timestep_grid`) and
    `noise_draws` noise draws eps of ||eps_theta(gamma_t x + sigma_t eps, t, c) - eps||^2, averaged over pixels
    (the package's per-pixel MEAN reduction; see `noise.per_sample_loss`). It is in epsilon space for every
    `prediction_type`. The timesteps are weighted equally, so it is a proxy for the negative ELBO, not the ELBO.

    Same model, data and seed give the same values; two models scored with the same seed see identical noisy
    inputs, so `after - before` is a paired difference. Runs without gradients, in eval mode.

    Returns a float64 tensor of shape (len(batch),) on CPU; with `per_query`, the unaveraged losses (len(batch),
    noise_draws * num_timesteps), as `query_losses`.

    Example:
        >>> losses = denoising_losses(denoiser, DenoisingBatch(images), num_timesteps=10, seed=0)  # doctest: +SKIP
        >>> losses.shape  # doctest: +SKIP
        torch.Size([16])
    """
    losses = torch.cat([
        per_sample_loss(prediction, noise).double().cpu().reshape(count, -1)
        for _, count, prediction, noise in _fixed_predictions(
            denoiser, batch, num_timesteps, noise_draws, seed, batch_size, timestep_range
        )
    ])
    return losses if per_query else losses.mean(dim=1)


def query_losses(denoiser: Denoiser, batch: DenoisingBatch, *args, **kwargs) -> torch.Tensor:
    """The losses `denoising_losses` averages, one per query: `denoising_losses(..., per_query=True)`, a float64
    tensor (len(batch), noise_draws * num_timesteps) on CPU, columns ordered (draw, timestep). Two models scored
    with the same seed answer the same queries (the same noisy inputs), column by column.

    Example:
        >>> query_losses(denoiser, DenoisingBatch(images), num_timesteps=10, noise_draws=2).shape  # doctest: +SKIP
        torch.Size([16, 20])
    """
    return denoising_losses(denoiser, batch, *args, per_query=True, **kwargs)


def kl_to_standard_normal(
    denoiser: Denoiser,
    batch: DenoisingBatch,
    num_timesteps: int = 10,
    noise_draws: int = 1,
    seed: int = 0,
    *,
    batch_size: int = 256,
    timestep_range: Optional[tuple[int, int]] = None,
) -> float:
    """KL( N(mu, diag(var)) || N(0, I) ) per dimension, for a Gaussian fitted to the model's noise predictions.

    EraseDiff's diagnostic: a model that has unlearned some data predicts noise on it that no longer looks like
    N(0, I). The predictions eps_theta(x_t, t, c) are collected on the same fixed timestep grid and seeded noise
    as `denoising_losses`; for every output dimension j (pixel and channel) their mean mu_j and variance var_j
    over all items, timesteps and draws are taken, and the function returns

        mean_j 0.5 * (var_j + mu_j^2 - 1 - log var_j)     (nats per dimension, >= 0).

    This is an APPROXIMATION: the predictions are not Gaussian, and the fit ignores correlations between
    dimensions (a full covariance would need more samples than dimensions). Compare values between models or
    between forget and keep data, not against an absolute scale. Variances are floored at 1e-12, so a constant
    output gives a large finite value rather than inf. Needs at least 2 predictions in total.

    Example:
        >>> kl_forget = kl_to_standard_normal(denoiser, forget_batch, seed=0)  # doctest: +SKIP
        >>> kl_keep = kl_to_standard_normal(denoiser, keep_batch, seed=0)  # doctest: +SKIP
    """
    total = total_sq = None
    count = 0
    for _, _, prediction, _ in _fixed_predictions(
        denoiser, batch, num_timesteps, noise_draws, seed, batch_size, timestep_range
    ):
        flat = prediction.detach().flatten(1).to("cpu", torch.float64)
        check_finite("the model's noise predictions", flat)
        total = flat.sum(dim=0) if total is None else total + flat.sum(dim=0)
        total_sq = flat.pow(2).sum(dim=0) if total_sq is None else total_sq + flat.pow(2).sum(dim=0)
        count += flat.shape[0]
    if count < 2:
        raise ValueError("kl_to_standard_normal needs at least 2 predictions; use more items, timesteps or draws.")
    mean = total / count
    variance = ((total_sq - count * mean.pow(2)) / (count - 1)).clamp_min(1e-12)
    kl = 0.5 * (variance + mean.pow(2) - 1.0 - variance.log())
    return float(kl.mean().item())


def mia_auc(member_losses: torch.Tensor, nonmember_losses: torch.Tensor) -> float:
    """Area under the ROC curve of a loss-threshold membership-inference attack.

    The attack calls an item a member when its loss is low. The AUC is the probability that a random member has a
    lower loss than a random non-member, ties counting one half (the Mann-Whitney U statistic / (n_m * n_n)),
    computed exactly from average ranks. 1.0: members are perfectly identifiable; 0.5: no better than chance;
    below 0.5: members now look LESS familiar than unseen data (a sign of over-unlearning, the "Streisand effect").

    Example:
        >>> mia_auc(torch.tensor([0.1, 0.2]), torch.tensor([0.3, 0.4]))
        1.0
        >>> mia_auc(torch.tensor([0.1, 0.3]), torch.tensor([0.2, 0.3]))  # pairs: win, win, loss, tie
        0.625
    """
    members = np.asarray(torch.as_tensor(member_losses).detach().cpu().double().flatten().numpy())
    nonmembers = np.asarray(torch.as_tensor(nonmember_losses).detach().cpu().double().flatten().numpy())
    if members.size == 0 or nonmembers.size == 0:
        raise ValueError("mia_auc needs at least one member loss and one non-member loss.")
    if not (np.isfinite(members).all() and np.isfinite(nonmembers).all()):
        raise ValueError("mia_auc got NaN or inf losses.")
    # Rank by score = -loss (higher score => more likely a member); tied values share their average rank.
    scores = -np.concatenate([members, nonmembers])
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)  # 1-based rank of the last element of each group of equal scores
    average_ranks = ends - (counts - 1) / 2.0
    member_rank_sum = average_ranks[inverse[: members.size]].sum()
    u_statistic = member_rank_sum - members.size * (members.size + 1) / 2.0
    return float(u_statistic / (members.size * nonmembers.size))
