"""Run a classifier over many images in batches: logits, predicted labels and penultimate features.

Any `nn.Module` works that maps a batch of images in [-1, 1] to logits with `forward(x)` and, for the Fréchet
distance, exposes `features(x)` returning its penultimate features (the toy's `DigitsClassifier` does both).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ._utils import as_float_tensor, check_batch_size, eval_mode, model_device, model_dtype


def _run_batched(
    module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, batch_size: int
) -> torch.Tensor:
    batch_size = check_batch_size(batch_size)
    images = as_float_tensor("images", images)
    device, dtype = model_device(module), model_dtype(module)
    outputs = []
    with torch.no_grad(), eval_mode(module):
        for start in range(0, images.shape[0], batch_size):
            chunk = images[start : start + batch_size].to(device, dtype)
            outputs.append(fn(chunk).detach().float().cpu())
    return torch.cat(outputs)


def classifier_logits(classifier: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """`classifier(images)` in batches, without gradients, in eval mode; float32 logits on CPU, shape (N, K).

    Example:
        >>> clf = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
        >>> classifier_logits(clf, torch.zeros(5, 1, 2, 2)).shape
        torch.Size([5, 3])
    """
    logits = _run_batched(classifier, classifier, images, batch_size)
    if logits.ndim != 2:
        raise ValueError(f"The classifier must return logits of shape (N, num_classes), got {tuple(logits.shape)}.")
    return logits


UNRECOGNIZED = -1
"""Label `predict_labels` gives a sample whose top class probability is below `min_confidence`."""

DEFAULT_MIN_CONFIDENCE = 0.5
"""Class-counting default: a sample counts as class c only if the classifier gives c at least this probability.

An arg-max always names some class, even for a sample that is pure noise; after class unlearning the forgotten
class often turns into exactly such noise, and the toy classifier happens to call dark noise a "1". Requiring a
probability of 0.5 (more than all other classes together) keeps those samples out of the forget-class count.
"""


def predict_labels(
    classifier: nn.Module, images: torch.Tensor, batch_size: int = 256, min_confidence: float = 0.0
) -> torch.Tensor:
    """The classifier's arg-max label for each image, as a long tensor of shape (N,).

    With `min_confidence > 0`, images whose top softmax probability is below it get `UNRECOGNIZED` (-1) instead,
    so they count toward no class.

    Example:
        >>> clf = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
        >>> predict_labels(clf, torch.zeros(5, 1, 2, 2)).shape
        torch.Size([5])
    """
    if not 0.0 <= min_confidence <= 1.0:
        raise ValueError(f"min_confidence must be in [0, 1], got {min_confidence}.")
    logits = classifier_logits(classifier, images, batch_size)
    probabilities = logits.softmax(dim=1)
    confidence, labels = probabilities.max(dim=1)
    if min_confidence > 0:
        labels = torch.where(confidence >= min_confidence, labels, torch.full_like(labels, UNRECOGNIZED))
    return labels


def classifier_features(classifier: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """`classifier.features(images)` in batches, flattened to float32 (N, D) on CPU.

    These are the features the Fréchet distance compares (see `frechet_distance`).

    Example:
        >>> class Clf(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.body, self.head = nn.Sequential(nn.Flatten(), nn.Linear(4, 6)), nn.Linear(6, 3)
        ...     def features(self, x):
        ...         return self.body(x)
        ...     def forward(self, x):
        ...         return self.head(self.features(x))
        >>> classifier_features(Clf(), torch.zeros(5, 1, 2, 2)).shape
        torch.Size([5, 6])
    """
    if not callable(getattr(classifier, "features", None)):
        raise TypeError(
            f"{type(classifier).__name__} has no `features(x)` method; the Fréchet distance needs a classifier "
            "that returns its penultimate features."
        )
    return _run_batched(classifier, classifier.features, images, batch_size).flatten(1)
