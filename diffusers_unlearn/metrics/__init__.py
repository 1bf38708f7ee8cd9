"""Metrics shared by every unlearning method, computed the same way (same seeds) before and after unlearning.

- memorization: `nearest_distances`, `memorization_rate` (pixel L2 in [0, 1] units, or cosine distance in a
  copy-detection model's features);
- copy detection: `load_copy_detector` (`PixelCopyDetector`, or `FeatureCopyDetector` on any `AutoModel` image
  embedding), `cluster_fraction`;
- classes: `class_rate`, `class_count`, `pul` (VDU's percentage of unlearning);
- quality: `frechet_distance`, `classifier_score`, with `classifier_features` / `classifier_logits`;
- likelihood: `denoising_losses` (ELBO proxy on a fixed timestep grid and seeded noise), `mia_auc`,
  `kl_to_standard_normal`;
- noise norm (Wen et al.): `noise_norm_scores`, with `noise_norm_per_prompt` / `noise_norm_per_class` /
  `noise_norm_along_trajectory`;
- weights: `weight_distance`;
- distance to retrain: `retrain_reference`, `distance_to_retrain` (FD, forget-loss gap and MIA AUC against a model
  retrained without the forget data), with `query_losses`;
- the suite: `evaluate_ddpm`, `pul_from_reports`.

See docs/metrics.md for definitions and units.

Example:
    >>> from diffusers_unlearn.metrics import mia_auc, pul
    >>> pul(80, 20)
    75.0
"""

from .classes import class_count, class_rate, pul
from .classifier import DEFAULT_MIN_CONFIDENCE, UNRECOGNIZED, classifier_features, classifier_logits, predict_labels
from .copy_detection import CopyDetector, FeatureCopyDetector, PixelCopyDetector, cluster_fraction, load_copy_detector
from .likelihood import denoising_losses, kl_to_standard_normal, mia_auc, query_losses, timestep_grid
from .memorization import memorization_rate, nearest_distances, to_unit_interval
from .noise_norm import noise_norm_along_trajectory, noise_norm_per_class, noise_norm_per_prompt, noise_norm_scores
from .quality import classifier_score, frechet_distance, frechet_distance_from_stats, gaussian_stats
from .retrain import RetrainReference, distance_to_retrain, retrain_reference
from .suite import evaluate_ddpm, pul_from_reports
from .weights import weight_distance

__all__ = [
    "CopyDetector",
    "DEFAULT_MIN_CONFIDENCE",
    "FeatureCopyDetector",
    "PixelCopyDetector",
    "RetrainReference",
    "UNRECOGNIZED",
    "class_count",
    "class_rate",
    "classifier_features",
    "classifier_logits",
    "classifier_score",
    "cluster_fraction",
    "denoising_losses",
    "distance_to_retrain",
    "evaluate_ddpm",
    "frechet_distance",
    "frechet_distance_from_stats",
    "gaussian_stats",
    "kl_to_standard_normal",
    "load_copy_detector",
    "memorization_rate",
    "mia_auc",
    "nearest_distances",
    "noise_norm_along_trajectory",
    "noise_norm_per_class",
    "noise_norm_per_prompt",
    "noise_norm_scores",
    "predict_labels",
    "pul",
    "pul_from_reports",
    "query_losses",
    "retrain_reference",
    "timestep_grid",
    "to_unit_interval",
    "weight_distance",
]
