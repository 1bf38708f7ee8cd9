import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_unlearn import data
from diffusers_unlearn.data import DataError


def write_png(path, value=128, size=8, mode="L"):
    array = np.full((size, size) if mode == "L" else (size, size, 3), value, dtype=np.uint8)
    array[0, 0] = 255 - value  # not constant, so different values hash differently
    Image.fromarray(array, mode=mode).save(path)


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(DataError, match="--forget_data_dir .* does not exist"):
        data.load_image_folder(tmp_path / "nope", 8, 1, "forget")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="contains no images"):
        data.load_image_folder(tmp_path / "empty", 8, 1, "forget")


def test_non_image_file_is_named(tmp_path):
    write_png(tmp_path / "a.png")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="notes.txt"):
        data.load_image_folder(tmp_path, 8, 1)


def test_corrupt_image_is_named(tmp_path):
    write_png(tmp_path / "a.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(DataError, match="broken.png"):
        data.load_image_folder(tmp_path, 8, 1)


def test_wrong_channels_and_size_are_converted_with_a_notice(tmp_path):
    write_png(tmp_path / "rgb.png", mode="RGB", size=16)
    loaded = data.load_image_folder(tmp_path, 8, 1)
    assert loaded.images.shape == (1, 1, 8, 8)
    assert loaded.images.min() >= -1 and loaded.images.max() <= 1
    assert any("converted RGB to L" in n for n in loaded.notices)
    assert any("resized 16x16 to 8x8" in n for n in loaded.notices)


def test_metadata_prompts_and_missing_prompt(tmp_path):
    write_png(tmp_path / "a.png", 10)
    write_png(tmp_path / "b.png", 20)
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "a digit"}) + "\n")
    with pytest.raises(DataError, match="b.png .* has no prompt"):
        data.load_image_folder(tmp_path, 8, 1, require_text=True)
    (tmp_path / "metadata.jsonl").write_text(
        "\n".join(json.dumps({"file_name": f, "text": f"prompt {f}"}) for f in ("a.png", "b.png"))
    )
    loaded = data.load_image_folder(tmp_path, 8, 1, require_text=True)
    assert loaded.texts == ["prompt a.png", "prompt b.png"]


def test_forget_class_must_exist():
    images = torch.zeros(3, 1, 8, 8)
    labels = torch.tensor([0, 1, 1])
    image_set = data.ImageSet(images, ["a", "b", "c"], ["a", "b", "c"], labels)
    with pytest.raises(DataError, match=r"--forget_class 7 is not in the dataset; classes present: \[0, 1\]"):
        data.select(image_set, forget_class=7)
    assert len(data.select(image_set, forget_class=1)) == 2
    with pytest.raises(DataError, match="out of range"):
        data.select(image_set, forget_indices=[5])


def test_hash_overlap_is_removed_from_keep_with_a_notice(tmp_path):
    # Values far apart: images 10/255 apart everywhere would also be near-duplicates.
    for folder, values in (("forget", [10]), ("keep", [10, 100, 200])):
        (tmp_path / folder).mkdir()
        for v in values:
            write_png(tmp_path / folder / f"img{v}.png", v)
    forget = data.load_image_folder(tmp_path / "forget", 8, 1)
    keep = data.load_image_folder(tmp_path / "keep", 8, 1, "keep")
    filtered = data.remove_overlap(keep, forget)
    assert len(filtered) == 2 and forget.hashes[0] not in filtered.hashes
    assert any("removed 1 item(s)" in n for n in filtered.notices)
    with pytest.raises(DataError, match="keep set is empty"):
        data.remove_overlap(forget, forget)


def test_duplicates_merge_and_hash_ignores_file_names(tmp_path):
    write_png(tmp_path / "a.png", 50)
    write_png(tmp_path / "copy_of_a.png", 50)
    loaded = data.deduplicate(data.load_image_folder(tmp_path, 8, 1))
    assert len(loaded) == 1 and any("duplicate" in n for n in loaded.notices)


def test_filter_far_from_splits_by_distance():
    forget = -torch.ones(1, 1, 8, 8)
    near = forget + 0.01
    far = torch.ones(1, 1, 8, 8)
    kept, rejected = data.filter_far_from(torch.cat([near, far]), forget, threshold=1.0)
    assert len(kept) == 1 and len(rejected) == 1 and torch.equal(kept[0], far[0])


def test_filter_far_from_follows_chains_of_copies():
    # A constant shift d in [-1, 1] units over 64 pixels is a distance of 4|d| in [0, 1] pixel units.
    forget = torch.zeros(1, 1, 8, 8)
    copy = forget + 0.025  # 0.1 from the forget image
    near_copy = forget + 0.2  # 0.8 from it, outside the threshold; 0.7 from `copy`
    lone = forget - 1.0  # 4.0 from it
    kept, rejected = data.filter_far_from(torch.cat([near_copy, lone, copy]), forget, threshold=0.75)
    assert len(kept) == 1 and torch.equal(kept[0], lone[0])
    assert len(rejected) == 2
    # Without `copy` among the candidates nothing links the near copy to the forget image.
    kept, rejected = data.filter_far_from(torch.cat([near_copy, lone]), forget, threshold=0.75)
    assert len(kept) == 2 and len(rejected) == 0


def test_toy_dataset_loads_and_checks_shape():
    loaded = data.load_dataset_images(data.TOY_DATASET, 8, 1)
    canary = data.select(loaded, forget_class=10)
    assert len(data.deduplicate(canary)) == 1
    with pytest.raises(DataError, match="expects 3x16x16"):
        data.load_dataset_images(data.TOY_DATASET, 16, 3)


def test_prompted_images_need_one_prompt_each(tmp_path):
    write_png(tmp_path / "a.png", 10, size=16, mode="RGB")
    write_png(tmp_path / "b.png", 200, size=16, mode="RGB")
    files = [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    loaded = data.load_prompted_images(files, ["a cat", "a dog"], 16, 3)
    assert loaded.texts == ["a cat", "a dog"] and loaded.images.shape == (2, 3, 16, 16)
    with pytest.raises(DataError, match="2 file\\(s\\) but --forget_prompts has 1"):
        data.load_prompted_images(files, ["a cat"], 16, 3)
    with pytest.raises(DataError, match="prompt for .*b.png is empty"):
        data.load_prompted_images(files, ["a cat", " "], 16, 3)
    with pytest.raises(DataError, match="missing.png does not exist"):
        data.load_prompted_images([str(tmp_path / "missing.png")], ["a cat"], 16, 3)


def test_center_crop_keeps_the_middle(tmp_path):
    array = np.zeros((8, 24), dtype=np.uint8)
    array[:, 8:16] = 255  # a white centre square between black margins
    Image.fromarray(array, mode="L").save(tmp_path / "wide.png")
    cropped = data.load_image_folder(tmp_path, 8, 1, center_crop=True)
    squeezed = data.load_image_folder(tmp_path, 8, 1)
    assert torch.all(cropped.images == 1.0)
    assert squeezed.images.min() < 0  # resizing the whole image keeps the black margins
    assert any("cropped 24x8" in notice for notice in cropped.notices)


def test_read_prompts_file_formats_and_errors(tmp_path):
    jsonl = tmp_path / "memorized.jsonl"
    jsonl.write_text('{"caption": "first", "index": 1}\n\n{"caption": "second"}\n{"caption": "first"}\n')
    assert data.read_prompts_file(jsonl) == ["first", "second"]
    text = tmp_path / "prompts.txt"
    text.write_text("a cat\na dog\n")
    assert data.read_prompts_file(text) == ["a cat", "a dog"]
    (tmp_path / "bad.jsonl").write_text('{"text": "no caption"}\n')
    with pytest.raises(DataError, match="line 1: no 'caption' field"):
        data.read_prompts_file(tmp_path / "bad.jsonl")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match="holds no prompts"):
        data.read_prompts_file(tmp_path / "empty.txt")
    with pytest.raises(DataError, match="does not exist"):
        data.read_prompts_file(tmp_path / "nope.jsonl")


def test_largest_cluster_finds_the_repeated_image():
    g = torch.Generator().manual_seed(0)
    copy = torch.rand(1, 1, 8, 8, generator=g) * 2 - 1
    others = torch.rand(5, 1, 8, 8, generator=g) * 2 - 1
    images = torch.cat([others[:2], copy, copy + 0.01, others[2:], copy - 0.01])
    assert data.largest_cluster(images, threshold=0.5) == [2, 3, 7]
    assert len(data.largest_cluster(others, threshold=0.01)) == 1


def test_concatenate_keeps_prompts_and_fills_sources_of_generated_images():
    from diffusers_unlearn.data import ImageSet, concatenate, pixel_hash

    files = torch.rand(2, 3, 4, 4) * 2 - 1
    sources = [torch.randint(0, 256, (3, 4, 6), dtype=torch.uint8), torch.randint(0, 256, (3, 4, 4), dtype=torch.uint8)]
    first = ImageSet(files, [pixel_hash(x) for x in files], ["a.png", "b.png"], None, ["a cat", "a dog"], [], sources, [(40, 60), (4, 4)])
    generated = torch.rand(1, 3, 4, 4) * 2 - 1
    second = ImageSet(generated, [pixel_hash(generated[0])], ["generation/0"], None, ["a cat"])
    both = concatenate(first, second)
    assert len(both) == 3 and both.texts == ["a cat", "a dog", "a cat"] and both.names[-1] == "generation/0"
    assert torch.equal(both.images, torch.cat([files, generated]))
    assert both.sources[:2] == sources and both.original_sizes == [(40, 60), (4, 4), (4, 4)]
    # A generated image's source is its own pixels, so a draw of it gives the image back (to uint8 precision).
    assert torch.allclose(both.sources[2].float() / 127.5 - 1.0, generated[0], atol=1 / 127.5)
    assert concatenate(second, second).sources is None  # neither has sources: none made up
    with pytest.raises(ValueError, match="texts"):
        concatenate(first, ImageSet(generated, ["h"], ["g"]))
