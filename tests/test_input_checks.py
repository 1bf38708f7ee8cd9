"""Bad input is refused with a message naming the file (and line), and near-duplicates never reach the keep set.

Library level: data.py's folder, prompt-file and overlap checks, and checks.py's model-path checks.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_unlearn import data
from diffusers_unlearn.checks import DDPM, STABLE_DIFFUSION, check_model_path, looks_like_hub_id
from diffusers_unlearn.data import DataError
from diffusers_unlearn.errors import UserInputError


def smooth_image(seed: int, size: int = 8) -> np.ndarray:
    """A smooth grayscale picture (a tilted ramp), which JPEG keeps close to the original."""
    rng = np.random.default_rng(seed)
    slope_x, slope_y = rng.uniform(-1, 1, size=2)
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    return np.clip(128 + 100 * (slope_x * (x - 0.5) + slope_y * (y - 0.5)), 0, 255).astype(np.uint8)


def write_png(path, value=128, size=8, mode="L"):
    array = np.full((size, size) if mode == "L" else (size, size, 3), value, dtype=np.uint8)
    array[0, 0] = 255 - value
    Image.fromarray(array, mode=mode).save(path)
    return path


@pytest.fixture
def jpeg_copy_sets(tmp_path):
    """A PNG forget image, and a keep folder with its JPEG copy and three distinct pictures."""
    forget_dir, keep_dir = tmp_path / "forget", tmp_path / "keep"
    forget_dir.mkdir()
    keep_dir.mkdir()
    picture = smooth_image(0)
    Image.fromarray(picture, mode="L").save(forget_dir / "canary.png")
    Image.fromarray(picture, mode="L").save(keep_dir / "canary_copy.jpg", quality=90)
    for seed in (1, 2, 3):
        Image.fromarray(255 - smooth_image(seed), mode="L").save(keep_dir / f"other{seed}.png")
    forget = data.load_image_folder(forget_dir, 8, 1, "forget")
    keep = data.load_image_folder(keep_dir, 8, 1, "keep")
    return forget, keep


def test_jpeg_copy_of_a_forget_image_is_removed_from_keep(jpeg_copy_sets):
    forget, keep = jpeg_copy_sets
    jpeg = keep.names.index(next(n for n in keep.names if n.endswith(".jpg")))
    assert keep.hashes[jpeg] != forget.hashes[0]  # not an exact copy: hashing alone keeps it
    assert len(data.remove_overlap(keep, forget, near_duplicate_distance=0)) == 4

    filtered = data.remove_overlap(keep, forget)
    assert len(filtered) == 3 and not any(n.endswith("canary_copy.jpg") for n in filtered.names)
    notice = next(n for n in filtered.notices if "near-duplicate" in n)
    assert "canary_copy.jpg" in notice and "canary.png" in notice

    # The threshold derived from the keep set: half the distance to the nearest *distinct* picture, not to the copy.
    from diffusers_unlearn.metrics import nearest_distances

    others = torch.stack([keep.images[i] for i in range(len(keep)) if i != jpeg])
    expected = 0.5 * float(nearest_distances(forget.images, others).min())
    assert data.memorization_threshold_from_keep(forget, filtered) == pytest.approx(expected)
    assert expected > 0.5 * data.default_near_duplicate_distance((1, 8, 8))


def test_threshold_from_a_keep_set_with_a_near_duplicate_is_refused(jpeg_copy_sets):
    forget, keep = jpeg_copy_sets
    unfiltered = data.remove_overlap(keep, forget, near_duplicate_distance=0)
    with pytest.raises(DataError, match=r"keep image .*canary_copy\.jpg is only .* from forget image .*canary\.png"):
        data.memorization_threshold_from_keep(forget, unfiltered)


def test_near_duplicate_distance_must_leave_a_keep_set_and_not_be_negative(jpeg_copy_sets):
    forget, keep = jpeg_copy_sets
    with pytest.raises(DataError, match="keep set is empty"):
        data.remove_overlap(keep, forget, near_duplicate_distance=1e6)
    with pytest.raises(DataError, match="must be >= 0"):
        data.remove_overlap(keep, forget, near_duplicate_distance=-1)


def test_subfolders_are_read_with_their_own_metadata(tmp_path):
    write_png(tmp_path / "a.png", 10)
    (tmp_path / "sub").mkdir()
    write_png(tmp_path / "sub" / "b.png", 120)
    (tmp_path / "sub" / "deeper").mkdir()
    write_png(tmp_path / "sub" / "deeper" / "c.png", 240)
    (tmp_path / ".ipynb_checkpoints").mkdir()  # hidden folders are skipped
    (tmp_path / ".ipynb_checkpoints" / "notes.txt").write_text("x")
    (tmp_path / "metadata.jsonl").write_text(
        json.dumps({"file_name": "a.png", "label": 1}) + "\n" + json.dumps({"file_name": "sub/deeper/c.png", "label": "4"})
    )
    (tmp_path / "sub" / "metadata.jsonl").write_text(json.dumps({"file_name": "b.png", "label": 3}))
    (tmp_path / "sub" / "loop").symlink_to(tmp_path, target_is_directory=True)  # read once, not forever
    loaded = data.load_image_folder(tmp_path, 8, 1)
    assert [n.split(str(tmp_path))[1] for n in loaded.names] == ["/a.png", "/sub/b.png", "/sub/deeper/c.png"]
    assert loaded.labels.tolist() == [1, 3, 4]


def test_a_linked_subfolder_is_read(tmp_path):
    (tmp_path / "root").mkdir()
    write_png(tmp_path / "root" / "a.png", 10)
    (tmp_path / "elsewhere").mkdir()
    write_png(tmp_path / "elsewhere" / "b.png", 200)
    (tmp_path / "root" / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    assert [path.name for path, _ in data.check_image_folder(tmp_path / "root")] == ["a.png", "b.png"]


def test_a_row_for_the_same_image_twice_is_refused(tmp_path):
    (tmp_path / "sub").mkdir()
    write_png(tmp_path / "sub" / "b.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "sub/b.png", "text": "one"}))
    (tmp_path / "sub" / "metadata.jsonl").write_text(json.dumps({"file_name": "b.png", "text": "two"}))
    with pytest.raises(DataError, match="sub/b.png"):
        data.load_image_folder(tmp_path, 8, 1)


def test_non_image_in_a_subfolder_is_named(tmp_path):
    write_png(tmp_path / "a.png")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "readme.txt").write_text("hello")
    (tmp_path / "metadata.csv").write_text("file_name,text\na.png,x\n")  # only metadata.jsonl is read
    with pytest.raises(DataError, match=r"not images: metadata.csv, sub/readme.txt"):
        data.check_image_folder(tmp_path)


def test_corrupt_image_in_a_subfolder_is_named_by_the_cheap_check(tmp_path):
    write_png(tmp_path / "a.png")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(DataError, match=r"Cannot read image .*sub/broken\.jpg"):
        data.check_image_folder(tmp_path)


def test_truncated_image_is_named_when_decoded(tmp_path):
    path = tmp_path / "a.png"
    Image.fromarray(smooth_image(0, size=64), mode="L").save(path)
    path.write_bytes(path.read_bytes()[:-200])  # a valid header, pixels cut short
    data.check_image_folder(tmp_path)  # the header check does not decode
    with pytest.raises(DataError, match=r"Cannot read image .*a\.png"):
        data.load_image_folder(tmp_path, 8, 1)


@pytest.mark.parametrize("limit", [100, 200], ids=["over twice the limit (PIL error)", "over the limit (PIL warning)"])
def test_decompression_bomb_is_refused_naming_the_file(tmp_path, monkeypatch, limit):
    # 16x16 = 256 pixels: PIL raises above 2 * MAX_IMAGE_PIXELS and only warns above MAX_IMAGE_PIXELS.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    path = write_png(tmp_path / "huge.png", size=16)
    with pytest.raises(DataError, match=r"huge\.png is too large to load safely .*MAX_IMAGE_PIXELS"):
        data.load_image_folder(tmp_path, 8, 1)
    with pytest.raises(DataError, match=r"huge\.png is too large"):
        data.load_prompted_images([str(path)], ["a prompt"], 8, 1)


def test_metadata_text_and_label_must_have_the_right_type(tmp_path):
    write_png(tmp_path / "a.png")
    metadata = tmp_path / "metadata.jsonl"
    metadata.write_text(json.dumps({"file_name": "a.png", "text": None}))
    with pytest.raises(DataError, match="a.png .* has no prompt"):  # not the prompt "None"
        data.load_image_folder(tmp_path, 8, 1, require_text=True)
    for row, message in (
        ({"file_name": "a.png", "text": 7}, "line 1: 'text' must be a string, got 7"),
        ({"file_name": "a.png", "label": "cat"}, "line 1: 'label' must be an integer class id"),
        ({"file_name": "a.png", "label": True}, "'label' must be an integer"),
        ({"text": "no file name"}, "needs a 'file_name' field"),
    ):
        metadata.write_text(json.dumps(row))
        with pytest.raises(DataError, match=message):
            data.load_image_folder(tmp_path, 8, 1)
    metadata.write_text('["a.png", "text"]')
    with pytest.raises(DataError, match="must be a JSON object"):
        data.load_image_folder(tmp_path, 8, 1)


def test_metadata_that_is_not_utf8_names_the_line(tmp_path):
    write_png(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_bytes(b'\n{"file_name": "a.png", "text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"metadata.jsonl, line 2: not UTF-8 \(byte 0xe9"):
        data.load_image_folder(tmp_path, 8, 1)


def test_prompts_file_not_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes("a cat\n".encode() + "un caf\u00e9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"prompts\.txt, line 2: not UTF-8 \(byte 0xe9 at column 7\)"):
        data.read_prompts_file(path)
    path.write_bytes("\ufeffun caf\u00e9\n".encode("utf-8"))  # UTF-8 with a byte-order mark is fine
    assert data.read_prompts_file(path) == ["un caf\u00e9"]


@pytest.mark.parametrize("caption", [None, "", "   ", 3, ["a cat"]])
def test_prompts_file_caption_must_be_a_non_empty_string(tmp_path, caption):
    path = tmp_path / "memorized.jsonl"
    path.write_text(json.dumps({"caption": "fine"}) + "\n" + json.dumps({"caption": caption}) + "\n")
    with pytest.raises(DataError, match=r"line 2: 'caption' must be a non-empty string"):
        data.read_prompts_file(path)


def test_data_errors_are_user_input_errors():
    assert issubclass(DataError, UserInputError) and issubclass(DataError, ValueError)


def test_missing_model_path_is_named_without_network(tmp_path):
    for path in ("./nope", str(tmp_path / "nope"), "nope", "~/models/nope", "a/b/c"):
        with pytest.raises(UserInputError, match="no such local folder and not a Hub id: "):
            check_model_path(path, DDPM)
    check_model_path("google/ddpm-cifar10-32", DDPM)  # shaped like a Hub id: left to from_pretrained
    assert looks_like_hub_id("org/name") and not looks_like_hub_id("../name") and not looks_like_hub_id("/tmp/x")
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"")
    with pytest.raises(UserInputError, match="is a file"):
        check_model_path(str(file), DDPM)


def test_model_kind_is_read_from_model_index(tmp_path):
    from diffusers_unlearn.toy import toy_model_path

    sd, ddpm = toy_model_path("sd_tiny"), toy_model_path("ddpm_unconditional")
    check_model_path(ddpm, DDPM)
    check_model_path(sd, STABLE_DIFFUSION)
    with pytest.raises(UserInputError, match=r"holds a StableDiffusionPipeline .* needs a DDPM pipeline .* Use train_unlearn_sd.py"):
        check_model_path(sd, DDPM)
    with pytest.raises(UserInputError, match=r"holds a DDPMPipeline .* needs a Stable Diffusion .* Use train_unlearn_ddpm.py"):
        check_model_path(ddpm, STABLE_DIFFUSION)
    sdxl = tmp_path / "sdxl"
    sdxl.mkdir()
    index = json.loads((Path(sd) / "model_index.json").read_text())
    index.update(_class_name="StableDiffusionXLPipeline", text_encoder_2=["transformers", "CLIPTextModelWithProjection"])
    (sdxl / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UserInputError, match="StableDiffusionXLPipeline .* needs a Stable Diffusion 1.x/2.x"):
        check_model_path(str(sdxl), STABLE_DIFFUSION)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match="has no model_index.json"):
        check_model_path(str(tmp_path / "empty"), DDPM)


def fake_hub_cache(cache_dir: Path, repo_id: str, model_index: dict) -> None:
    """A Hub cache holding only `repo_id`'s model_index.json, as huggingface_hub lays it out."""
    commit = "0" * 40
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "model_index.json").write_text(json.dumps(model_index))


def test_hub_model_kind_is_read_from_the_cache_offline(tmp_path, monkeypatch):
    from diffusers_unlearn.checks import check_hub_model
    from diffusers_unlearn.toy import toy_model_path

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    sd_index = json.loads((Path(toy_model_path("sd_tiny")) / "model_index.json").read_text())
    fake_hub_cache(tmp_path, "org/tiny-sd", sd_index)
    check_hub_model("org/tiny-sd", STABLE_DIFFUSION, cache_dir=str(tmp_path))
    with pytest.raises(UserInputError, match="org/tiny-sd holds a StableDiffusionPipeline .* Use train_unlearn_sd.py"):
        check_hub_model("org/tiny-sd", DDPM, cache_dir=str(tmp_path))
    with pytest.raises(UserInputError, match="org/not-cached: no such local folder, and the Hub id is not in the local cache"):
        check_hub_model("org/not-cached", DDPM, cache_dir=str(tmp_path))
