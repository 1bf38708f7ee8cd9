"""Forget and keep sets: loading, validation, hashing and overlap checks.

Everything here runs before any training, so bad input fails fast with a message that
names the problem and the fix. Both training scripts use these functions.

Every image is identified by the SHA-256 of its decoded pixels at the training resolution
(uint8, channels-first, with the shape in the hash), so the same picture in two files, or in a
folder and a dataset, is recognised as the same item.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
# Files an image folder may hold besides images.
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.json")
TOY_DATASET = "toy-digits"


class DataError(ValueError):
    """Bad forget/keep input, found before training starts."""


@dataclass
class ImageSet:
    """Images in [-1, 1] (N, C, H, W) with optional labels/prompts and one hash per item."""

    images: torch.Tensor
    hashes: list[str]
    names: list[str]
    labels: Optional[torch.Tensor] = None
    texts: Optional[list[str]] = None
    notices: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, index: Sequence[int]) -> "ImageSet":
        index = list(index)
        return ImageSet(
            self.images[index] if index else self.images[:0],
            [self.hashes[i] for i in index],
            [self.names[i] for i in index],
            None if self.labels is None else self.labels[index],
            None if self.texts is None else [self.texts[i] for i in index],
            list(self.notices),
        )


def pixel_hash(image: torch.Tensor) -> str:
    """SHA-256 of an image in [-1, 1] quantised to uint8, shape included."""
    array = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    digest = hashlib.sha256(str(array.shape).encode())
    digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _to_tensor(
    image: Image.Image, resolution: int, channels: int, name: str, notices: list[str], center_crop: bool = False
) -> torch.Tensor:
    """PIL image -> (C, H, W) float in [-1, 1], converting mode and size with a notice. With `center_crop`, a
    non-square image is cropped to its centre square first instead of being squeezed."""
    mode = "L" if channels == 1 else "RGB"
    if channels not in (1, 3):
        raise DataError(f"Only 1- or 3-channel models are supported, got {channels} channels.")
    if image.mode != mode:
        notices.append(f"{name}: converted {image.mode} to {mode} ({channels} channel(s)).")
        image = image.convert(mode)
    if center_crop and image.size[0] != image.size[1]:
        side = min(image.size)
        left, top = (image.size[0] - side) // 2, (image.size[1] - side) // 2
        notices.append(f"{name}: cropped {image.size[0]}x{image.size[1]} to its centre {side}x{side}.")
        image = image.crop((left, top, left + side, top + side))
    if image.size != (resolution, resolution):
        notices.append(f"{name}: resized {image.size[0]}x{image.size[1]} to {resolution}x{resolution}.")
        image = image.resize((resolution, resolution), Image.BICUBIC)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    if array.ndim == 2:
        array = array[None]
    else:
        array = array.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(array))


def _read_metadata(folder: Path) -> dict[str, dict]:
    path = folder / "metadata.jsonl"
    if not path.exists():
        return {}
    rows = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}, line {number}: not valid JSON ({error.msg}).") from None
        if "file_name" not in row:
            raise DataError(f"{path}, line {number}: every row needs a 'file_name' field.")
        rows[row["file_name"]] = row
    return rows


def load_image_folder(
    folder: str | os.PathLike,
    resolution: int,
    channels: int,
    what: str = "forget",
    require_text: bool = False,
    center_crop: bool = False,
) -> ImageSet:
    """Load every image of a folder (an imagefolder: optional metadata.jsonl with `file_name`
    and `text` or `label`).

    Raises `DataError` for a missing or empty folder, a non-image file or an unreadable image
    (naming the file), and, with `require_text`, an image without a prompt. Images of another
    size or channel count are converted, and each conversion is recorded in `notices`.
    """
    folder = Path(folder)
    flag = f"--{what}_data_dir"
    if not folder.is_dir():
        raise DataError(f"{flag} {folder} does not exist or is not a directory.")
    files = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    bad = [p.name for p in files if p.is_file() and p.suffix.lower() not in IMAGE_EXTENSIONS + (".jsonl", ".csv", ".json")]
    bad += [p.name for p in files if p.suffix.lower() in (".jsonl", ".csv", ".json") and p.name not in METADATA_FILES]
    if bad:
        raise DataError(
            f"{flag} {folder} holds files that are not images: {', '.join(sorted(bad))}. "
            f"Remove them; accepted images: {', '.join(IMAGE_EXTENSIONS)} (plus metadata.jsonl)."
        )
    image_files = [p for p in files if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    if not image_files:
        raise DataError(f"{flag} {folder} contains no images ({', '.join(IMAGE_EXTENSIONS)}).")

    metadata = _read_metadata(folder)
    unknown = sorted(set(metadata) - {p.name for p in image_files})
    if unknown:
        raise DataError(f"{folder}/metadata.jsonl names files that do not exist: {', '.join(unknown[:5])}.")
    notices: list[str] = []
    images, names, labels, texts = [], [], [], []
    for path in image_files:
        try:
            with Image.open(path) as image:
                image.load()
                tensor = _to_tensor(image, resolution, channels, path.name, notices, center_crop)
        except (UnidentifiedImageError, OSError, SyntaxError) as error:
            raise DataError(f"Cannot read image {path}: {error}. Replace or remove the file.") from None
        row = metadata.get(path.name, {})
        if require_text and not str(row.get("text", "")).strip():
            raise DataError(
                f"{path.name} in {folder} has no prompt: add a line "
                f'{{"file_name": "{path.name}", "text": "..."}} to {folder}/metadata.jsonl.'
            )
        images.append(tensor)
        names.append(str(path))
        labels.append(row.get("label"))
        texts.append(row.get("text"))
    stacked = torch.stack(images)
    has_labels = all(label is not None for label in labels)
    has_texts = any(text is not None for text in texts)
    return ImageSet(
        stacked,
        [pixel_hash(image) for image in stacked],
        names,
        torch.tensor([int(label) for label in labels]) if has_labels else None,
        texts if has_texts else None,
        notices,
    )


def load_dataset_images(
    name: str,
    resolution: int,
    channels: int,
    what: str = "forget",
    split: str = "train",
    include_canary: bool = True,
) -> ImageSet:
    """A labelled dataset: the bundled `toy-digits`, or any `datasets` name or local path
    with an image column ("image" or "img") and a label column ("label" or "labels")."""
    if name == TOY_DATASET:
        from .toy.data import toy_split

        data = toy_split(split)
        images, labels = data.images, data.labels
        if not include_canary:
            images, labels = images[~data.is_canary], labels[~data.is_canary]
        notices: list[str] = []
        if images.shape[-1] != resolution or images.shape[1] != channels:
            raise DataError(
                f"{TOY_DATASET} images are {images.shape[1]}x{images.shape[-1]}x{images.shape[-1]}, but the model "
                f"expects {channels}x{resolution}x{resolution}. Use the bundled toy model with this dataset."
            )
        names = [f"{TOY_DATASET}/{split}/{i}" for i in range(len(images))]
        return ImageSet(images.clone(), [pixel_hash(im) for im in images], names, labels.clone(), None, notices)

    try:
        from datasets import load_dataset

        dataset = load_dataset(name, split=split)
    except Exception as error:  # datasets raises many types; the message is what matters
        raise DataError(f"--{what}_dataset_name {name!r} could not be loaded: {error}") from None
    image_column = next((c for c in ("image", "img") if c in dataset.column_names), None)
    label_column = next((c for c in ("label", "labels") if c in dataset.column_names), None)
    if image_column is None:
        raise DataError(f"Dataset {name!r} has no 'image' or 'img' column (columns: {dataset.column_names}).")
    notices = []
    images, labels = [], []
    for index, row in enumerate(dataset):
        images.append(_to_tensor(row[image_column], resolution, channels, f"{name}[{index}]", notices))
        labels.append(row[label_column] if label_column else None)
    if not images:
        raise DataError(f"--{what}_dataset_name {name!r} split {split!r} is empty.")
    stacked = torch.stack(images)
    return ImageSet(
        stacked,
        [pixel_hash(im) for im in stacked],
        [f"{name}/{split}/{i}" for i in range(len(images))],
        torch.tensor(labels) if label_column else None,
        None,
        _summarise(notices),
    )


def _summarise(notices: list[str]) -> list[str]:
    if len(notices) <= 3:
        return notices
    return notices[:3] + [f"... and {len(notices) - 3} more conversions."]


def select(
    data: ImageSet,
    forget_class: Optional[int] = None,
    forget_indices: Optional[Sequence[int]] = None,
    what: str = "forget",
) -> ImageSet:
    """Pick the items of one class and/or explicit indices."""
    index = list(range(len(data)))
    if forget_class is not None:
        if data.labels is None:
            raise DataError(f"--{what}_class needs a dataset with labels.")
        present = sorted(set(int(v) for v in data.labels.tolist()))
        if forget_class not in present:
            raise DataError(f"--{what}_class {forget_class} is not in the dataset; classes present: {present}.")
        index = [i for i in index if int(data.labels[i]) == forget_class]
    if forget_indices is not None:
        out_of_range = [i for i in forget_indices if not 0 <= i < len(data)]
        if out_of_range:
            raise DataError(f"--{what}_indices {out_of_range} are out of range for {len(data)} items.")
        wanted = set(forget_indices)
        index = [i for i in index if i in wanted]
    if not index:
        raise DataError(f"The {what} selection is empty: check --{what}_class / --{what}_indices.")
    return data.subset(index)


def deduplicate(data: ImageSet, what: str = "forget") -> ImageSet:
    """Keep the first copy of every distinct image (the canary, for example, is planted many times)."""
    seen: set[str] = set()
    index = []
    for i, digest in enumerate(data.hashes):
        if digest not in seen:
            seen.add(digest)
            index.append(i)
    result = data.subset(index)
    if len(index) < len(data):
        result.notices.append(f"{what} set: {len(data) - len(index)} duplicate image(s) merged, {len(index)} distinct.")
    return result


def remove_overlap(keep: ImageSet, forget: ImageSet) -> ImageSet:
    """Drop every keep item whose hash equals a forget item's, with a notice."""
    forget_hashes = set(forget.hashes)
    index = [i for i, digest in enumerate(keep.hashes) if digest not in forget_hashes]
    result = keep.subset(index)
    removed = len(keep) - len(index)
    if removed:
        result.notices.append(f"keep set: removed {removed} item(s) that are also in the forget set (same SHA-256).")
    if not index:
        raise DataError("The keep set is empty after removing the forget items; give a larger keep set.")
    return result


def filter_far_from(
    candidates: torch.Tensor, forget_images: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split generated images into (far, near) by pixel L2 distance (in [0, 1] pixel units). The far ones can
    serve as a keep set.

    A candidate is near if it lies within `threshold` of a forget image, or of a candidate already found near:
    copies of a memorized image scatter around it, and a copy just outside the threshold is usually close to
    another copy. One such copy left in a keep set teaches the model to keep the image.

    Example:
        >>> far, near = filter_far_from(generations, forget_images, threshold=2.0)  # doctest: +SKIP
    """
    points = ((candidates.float() + 1) / 2).flatten(1)
    anchors = ((forget_images.float() + 1) / 2).flatten(1)
    near = torch.cdist(points, anchors).min(dim=1).values < threshold
    between = torch.cdist(points, points)
    while True:  # grow the near set through chains of close candidates
        grown = near | (between[:, near] < threshold).any(dim=1)
        if torch.equal(grown, near):
            break
        near = grown
    return candidates[~near], candidates[near]


def log_notices(data: ImageSet, log=logger.info) -> None:
    for notice in data.notices:
        log(notice)


# ---------------------------------------------------------------------------------------------------------------
# Text-to-image forget sets (train_unlearn_sd.py)
# ---------------------------------------------------------------------------------------------------------------


def load_prompted_images(
    image_paths: Sequence[str],
    prompts: Sequence[str],
    resolution: int,
    channels: int = 3,
    what: str = "forget",
    center_crop: bool = False,
) -> ImageSet:
    """Images given one by one with one prompt each (`--forget_images` with `--forget_prompts`).

    Raises `DataError` when the counts differ, a prompt is empty, or a file is missing or not an image.
    """
    if len(image_paths) != len(prompts):
        raise DataError(
            f"--{what}_images has {len(image_paths)} file(s) but --{what}_prompts has {len(prompts)} prompt(s); "
            "give exactly one prompt per image, in the same order."
        )
    if not image_paths:
        raise DataError(f"--{what}_images is empty.")
    notices: list[str] = []
    images = []
    for path, prompt in zip(image_paths, prompts):
        if not str(prompt).strip():
            raise DataError(f"The prompt for {path} is empty; every --{what}_images file needs a prompt.")
        if not os.path.isfile(path):
            raise DataError(f"--{what}_images: {path} does not exist.")
        try:
            with Image.open(path) as image:
                image.load()
                images.append(_to_tensor(image, resolution, channels, os.path.basename(path), notices, center_crop))
        except (UnidentifiedImageError, OSError, SyntaxError) as error:
            raise DataError(f"Cannot read image {path}: {error}. Replace or remove the file.") from None
    stacked = torch.stack(images)
    return ImageSet(stacked, [pixel_hash(im) for im in stacked], [str(p) for p in image_paths], None, [str(p) for p in prompts], notices)


def read_prompts_file(path: str | os.PathLike, field: str = "caption") -> list[str]:
    """Prompts from a JSON-lines file with a `caption` field per line (the format of the public list of
    memorized LAION prompts, and of `python -m diffusers_unlearn.scan`'s output), or a plain text file with one
    prompt per line. Blank lines are skipped; duplicates are kept once, in order."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Prompts file {path} does not exist.")
    prompts: list[str] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}, line {number}: not valid JSON ({error.msg}).") from None
            if not str(row.get(field, "")).strip():
                raise DataError(f"{path}, line {number}: no {field!r} field; each JSON line needs one.")
            line = str(row[field]).strip()
        if line not in prompts:
            prompts.append(line)
    if not prompts:
        raise DataError(f"Prompts file {path} holds no prompts.")
    return prompts


def largest_cluster(images: torch.Tensor, threshold: float) -> list[int]:
    """Indices of the largest group of near-identical images: each member lies within `threshold` (pixel L2 in
    [0, 1] units) of the group's most connected image. A memorized prompt makes many generations collapse onto
    the training image, so that group is the memorized content (SISS built its Stable Diffusion forget sets this
    way). Returns a single index when no two images are that close."""
    flat = ((images.float() + 1) / 2).flatten(1)
    distances = torch.cdist(flat, flat)
    neighbours = distances < threshold
    center = int(neighbours.sum(dim=1).argmax())
    return [i for i in range(len(images)) if bool(neighbours[center, i])]
