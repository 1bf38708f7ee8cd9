"""Distance to retrain: how far an unlearned model is from the gold standard, a model retrained without the forget data.

The retrained model is measured once (`retrain_reference`); every other model (the base model before unlearning,
the unlearned one after) is compared with it on the same footing: its samples come from the same seeds and its
forget-item losses answer the same queries (the same timesteps and seeded noise, see `query_losses`). The figures
(`distance_to_retrain`, docs/metrics.md, "Distance to retrain"):

- `fd_to_retrain`: the Fréchet distance between the model's samples and the retrained model's samples, in the
  same features the suite's `fd` uses;
- `forget_loss_gap_to_retrain`: the model's mean forget-item loss minus the retrained model's (`forget_loss_retrain`);
  negative: the model still fits the forget items better than a model that never saw them; positive: it overshot;
- `mia_auc_vs_retrain`: the AUC of the loss-threshold attack (`mia_auc`) that takes the model's forget losses as
  members and the retrained model's losses on the same queries as non-members, taken per query (one timestep and
  noise draw, over the forget items) and averaged over the queries; 0.5 when the two models answer alike, above it
  while the model still remembers, below it when it overshot;
- `retrain_mia_auc`, `mia_auc_gap_to_retrain`: with held-out data, the retrained model's own forget-vs-held-out
  AUC (the level unlearning should reach) and the model's `mia_auc` minus it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from . import likelihood
from .quality import frechet_distance_from_stats, gaussian_stats


@dataclass
class RetrainReference:
    """The retrained model's side of "distance to retrain", measured once.

    Attributes:
        forget_query_losses: (forget items, queries) per-query denoising losses (`query_losses`).
        feature_stats: (mean, covariance) of its samples' features (`gaussian_stats`), or None (no FD).
        mia_auc: its own forget-vs-held-out membership-inference AUC, or None (no held-out data).
    """

    forget_query_losses: torch.Tensor
    feature_stats: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    mia_auc: Optional[float] = None


def retrain_reference(
    forget_query_losses: torch.Tensor,
    sample_features: Optional[torch.Tensor] = None,
    mia_auc: Optional[float] = None,
) -> RetrainReference:
    """Summarise the retrained model: its per-query forget losses, its samples' features (at least 2 samples; their
    Gaussian statistics are kept) and its own forget-vs-held-out MIA AUC (the suite's `mia_auc`), if measured.

    Example:
        >>> ref = retrain_reference(torch.tensor([[0.5, 0.7]]), mia_auc=0.45)
        >>> distance_to_retrain(ref, torch.tensor([[0.9, 1.1]]), model_mia_auc=0.05)["mia_auc_gap_to_retrain"]
        -0.4
    """
    losses = torch.as_tensor(forget_query_losses).detach().double().cpu()
    if losses.ndim != 2 or losses.numel() == 0:
        raise ValueError(f"forget_query_losses must be a non-empty (items, queries) tensor, got {tuple(losses.shape)}.")
    stats = None
    if sample_features is not None:
        if sample_features.shape[0] < 2:
            raise ValueError("The Fréchet distance to retrain needs at least 2 samples of the retrained model.")
        stats = gaussian_stats(sample_features)
    return RetrainReference(losses, stats, None if mia_auc is None else float(mia_auc))


def query_auc(member_query_losses: torch.Tensor, nonmember_query_losses: torch.Tensor) -> float:
    """`mia_auc` per query (column: one timestep and noise draw) over the items (rows), averaged over the queries.

    Taking the AUC within a query compares the two models on the same noisy inputs only: pooled over timesteps, the
    losses' scale (large near t = 0, small near t = T) would decide most pairs instead of the models.

    Example:
        >>> query_auc(torch.tensor([[0.4, 0.7]]), torch.tensor([[0.5, 0.7]]))   # query 1: lower (1), query 2: tie (0.5)
        0.75
    """
    if member_query_losses.shape[1] != nonmember_query_losses.shape[1]:
        raise ValueError("The two sets of losses must answer the same queries (the same number of columns).")
    columns = range(member_query_losses.shape[1])
    return sum(likelihood.mia_auc(member_query_losses[:, j], nonmember_query_losses[:, j]) for j in columns) / len(columns)


def distance_to_retrain(
    reference: RetrainReference,
    forget_query_losses: torch.Tensor,
    sample_features: Optional[torch.Tensor] = None,
    model_mia_auc: Optional[float] = None,
) -> dict[str, Any]:
    """Compare a model with the retrained one (see the module docstring for each key).

    `forget_query_losses` must answer the reference's queries (same forget items, timestep grid, noise draws and
    seed); `sample_features` must come from the same number of samples and seeds as the reference's, in the same
    features. The FD needs both sides' features; the MIA gap needs `model_mia_auc` and the reference's AUC.

    Example:
        >>> ref = retrain_reference(torch.tensor([[0.5, 0.7]]))
        >>> distance_to_retrain(ref, torch.tensor([[0.5, 0.7]]))["mia_auc_vs_retrain"]   # identical answers
        0.5
    """
    losses = torch.as_tensor(forget_query_losses).detach().double().cpu()
    if losses.shape != reference.forget_query_losses.shape:
        raise ValueError(
            f"The forget losses answer other queries than the retrained model's: shape {tuple(losses.shape)} vs "
            f"{tuple(reference.forget_query_losses.shape)} (same forget set, timesteps, noise draws and seed needed)."
        )
    retrain_loss = float(reference.forget_query_losses.mean().item())
    report: dict[str, Any] = {
        "forget_loss_retrain": retrain_loss,
        "forget_loss_gap_to_retrain": float(losses.mean().item()) - retrain_loss,
        "mia_auc_vs_retrain": query_auc(losses, reference.forget_query_losses),
    }
    if sample_features is not None and reference.feature_stats is not None:
        if sample_features.shape[0] < 2:
            raise ValueError("The Fréchet distance to retrain needs at least 2 samples.")
        report["fd_to_retrain"] = frechet_distance_from_stats(*gaussian_stats(sample_features), *reference.feature_stats)
    if reference.mia_auc is not None:
        report["retrain_mia_auc"] = reference.mia_auc
        if model_mia_auc is not None:
            report["mia_auc_gap_to_retrain"] = float(model_mia_auc) - reference.mia_auc
    return report
