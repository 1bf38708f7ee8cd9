"""Sample quality: the Fréchet distance between feature sets and an Inception-score-style classifier score.

The Fréchet distance between Gaussians N(mu_a, S_a) and N(mu_b, S_b) fitted to two feature sets is

    FD = ||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^{1/2} S_b S_a^{1/2})^{1/2}).

With Inception-v3 pool features this is FID; here any feature extractor works (the toy uses the digits
classifier's penultimate features), so values are only comparable for the same extractor and sample count.
"""

from __future__ import annotations

import math

import torch

from ._utils import as_float_tensor, check_finite


def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance (divisor N - 1) of a feature set (N, D), in float64.

    Compute the statistics of a fixed reference set once and reuse them with `frechet_distance_from_stats`.

    Example:
        >>> mu, cov = gaussian_stats(torch.tensor([[0.0, 1.0], [2.0, 3.0]]))
        >>> mu.tolist(), cov.tolist()
        ([1.0, 2.0], [[2.0, 2.0], [2.0, 2.0]])
    """
    features = as_float_tensor("features", features, min_rows=2).detach().flatten(1).to("cpu", torch.float64)
    check_finite("features", features)
    mean = features.mean(dim=0)
    centred = features - mean
    cov = centred.T @ centred / (features.shape[0] - 1)
    return mean, cov


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix by eigendecomposition.

    Rounding can make tiny eigenvalues negative; they are clipped to 0, which keeps the result real.
    """
    symmetric = (matrix + matrix.T) / 2
    eigenvalues, eigenvectors = torch.linalg.eigh(symmetric)
    roots = eigenvalues.clamp_min(0.0).sqrt()
    return (eigenvectors * roots) @ eigenvectors.T


def _trace_sqrt_product(cov_a: torch.Tensor, cov_b: torch.Tensor) -> float:
    """tr((S_a S_b)^{1/2}), computed as tr((S_a^{1/2} S_b S_a^{1/2})^{1/2}).

    The inner matrix is symmetric PSD, so only symmetric eigendecompositions are needed: no complex parts and
    no ill-conditioned general square root (scipy's sqrtm on S_a S_b needs an epsilon fudge when S_a is
    singular; this form does not).
    """
    root_a = _psd_sqrt(cov_a)
    inner = root_a @ cov_b @ root_a
    eigenvalues = torch.linalg.eigvalsh((inner + inner.T) / 2)
    return float(eigenvalues.clamp_min(0.0).sqrt().sum().item())


def frechet_distance_from_stats(
    mean_a: torch.Tensor, cov_a: torch.Tensor, mean_b: torch.Tensor, cov_b: torch.Tensor
) -> float:
    """Fréchet distance between N(mean_a, cov_a) and N(mean_b, cov_b). Units: squared feature units.

    Example:
        >>> eye = torch.eye(2, dtype=torch.float64)
        >>> frechet_distance_from_stats(torch.zeros(2), eye, torch.ones(2), 4 * eye)   # 2 + 2 * (2 - 1)^2
        4.0
    """
    mean_a, mean_b = (torch.as_tensor(m, dtype=torch.float64).flatten() for m in (mean_a, mean_b))
    cov_a, cov_b = (torch.as_tensor(c, dtype=torch.float64) for c in (cov_a, cov_b))
    dim = mean_a.shape[0]
    if mean_b.shape[0] != dim or cov_a.shape != (dim, dim) or cov_b.shape != (dim, dim):
        raise ValueError(
            f"Mismatched statistics: means {tuple(mean_a.shape)} / {tuple(mean_b.shape)}, "
            f"covariances {tuple(cov_a.shape)} / {tuple(cov_b.shape)}."
        )
    if torch.equal(mean_a, mean_b) and torch.equal(cov_a, cov_b):
        return 0.0  # exact, instead of the ~1e-15 that rounding in the matrix square root leaves
    mean_term = float((mean_a - mean_b).pow(2).sum().item())
    trace_term = float((torch.trace(cov_a) + torch.trace(cov_b)).item()) - 2.0 * _trace_sqrt_product(cov_a, cov_b)
    # The exact value is >= 0; rounding can leave -1e-12 for identical inputs.
    return max(mean_term + trace_term, 0.0)


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets of shape (N_a, D) and (N_b, D).

    Zero for identical sets, symmetric, and in squared feature units. It is biased upward for small N (the
    covariance estimates are noisy), so compare values computed with the same number of samples.

    Example:
        >>> a = torch.randn(500, 4, generator=torch.Generator().manual_seed(0))
        >>> frechet_distance(a, a)
        0.0
        >>> round(frechet_distance(a, a + 3.0), 6)   # a shift by 3 in each of 4 dimensions: 4 * 3^2
        36.0
    """
    features_a = as_float_tensor("features_a", features_a, min_rows=2).flatten(1)
    features_b = as_float_tensor("features_b", features_b, min_rows=2).flatten(1)
    if features_a.shape[1] != features_b.shape[1]:
        raise ValueError(
            f"Feature sizes differ: {features_a.shape[1]} vs {features_b.shape[1]}; use the same feature extractor."
        )
    return frechet_distance_from_stats(*gaussian_stats(features_a), *gaussian_stats(features_b))


def classifier_score(logits: torch.Tensor) -> float:
    """Inception-score-style quality and diversity score: exp(E_x KL(p(y|x) || p(y))).

    `logits` are a classifier's outputs on generated samples, shape (N, K); p(y) is the mean of the softmax over
    the samples. The score lies in [1, K]: K when every sample is classified confidently and the classes are
    used evenly, 1 when all samples get the same distribution. Computed on the whole set (no splits).

    Example:
        >>> confident = torch.eye(3) * 100.0        # three samples, each certain of a different class
        >>> round(classifier_score(confident), 4)
        3.0
        >>> classifier_score(torch.zeros(4, 3))     # uniform predictions
        1.0
    """
    logits = as_float_tensor("logits", logits).detach().to("cpu", torch.float64)
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape (N, num_classes), got {tuple(logits.shape)}.")
    check_finite("logits", logits)
    log_p = torch.log_softmax(logits, dim=1)
    log_marginal = torch.logsumexp(log_p, dim=0) - math.log(logits.shape[0])
    kl = (log_p.exp() * (log_p - log_marginal)).sum(dim=1)
    return float(kl.mean().exp().item())
