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
from typing import Optional, Sequence

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
    with _open_image(path) as image:
        try:
            image.load()
        except (OSError, SyntaxError, Image.DecompressionBombError) as error:
            raise DataError(f"Cannot read image {path}: {error}. Replace or remove the file.") from None
        return _to_tensor(image, resolution, channels, name, notices, center_crop)


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
) -> ImageSet:
    """Load every image of a folder and its subfolders (an imagefolder: optional metadata.jsonl with
    `file_name` and `text` or `label`).

    Everything `check_image_folder` checks is checked first; a file whose pixels cannot be decoded raises
    `DataError` naming it. Images of another size or channel count are converted, and each conversion is
    recorded in `notices`. `labels` is set only when every image has one.
    """
    folder = Path(folder)
    notices: list[str] = []
    images, names, labels, texts = [], [], [], []
    for path, row in check_image_folder(folder, what, require_text):
        images.append(_load_image(path, resolution, channels, path.relative_to(folder).as_posix(), notices, center_crop))
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
) -> ImageSet:
    """Images given one by one with one prompt each (`--forget_images` with `--forget_prompts`).

    Everything `check_prompted_images` checks is checked first; a file whose pixels cannot be decoded raises
    `DataError` naming it.
    """
    check_prompted_images(image_paths, prompts, what)
    notices: list[str] = []
    images = [
        _load_image(Path(path), resolution, channels, os.path.basename(path), notices, center_crop) for path in image_paths
    ]
    stacked = torch.stack(images)
    return ImageSet(stacked, [pixel_hash(im) for im in stacked], [str(p) for p in image_paths], None, [str(p) for p in prompts], notices)


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
