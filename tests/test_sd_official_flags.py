"""train_unlearn_sd.py with train_text_to_image_lora.py's flags: a keep set from --train_data_dir / --dataset_name
with --image_column / --caption_column, per-draw random crops and flips, --image_interpolation_mode, --snr_gamma,
--noise_offset, --scale_lr and --dataloader_num_workers (tiny random pipelines, a few steps per run)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train_unlearn_sd as script  # noqa: E402

from diffusers_unlearn import data as unlearn_data  # noqa: E402
from diffusers_unlearn.errors import UserInputError  # noqa: E402
from tiny_models import quick_sd_script_args, save_tiny_sd_pipeline, save_tiny_sdxl_pipeline  # noqa: E402

PROMPTS = ["a digit seven", "a photo of a cat"]


def image(width, height, rng):
    return Image.fromarray((rng.random((height, width, 3)) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny SD and SDXL pipeline (16 px), two forget images, and keep sets of non-square images: an imagefolder
    whose captions are under "caption", and a parquet dataset with columns "img" and "caption"."""
    root = tmp_path_factory.mktemp("official")
    save_tiny_sd_pipeline(root / "model")
    save_tiny_sdxl_pipeline(root / "sdxl")
    rng = np.random.default_rng(0)
    for i in range(2):
        image(16, 16, rng).save(root / f"f{i}.png")
    folder = root / "keep_folder"
    folder.mkdir()
    rows = []
    for i, size in enumerate([(24, 16), (16, 28), (20, 16), (16, 16)]):
        image(*size, rng).save(folder / f"k{i}.png")
        rows.append({"file_name": f"k{i}.png", "caption": PROMPTS[i % 2]})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))

    import datasets

    table = datasets.Dataset.from_dict(
        {"img": [image(24, 16, rng) for _ in range(3)], "caption": [[PROMPTS[0], "a seven"], [PROMPTS[1]], [PROMPTS[0]]]},
        features=datasets.Features({"img": datasets.Image(), "caption": datasets.Sequence(datasets.Value("string"))}),
    )
    (root / "keep_parquet").mkdir()
    table.to_parquet(str(root / "keep_parquet" / "train.parquet"))
    return root


def args_for(workspace, output_dir, *extra, model="model"):
    forget = [workspace / "f0.png", workspace / "f1.png"]
    return quick_sd_script_args(workspace / model, output_dir, forget, PROMPTS, "--cache_dir", str(workspace / "hf_cache"), *extra)


def run(args):
    script.main(script.parse_args(args))


class DrawSpy:
    """Records every per-draw crop (corners) the pools make, through `draw_training_images`."""

    def __init__(self, monkeypatch):
        self.corners = []
        real = unlearn_data.draw_training_images

        def spy(sources, index, *args, **kwargs):
            images, corners = real(sources, index, *args, **kwargs)
            self.corners.append(([tuple(sources[i].shape[1:]) for i in index.tolist()], corners.tolist()))
            return images, corners

        monkeypatch.setattr(unlearn_data, "draw_training_images", spy)


def test_train_data_dir_keep_set_with_random_crops_flips_snr_gamma_and_noise_offset(workspace, tmp_path, monkeypatch, caplog):
    spy = DrawSpy(monkeypatch)
    out = tmp_path / "out"
    with caplog.at_level("INFO"):
        run(args_for(workspace, out, "--train_data_dir", str(workspace / "keep_folder"), "--caption_column", "caption",
                     "--random_flip", "--snr_gamma", "5", "--noise_offset", "0.05", "--image_interpolation_mode", "bilinear",
                     "--dataloader_num_workers", "2"))
    report = json.loads((out / "unlearning_report.json").read_text())
    assert report["num_keep_items"] == 4
    assert report["training_options"] == {
        "train_data_dir": str(workspace / "keep_folder"), "caption_column": "caption", "random_flip": True,
        "snr_gamma": 5.0, "noise_offset": 0.05, "image_interpolation_mode": "bilinear",
    }
    assert "Per-draw crops/flips (VAE encoding each draw) for: forget, keep" in caplog.text
    # Every step drew forget and keep images anew; the wide and tall keep images at several crop positions.
    assert len(spy.corners) == 2 * 2
    shapes_and_corners = [pair for shapes, corners in spy.corners for pair in zip(shapes, corners)]
    assert {(16, 16)} < {shape for shape, _ in shapes_and_corners}  # the keep images' resized sizes, not only 16x16
    for (height, width), (top, left) in shapes_and_corners:
        assert 0 <= top <= height - 16 and 0 <= left <= width - 16
    assert (out / "pytorch_lora_weights.safetensors").is_file()


def test_dataset_name_with_image_and_caption_columns_and_scale_lr(workspace, tmp_path, caplog):
    out = tmp_path / "out"
    with caplog.at_level("INFO"):
        run(args_for(workspace, out, "--dataset_name", str(workspace / "keep_parquet"), "--image_column", "img",
                     "--caption_column", "caption", "--center_crop", "--scale_lr", "--learning_rate", "1e-4",
                     "--gradient_accumulation_steps", "2"))
    report = json.loads((out / "unlearning_report.json").read_text())
    assert report["num_keep_items"] == 3
    assert report["learning_rate"] == pytest.approx(1e-4 * 2 * 2 * 1)  # lr * accumulation * batch * processes
    # --center_crop and no flip: every draw is the fixed centre crop, encoded once (no per-draw pool).
    assert "Per-draw crops/flips" not in caplog.text


def test_noise_offset_and_snr_gamma_change_the_trained_adapter(workspace, tmp_path):
    # --keep_data_dir reads captions from "text": a copy of the keep folder with its captions under that name.
    keep = tmp_path / "keep_text"
    keep.mkdir()
    rows = [json.loads(line) for line in (workspace / "keep_folder" / "metadata.jsonl").read_text().splitlines()]
    for row in rows:
        (keep / row["file_name"]).write_bytes((workspace / "keep_folder" / row["file_name"]).read_bytes())
    (keep / "metadata.jsonl").write_text("\n".join(json.dumps({"file_name": r["file_name"], "text": r["caption"]}) for r in rows))
    common = ["--keep_data_dir", str(keep), "--center_crop"]
    weights = {}
    for name, extra in {"plain": [], "snr": ["--snr_gamma", "0.01"], "offset": ["--noise_offset", "0.5"]}.items():
        run(args_for(workspace, tmp_path / name, *common, *extra))
        weights[name] = load_file(str(tmp_path / name / "pytorch_lora_weights.safetensors"))
    for name in ("snr", "offset"):
        assert any(not torch.equal(weights["plain"][key], weights[name][key]) for key in weights["plain"]), name


def test_resume_with_another_snr_gamma_is_refused(workspace, tmp_path):
    out = tmp_path / "out"
    common = ["--keep_from_generations", "2", "--checkpointing_steps", "2"]
    run(args_for(workspace, out, *common, "--snr_gamma", "5"))
    with pytest.raises(UserInputError, match="snr_gamma"):
        run(args_for(workspace, out, *common, "--snr_gamma", "1", "--max_train_steps", "4", "--resume_from_checkpoint", "latest"))


@pytest.mark.parametrize("extra, message", [
    (["--train_data_dir", "{root}/keep_folder"], "--caption_column 'text' is not a column"),
    (["--dataset_name", "{root}/keep_parquet", "--caption_column", "caption"], "--image_column 'image' is not a column"),
])
def test_bad_dataset_columns_fail_before_any_model_loads(workspace, tmp_path, monkeypatch, extra, message):
    def no_accelerator(*args, **kwargs):
        raise AssertionError("the accelerator (and the models) must not be reached")

    monkeypatch.setattr(script, "make_accelerator", no_accelerator)
    extra = [value.replace("{root}", str(workspace)) for value in extra]
    with pytest.raises(unlearn_data.DataError, match=message):
        run(args_for(workspace, tmp_path / "out", *extra))


def test_sdxl_time_ids_carry_each_draws_crop_corner(workspace, tmp_path, monkeypatch, fresh_accelerate_state):
    """SDXL conditions on the original size and the crop's top-left corner of each drawn image."""
    from diffusers_unlearn.families import get_family

    family = type(get_family("sdxl"))
    calls = []
    real = family.micro_conditioning

    def spy(self, components, count, original_sizes=None, crops_top_left=None, target_size=None):
        calls.append((original_sizes, crops_top_left, target_size))
        return real(self, components, count, original_sizes, crops_top_left, target_size)

    monkeypatch.setattr(family, "micro_conditioning", spy)
    out = tmp_path / "out"
    run(args_for(workspace, out, "--train_data_dir", str(workspace / "keep_folder"), "--caption_column", "caption", model="sdxl"))
    draws = [(sizes, corners) for sizes, corners, target in calls if corners is not None and target == (16, 16) and len(sizes) == 2]
    assert draws, "no per-draw micro-conditioning"
    originals = {tuple(size) for sizes, _ in draws for size in sizes}
    assert originals <= {(16, 24), (28, 16), (16, 20), (16, 16)}
    assert any(tuple(corner) != (0, 0) for _, corners in draws for corner in corners)
    assert (out / "pytorch_lora_weights.safetensors").is_file()


def test_random_flip_resumes_exactly_and_works_with_a_training_text_encoder(workspace, tmp_path):
    """Per-draw flips and crops come from the step's generator, so a resumed run draws what a straight one did;
    with --train_text_encoder the pool encodes the token ids every draw."""
    common = ["--train_data_dir", str(workspace / "keep_folder"), "--caption_column", "caption", "--random_flip",
              "--train_text_encoder", "--checkpointing_steps", "2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(args_for(workspace, straight, *common, "--max_train_steps", "4"))
    run(args_for(workspace, resumed, *common, "--max_train_steps", "2"))
    run(args_for(workspace, resumed, *common, "--max_train_steps", "4", "--resume_from_checkpoint", "latest"))
    a = load_file(str(straight / "pytorch_lora_weights.safetensors"))
    b = load_file(str(resumed / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and any(key.startswith("text_encoder.") for key in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
