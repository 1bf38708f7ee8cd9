"""train_text_to_image_lora.py's data semantics in diffusers_unlearn.data: shorter-side resize with a PIL filter,
centre or random crops (with their top-left corners), a per-draw random flip, and a keep set from a `datasets`
dataset or a local imagefolder with named image and caption columns."""

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_unlearn import data
from diffusers_unlearn.data import (
    AugmentedImagePool,
    DataError,
    crop_top_left,
    draw_training_images,
    load_training_image,
    needs_augmented_pool,
    resize_shorter_side,
)


def striped(width, height, seed=0):
    """An RGB image whose every column differs, so crops and flips are told apart."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("size, expected", [((40, 20), (16, 8)), ((20, 40), (8, 16)), ((30, 30), (8, 8)), ((13, 8), (13, 8)), ((9, 25), (8, 22))])
def test_resize_shorter_side_keeps_the_aspect_ratio_as_torchvision_computes_it(size, expected):
    assert resize_shorter_side(Image.new("RGB", size), 8).size == expected


def test_interpolation_modes_are_pil_filters_and_a_bad_one_is_named():
    image = striped(40, 20)
    lanczos = np.asarray(resize_shorter_side(image, 8, "lanczos"))
    bilinear = np.asarray(resize_shorter_side(image, 8, "bilinear"))
    assert np.array_equal(lanczos, np.asarray(image.resize((16, 8), Image.LANCZOS)))
    assert np.array_equal(bilinear, np.asarray(image.resize((16, 8), Image.BILINEAR)))
    assert not np.array_equal(lanczos, bilinear)
    with pytest.raises(DataError, match="--image_interpolation_mode 'cubic' .*lanczos"):
        resize_shorter_side(image, 8, "cubic")


@pytest.mark.parametrize("height, width", [(8, 8), (8, 13), (8, 14), (21, 8), (9, 10)])
def test_centre_crop_corner_is_torchvision_centercrop(height, width):
    # torchvision's center_crop: crop_top = int(round((h - th) / 2.0)), crop_left likewise.
    assert crop_top_left(height, width, 8, center=True) == (int(round((height - 8) / 2.0)), int(round((width - 8) / 2.0)))


def test_random_crop_reaches_every_position_and_is_pinned_by_the_generator():
    g = torch.Generator().manual_seed(0)
    corners = {crop_top_left(10, 12, 8, center=False, generator=g) for _ in range(400)}
    assert corners == {(top, left) for top in range(3) for left in range(5)}
    first = [crop_top_left(10, 12, 8, False, torch.Generator().manual_seed(3)) for _ in range(2)]
    assert first[0] == first[1]


def test_load_training_image_resizes_the_shorter_side_and_centre_crops_the_fixed_form():
    notices = []
    centre, source, original = load_training_image(striped(40, 20), 8, 3, "a.png", notices, "bicubic")
    assert original == (20, 40)
    assert source.dtype == torch.uint8 and tuple(source.shape) == (3, 8, 16)
    assert torch.equal(centre, source[:, :, 4:12].float() / 127.5 - 1.0)
    assert any("shorter side 8" in n for n in notices)


def test_random_flip_is_drawn_per_item_and_per_draw_with_probability_one_half():
    source = torch.from_numpy(np.asarray(striped(8, 8)).transpose(2, 0, 1).copy())
    image = source.float() / 127.5 - 1.0
    g = torch.Generator().manual_seed(0)
    flips = 0
    for _ in range(50):
        drawn, corners = draw_training_images([source], torch.zeros(20, dtype=torch.long), 8, True, True, g)
        assert corners.tolist() == [[0, 0]] * 20
        for item in drawn:
            assert torch.equal(item, image) or torch.equal(item, image.flip(-1))
            flips += int(torch.equal(item, image.flip(-1)))
    assert 400 < flips < 600  # 1000 draws, p = 1/2 (the bounds are > 6 standard deviations wide)


def test_random_crops_return_their_corners_and_match_the_pixels():
    source = torch.from_numpy(np.asarray(striped(14, 9)).transpose(2, 0, 1).copy())
    drawn, corners = draw_training_images([source], torch.zeros(30, dtype=torch.long), 8, False, False, torch.Generator().manual_seed(1))
    assert len({tuple(c) for c in corners.tolist()}) > 3
    for item, (top, left) in zip(drawn, corners.tolist()):
        assert torch.equal(item, source[:, top : top + 8, left : left + 8].float() / 127.5 - 1.0)
    fixed, fixed_corners = draw_training_images([source], torch.zeros(3, dtype=torch.long), 8, True, False)
    assert fixed_corners.tolist() == [[0, 3]] * 3


def write_folder(folder, sizes, caption_key="text", captions=None):
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, size in enumerate(sizes):
        striped(*size, seed=i).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", caption_key: (captions or [f"a photo of {i}"] * len(sizes))[i]})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder


def test_load_image_folder_with_an_interpolation_keeps_sources_and_subsets_carry_them(tmp_path):
    folder = write_folder(tmp_path / "keep", [(24, 16), (16, 16)])
    loaded = data.load_image_folder(folder, 16, 3, "keep", require_text=True, interpolation="lanczos")
    assert [tuple(s.shape) for s in loaded.sources] == [(3, 16, 24), (3, 16, 16)]
    assert loaded.original_sizes == [(16, 24), (16, 16)]
    assert torch.equal(loaded.images[0], loaded.sources[0][:, :, 4:20].float() / 127.5 - 1.0)
    subset = loaded.subset([1])
    assert subset.sources[0] is loaded.sources[1] and subset.original_sizes == [(16, 16)]
    plain = data.load_image_folder(folder, 16, 3, "keep", require_text=True)  # the old path: squeezed, no sources
    assert plain.sources is None and not torch.equal(plain.images[0], loaded.images[0])
    assert needs_augmented_pool(loaded, 16, center_crop=False, random_flip=False)
    assert not needs_augmented_pool(loaded, 16, center_crop=True, random_flip=False)
    assert not needs_augmented_pool(loaded.subset([1]), 16, center_crop=False, random_flip=False)
    assert needs_augmented_pool(loaded.subset([1]), 16, center_crop=True, random_flip=True)


def test_train_data_dir_is_read_as_an_imagefolder_with_named_columns(tmp_path):
    folder = write_folder(tmp_path / "keep", [(24, 16), (16, 20)], caption_key="caption")
    dataset = data.open_text_image_dataset(train_data_dir=str(folder), caption_column="caption", cache_dir=str(tmp_path / "cache"))
    keep = data.load_text_image_dataset(dataset, 16, 3, caption_column="caption", interpolation="bilinear", name="keep")
    assert sorted(keep.texts) == ["a photo of 0", "a photo of 1"]
    assert sorted(tuple(s.shape) for s in keep.sources) == [(3, 16, 24), (3, 20, 16)]
    assert len(set(keep.hashes)) == 2
    with pytest.raises(DataError, match="--caption_column 'text' is not a column .* its columns are: image, caption"):
        data.open_text_image_dataset(train_data_dir=str(folder), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match="--image_column 'img'"):
        data.open_text_image_dataset(train_data_dir=str(folder), image_column="img", caption_column="caption", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match="--train_data_dir .*missing does not exist"):
        data.open_text_image_dataset(train_data_dir=str(tmp_path / "missing"))


def test_dataset_name_loads_a_local_dataset_folder_and_caption_lists_are_drawn_with_the_seed(tmp_path):
    folder = write_folder(tmp_path / "ds" / "train", [(16, 16)] * 3, captions=[["one", "uno"], ["two", "dos"], ["three", "tres"]])
    dataset = data.open_text_image_dataset(dataset_name=str(tmp_path / "ds"), cache_dir=str(tmp_path / "cache"))
    first = data.load_text_image_dataset(dataset, 16, 3, seed=0)
    again = data.load_text_image_dataset(dataset, 16, 3, seed=0)
    assert first.texts == again.texts
    assert all(text in ("one", "uno", "two", "dos", "three", "tres") for text in first.texts)
    assert len(data.load_text_image_dataset(dataset, 16, 3, max_samples=2).texts) == 2
    with pytest.raises(DataError, match="could not be loaded"):
        data.open_text_image_dataset(dataset_name=str(tmp_path / "nothing-here"), cache_dir=str(tmp_path / "cache"))


def test_a_caption_that_is_not_text_is_one_clear_error(tmp_path):
    folder = write_folder(tmp_path / "keep", [(16, 16)], captions=[7])
    dataset = data.open_text_image_dataset(train_data_dir=str(folder), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match="should contain either strings or lists of strings"):
        data.load_text_image_dataset(dataset, 16, 3)


def test_missing_datasets_package_names_the_pip_command(tmp_path, monkeypatch):
    folder = write_folder(tmp_path / "keep", [(16, 16)])
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match="pip install datasets"):
        data.open_text_image_dataset(train_data_dir=str(folder))


def test_augmented_pool_draws_anew_and_passes_crop_corners_on(tmp_path):
    folder = write_folder(tmp_path / "keep", [(24, 16), (16, 16)])
    keep = data.load_image_folder(folder, 16, 3, "keep", require_text=True, interpolation="lanczos")
    hidden = torch.arange(2.0).view(2, 1, 1).expand(2, 3, 4).clone()
    seen = []

    def time_ids(original_sizes, corners, index):
        seen.append((original_sizes, corners, index))
        return {"time_ids": torch.cat([original_sizes, corners], dim=1).float()}

    pool = AugmentedImagePool(keep, 16, center_crop=False, random_flip=True, encode_images=lambda x: x * 2,
                              encoder_hidden_states=hidden, added_cond=time_ids)
    batch = pool.sample(8, torch.Generator().manual_seed(0))
    original_sizes, corners, index = seen[-1]
    assert batch.x0.shape == (8, 3, 16, 16)
    assert torch.equal(batch.encoder_hidden_states, hidden[index])
    assert torch.equal(original_sizes, torch.tensor(keep.original_sizes)[index])
    assert torch.equal(batch.added_cond["time_ids"][:, 2:], corners.float())
    assert (corners[:, 0] == 0).all() and (corners[index == 1] == 0).all()  # only the wide image moves, sideways
    repeat = pool.sample(8, torch.Generator().manual_seed(0))
    assert torch.equal(repeat.x0, batch.x0)  # a pinned generator pins every draw
    other = pool.sample(8, torch.Generator().manual_seed(1))
    assert not torch.equal(other.x0, batch.x0)
