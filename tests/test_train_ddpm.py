"""train_unlearn_ddpm.py end to end on a tiny model and image folders (CPU, seconds per run)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train_unlearn_ddpm as script  # noqa: E402

from tiny_models import tiny_unet  # noqa: E402


def save_folder(folder: Path, images: torch.Tensor, prefix: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        array = ((image[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
        Image.fromarray(array, mode="L").save(folder / f"{prefix}{i}.png")
    return folder


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny DDPM pipeline folder plus forget/keep/heldout image folders."""
    from diffusers import DDPMPipeline, DDPMScheduler

    root = tmp_path_factory.mktemp("ddpm")
    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(root / "model")
    g = torch.Generator().manual_seed(0)
    images = torch.rand(14, 1, 8, 8, generator=g) * 2 - 1
    save_folder(root / "forget", images[:2], "f")
    save_folder(root / "keep", images[:10], "k")  # the two forget images are also in the keep folder
    save_folder(root / "heldout", images[10:], "h")
    return root


def base_args(workspace, output_dir, *extra):
    return [
        "--pretrained_model_name_or_path", str(workspace / "model"),
        "--forget_data_dir", str(workspace / "forget"),
        "--keep_data_dir", str(workspace / "keep"),
        "--heldout_data_dir", str(workspace / "heldout"),
        "--output_dir", str(output_dir),
        "--train_batch_size", "4",
        "--max_train_steps", "4",
        "--num_eval_samples", "8",
        "--num_validation_images", "4",
        "--ddpm_num_inference_steps", "3",
        "--validation_steps", "2",
        "--siss_scaling_norm", "0.5",
        *extra,
    ]


def run(args):
    script.main(script.parse_args(args))


def test_full_run_writes_report_adapter_grids_and_card(workspace, tmp_path, caplog):
    out = tmp_path / "out"
    with caplog.at_level("INFO"):
        run(base_args(workspace, out))
    report = json.loads((out / "unlearning_report.json").read_text())
    assert report["method"] == "siss" and report["seed"] == 0
    assert report["hyperparameters"]["lam"] == 0.5
    assert len(report["forget_items"]) == 2 and all(len(i["sha256"]) == 64 for i in report["forget_items"])
    assert report["num_keep_items"] == 8  # the two forget images were removed from the keep set
    assert "also in the forget set" in caplog.text
    for phase in ("before", "after"):
        metrics = report["metrics"][phase]
        for key in ("memorization_rate", "fd", "forget_loss", "keep_loss", "heldout_loss", "mia_auc"):
            assert key in metrics, (phase, key)
    assert report["metrics"]["after"]["wall_seconds"] > 0
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "samples_before.png").is_file() and (out / "samples_after.png").is_file()
    card = (out / "README.md").read_text()
    for tag in ("- diffusers", "- lora", "- unlearning", "- siss"):
        assert tag in card
    assert "| forget_loss |" in card
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--forget_data_dir", "/nonexistent/forget"], "does not exist"),
        (["--method", "retrain"], "unknown"),
        (["--siss_lambda", "1.5"], "lam"),
        (["--vdu_gamma", "1.0"], "does not apply to --method siss"),
        (["--mixed_precision", "fp16"], "fp16 needs a CUDA GPU"),
    ],
)
def test_bad_input_fails_before_training(workspace, tmp_path, extra, message, capsys):
    out = tmp_path / "out"
    with pytest.raises((SystemExit, ValueError)) as info:
        run(base_args(workspace, out, *extra))
    text = str(info.value) + capsys.readouterr().err
    assert message in text
    assert not (out / "unlearning_report.json").exists()


def test_corrupt_forget_file_is_named(workspace, tmp_path):
    forget = tmp_path / "forget"
    save_folder(forget, torch.zeros(1, 1, 8, 8), "ok")
    (forget / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="bad.png"):
        run(base_args(workspace, tmp_path / "out", "--forget_data_dir", str(forget)))


def trained_weights(out: Path) -> dict:
    return load_file(str(out / "pytorch_lora_weights.safetensors"))


def test_resume_matches_an_uninterrupted_run(workspace, tmp_path):
    common = ["--max_train_steps", "10", "--checkpointing_steps", "5", "--validation_steps", "100"]
    straight = tmp_path / "straight"
    run(base_args(workspace, straight, *common))

    resumed = tmp_path / "resumed"
    run(base_args(workspace, resumed, *common[:1], "5", *common[2:]))  # stops at step 5
    assert (resumed / "checkpoint-5").is_dir()
    run(base_args(workspace, resumed, *common, "--resume_from_checkpoint", "latest"))
    a, b = trained_weights(straight), trained_weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_checkpoints_total_limit_and_atomic_names(workspace, tmp_path):
    out = tmp_path / "out"
    run(base_args(workspace, out, "--max_train_steps", "6", "--checkpointing_steps", "2", "--checkpoints_total_limit", "2"))
    checkpoints = sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-"))
    assert checkpoints == ["checkpoint-4", "checkpoint-6"]


def test_two_processes_only_rank_zero_writes(workspace, tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
        str(ROOT / "train_unlearn_ddpm.py"), *base_args(workspace, out, "--max_train_steps", "3"),
    ]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert completed.returncode == 0, completed.stderr[-4000:]
    report = json.loads((out / "unlearning_report.json").read_text())
    assert report["num_processes"] == 2
    for phase in ("before", "after"):
        assert all(report["metrics"][phase][k] is not None for k in ("forget_loss", "keep_loss", "mia_auc"))
    assert completed.stdout.count("Unlearning summary") == 1  # printed (and written) by rank 0 only


def test_class_unlearning_without_a_fitting_classifier_fails_before_the_model_loads(workspace, tmp_path, monkeypatch):
    """The bundled classifier reads 8x8 grey images: for another size, --forget_class needs --classifier_dir, and
    the UNet's config (not its weights) says so before anything loads."""
    from diffusers import UNet2DModel

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the input check")

    monkeypatch.setattr(UNet2DModel, "from_pretrained", no_loading)
    with pytest.raises(ValueError, match="reads 8x8 grey images, not this model's 16x16x1: pass --classifier_dir"):
        args = base_args(workspace, tmp_path / "out", "--forget_dataset_name", "toy-digits", "--forget_class", "3", "--resolution", "16")
        run(args[:2] + args[4:])  # without --forget_data_dir
    assert not (tmp_path / "out" / "unlearning_report.json").exists()
