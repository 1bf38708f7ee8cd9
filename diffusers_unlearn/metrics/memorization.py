"""Memorization: how close generated samples come to the images we want forgotten.

Two distances are offered:

- pixel L2 (the default): images are mapped from [-1, 1] to [0, 1] and compared as flat vectors, so a distance of
  1.0 is, for example, one pixel moving from black to white. SISS's MNIST threshold was L2 < 10 at 28x28;
  for the 8x8 toy, copies of the canary sit below 0.5 and the nearest real digit about 5 away.
- cosine distance (1 - cosine similarity, in [0, 2]) between the features of a copy-detection model the user
  supplies as `feature_fn` (SSCD-style), for images where pixel distance is too brittle.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ._utils import as_float_tensor, check_batch_size, check_finite

FeatureFn = Callable[[torch.Tensor], torch.Tensor]

#: Values beyond this magnitude mean the images are not in [-1, 1] (for example in [0, 255]).
_RANGE_LIMIT = 1.5


def to_unit_interval(images: torch.Tensor) -> torch.Tensor:
    """Map images from [-1, 1] (the diffusers convention) to [0, 1] pixel units.

    Example:
        >>> to_unit_interval(torch.tensor([-1.0, 0.0, 1.0]))
        tensor([0.0000, 0.5000, 1.0000])
    """
    return (images + 1.0) / 2.0


def _check_pixel_range(name: str, images: torch.Tensor) -> None:
    if images.numel() and images.abs().max() > _RANGE_LIMIT:
        raise ValueError(
            f"{name} must be images in [-1, 1], but values reach {images.abs().max().item():.3g}. "
            "Scale [0, 1] images with x * 2 - 1 and [0, 255] images with x / 127.5 - 1."
        )


def _features(
    images: torch.Tensor, feature_fn: FeatureFn, batch_size: int, device: Optional[torch.device]
) -> torch.Tensor:
    """feature_fn applied in batches, L2-normalised, flattened, on CPU in float64."""
    chunks = []
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            chunk = images[start : start + batch_size]
            if device is not None:
                chunk = chunk.to(device)
            chunks.append(feature_fn(chunk).detach().flatten(1).to("cpu", torch.float64))
    features = torch.cat(chunks)
    return torch.nn.functional.normalize(features, dim=1)


def nearest_distances(
    samples: torch.Tensor,
    references: torch.Tensor,
    *,
    feature_fn: Optional[FeatureFn] = None,
    batch_size: int = 256,
    return_indices: bool = False,
    device: Optional[torch.device | str] = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Distance from each sample to its nearest reference image.

    Without `feature_fn`: the L2 distance in [0, 1] pixel units. Both inputs are images in [-1, 1] of the same
    shape, (N, C, H, W) or any (N, ...). With `feature_fn`: the cosine distance 1 - cos(f(sample), f(reference))
    between the features `feature_fn` returns for a batch of images (given in [-1, 1], as passed here).

    The distance matrix is built block by block (`batch_size` samples x `batch_size` references) in float64, so
    memory stays bounded for any N and the distances of exact copies come out as 0 to float precision.

    Returns a float64 tensor of shape (N,), and with `return_indices=True` also the index of each nearest
    reference. `device` is where `feature_fn` runs (the inputs are moved there batch by batch); pixel distances
    are computed on CPU.

    Example:
        >>> refs = torch.full((1, 1, 2, 2), -1.0)                         # a black 2x2 image
        >>> samples = torch.stack([refs[0], torch.ones(1, 2, 2)])         # a copy and a white image
        >>> nearest_distances(samples, refs)                              # sqrt(4 pixels * 1^2) = 2
        tensor([0., 2.], dtype=torch.float64)
    """
    batch_size = check_batch_size(batch_size)
    samples = as_float_tensor("samples", samples)
    references = as_float_tensor("references", references)
    if feature_fn is None:
        if samples.shape[1:] != references.shape[1:]:
            raise ValueError(
                f"samples have shape {tuple(samples.shape[1:])} per item but references {tuple(references.shape[1:])}; "
                "pixel distances need images of the same size."
            )
        _check_pixel_range("samples", samples)
        _check_pixel_range("references", references)
        check_finite("samples", samples)
        check_finite("references", references)
        left, right, cosine = samples.detach(), references.detach(), False
    else:
        device = torch.device(device) if device is not None else None
        left = _features(samples.detach(), feature_fn, batch_size, device)
        right = _features(references.detach(), feature_fn, batch_size, device)
        if left.shape[1] != right.shape[1]:
            raise ValueError("feature_fn returned features of different sizes for samples and references.")
        check_finite("features of samples", left)
        check_finite("features of references", right)
        cosine = True

    def block_of(tensor: torch.Tensor, start: int) -> torch.Tensor:
        # Converted block by block, so a large image set is never copied whole to float64.
        block = tensor[start : start + batch_size].flatten(1).to("cpu", torch.float64)
        return block if cosine else to_unit_interval(block)

    best = torch.full((left.shape[0],), float("inf"), dtype=torch.float64)
    best_index = torch.zeros(left.shape[0], dtype=torch.long)
    for start in range(0, left.shape[0], batch_size):
        rows = block_of(left, start)
        row_best = best[start : start + batch_size]  # views: the updates below write into best / best_index
        row_index = best_index[start : start + batch_size]
        for ref_start in range(0, right.shape[0], batch_size):
            cols = block_of(right, ref_start)
            if cosine:
                distances = (1.0 - rows @ cols.T).clamp_min(0.0)
            else:
                distances = torch.cdist(rows, cols, compute_mode="donot_use_mm_for_euclid_dist")
            value, index = distances.min(dim=1)
            better = value < row_best
            row_best[better] = value[better]
            row_index[better] = index[better] + ref_start
    if return_indices:
        return best, best_index
    return best


def memorization_rate(
    samples: torch.Tensor,
    forget_images: torch.Tensor,
    threshold: Optional[float] = None,
    *,
    feature_fn: Optional[FeatureFn] = None,
    batch_size: int = 256,
    copy_detector=None,
) -> float:
    """Fraction of samples whose nearest forget image is closer than `threshold` (strictly).

    Distances are those of `nearest_distances`: L2 in [0, 1] pixel units, or cosine distance in the features of
    `feature_fn`. With `copy_detector` (`metrics.copy_detection.CopyDetector`), the fraction it flags as copies;
    `threshold` is then not used. Returns a number in [0, 1]; multiply by the number of samples for the count.

    Example:
        >>> canary = torch.ones(1, 1, 8, 8)
        >>> samples = torch.cat([canary, -canary, canary * 0.99])
        >>> memorization_rate(samples, canary, threshold=1.0)   # the copy and the near-copy
        0.6666666666666666
    """
    if copy_detector is not None:
        if feature_fn is not None:
            raise ValueError("Give feature_fn or copy_detector, not both.")
        return float(copy_detector.is_copy(samples, forget_images, batch_size=batch_size).double().mean().item())
    if threshold is None:
        raise ValueError("memorization_rate needs a threshold or a copy_detector.")
    threshold = float(threshold)
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0, got {threshold}.")
    distances = nearest_distances(samples, forget_images, feature_fn=feature_fn, batch_size=batch_size)
    return float((distances < threshold).double().mean().item())
