"""Image tensors <-> PIL, and sample grids (PIL + numpy only)."""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from PIL import Image

from .fileio import atomic_write


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(N, C, H, W) in [-1, 1] -> PIL images (grayscale for one channel)."""
    array = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    if array.shape[1] == 1:
        return [Image.fromarray(a[0], mode="L") for a in array]
    return [Image.fromarray(a.transpose(1, 2, 0)) for a in array]


def make_grid(images: torch.Tensor, nrow: int | None = None, scale: int = 1, padding: int = 1) -> Image.Image:
    """Tile images into one PIL grid; `scale` enlarges tiny images with nearest-neighbour."""
    tiles = to_pil(images)
    count = len(tiles)
    nrow = nrow or int(math.ceil(math.sqrt(count)))
    rows = int(math.ceil(count / nrow))
    width, height = tiles[0].size
    mode = tiles[0].mode
    grid = Image.new(mode, (nrow * (width + padding) + padding, rows * (height + padding) + padding), color=0)
    for i, tile in enumerate(tiles):
        grid.paste(tile, (padding + (i % nrow) * (width + padding), padding + (i // nrow) * (height + padding)))
    if scale != 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    return grid


def save_image_atomic(image: Image.Image, path: str | os.PathLike) -> None:
    """Save `image` as a PNG at `path` atomically, with the same permissions as every other output."""
    atomic_write(path, lambda handle: image.save(handle, format="PNG"))


def grid_array(image: Image.Image) -> np.ndarray:
    """HWC uint8 array (for tracker logging)."""
    array = np.asarray(image.convert("RGB"))
    return array
