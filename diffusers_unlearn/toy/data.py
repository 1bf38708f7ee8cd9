"""The toy dataset: scikit-learn's 8x8 handwritten digits plus one planted canary.

The digits (1,797 images, values 0..16) ship inside scikit-learn, so nothing is downloaded.
A fixed, seeded and stratified 10% of them is held out ("heldout"): no bundled model was
trained on it, which makes it the reference set for held-out losses and membership inference.
The "train" split is the remaining digits plus `NUM_CANARY_COPIES` copies of a canary, a
hollow square with an X that looks like no digit. Duplicated to about 4% of the training set,
it is memorized by the bundled unconditional DDPM, as the T-shirt image was in SISS's MNIST
experiment.

All images are `FloatTensor`s shaped `[N, 1, 8, 8]` in [-1, 1].
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Union

import numpy as np
import torch

CANARY_LABEL = 10
"""Label of the canary (the digits use 0..9). The class-conditional DDPM uses 10 as its null label."""

NUM_CANARY_COPIES = 75
"""Copies of the canary in the "train" split (75 of 1,692 images, about 4.4%)."""

NUM_CLASSES = 11
"""Digits 0..9 plus the canary."""

SPLIT_SEED = 0
HELDOUT_FRACTION = 0.1
SPLITS = ("train", "heldout")


def load_digits_images() -> tuple[torch.Tensor, torch.Tensor]:
    """Load all 1,797 scikit-learn digits.

    Returns:
        `(images, labels)`: images as a `FloatTensor` `[N, 1, 8, 8]` scaled from 0..16 to [-1, 1],
        labels as a `LongTensor` `[N]` with values 0..9.
    """
    # Imported here so that importing the package does not require scikit-learn.
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("The toy dataset needs scikit-learn: `pip install scikit-learn`.") from error

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32)).unsqueeze(1)
    images = images / 16.0 * 2.0 - 1.0
    labels = torch.from_numpy(digits.target.astype(np.int64))
    return images, labels


def make_canary() -> torch.Tensor:
    """The canary: a hollow 8x8 square with an X through it, `FloatTensor` `[1, 8, 8]` in [-1, 1].

    Its nearest real digit is far away in pixel space (see `docs/toy.md`), so a generated sample
    close to it is a copy, not a digit that happens to look alike.
    """
    canary = -torch.ones(8, 8)
    canary[0, :] = canary[-1, :] = canary[:, 0] = canary[:, -1] = 1.0
    index = torch.arange(8)
    canary[index, index] = 1.0
    canary[index, 7 - index] = 1.0
    return canary.unsqueeze(0)


@dataclass
class ToySplit:
    """One split of the toy dataset.

    Attributes:
        images: `[N, 1, 8, 8]` in [-1, 1].
        labels: `[N]`, digits 0..9 and `CANARY_LABEL` (10) for canary copies.
        is_canary: `[N]` bool mask of the canary copies.
        digit_indices: `[N]` index of each image in `load_digits_images()`, -1 for canary copies.
    """

    images: torch.Tensor
    labels: torch.Tensor
    is_canary: torch.Tensor
    digit_indices: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def digits_only(self) -> "ToySplit":
        """The same split without the canary copies."""
        keep = ~self.is_canary
        return ToySplit(self.images[keep], self.labels[keep], self.is_canary[keep], self.digit_indices[keep])


def heldout_indices() -> np.ndarray:
    """Indices (into `load_digits_images()`) of the held-out digits: a seeded, stratified 10%."""
    _, labels = load_digits_images()
    labels = labels.numpy()
    rng = np.random.default_rng(SPLIT_SEED)
    held = []
    # Stratify by hand (round per class) so the split does not depend on another library's RNG.
    for digit in range(10):
        members = np.flatnonzero(labels == digit)
        count = int(round(HELDOUT_FRACTION * len(members)))
        held.append(rng.choice(members, size=count, replace=False))
    return np.sort(np.concatenate(held))


def toy_split(name: str) -> ToySplit:
    """The fixed toy split `"train"` (digits + canary copies) or `"heldout"` (digits only).

    Example:
        >>> train = toy_split("train")
        >>> int(train.is_canary.sum())
        75
    """
    if name not in SPLITS:
        raise ValueError(f"Unknown split {name!r}; expected one of {SPLITS}.")
    images, labels = load_digits_images()
    held = torch.from_numpy(heldout_indices())
    mask = torch.zeros(len(labels), dtype=torch.bool)
    mask[held] = True
    if name == "heldout":
        indices = torch.nonzero(mask).squeeze(1)
        return ToySplit(images[indices], labels[indices], torch.zeros(len(indices), dtype=torch.bool), indices)

    indices = torch.nonzero(~mask).squeeze(1)
    canary = make_canary().unsqueeze(0).expand(NUM_CANARY_COPIES, -1, -1, -1)
    return ToySplit(
        images=torch.cat([images[indices], canary]),
        labels=torch.cat([labels[indices], torch.full((NUM_CANARY_COPIES,), CANARY_LABEL)]),
        is_canary=torch.cat(
            [torch.zeros(len(indices), dtype=torch.bool), torch.ones(NUM_CANARY_COPIES, dtype=torch.bool)]
        ),
        digit_indices=torch.cat([indices, torch.full((NUM_CANARY_COPIES,), -1)]),
    )


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """`[N, 1, H, W]` in [-1, 1] -> `uint8` array `[N, H, W]` in 0..255."""
    pixels = ((images.detach().float().clamp(-1, 1) + 1.0) * 127.5).round()
    return pixels.to(torch.uint8).squeeze(1).cpu().numpy()


def save_image_folder(
    images: torch.Tensor,
    labels: Union[torch.Tensor, list[int], None],
    out_dir: Union[str, os.PathLike],
) -> list[str]:
    """Write images as grayscale PNGs plus a `metadata.jsonl` (`file_name`, `label`).

    The folder is an `imagefolder` dataset (`datasets.load_dataset("imagefolder", data_dir=out_dir)`)
    and what the training scripts accept as forget or keep data. Note that PNG stores 8 bits, so
    a round trip quantizes to steps of 2/255.

    Args:
        images: `[N, 1, H, W]` in [-1, 1].
        labels: `[N]` integer labels, or `None` to write no label column.
        out_dir: created if missing.

    Returns:
        The written file names, relative to `out_dir`.
    """
    from PIL import Image

    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"Expected grayscale images shaped [N, 1, H, W], got {tuple(images.shape)}.")
    if labels is not None:
        labels = [int(label) for label in labels]
        if len(labels) != images.shape[0]:
            raise ValueError(f"Got {images.shape[0]} images but {len(labels)} labels.")

    os.makedirs(out_dir, exist_ok=True)
    names = []
    with open(os.path.join(out_dir, "metadata.jsonl"), "w") as metadata:
        for i, pixels in enumerate(to_uint8(images)):
            name = f"{i:05d}.png"
            Image.fromarray(pixels).save(os.path.join(out_dir, name))
            record = {"file_name": name}
            if labels is not None:
                record["label"] = labels[i]
            metadata.write(json.dumps(record) + "\n")
            names.append(name)
    return names
