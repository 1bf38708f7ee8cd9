"""Copy detection: is a generated image a copy of a reference image?

One small interface, `CopyDetector`, serves every place that decides "copy or not", so they all agree: the
memorization rate (`memorization_rate`, `evaluate_ddpm`), the keep-from-generations filter
(`data.filter_far_from`), the cluster check that finds the memorized content of a prompt
(`data.largest_cluster`, used by `train_unlearn_sd.py --memorized_prompts_file`, by
`python -m diffusers_unlearn.scan --num_cluster_generations` and by the pipelines'
`memorization_score(..., copy_detector=...)`).

Two detectors:

- `PixelCopyDetector(threshold)`: the L2 distance between images mapped to [0, 1], flattened; a copy when the
  distance is below `threshold` (strictly). The toys' default, and the numbers the package always reported.
- `FeatureCopyDetector(model, processor, threshold)`: the cosine similarity between the embeddings of an image
  model that transformers loads with `AutoModel` / `AutoImageProcessor` (DINOv2, CLIP vision, ...); a copy when
  the similarity is above `threshold` (strictly). Images are handed to the processor as 8-bit RGB pictures, so
  it resizes, crops and normalises them as it does for any picture.

Both give a *distance* (pixel L2, or 1 - cosine similarity) through `distance_matrix` / `nearest`, and the
distance below which a pair is a copy as `distance_threshold`; `is_copy` applies it.

`load_copy_detector("pixel", threshold)` or `load_copy_detector("facebook/dinov2-small", 0.5)` builds one; the
weights load only from safetensors files. `check_copy_detector(name_or_path)` checks the flag without loading
anything heavy. See docs/metrics.md ("Copy detection") for the thresholds in the literature.

Example:
    >>> detector = PixelCopyDetector(threshold=1.0)
    >>> canary = torch.ones(1, 1, 8, 8)
    >>> detector.is_copy(torch.cat([canary, -canary]), canary)
    tensor([ True, False])
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Optional

import torch

from ..errors import UserInputError

PIXEL = "pixel"

#: The default `--copy_similarity_threshold`: SSCD similarity > 0.5 is the copy criterion of Somepalli et al.
#: (2023) and of the papers that follow them. It was set for SSCD features; for DINOv2 or CLIP features it is only
#: a starting point (see docs/metrics.md).
DEFAULT_SIMILARITY_THRESHOLD = 0.5


class CopyDetector:
    """Decides whether images are copies of reference images. Subclasses define `embed` and `distance_matrix`.

    `name` and `threshold` (in the detector's own units: pixel L2, or cosine similarity) are recorded in reports
    and model cards (`describe`).
    """

    name: str = ""
    threshold: float = 0.0
    kind: str = ""

    @property
    def distance_threshold(self) -> float:
        """The distance below which a pair is a copy."""
        raise NotImplementedError

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """What distances are taken between, one row per image in [-1, 1]."""
        raise NotImplementedError

    def distances_between(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """The (N, M) distances between two sets of `embed` rows."""
        raise NotImplementedError

    def distance_matrix(self, images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
        """The (N, M) distances from each image to each reference (images in [-1, 1])."""
        return self.distances_between(self.embed(images), self.embed(references))

    def nearest(self, images: torch.Tensor, references: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """(distance, index) of each image's nearest reference; distances in float64."""
        raise NotImplementedError

    def is_copy(self, images: torch.Tensor, references: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """A bool tensor (N,): is each image a copy of some reference?"""
        distances, _ = self.nearest(images, references, batch_size=batch_size)
        return distances < self.distance_threshold

    def similarities(self, images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
        """(N, M) cosine similarities (feature detectors only)."""
        raise TypeError(f"The {self.name!r} copy detector measures distances, not similarities.")

    def describe(self) -> dict[str, Any]:
        """What reports, model cards and checkpoint fingerprints record: name, kind, threshold and its units."""
        units = "pixel L2 in [0, 1] units, copy below" if self.kind == PIXEL else "cosine similarity, copy above"
        return {"name": self.name, "kind": self.kind, "threshold": self.threshold, "threshold_units": units}


class PixelCopyDetector(CopyDetector):
    """Pixel L2 in [0, 1] units; a copy when closer than `threshold`. `threshold` may be None for a detector
    whose distances are wanted but whose threshold is decided later (`with_threshold`)."""

    kind = PIXEL

    def __init__(self, threshold: Optional[float] = None):
        if threshold is not None and not float(threshold) > 0:
            raise ValueError(f"The pixel copy threshold must be > 0, got {threshold}.")
        self.name = PIXEL
        self.threshold = None if threshold is None else float(threshold)

    def with_threshold(self, threshold: float) -> "PixelCopyDetector":
        return PixelCopyDetector(threshold)

    @property
    def distance_threshold(self) -> float:
        if self.threshold is None:
            raise ValueError("This pixel copy detector has no threshold yet; give one (with_threshold).")
        return self.threshold

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return ((images.float() + 1) / 2).flatten(1)

    def distances_between(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        return torch.cdist(left, right)

    def nearest(self, images: torch.Tensor, references: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        from .memorization import nearest_distances

        return nearest_distances(images, references, batch_size=batch_size, return_indices=True)


def _rgb_pictures(images: torch.Tensor) -> list:
    """Images in [-1, 1] (N, C, H, W) with 1 or 3 channels -> 8-bit RGB PIL images, as a saved PNG holds them."""
    from PIL import Image

    images = torch.as_tensor(images).detach().float().cpu()
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"Copy detection takes images (N, C, H, W) with 1 or 3 channels, got shape {tuple(images.shape)}.")
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(p, mode="RGB") for p in pixels]


class FeatureCopyDetector(CopyDetector):
    """Cosine similarity between image embeddings; a copy when the similarity exceeds `threshold`.

    `model` is an image-embedding model (`AutoModel` of DINOv2, a CLIP vision model, a CLIP model with
    `get_image_features`) and `processor` its `AutoImageProcessor`; or, with `processor=None`, `model` is a
    function from images in [-1, 1] to features (N, D) (for example a classifier's penultimate layer).
    Embeddings are computed `batch_size` images at a time, so results do not depend on the batch size.
    """

    kind = "features"

    def __init__(
        self,
        model: torch.nn.Module | Callable[[torch.Tensor], torch.Tensor],
        processor: Any = None,
        threshold: float = DEFAULT_SIMILARITY_THRESHOLD,
        batch_size: int = 32,
        name: Optional[str] = None,
        device: Optional[torch.device | str] = None,
    ):
        threshold = float(threshold)
        if not -1.0 < threshold < 1.0:
            raise ValueError(f"The cosine-similarity copy threshold must be in (-1, 1), got {threshold}.")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.model, self.processor, self.threshold = model, processor, threshold
        self.batch_size = int(batch_size)
        self.name = name or getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__
        self.device = torch.device(device) if device is not None else _module_device(model)

    @property
    def distance_threshold(self) -> float:
        return 1.0 - self.threshold

    def to(self, device: torch.device | str) -> "FeatureCopyDetector":
        """Move the model (when it is a module) and run it on `device`; returns self."""
        if isinstance(self.model, torch.nn.Module):
            self.model.to(device)
        self.device = torch.device(device)
        return self

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """The processor's pixel values for images in [-1, 1]: RGB, at the processor's size."""
        return self.processor(images=_rgb_pictures(images), return_tensors="pt")["pixel_values"]

    def _features_of(self, images: torch.Tensor) -> torch.Tensor:
        if self.processor is None:
            return self.model(images.to(self.device) if self.device is not None else images)
        pixel_values = self.preprocess(images)
        dtype = getattr(self.model, "dtype", None)
        pixel_values = pixel_values.to(self.device, dtype if dtype is not None and dtype.is_floating_point else None)
        if hasattr(self.model, "get_image_features"):  # a CLIP-like model with a text tower too
            output = self.model.get_image_features(pixel_values=pixel_values)
        else:
            output = self.model(pixel_values=pixel_values)
        if isinstance(output, torch.Tensor):
            return output
        pooled = getattr(output, "image_embeds", None)
        if pooled is None:
            pooled = getattr(output, "pooler_output", None)
        return pooled if pooled is not None else output.last_hidden_state[:, 0]

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised features (N, D) in float64, on CPU."""
        images = torch.as_tensor(images).detach()
        chunks = []
        with torch.no_grad():
            for start in range(0, images.shape[0], self.batch_size):
                features = self._features_of(images[start : start + self.batch_size])
                chunks.append(features.detach().flatten(1).to("cpu", torch.float64))
        if not chunks:
            raise ValueError("Copy detection got no images.")
        features = torch.cat(chunks)
        if not torch.isfinite(features).all():
            raise ValueError(f"The copy detector {self.name!r} returned non-finite features.")
        return torch.nn.functional.normalize(features, dim=1)

    def distances_between(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        if left.shape[1] != right.shape[1]:
            raise ValueError("The copy detector returned features of different sizes for images and references.")
        return (1.0 - left @ right.T).clamp_min(0.0)

    def similarities(self, images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
        return self.embed(images) @ self.embed(references).T

    def nearest(self, images: torch.Tensor, references: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        value, index = self.distance_matrix(images, references).min(dim=1)
        return value, index


def _module_device(model) -> Optional[torch.device]:
    if isinstance(model, torch.nn.Module):
        parameter = next(model.parameters(), None)
        return parameter.device if parameter is not None else None
    return None


def _looks_like_path(name: str) -> bool:
    """A Hub id is "name" or "owner/name"; anything else that does not exist locally is a missing folder."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def check_copy_detector(name_or_path: Optional[str], flag: str = "--copy_detector") -> None:
    """Check `--copy_detector` before any expensive work: "pixel", a local folder holding a safetensors model with
    its config and image-processor config, or a Hub id (checked when it loads). Raises `UserInputError` with one
    line naming the fix."""
    if name_or_path is None or name_or_path == PIXEL:
        return
    name = str(name_or_path)
    if os.path.isdir(name):
        files = set(os.listdir(name))
        if "config.json" not in files:
            raise UserInputError(f"{flag} {name}: no config.json there; save the model with save_pretrained(folder).")
        if not any(f.endswith(".safetensors") for f in files):
            if any(f.endswith(".bin") for f in files):
                raise UserInputError(
                    f"{flag} {name} holds only .bin weights, which are not loaded (pickle); convert them: "
                    "AutoModel.from_pretrained(folder).save_pretrained(folder, safe_serialization=True)."
                )
            raise UserInputError(f"{flag} {name}: no .safetensors weights there; save the model with save_pretrained(folder).")
        if "preprocessor_config.json" not in files:
            raise UserInputError(
                f"{flag} {name}: no preprocessor_config.json there; save the model's image processor into it: "
                "AutoImageProcessor.from_pretrained(model_id).save_pretrained(folder)."
            )
        return
    if os.path.exists(name):
        raise UserInputError(f"{flag} {name} is a file; give 'pixel', a model folder or a Hub id.")
    if _looks_like_path(name):
        raise UserInputError(f"{flag} {name} does not exist; give 'pixel', an existing model folder or a Hub id (owner/name).")


def add_copy_detector_arguments(parser, pixel_flag: str = "--memorization_threshold") -> None:
    """`--copy_detector` and `--copy_similarity_threshold`, as the training scripts and the scan define them."""
    parser.add_argument("--copy_detector", type=str, default=PIXEL, help=f"What counts as a copy of a forget image (memorization rate, keep-from-generations filter, memorized-cluster check): 'pixel' (L2 in [0,1] units below {pixel_flag}) or a local folder / Hub id of an image model AutoModel and AutoImageProcessor load from safetensors (DINOv2, CLIP vision), compared by cosine similarity. See docs/metrics.md.")
    parser.add_argument("--copy_similarity_threshold", type=float, default=None, help=f"Cosine similarity above which an image copies another, for a feature --copy_detector. Default {DEFAULT_SIMILARITY_THRESHOLD} (the SSCD criterion of Somepalli et al. 2023; only a starting point for DINOv2/CLIP features, see docs/metrics.md).")


def copy_detector_threshold(args, pixel_flags: tuple[str, ...] = ("memorization_threshold",)) -> Optional[float]:
    """Check `--copy_detector` / `--copy_similarity_threshold` against the pixel flags (cheaply, before any model
    loads) and return the threshold to build the detector with: the similarity threshold for a feature model,
    `--memorization_threshold` (or None) for pixel. A threshold flag in the other detector's units is refused."""
    name = getattr(args, "copy_detector", PIXEL) or PIXEL
    similarity = getattr(args, "copy_similarity_threshold", None)
    check_copy_detector(name)
    if name == PIXEL:
        if similarity is not None:
            raise UserInputError("--copy_similarity_threshold applies to a feature --copy_detector; with pixel use --memorization_threshold (pixel L2).")
        return getattr(args, "memorization_threshold", None)
    for flag in pixel_flags:
        if getattr(args, flag, None) is not None:
            raise UserInputError(f"--{flag} is pixel L2, but --copy_detector {name} compares features: use --copy_similarity_threshold instead.")
    if similarity is not None and not -1.0 < similarity < 1.0:
        raise UserInputError(f"--copy_similarity_threshold must be in (-1, 1), got {similarity}.")
    return similarity


def load_copy_detector(
    name_or_path: Optional[str],
    threshold: Optional[float] = None,
    *,
    batch_size: int = 32,
    device: Optional[torch.device | str] = None,
    revision: Optional[str] = None,
    cache_dir: Optional[str] = None,
    flag: str = "--copy_detector",
) -> CopyDetector:
    """"pixel" (or None) -> `PixelCopyDetector(threshold)`; a folder or Hub id -> `FeatureCopyDetector` of the
    model `AutoModel` loads from it (safetensors only) and its `AutoImageProcessor`, with `threshold` a cosine
    similarity (default `DEFAULT_SIMILARITY_THRESHOLD`). Raises `UserInputError` for a flag that cannot work."""
    if name_or_path is None or name_or_path == PIXEL:
        return PixelCopyDetector(threshold)
    check_copy_detector(name_or_path, flag)
    from transformers import AutoImageProcessor, AutoModel

    name = str(name_or_path)
    try:
        model = AutoModel.from_pretrained(name, use_safetensors=True, revision=revision, cache_dir=cache_dir)
    except Exception as error:  # transformers raises OSError / ValueError / EnvironmentError variously
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserInputError(
            f"{flag} {name}: no image model with safetensors weights could be loaded ({first}); give 'pixel', "
            "or a folder / Hub id of a model AutoModel loads from .safetensors (DINOv2, CLIP vision)."
        ) from None
    try:
        processor = AutoImageProcessor.from_pretrained(name, revision=revision, cache_dir=cache_dir)
    except Exception as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserInputError(f"{flag} {name}: its image processor could not be loaded ({first}); save one beside the model.") from None
    model.eval()
    if device is not None:
        model.to(device)
    return FeatureCopyDetector(
        model, processor, DEFAULT_SIMILARITY_THRESHOLD if threshold is None else threshold,
        batch_size=batch_size, name=name, device=device,
    )


def detector_fingerprint(detector: Optional[CopyDetector]) -> dict[str, Any]:
    """The checkpoint-fingerprint entry of a copy detector: nothing for pixel (so checkpoints from before this
    option still resume), else its name and threshold."""
    if detector is None or detector.kind == PIXEL:
        return {}
    return {"copy_detector": {"name": detector.name, "threshold": detector.threshold}}


def cluster_fraction(images: torch.Tensor, detector: CopyDetector) -> float:
    """The fraction of `images` in their largest group of mutual copies (`data.largest_cluster` under `detector`):
    1/N when no two images are copies of each other, 1 when all are. The memorized content of a prompt is the
    group its generations collapse onto (Carlini et al. 2023 flag a prompt when enough of its generations do)."""
    from ..data import largest_cluster

    if len(images) == 0:
        raise ValueError("cluster_fraction needs at least one image.")
    if detector.kind == PIXEL and detector.threshold is None:
        detector = detector.with_threshold(default_pixel_copy_threshold(images.shape[1:]))
    return len(largest_cluster(images, copy_detector=detector)) / len(images)


def default_pixel_copy_threshold(image_shape) -> float:
    """The pixel threshold used when none is given: an RMS pixel difference of 0.1 in [0, 1] units, as
    `unlearn()`'s keep filter, i.e. 0.1 * sqrt(C * H * W)."""
    return 0.1 * math.sqrt(math.prod(image_shape))


def generation_cluster_fractions(
    pipe,
    prompts: list[str],
    detector: CopyDetector,
    num_generations: int = 16,
    guidance_scale: Optional[float] = None,
    **generation: Any,
) -> list[float]:
    """For each prompt, `num_generations` seeded generations of a text-to-image pipeline and their
    `cluster_fraction` under `detector`. The cluster check of the scan (`--num_cluster_generations`) and of the
    pipelines' `memorization_score(..., copy_detector=...)`. `guidance_scale` defaults to the family's (7.5 for
    SD); `generation` goes to `pipelines.text_to_image.generate_images` (seed, num_inference_steps, batch_size,
    height, width, max_sequence_length)."""
    from ..families import family_of_pipeline
    from ..pipelines.text_to_image import generate_images

    if num_generations < 2:
        raise ValueError(f"The cluster check needs at least 2 generations per prompt, got {num_generations}.")
    if guidance_scale is None:
        guidance_scale = getattr(family_of_pipeline(pipe), "default_guidance_scale", 7.5)
    generations = generate_images(pipe, prompts, num_generations, guidance_scale=guidance_scale, **generation)
    return [cluster_fraction(images, detector) for images in generations]
