"""train_unlearn_sd.py on a tiny random SDXL pipeline (SDXL base's block structure at small widths): the family
is picked from model_index.json, both text encoders train with --train_text_encoder, bf16 and full fine-tuning
work, a resume is bit-identical, and the adapter loads into plain StableDiffusionXLPipeline."""

import json
import shutil
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

from tiny_models import check_script_adapter_in_plain_pipeline, quick_sd_script_args, save_tiny_sdxl_pipeline, tiny_vae  # noqa: E402

PROMPTS = ["a digit seven", "a photo of a cat"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl")
    save_tiny_sdxl_pipeline(root / "model")
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray((rng.random((16, 16, 3)) * 255).astype("uint8")).save(root / f"f{i}.png")
    return root


def args_for(workspace, output_dir, *extra, model="model"):
    forget = [workspace / "f0.png", workspace / "f1.png"]
    return quick_sd_script_args(workspace / model, output_dir, forget, PROMPTS, "--keep_from_generations", "2", *extra)


def run(args):
    script.main(script.parse_args(args))


def test_lora_with_both_text_encoders_loads_into_plain_sdxl(workspace, tmp_path, fresh_accelerate_state):
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "lora"
    run(args_for(workspace, out, "--train_text_encoder"))
    report = json.loads((out / "unlearning_report.json").read_text())
    assert report["model_family"] == "sdxl"
    assert all(np.isfinite(report["metrics"]["after"][key]) for key in ("forget_loss", "keep_loss"))
    assert "StableDiffusionXLPipeline.from_pretrained" in (out / "README.md").read_text()
    saved = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert {key.split(".")[0] for key in saved} == {"unet", "text_encoder", "text_encoder_2"}
    for prefix in ("unet", "text_encoder", "text_encoder_2"):  # every part trained (lora_B starts at zero)
        assert any(t.abs().sum() > 0 for k, t in saved.items() if k.startswith(prefix + ".") and "lora_B" in k), prefix

    pipe = StableDiffusionXLPipeline.from_pretrained(str(workspace / "model"))
    check_script_adapter_in_plain_pipeline(pipe, out, saved, ("unet", "text_encoder", "text_encoder_2"))

    # Our pipeline loads the same folder by the method's name, into all three components, at a strength.
    from diffusers_unlearn.pipelines import UnlearnStableDiffusionXLPipeline

    ours = UnlearnStableDiffusionXLPipeline.from_pretrained(str(workspace / "model"))
    ours.set_progress_bar_config(disable=True)

    def generate():
        return ours(PROMPTS[0], num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").images

    base = generate()
    assert ours.load_unlearning_adapter(str(out)) == "siss"
    assert all("siss" in getattr(ours, part).peft_config for part in ("unet", "text_encoder", "text_encoder_2"))
    unlearned = generate()
    assert not torch.equal(unlearned, base)
    ours.set_unlearning_strength(0.0)
    assert torch.allclose(generate(), base, atol=1e-6)
    ours.set_unlearning_strength(1.0)
    assert torch.allclose(generate(), unlearned, atol=1e-6)


def test_bf16_lora_trains_a_float32_adapter(workspace, tmp_path, fresh_accelerate_state):
    out = tmp_path / "bf16"
    # As docs/families/sdxl.md's command runs it: bf16, 8-bit AdamW, gradient checkpointing (both text encoders too).
    run(args_for(workspace, out, "--mixed_precision", "bf16", "--train_text_encoder", "--use_8bit_adam", "--gradient_checkpointing"))
    saved = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.float32}
    report = json.loads((out / "unlearning_report.json").read_text())
    assert all(np.isfinite(report["metrics"][side]["forget_loss"]) for side in ("before", "after"))


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_full_finetune_saves_the_sdxl_base_with_a_new_unet(workspace, tmp_path, precision, fresh_accelerate_state):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    out = tmp_path / "full"
    run(args_for(workspace, out, "--train_mode", "full", "--mixed_precision", precision, "--learning_rate", "1e-3"))
    base = workspace / "model"
    for name in ("vae", "text_encoder", "text_encoder_2"):
        saved = load_file(str(next((out / name).glob("*.safetensors"))))
        original = load_file(str(next((base / name).glob("*.safetensors"))))
        assert saved.keys() == original.keys()
        assert all(saved[k].dtype == original[k].dtype and torch.equal(saved[k], original[k]) for k in original), name
    unet = load_file(str(next((out / "unet").glob("*.safetensors"))))
    base_unet = load_file(str(next((base / "unet").glob("*.safetensors"))))
    assert {t.dtype for t in unet.values()} == {torch.float32}
    assert any(not torch.equal(unet[k], base_unet[k]) for k in base_unet)

    pipe = StableDiffusionXLPipeline.from_pretrained(str(out))
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)  # the base's sampler, not a training scheduler
    pipe.set_progress_bar_config(disable=True)
    image = pipe(PROMPTS[0], num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all()


def test_resume_matches_an_uninterrupted_run(workspace, tmp_path, fresh_accelerate_state):
    common = ["--max_train_steps", "4", "--checkpointing_steps", "2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(args_for(workspace, straight, *common, "--train_text_encoder"))
    run(args_for(workspace, resumed, "--max_train_steps", "2", "--checkpointing_steps", "2", "--train_text_encoder"))
    run(args_for(workspace, resumed, *common, "--train_text_encoder", "--resume_from_checkpoint", "latest"))
    a = load_file(str(straight / "pytorch_lora_weights.safetensors"))
    b = load_file(str(resumed / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    step_2 = load_file(str(straight / "checkpoint-2" / "pytorch_lora_weights.safetensors"))
    assert {k.split(".")[0] for k in step_2} == {"unet", "text_encoder", "text_encoder_2"}


def test_a_separate_vae_is_the_one_used(workspace, tmp_path, fresh_accelerate_state):
    """--pretrained_vae_model_name_or_path replaces the model's VAE (other weights give other latents, so other
    forget losses); a resume under another VAE is refused."""
    vae_dir = tmp_path / "other-vae"
    torch.manual_seed(7)
    tiny_vae(scaling_factor=0.13025, force_upcast=False).save_pretrained(str(vae_dir))
    own, other = tmp_path / "own", tmp_path / "other"
    run(args_for(workspace, own, "--max_train_steps", "1"))
    run(args_for(workspace, other, "--max_train_steps", "1", "--checkpointing_steps", "1", "--pretrained_vae_model_name_or_path", str(vae_dir)))
    before = [json.loads((folder / "unlearning_report.json").read_text())["metrics"]["before"]["forget_loss"] for folder in (own, other)]
    assert before[0] != before[1]
    with pytest.raises(Exception, match="vae"):
        run(args_for(workspace, other, "--max_train_steps", "2", "--resume_from_checkpoint", "latest"))


def test_family_override_and_unsupported_pipelines(workspace, tmp_path, capsys):
    # An SDXL folder given as --model_family sd: refused before anything loads, naming what it holds.
    with pytest.raises(SystemExit):
        script.run_script(lambda: script.parse_args(args_for(workspace, tmp_path / "a", "--model_family", "sd")), "train_unlearn_sd.py")
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "StableDiffusionXLPipeline" in error[0] and "Stable Diffusion 1.x/2.x" in error[0]

    # A pipeline class no family serves (a custom subclass saved under its own name): one line naming the
    # supported classes; --model_family sdxl takes it.
    custom = tmp_path / "custom"
    shutil.copytree(workspace / "model", custom)
    index = json.loads((custom / "model_index.json").read_text())
    index["_class_name"] = "MyStableDiffusionXLPipeline"
    (custom / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(SystemExit):
        script.run_script(lambda: script.parse_args(args_for(workspace, tmp_path / "b", model=custom)), "train_unlearn_sd.py")
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "MyStableDiffusionXLPipeline" in error[0] and "StableDiffusionXLPipeline" in error[0]
    args = script.parse_args(args_for(workspace, tmp_path / "c", "--model_family", "sdxl", model=custom))
    assert args.model_family == "sdxl"

    # A flow-matching pipeline (SD3): refused with the supported pipelines named.
    sd3 = tmp_path / "sd3"
    sd3.mkdir()
    (sd3 / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    }))
    with pytest.raises(SystemExit):
        script.run_script(lambda: script.parse_args(args_for(workspace, tmp_path / "d", model=sd3)), "train_unlearn_sd.py")
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "StableDiffusion3Pipeline" in error[0] and "StableDiffusionXLPipeline" in error[0]
