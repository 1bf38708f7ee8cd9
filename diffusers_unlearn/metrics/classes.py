"""Class unlearning: how often samples are (still) classified as the forgotten class, and VDU's PUL."""

from __future__ import annotations

import math

import torch


def _labels(predicted_labels) -> torch.Tensor:
    labels = torch.as_tensor(predicted_labels)
    if labels.ndim != 1:
        raise ValueError(f"predicted_labels must be a 1-D tensor of class indices, got shape {tuple(labels.shape)}.")
    if labels.is_floating_point():
        raise ValueError("predicted_labels must hold integer class indices; take logits.argmax(dim=1) first.")
    return labels


def class_count(predicted_labels: torch.Tensor, target_class: int) -> int:
    """Number of predictions equal to `target_class`.

    Example:
        >>> class_count(torch.tensor([1, 3, 1, 0]), 1)
        2
    """
    return int((_labels(predicted_labels) == int(target_class)).sum().item())


def class_rate(predicted_labels: torch.Tensor, target_class: int) -> float:
    """Fraction of predictions equal to `target_class` (the forget-class rate, in [0, 1]).

    Example:
        >>> class_rate(torch.tensor([1, 3, 1, 0]), 1)
        0.5
    """
    labels = _labels(predicted_labels)
    if labels.numel() == 0:
        raise ValueError("class_rate needs at least one prediction.")
    return class_count(labels, target_class) / labels.numel()


def pul(n_undesired_original: int | float, n_undesired_unlearned: int | float) -> float:
    """Percentage of unlearning (VDU): 100 * (N_orig - N_unl) / N_orig.

    `N_orig` and `N_unl` count the undesired samples (for example those a classifier assigns to the forgotten
    class) among the samples of the original and the unlearned model, drawn from the SAME seeds. 100 means none
    are left; 0 means no change; a negative value means the unlearned model makes more of them.

    Raises ValueError when N_orig is 0 (the original model made no undesired sample, so there is nothing to
    measure: draw more samples) or when a count is negative.

    Example:
        >>> pul(80, 20)
        75.0
    """
    original, unlearned = float(n_undesired_original), float(n_undesired_unlearned)
    for name, value in (("n_undesired_original", original), ("n_undesired_unlearned", unlearned)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a count >= 0, got {value}.")
    if original == 0:
        raise ValueError(
            "PUL is undefined when the original model produced no undesired samples (N_orig = 0); "
            "draw more samples or check the classifier and the forget class."
        )
    return 100.0 * (original - unlearned) / original
