"""Both scripts refuse bad input before any model loads (or, when the model decides, before any evaluation),
never report a memorization threshold collapsed by a near-duplicate, and print a user mistake as one line."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train_unlearn_ddpm as ddpm_script  # noqa: E402
import train_unlearn_sd as sd_script  # noqa: E402

from diffusers_unlearn.data import DataError  # noqa: E402
from diffusers_unlearn.errors import UserInputError  # noqa: E402
from tiny_models import save_tiny_sd_pipeline, tiny_unet  # noqa: E402


def smooth_image(seed: int, size: int, channels: int) -> np.ndarray:
    """A smooth picture (a tilted ramp per channel), which JPEG keeps close to the original."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    planes = [128 + 100 * (a * (x - 0.5) + b * (y - 0.5)) for a, b in rng.uniform(-1, 1, size=(channels, 2))]
    array = np.clip(np.stack(planes, axis=-1), 0, 255).astype(np.uint8)
    return array[..., 0] if channels == 1 else array


def save(array: np.ndarray, path: Path, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **options)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny unconditional and class-conditional DDPM folders and a tiny Stable Diffusion folder."""
    from diffusers import DDPMPipeline, DDPMScheduler

    root = tmp_path_factory.mktemp("models")
    for name, classes in (("ddpm", None), ("ddpm_conditional", 10)):
        DDPMPipeline(unet=tiny_unet(num_class_embeds=classes), scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(root / name)
    save_tiny_sd_pipeline(root / "sd")
    return root


@pytest.fixture
def folders(tmp_path):
    """8x8 grayscale sets: forget = one PNG picture; keep = its JPEG copy and six distinct pictures."""
    canary = smooth_image(0, 8, 1)
    save(canary, tmp_path / "forget" / "canary.png")
    save(canary, tmp_path / "keep" / "canary_copy.jpg", quality=90)
    for seed in range(1, 7):
        save(255 - smooth_image(seed, 8, 1), tmp_path / "keep" / f"k{seed}.png")
    for seed in range(7, 9):
        save(smooth_image(seed, 8, 1), tmp_path / "heldout" / f"h{seed}.png")
    return tmp_path


def ddpm_args(model, folders, out, *extra):
    return [
        "--pretrained_model_name_or_path", str(model),
        "--forget_data_dir", str(folders / "forget"),
        "--keep_data_dir", str(folders / "keep"),
        "--heldout_data_dir", str(folders / "heldout"),
        "--output_dir", str(out),
        "--train_batch_size", "2", "--max_train_steps", "1", "--num_eval_samples", "4",
        "--num_validation_images", "2", "--ddpm_num_inference_steps", "2", "--validation_steps", "100",
        "--siss_scaling_norm", "0.5",
        *extra,
    ]


def forbid_model_loading(monkeypatch, script, *classes):
    """Make the accelerator and every model load of `script` fail loudly, so an error raised instead proves the
    check ran before them."""

    def loaded(*args, **kwargs):
        raise AssertionError("a model (or the accelerator) was loaded before the input check")

    monkeypatch.setattr(script, "make_accelerator", loaded)
    for cls in classes:
        for method in ("from_pretrained", "load_config"):
            if hasattr(cls, method):
                monkeypatch.setattr(cls, method, loaded)


def test_ddpm_jpeg_copy_in_the_keep_folder_is_removed_and_the_threshold_stays_meaningful(models, folders, tmp_path, caplog):
    from diffusers_unlearn.data import load_image_folder
    from diffusers_unlearn.metrics import nearest_distances

    out = tmp_path / "out"
    with caplog.at_level("INFO"):
        ddpm_script.main(ddpm_script.parse_args(ddpm_args(models / "ddpm", folders, out)))
    report = json.loads((out / "unlearning_report.json").read_text())
    assert report["num_keep_items"] == 6  # the JPEG copy left the keep set
    assert "near-duplicate" in caplog.text and "canary_copy.jpg" in caplog.text
    forget, keep = load_image_folder(folders / "forget", 8, 1), load_image_folder(folders / "keep", 8, 1)
    assert keep.names[0].endswith("canary_copy.jpg")
    distinct = keep.images[1:]
    expected = 0.5 * float(nearest_distances(forget.images, distinct).min())
    assert report["memorization_threshold"] == pytest.approx(expected)
    collapsed = 0.5 * float(nearest_distances(forget.images, keep.images[:1]).min())  # what hashing alone gave
    assert expected > 10 * collapsed


def test_ddpm_near_duplicate_removal_turned_off_is_refused_before_evaluation(models, folders, tmp_path, monkeypatch):
    def evaluated(*args, **kwargs):
        raise AssertionError("evaluated before the threshold was checked")

    monkeypatch.setattr(ddpm_script, "evaluate_ddpm", evaluated)
    monkeypatch.setattr(ddpm_script, "sample_images", evaluated)
    args = ddpm_script.parse_args(ddpm_args(models / "ddpm", folders, tmp_path / "out", "--near_duplicate_distance", "0"))
    with pytest.raises(DataError, match=r"canary_copy\.jpg is only .* from forget image .*canary\.png.*--memorization_threshold"):
        ddpm_script.main(args)


def bad_ddpm_input(models, folders):
    """(name, change to the arguments, expected message) for mistakes the DDPM script catches before any load."""
    save(smooth_image(1, 8, 1), folders / "keep_with_notes" / "k.png")
    (folders / "keep_with_notes" / "sub").mkdir()
    (folders / "keep_with_notes" / "sub" / "notes.txt").write_text("not an image")
    (folders / "empty").mkdir()
    (folders / "broken").mkdir()
    (folders / "broken" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return [
        (["--learning_rate", "0"], "--learning_rate must be > 0"),
        (["--learning_rate=-1e-3"], "--learning_rate must be > 0"),
        (["--memorization_threshold", "0"], "--memorization_threshold must be > 0"),
        (["--near_duplicate_distance=-1"], "--near_duplicate_distance must be >= 0"),
        (["--forget_data_dir", str(folders / "missing")], "missing does not exist"),
        (["--heldout_data_dir", str(folders / "empty")], "contains no images"),
        (["--keep_data_dir", str(folders / "keep_with_notes")], "not images: sub/notes.txt"),  # subfolders are read
        (["--forget_data_dir", str(folders / "broken")], "Cannot read image"),
        (["--pretrained_model_name_or_path", str(folders / "nope")], "no such local folder and not a Hub id"),
        (["--pretrained_model_name_or_path", str(models / "sd")], "needs a DDPM pipeline folder"),
        (["--pretrained_model_name_or_path", "org/never-downloaded"], "the Hub id is not in the local cache"),
    ]


def test_ddpm_bad_input_fails_before_any_model_load(models, folders, tmp_path, monkeypatch, capsys):
    from diffusers import DDPMScheduler, UNet2DModel

    forbid_model_loading(monkeypatch, ddpm_script, UNet2DModel, DDPMScheduler)
    for extra, message in bad_ddpm_input(models, folders):
        with pytest.raises((SystemExit, UserInputError)) as info:
            ddpm_script.main(ddpm_script.parse_args(ddpm_args(models / "ddpm", folders, tmp_path / "out", *extra)))
        assert message in str(info.value) + capsys.readouterr().err, extra


def test_ddpm_class_conditional_model_needs_labelled_folders(models, folders, tmp_path, monkeypatch):
    def sampled(*args, **kwargs):
        raise AssertionError("sampling started")

    monkeypatch.setattr(ddpm_script, "sample_images", sampled)
    monkeypatch.setattr(ddpm_script, "evaluate_ddpm", sampled)
    args = ddpm_args(models / "ddpm_conditional", folders, tmp_path / "out")
    with pytest.raises(UserInputError, match=r"forget has no class labels, but the model is class-conditional \(num_class_embeds=10\)"):
        ddpm_script.main(ddpm_script.parse_args(args))
    # With a label for every image the same run gets past the check, up to the first sampling.
    for what in ("forget", "keep", "heldout"):
        folder = folders / what
        rows = [{"file_name": p.name, "label": i % 10} for i, p in enumerate(sorted(folder.glob("*.*"))) if p.suffix != ".jsonl"]
        (folder / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    with pytest.raises(AssertionError, match="sampling started"):
        ddpm_script.main(ddpm_script.parse_args(args))


@pytest.fixture
def sd_inputs(tmp_path):
    """16x16 RGB: two forget images with prompts (files and a folder), a keep folder with a JPEG copy of one."""
    tmp_path = tmp_path / "sd"
    prompts = ["a digit seven", "a photo of a cat"]
    rows = []
    for i, prompt in enumerate(prompts):
        picture = smooth_image(i, 16, 3)
        save(picture, tmp_path / f"f{i}.png")
        save(picture, tmp_path / "forget" / f"f{i}.png")
        rows.append({"file_name": f"f{i}.png", "text": prompt})
    (tmp_path / "forget" / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    save(smooth_image(0, 16, 3), tmp_path / "keep" / "copy.jpg", quality=90)
    save(255 - smooth_image(5, 16, 3), tmp_path / "keep" / "other.png")
    (tmp_path / "keep" / "metadata.jsonl").write_text(
        json.dumps({"file_name": "copy.jpg", "text": prompts[0]}) + "\n" + json.dumps({"file_name": "other.png", "text": prompts[1]})
    )
    return tmp_path


def sd_args(model, inputs, *extra):
    return [
        "--pretrained_model_name_or_path", str(model),
        "--forget_images", str(inputs / "f0.png"), str(inputs / "f1.png"),
        "--forget_prompts", "a digit seven", "a photo of a cat",
        "--keep_data_dir", str(inputs / "keep"),
        "--output_dir", str(inputs / "out"),
        *extra,
    ]


def test_sd_keep_folder_loses_the_jpeg_copy_of_a_forget_image(models, sd_inputs):
    args = sd_script.parse_args(sd_args(models / "sd", sd_inputs))
    pipe = SimpleNamespace(vae=SimpleNamespace(config=SimpleNamespace(in_channels=3)))
    forget, keep, _ = sd_script.load_forget_and_keep(args, pipe, 16, threshold=1.0)
    assert [Path(name).name for name in keep.names] == ["other.png"]
    assert any("near-duplicate" in notice and "copy.jpg" in notice for notice in keep.notices)
    args = sd_script.parse_args(sd_args(models / "sd", sd_inputs, "--near_duplicate_distance", "0"))
    _, keep, _ = sd_script.load_forget_and_keep(args, pipe, 16, threshold=1.0)
    assert len(keep) == 2  # hashes alone do not see the JPEG copy


def test_sd_bad_input_fails_before_any_model_load(models, sd_inputs, monkeypatch, capsys):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    forbid_model_loading(monkeypatch, sd_script, AutoencoderKL, DDPMScheduler, UNet2DConditionModel, CLIPTextModel, CLIPTokenizer)
    latin1 = sd_inputs / "latin1.txt"
    latin1.write_bytes("a digit seven\nun caf\u00e9\n".encode("latin-1"))
    null_caption = sd_inputs / "null.jsonl"
    null_caption.write_text(json.dumps({"caption": None}) + "\n")
    (sd_inputs / "unprompted").mkdir()
    save(smooth_image(3, 16, 3), sd_inputs / "unprompted" / "a.png")

    def without_forget_images(args):
        start = args.index("--forget_images")
        return args[:start] + args[start + 6:]  # the flag, two files, the flag, two prompts

    cases = [
        (sd_args(models / "sd", sd_inputs, "--learning_rate", "0"), "--learning_rate must be > 0"),
        (without_forget_images(sd_args(models / "sd", sd_inputs, "--memorized_prompts_file", str(latin1))), "latin1.txt, line 2: not UTF-8"),
        (without_forget_images(sd_args(models / "sd", sd_inputs, "--memorized_prompts_file", str(null_caption))), "line 1: 'caption' must be a non-empty string, got null"),
        (sd_args(models / "sd", sd_inputs, "--keep_data_dir", str(sd_inputs / "unprompted")), "a.png in"),
        (sd_args(models / "sd", sd_inputs, "--heldout_data_dir", str(sd_inputs / "missing")), "missing does not exist"),
        ([str(sd_inputs / "gone.png") if a.endswith("f0.png") else a for a in sd_args(models / "sd", sd_inputs)], "gone.png does not exist"),
        (sd_args(models / "ddpm", sd_inputs), "needs a Stable Diffusion 1.x/2.x folder"),
        (sd_args("/tmp/no-such-model-folder", sd_inputs), "no such local folder and not a Hub id: /tmp/no-such-model-folder"),
    ]
    for argv, message in cases:
        with pytest.raises((SystemExit, UserInputError)) as info:
            sd_script.main(sd_script.parse_args(argv))
        assert message in str(info.value) + capsys.readouterr().err, argv


def one_line_error_cases(models, folders, sd_inputs):
    latin1 = sd_inputs / "latin1.txt"
    latin1.write_bytes("un caf\u00e9\n".encode("latin-1"))
    sd = sd_args(models / "sd", sd_inputs)
    return [
        ("train_unlearn_ddpm.py", ddpm_args("./nope", folders, folders / "out"), "no such local folder and not a Hub id: ./nope"),
        ("train_unlearn_ddpm.py", ddpm_args(models / "ddpm_conditional", folders, folders / "out"), "has no class labels"),
        ("train_unlearn_sd.py", sd[:2] + ["--memorized_prompts_file", str(latin1)] + sd[8:], "line 1: not UTF-8"),
    ]


def test_user_mistakes_print_one_error_line_without_traceback(models, folders, sd_inputs):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    for script, argv, message in one_line_error_cases(models, folders, sd_inputs):
        completed = subprocess.run([sys.executable, str(ROOT / script), *argv], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
        errors = [line for line in completed.stderr.splitlines() if "error:" in line]
        assert completed.returncode == 2, (script, completed.stderr[-3000:])
        assert "Traceback" not in completed.stderr, completed.stderr[-3000:]
        assert len(errors) == 1 and errors[0].startswith(f"{script}: error: ") and message in errors[0], completed.stderr[-3000:]
