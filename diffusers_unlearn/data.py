"""Forget and keep sets: loading, validation, hashing and overlap checks.

Everything here runs before any training, so bad input fails fast with a message that
names the problem and the fix. Both training scripts use these functions.

Every image is identified by the SHA-256 of its decoded pixels at the training resolution
(uint8, channels-first, with the shape in the hash), so the same picture in two files, or in a
folder and a dataset, is recognised as the same item. The same picture in another encoding (a JPEG
copy) hashes differently; `remove_overlap` finds it by pixel distance at that resolution.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import UserInputError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
# The one file an image folder (or any of its subfolders) may hold besides images.
METADATA_FILE = "metadata.jsonl"
TOY_DATASET = "toy-digits"
#: Default near-duplicate distance as an RMS pixel difference ([0, 1] units). JPEG at quality 50-95 moves a
#: photo or a digit by 0.004-0.043 RMS at the model resolution; the closest two distinct digits of
#: sklearn's 1,797 are 0.041 apart, distinct photos much further.
NEAR_DUPLICATE_RMS = 0.04


class DataError(UserInputError):
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
    #: Optional, for per-draw crops: each item's image with its SHORTER side resized to the training resolution
    #: (uint8, (C, H, W), aspect ratio kept; `images` holds its centre crop), and its size before resizing
    #: (height, width), which SDXL conditions on. See `load_training_image` and `AugmentedImagePool`.
    sources: Optional[list[torch.Tensor]] = None
    original_sizes: Optional[list[tuple[int, int]]] = None

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
            None if self.sources is None else [self.sources[i] for i in index],
            None if self.original_sizes is None else [self.original_sizes[i] for i in index],
        )


def concatenate(first: ImageSet, second: ImageSet) -> ImageSet:
    """The items of `first`, then those of `second`. Both must have prompts, or both labels, or neither. Where one
    set has per-draw sources and the other not (generated images), the other's centre crops serve as its sources
    (a crop of a `resolution` square is itself, so its draws are unchanged).

    Example:
        >>> keep = concatenate(keep, anchor_generations)  # doctest: +SKIP
    """
    for attribute in ("texts", "labels"):
        if (getattr(first, attribute) is None) != (getattr(second, attribute) is None):
            raise ValueError(f"Cannot concatenate a set with {attribute} and one without.")

    def sources(data: ImageSet) -> list[torch.Tensor]:
        if data.sources is not None:
            return data.sources
        return [((image + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8) for image in data.images]

    def sizes(data: ImageSet) -> list[tuple[int, int]]:
        return data.original_sizes if data.original_sizes is not None else [tuple(image.shape[1:]) for image in data.images]

    with_sources = first.sources is not None or second.sources is not None
    with_sizes = first.original_sizes is not None or second.original_sizes is not None
    return ImageSet(
        torch.cat([first.images, second.images]),
        first.hashes + second.hashes,
        first.names + second.names,
        None if first.labels is None else torch.cat([first.labels, second.labels]),
        None if first.texts is None else first.texts + second.texts,
        first.notices + second.notices,
        sources(first) + sources(second) if with_sources else None,
        sizes(first) + sizes(second) if with_sizes else None,
    )


def pixel_hash(image: torch.Tensor) -> str:
    """SHA-256 of an image in [-1, 1] quantised to uint8, shape included."""
    array = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    digest = hashlib.sha256(str(array.shape).encode())
    digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _convert_mode(image: Image.Image, channels: int, name: str, notices: list[str]) -> Image.Image:
    """`image` in the PIL mode of a `channels`-channel model ("L" or "RGB"), a conversion recorded in `notices`."""
    mode = "L" if channels == 1 else "RGB"
    if channels not in (1, 3):
        raise DataError(f"Only 1- or 3-channel models are supported, got {channels} channels.")
    if image.mode != mode:
        notices.append(f"{name}: converted {image.mode} to {mode} ({channels} channel(s)).")
        image = image.convert(mode)
    return image


def _to_tensor(
    image: Image.Image, resolution: int, channels: int, name: str, notices: list[str], center_crop: bool = False
) -> torch.Tensor:
    """PIL image -> (C, H, W) float in [-1, 1], converting mode and size with a notice. With `center_crop`, a
    non-square image is cropped to its centre square first instead of being squeezed."""
    image = _convert_mode(image, channels, name, notices)
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


#: `--image_interpolation_mode` values (those of train_text_to_image_lora.py, whose torchvision modes map onto
#: these PIL filters for PIL images; "nearest_exact" is PIL's nearest too).
INTERPOLATION_MODES = {
    "bicubic": Image.BICUBIC,
    "bilinear": Image.BILINEAR,
    "box": Image.BOX,
    "hamming": Image.HAMMING,
    "lanczos": Image.LANCZOS,
    "nearest": Image.NEAREST,
    "nearest_exact": Image.NEAREST,
}


def check_interpolation_mode(mode: str) -> str:
    """`mode` lower-cased if it is one of `INTERPOLATION_MODES`, else `DataError` listing them."""
    if str(mode).lower() not in INTERPOLATION_MODES:
        raise DataError(
            f"--image_interpolation_mode {mode!r} is not supported; choose one of {', '.join(INTERPOLATION_MODES)}."
        )
    return str(mode).lower()


def resize_shorter_side(image: Image.Image, resolution: int, interpolation: str = "lanczos") -> Image.Image:
    """`image` resized so its shorter side is `resolution`, aspect ratio kept (the longer side is
    int(resolution * long / short), as torchvision's Resize(resolution) computes it). An image already that size
    is returned as a copy.

    Example:
        >>> resize_shorter_side(Image.new("RGB", (40, 20)), 8).size
        (16, 8)
    """
    width, height = image.size
    if min(width, height) == resolution:
        return image.copy()
    if width <= height:
        size = (resolution, int(resolution * height / width))
    else:
        size = (int(resolution * width / height), resolution)
    return image.resize(size, INTERPOLATION_MODES[check_interpolation_mode(interpolation)])


def crop_top_left(
    height: int, width: int, resolution: int, center: bool, generator: Optional[torch.Generator] = None
) -> tuple[int, int]:
    """(top, left) of a `resolution` square in a (height, width) image: centred as torchvision's CenterCrop
    (int(round((size - resolution) / 2))), or uniform over every position as its RandomCrop, drawn from
    `generator`. SDXL conditions on these coordinates (`crops_coords_top_left`).

    Example:
        >>> crop_top_left(8, 13, 8, center=True)
        (0, 2)
    """
    if height < resolution or width < resolution:
        raise ValueError(f"Cannot crop {resolution}x{resolution} from a {height}x{width} image.")
    if center:
        return int(round((height - resolution) / 2.0)), int(round((width - resolution) / 2.0))
    top = int(torch.randint(0, height - resolution + 1, (1,), generator=generator))
    left = int(torch.randint(0, width - resolution + 1, (1,), generator=generator))
    return top, left


def load_training_image(
    image: Image.Image, resolution: int, channels: int, name: str, notices: list[str], interpolation: str = "lanczos"
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """A PIL image prepared as train_text_to_image_lora.py prepares it, minus the per-draw part.

    Returns (centre crop as (C, resolution, resolution) float in [-1, 1], the shorter-side-resized image as
    uint8 (C, H, W) for per-draw crops and flips, the original (height, width)). The centre crop is the item's
    fixed form: its hash, the overlap checks and the metrics use it.
    """
    image = _convert_mode(image, channels, name, notices)
    original = (image.size[1], image.size[0])
    resized = resize_shorter_side(image, resolution, interpolation)
    if resized.size != image.size:
        notices.append(
            f"{name}: resized {image.size[0]}x{image.size[1]} to {resized.size[0]}x{resized.size[1]} "
            f"(shorter side {resolution}, {interpolation})."
        )
    array = np.asarray(resized, dtype=np.uint8)
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    source = torch.from_numpy(np.ascontiguousarray(array))
    top, left = crop_top_left(source.shape[1], source.shape[2], resolution, center=True)
    if source.shape[1:] != (resolution, resolution):
        notices.append(f"{name}: {source.shape[2]}x{source.shape[1]} is cropped to {resolution}x{resolution} (centre when fixed).")
    centre = source[:, top : top + resolution, left : left + resolution].float() / 127.5 - 1.0
    return centre.contiguous(), source, original


def _read_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of every line of a UTF-8 text file (a leading byte-order mark is dropped).

    Decoded line by line, so a byte that is not UTF-8 is reported with its line instead of as a traceback.
    """
    lines = []
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise DataError(
                f"{path}, line {number}: not UTF-8 (byte 0x{raw[error.start]:02x} at column {error.start + 1}). "
                "Save the file as UTF-8."
            ) from None
        lines.append((number, text.lstrip("\ufeff") if number == 1 else text))
    return lines


def _check_label(value: object, where: str) -> Optional[int]:
    """A metadata label as a class id: an integer, or a string of one; None when absent."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise DataError(f"{where}: 'label' must be an integer class id, got {json.dumps(value)}.")


def _read_metadata(path: Path, folder: Path) -> dict[str, dict]:
    """Rows of one metadata.jsonl, keyed by image path relative to `folder` (the rows' `file_name` is relative
    to the metadata file's own folder, as in `datasets`' imagefolder)."""
    rows: dict[str, dict] = {}
    for number, line in _read_lines(path):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: not valid JSON ({error.msg}).") from None
        if not isinstance(row, dict):
            raise DataError(f'{where}: each line must be a JSON object like {{"file_name": "a.png", "text": "..."}}.')
        name = row.get("file_name")
        if not isinstance(name, str) or not name.strip():
            raise DataError(f"{where}: every row needs a 'file_name' field.")
        text = row.get("text")
        if text is not None and not isinstance(text, str):
            raise DataError(f"{where}: 'text' must be a string, got {json.dumps(text)}.")
        row = {**row, "label": _check_label(row.get("label"), where)}
        key = Path(os.path.normpath(path.parent.relative_to(folder) / name)).as_posix()
        if key in rows:
            raise DataError(f"{where}: {name} already has a row; give each image one row.")
        rows[key] = row
    return rows


def _open_image(path: Path) -> Image.Image:
    """PIL's lazy open (it reads the header only), every failure turned into a `DataError` naming the file."""
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that, yet such an image costs gigabytes to decode.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise DataError(
            f"Image {path} is too large to load safely ({error}). Downscale it, or raise "
            "PIL.Image.MAX_IMAGE_PIXELS if you trust the file."
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise DataError(f"Cannot read image {path}: {error}. Replace or remove the file.") from None


def _load_image(
    path: Path, resolution: int, channels: int, name: str, notices: list[str], center_crop: bool
) -> torch.Tensor:
    """An image file as (C, H, W) in [-1, 1] at the model resolution; unreadable pixels name the file."""
    return _decode(path, lambda image: _to_tensor(image, resolution, channels, name, notices, center_crop))


def _decode(path: Path, prepare: Callable[[Image.Image], Any]) -> Any:
    """`prepare` applied to the decoded pixels of an image file; pixels that cannot be decoded name the file."""
    with _open_image(path) as image:
        try:
            image.load()
        except (OSError, SyntaxError, Image.DecompressionBombError) as error:
            raise DataError(f"Cannot read image {path}: {error}. Replace or remove the file.") from None
        return prepare(image)


def _folder_files(folder: Path) -> list[Path]:
    """Every file under `folder`, subfolders (and linked subfolders) included; hidden files and folders (".*")
    are skipped."""
    found, visited = [], set()
    for root, subfolders, files in os.walk(folder, followlinks=True):
        if os.path.realpath(root) in visited:  # a link back up the tree: read each folder once
            subfolders[:] = []
            continue
        visited.add(os.path.realpath(root))
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]  # .git, .ipynb_checkpoints
        found += [Path(root) / name for name in files if not name.startswith(".")]
    return sorted(found, key=lambda path: path.relative_to(folder).as_posix())


def check_image_folder(
    folder: str | os.PathLike, what: str = "forget", require_text: bool = False
) -> list[tuple[Path, dict]]:
    """Check an image folder without decoding any pixels; returns (image path, metadata row) pairs in order.

    Like `datasets`' imagefolder, images in subfolders are read too, and a metadata.jsonl in any folder gives
    `file_name` (relative to that metadata file), and optionally `text` (a prompt) and `label` (a class id) for
    its images. Raises `DataError` for a missing or empty folder, a file that is neither an image nor
    metadata.jsonl, metadata that does not parse or names missing files, an image whose header PIL cannot read
    or that exceeds PIL's decompression-bomb limit, and, with `require_text`, an image without a prompt.

    Example:
        >>> items = check_image_folder("forget/", "forget", require_text=True)  # doctest: +SKIP
    """
    folder = Path(folder)
    flag = f"--{what}_data_dir"
    if not folder.is_dir():
        raise DataError(f"{flag} {folder} does not exist or is not a directory.")
    files = _folder_files(folder)

    def relative(path: Path) -> str:
        return path.relative_to(folder).as_posix()

    bad = [relative(p) for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS and p.name != METADATA_FILE]
    if bad:
        raise DataError(
            f"{flag} {folder} holds files that are not images: {', '.join(bad[:10])}"
            f"{f' and {len(bad) - 10} more' if len(bad) > 10 else ''}. Remove them; accepted: images "
            f"({', '.join(IMAGE_EXTENSIONS)}) and {METADATA_FILE} (one JSON object per line)."
        )
    image_files = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    if not image_files:
        raise DataError(f"{flag} {folder} contains no images ({', '.join(IMAGE_EXTENSIONS)}).")

    metadata: dict[str, dict] = {}
    for path in (p for p in files if p.name == METADATA_FILE):
        rows = _read_metadata(path, folder)
        unknown = sorted(set(rows) - {relative(p) for p in image_files})
        if unknown:
            raise DataError(f"{path} names files that do not exist: {', '.join(unknown[:5])}.")
        repeated = sorted(set(rows) & set(metadata))
        if repeated:
            raise DataError(f"{path} repeats rows of another metadata file for: {', '.join(repeated[:5])}.")
        metadata.update(rows)

    items = []
    for path in image_files:
        row = metadata.get(relative(path), {})
        text = row.get("text")
        if require_text and not (isinstance(text, str) and text.strip()):
            raise DataError(
                f"{relative(path)} in {folder} has no prompt: add a line "
                f'{{"file_name": "{relative(path)}", "text": "..."}} to {folder}/{METADATA_FILE}.'
            )
        _open_image(path).close()
        items.append((path, row))
    return items


def load_image_folder(
    folder: str | os.PathLike,
    resolution: int,
    channels: int,
    what: str = "forget",
    require_text: bool = False,
    center_crop: bool = False,
    interpolation: Optional[str] = None,
) -> ImageSet:
    """Load every image of a folder and its subfolders (an imagefolder: optional metadata.jsonl with
    `file_name` and `text` or `label`).

    Everything `check_image_folder` checks is checked first; a file whose pixels cannot be decoded raises
    `DataError` naming it. Images of another size or channel count are converted, and each conversion is
    recorded in `notices`. `labels` is set only when every image has one.

    With `interpolation` (an `INTERPOLATION_MODES` name), images are prepared as diffusers' text-to-image scripts
    prepare them (`load_training_image`: shorter side resized, centre crop as the fixed form) and the result
    keeps `sources` for per-draw crops and flips; `center_crop` is then the pool's business. Without it, a
    non-square image is squeezed (or, with `center_crop`, cropped to its centre square) and resized bicubically.
    """
    folder = Path(folder)
    notices: list[str] = []
    images, names, labels, texts, sources, sizes = [], [], [], [], [], []
    for path, row in check_image_folder(folder, what, require_text):
        name = path.relative_to(folder).as_posix()
        if interpolation is None:
            images.append(_load_image(path, resolution, channels, name, notices, center_crop))
        else:
            image, source, size = _load_training_file(path, resolution, channels, name, notices, interpolation)
            images.append(image)
            sources.append(source)
            sizes.append(size)
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
        torch.tensor(labels) if has_labels else None,
        texts if has_texts else None,
        notices,
        sources if interpolation is not None else None,
        sizes if interpolation is not None else None,
    )


def _load_training_file(
    path: Path, resolution: int, channels: int, name: str, notices: list[str], interpolation: str
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """`load_training_image` of an image file; unreadable pixels name the file."""
    return _decode(path, lambda image: load_training_image(image, resolution, channels, name, notices, interpolation))


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

    load_dataset = _import_datasets().load_dataset
    try:
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


def default_near_duplicate_distance(image_shape: Sequence[int]) -> float:
    """The default `--near_duplicate_distance` for images of shape (C, H, W): an RMS pixel difference of
    `NEAR_DUPLICATE_RMS`, as a pixel L2 distance in [0, 1] units (the units of the memorization threshold).

    Example:
        >>> round(default_near_duplicate_distance((1, 8, 8)), 3)    # 0.04 * sqrt(64)
        0.32
    """
    return NEAR_DUPLICATE_RMS * math.sqrt(math.prod(image_shape))


def _forget_to_keep(forget: ImageSet, keep: ImageSet) -> tuple[torch.Tensor, torch.Tensor]:
    """For each keep item, the pixel L2 distance ([0, 1] units) to its nearest forget item, and that item."""
    from .metrics.memorization import nearest_distances

    # Small blocks: a block is converted to float64, and a 512x512 RGB image alone is 6 MB there.
    return nearest_distances(keep.images, forget.images, batch_size=16, return_indices=True)


def remove_overlap(keep: ImageSet, forget: ImageSet, near_duplicate_distance: Optional[float] = None) -> ImageSet:
    """Drop every keep item that is a forget item: the same SHA-256, or a near-duplicate (pixel L2 in [0, 1]
    units below `near_duplicate_distance` at the model resolution, such as the same picture saved as JPEG).
    Each removal is recorded in `notices`.

    `near_duplicate_distance` defaults to `default_near_duplicate_distance`; 0 removes exact copies only.
    A near-duplicate left in the keep set would teach the model to keep the image it should forget, and would
    shrink the memorization threshold derived from the keep set (`memorization_threshold_from_keep`) to nothing.
    """
    if near_duplicate_distance is None:
        near_duplicate_distance = default_near_duplicate_distance(forget.images.shape[1:])
    if near_duplicate_distance < 0:
        raise DataError(f"--near_duplicate_distance must be >= 0, got {near_duplicate_distance}.")
    forget_hashes = set(forget.hashes)
    exact = [digest in forget_hashes for digest in keep.hashes]
    near = [False] * len(keep)
    details = []
    if near_duplicate_distance > 0 and len(keep):
        distances, nearest = _forget_to_keep(forget, keep)
        for i in range(len(keep)):
            if not exact[i] and distances[i] < near_duplicate_distance:
                near[i] = True
                details.append(f"{keep.names[i]} ({float(distances[i]):.3g} from {forget.names[int(nearest[i])]})")
    index = [i for i in range(len(keep)) if not exact[i] and not near[i]]
    result = keep.subset(index)
    if any(exact):
        result.notices.append(f"keep set: removed {sum(exact)} item(s) that are also in the forget set (same SHA-256).")
    if details:
        result.notices.append(
            f"keep set: removed {len(details)} near-duplicate(s) of forget items (pixel L2 < "
            f"{near_duplicate_distance:.3g}, --near_duplicate_distance): {', '.join(details[:5])}"
            f"{f' and {len(details) - 5} more' if len(details) > 5 else ''}."
        )
    if not index:
        raise DataError("The keep set is empty after removing the forget items; give a larger keep set.")
    return result


def memorization_threshold_from_keep(forget: ImageSet, keep: ImageSet) -> float:
    """Half the smallest forget-to-keep pixel L2 distance ([0, 1] units): a generation closer than that to a
    forget image is closer to it than any keep image is, so it counts as a copy.

    Raises `DataError` naming the two images when a keep image lies within `default_near_duplicate_distance`
    of a forget image (possible only when near-duplicate removal was turned off or narrowed): half of that
    distance would count no generation as a copy, and the report would show memorization 0 before and after.

    Example:
        >>> threshold = memorization_threshold_from_keep(forget, remove_overlap(keep, forget))  # doctest: +SKIP
    """
    distances, nearest = _forget_to_keep(forget, keep)
    closest = int(distances.argmin())
    distance = float(distances[closest])
    if distance < default_near_duplicate_distance(forget.images.shape[1:]):
        raise DataError(
            f"The default memorization threshold would be {0.5 * distance:.3g}, too small to count any copy: keep "
            f"image {keep.names[closest]} is only {distance:.3g} from forget image {forget.names[int(nearest[closest])]}. "
            "Remove it from the keep set (see --near_duplicate_distance) or pass --memorization_threshold."
        )
    return 0.5 * distance


def filter_far_from(
    candidates: torch.Tensor, forget_images: torch.Tensor, threshold: Optional[float] = None, *, copy_detector=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split generated images into (far, near) by pixel L2 distance (in [0, 1] pixel units), or by the
    `copy_detector` given (`metrics.copy_detection`; then `threshold` is not used). The far ones can serve as a
    keep set.

    A candidate is near if it lies within `threshold` of a forget image, or of a candidate already found near:
    copies of a memorized image scatter around it, and a copy just outside the threshold is usually close to
    another copy. One such copy left in a keep set teaches the model to keep the image.

    Example:
        >>> far, near = filter_far_from(generations, forget_images, threshold=2.0)  # doctest: +SKIP
    """
    detector = _copy_detector(copy_detector, threshold)
    points, anchors = detector.embed(candidates), detector.embed(forget_images)
    threshold = detector.distance_threshold
    near = detector.distances_between(points, anchors).min(dim=1).values < threshold
    between = detector.distances_between(points, points)
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


def check_prompted_images(image_paths: Sequence[str], prompts: Sequence[str], what: str = "forget") -> None:
    """Check `--forget_images` with `--forget_prompts` without decoding any pixels.

    Raises `DataError` when the counts differ, a prompt is empty, or a file is missing, not an image, or over
    PIL's decompression-bomb limit.
    """
    if len(image_paths) != len(prompts):
        raise DataError(
            f"--{what}_images has {len(image_paths)} file(s) but --{what}_prompts has {len(prompts)} prompt(s); "
            "give exactly one prompt per image, in the same order."
        )
    if not image_paths:
        raise DataError(f"--{what}_images is empty.")
    for path, prompt in zip(image_paths, prompts):
        if not str(prompt).strip():
            raise DataError(f"The prompt for {path} is empty; every --{what}_images file needs a prompt.")
        if not os.path.isfile(path):
            raise DataError(f"--{what}_images: {path} does not exist.")
        _open_image(Path(path)).close()


def load_prompted_images(
    image_paths: Sequence[str],
    prompts: Sequence[str],
    resolution: int,
    channels: int = 3,
    what: str = "forget",
    center_crop: bool = False,
    interpolation: Optional[str] = None,
) -> ImageSet:
    """Images given one by one with one prompt each (`--forget_images` with `--forget_prompts`).

    Everything `check_prompted_images` checks is checked first; a file whose pixels cannot be decoded raises
    `DataError` naming it. `interpolation` works as in `load_image_folder`.
    """
    check_prompted_images(image_paths, prompts, what)
    notices: list[str] = []
    if interpolation is None:
        images = [
            _load_image(Path(path), resolution, channels, os.path.basename(path), notices, center_crop) for path in image_paths
        ]
        sources = sizes = None
    else:
        loaded = [
            _load_training_file(Path(path), resolution, channels, os.path.basename(path), notices, interpolation)
            for path in image_paths
        ]
        images, sources, sizes = [item[0] for item in loaded], [item[1] for item in loaded], [item[2] for item in loaded]
    stacked = torch.stack(images)
    return ImageSet(
        stacked, [pixel_hash(im) for im in stacked], [str(p) for p in image_paths], None, [str(p) for p in prompts],
        notices, sources, sizes,
    )


def read_prompts_file(path: str | os.PathLike, field: str = "caption") -> list[str]:
    """Prompts from a JSON-lines file with a `caption` field per line (the format of the public list of
    memorized LAION prompts, and of `python -m diffusers_unlearn.scan`'s output), or a plain text file with one
    prompt per line. Blank lines are skipped; duplicates are kept once, in order.

    Raises `DataError` naming the file and line for a line that is not UTF-8 or not valid JSON, and for a
    JSON line whose `field` is missing, empty or not a string (`{"caption": null}` is an error, not "None").
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Prompts file {path} does not exist.")
    prompts: list[str] = []
    for number, line in _read_lines(path):
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}, line {number}: not valid JSON ({error.msg}).") from None
            if field not in row:
                raise DataError(f"{path}, line {number}: no {field!r} field; each JSON line needs one.")
            value = row[field]
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{path}, line {number}: {field!r} must be a non-empty string, got {json.dumps(value)}.")
            line = value.strip()
        if line not in prompts:
            prompts.append(line)
    if not prompts:
        raise DataError(f"Prompts file {path} holds no prompts.")
    return prompts


def _copy_detector(copy_detector, threshold: Optional[float]):
    """The detector to use: the one given, else pixel L2 at `threshold`."""
    if copy_detector is not None:
        return copy_detector
    if threshold is None:
        raise ValueError("Give a pixel threshold or a copy_detector.")
    from .metrics.copy_detection import PixelCopyDetector

    return PixelCopyDetector(threshold)


def largest_cluster(images: torch.Tensor, threshold: Optional[float] = None, *, copy_detector=None) -> list[int]:
    """Indices of the largest group of near-identical images: each member lies within `threshold` (pixel L2 in
    [0, 1] units), or is a copy by `copy_detector` (`metrics.copy_detection`), of the group's most connected
    image. A memorized prompt makes many generations collapse onto the training image, so that group is the
    memorized content (SISS built its Stable Diffusion forget sets this way; Carlini et al. 2023 flag a prompt
    whose generations form such a group). Returns a single index when no two images are that close."""
    detector = _copy_detector(copy_detector, threshold)
    flat = detector.embed(images)
    distances = detector.distances_between(flat, flat)
    neighbours = distances < detector.distance_threshold
    center = int(neighbours.sum(dim=1).argmax())
    return [i for i in range(len(images)) if bool(neighbours[center, i])]


# ---------------------------------------------------------------------------------------------------------------
# A keep set from a `datasets` dataset or a local imagefolder (train_text_to_image_lora.py's data flags)
# ---------------------------------------------------------------------------------------------------------------


def _import_datasets():
    """The `datasets` package, imported only when a dataset flag is used."""
    try:
        import datasets
    except ImportError:
        raise DataError(
            "--dataset_name / --train_data_dir need the `datasets` package: pip install datasets "
            '(or pip install "diffusers-unlearn[datasets]").'
        ) from None
    return datasets


def open_text_image_dataset(
    dataset_name: Optional[str] = None,
    dataset_config_name: Optional[str] = None,
    train_data_dir: Optional[str] = None,
    image_column: str = "image",
    caption_column: str = "text",
    cache_dir: Optional[str] = None,
):
    """The "train" split of a `datasets` dataset, opened as train_text_to_image_lora.py opens it, with its image
    and caption columns checked.

    `dataset_name` (a Hub id or a local dataset folder) is loaded with `dataset_config_name`, and
    `train_data_dir` as its `data_dir`; without `dataset_name`, `train_data_dir` is read as an imagefolder
    (images with an optional metadata.jsonl naming `file_name` and the caption column). Raises `DataError` for a
    dataset that does not load, a missing folder, no "train" split, or a column that is not there (naming the
    columns there are).

    Example:
        >>> dataset = open_text_image_dataset(train_data_dir="keep/", caption_column="text")  # doctest: +SKIP
    """
    if dataset_name is None and train_data_dir is None:
        raise DataError("Give --dataset_name or --train_data_dir.")
    if train_data_dir is not None and not os.path.isdir(train_data_dir):
        raise DataError(f"--train_data_dir {train_data_dir} does not exist or is not a directory.")
    datasets = _import_datasets()
    flag = f"--dataset_name {dataset_name!r}" if dataset_name is not None else f"--train_data_dir {train_data_dir}"
    try:
        if dataset_name is not None:
            loaded = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir, data_dir=train_data_dir)
        else:
            loaded = datasets.load_dataset(
                "imagefolder", data_files={"train": os.path.join(train_data_dir, "**")}, cache_dir=cache_dir
            )
    except Exception as error:  # datasets raises many types; its message is what matters
        raise DataError(f"{flag} could not be loaded: {error}") from None
    if "train" not in loaded:
        raise DataError(f"{flag} has no 'train' split (splits: {', '.join(loaded)}).")
    dataset = loaded["train"]
    columns = dataset.column_names
    for what, column in (("--image_column", image_column), ("--caption_column", caption_column)):
        if column not in columns:
            raise DataError(f"{what} {column!r} is not a column of {flag}; its columns are: {', '.join(columns)}.")
    if len(dataset) == 0:
        raise DataError(f"{flag} has no rows in its 'train' split.")
    return dataset


def load_text_image_dataset(
    dataset,
    resolution: int,
    channels: int,
    image_column: str = "image",
    caption_column: str = "text",
    interpolation: str = "lanczos",
    max_samples: Optional[int] = None,
    seed: int = 0,
    name: str = "dataset",
) -> ImageSet:
    """An `ImageSet` with captions from an opened dataset (`open_text_image_dataset`), each image prepared by
    `load_training_image` (sources kept for per-draw crops and flips).

    A caption is a string, or a list of strings of which one is chosen per item with `seed` (the official
    script draws again each time an item is read; here prompt embeddings are computed once, so the choice is
    made once). `max_samples` keeps that many rows after a seeded shuffle, as the official `--max_train_samples`.
    Raises `DataError` for an image cell that is not an image and a caption that is not a string or a list of
    strings.
    """
    if max_samples is not None:
        if max_samples < 1:
            raise DataError(f"--max_train_samples must be >= 1, got {max_samples}.")
        dataset = dataset.shuffle(seed=seed).select(range(min(max_samples, len(dataset))))
    generator = torch.Generator().manual_seed(seed)
    notices: list[str] = []
    images, sources, sizes, texts, names = [], [], [], [], []
    for index, row in enumerate(dataset):
        where = f"{name}[{index}]"
        image = row[image_column]
        if not isinstance(image, Image.Image):
            raise DataError(f"{where}: column {image_column!r} holds {type(image).__name__}, not an image; check --image_column.")
        caption = row[caption_column]
        if isinstance(caption, (list, tuple, np.ndarray)) and len(caption) and all(isinstance(c, str) for c in caption):
            caption = caption[int(torch.randint(0, len(caption), (1,), generator=generator))]
        if not isinstance(caption, str):
            raise DataError(
                f"{where}: caption column {caption_column!r} should contain either strings or lists of strings, "
                f"got {type(caption).__name__}."
            )
        centre, source, size = load_training_image(image, resolution, channels, where, notices, interpolation)
        images.append(centre)
        sources.append(source)
        sizes.append(size)
        texts.append(caption)
        names.append(where)
    stacked = torch.stack(images)
    return ImageSet(stacked, [pixel_hash(im) for im in stacked], names, None, texts, _summarise(notices), sources, sizes)


# ---------------------------------------------------------------------------------------------------------------
# Per-draw crops and flips (train_text_to_image_lora.py's --center_crop / --random_flip semantics)
# ---------------------------------------------------------------------------------------------------------------


def draw_training_images(
    sources: Sequence[torch.Tensor],
    index: torch.Tensor,
    resolution: int,
    center_crop: bool,
    random_flip: bool,
    generator: Optional[torch.Generator] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Crops (and flips) of `sources[index]`, drawn anew on every call: (images (B, C, res, res) in [-1, 1],
    crop top-left coordinates (B, 2) as (top, left)).

    Per item, in this order: a horizontal flip with probability 1/2 (`random_flip`), then the crop, centred
    (`center_crop`) or at a uniform position, both drawn from `generator`. That is train_text_to_image_lora_sdxl.py's
    order, so the coordinates are those SDXL conditions on; for Stable Diffusion 1.x/2.x, whose script crops
    first and flips after, the distribution of training images is the same.

    Example:
        >>> sources = [torch.zeros(3, 8, 12, dtype=torch.uint8)]
        >>> images, corners = draw_training_images(sources, torch.tensor([0, 0]), 8, False, True, torch.Generator().manual_seed(0))
        >>> images.shape, corners.shape
        (torch.Size([2, 3, 8, 8]), torch.Size([2, 2]))
    """
    images, corners = [], []
    for i in index.tolist():
        source = sources[i]
        if random_flip and bool(torch.rand(1, generator=generator) < 0.5):
            source = source.flip(-1)
        top, left = crop_top_left(source.shape[1], source.shape[2], resolution, center_crop, generator)
        images.append(source[:, top : top + resolution, left : left + resolution].float() / 127.5 - 1.0)
        corners.append((top, left))
    return torch.stack(images), torch.tensor(corners, dtype=torch.long)


class AugmentedImagePool:
    """A training pool that crops and flips each image every time it is drawn, then encodes it.

    The drop-in for `unlearner.BatchPool` when `--random_flip` is set or images are not square (random crops
    unless `center_crop`): the same `sample(batch_size, generator, device)`, items drawn uniformly with
    replacement, conditioning indexed alongside (cached `encoder_hidden_states`, or `input_ids` with `encode`
    when the text encoder trains, and `cached_cond`, further per-item conditioning by name). `encode_images(pixels)`
    turns the drawn pixels into the model's inputs (for latent models, the VAE; run without gradients);
    `added_cond(original_sizes, crop_top_left, index)` may return per-item extra conditioning from the draw
    (SDXL's time ids), which replaces a `cached_cond` entry of the same name.

    Sets without `sources` (generated or toy images, already square at the resolution) are used as they are.

    Example:
        >>> pool = AugmentedImagePool(keep, resolution=512, center_crop=False, random_flip=True,
        ...                           encode_images=lambda x: encode_latents(vae, x), encoder_hidden_states=hidden)  # doctest: +SKIP
    """

    def __init__(
        self,
        images: ImageSet,
        resolution: int,
        center_crop: bool,
        random_flip: bool,
        encode_images: Callable[[torch.Tensor], torch.Tensor],
        encoder_hidden_states: Optional[torch.Tensor] = None,
        input_ids: Optional[torch.Tensor] = None,
        encode: Optional[Callable[[torch.Tensor], Any]] = None,
        added_cond: Optional[Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Mapping[str, torch.Tensor]]] = None,
        cached_cond: Optional[dict[str, torch.Tensor]] = None,
    ):
        if len(images) == 0:
            raise ValueError("A batch pool needs at least one item.")
        from .unlearner import BatchPool

        # The index draw and the conditioning are BatchPool's own: a pool over the item numbers.
        self._items = BatchPool(
            torch.arange(len(images)), encoder_hidden_states=encoder_hidden_states, input_ids=input_ids, encode=encode,
            added_cond=cached_cond,
        )
        if images.sources is not None:
            self.sources = list(images.sources)
            self.original_sizes = torch.tensor(images.original_sizes, dtype=torch.long)
        else:
            self.sources = [((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8) for image in images.images]
            self.original_sizes = torch.tensor([tuple(image.shape[1:]) for image in images.images], dtype=torch.long)
        self.resolution = int(resolution)
        self.center_crop = bool(center_crop)
        self.random_flip = bool(random_flip)
        self.encode_images = encode_images
        self.added_cond = added_cond

    def __len__(self) -> int:
        return len(self.sources)

    def sample(self, batch_size: int, generator: torch.Generator, device=None):
        """A batch of `batch_size` items drawn with replacement, each cropped and flipped anew, then encoded."""
        batch = self._items.sample(batch_size, generator, device)
        index = batch.x0.cpu()
        pixels, corners = draw_training_images(
            self.sources, index, self.resolution, self.center_crop, self.random_flip, generator
        )
        with torch.no_grad():
            x0 = self.encode_images(pixels)
        batch.x0 = x0.to(device or x0.device)
        if self.added_cond is not None:
            extra = self.added_cond(self.original_sizes[index], corners, index)
            batch.added_cond = {**(batch.added_cond or {}), **{k: v.to(device or v.device) for k, v in extra.items()}}
        return batch


def needs_augmented_pool(images: ImageSet, resolution: int, center_crop: bool, random_flip: bool) -> bool:
    """True when training draws must be made anew each time: `random_flip`, or random crops (no `center_crop`)
    of an image that is not a `resolution` square after resizing its shorter side. Otherwise every draw of an
    item is its fixed centre crop (`images.images`), which can be encoded once and cached."""
    if random_flip:
        return True
    if center_crop or images.sources is None:
        return False
    return any(tuple(s.shape[1:]) != (resolution, resolution) for s in images.sources)
