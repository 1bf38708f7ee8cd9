"""train_unlearn_sd.py on tiny random SD3 (with and without T5) and Flux pipelines: the flow-matching families run
end to end in LoRA and full mode, fp32 and bf16, resume bit-identically, and their adapters load into the plain
pipelines with no missing or unexpected keys."""

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

from tiny_models import check_script_adapter_in_plain_pipeline, quick_sd_script_args, save_tiny_flux_pipeline, save_tiny_sd3_pipeline  # noqa: E402

PROMPTS = ["a digit seven", "a photo of a cat"]
MODELS = {"sd3": {}, "sd3_t5": {"with_t5": True}, "flux": {}}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow")
    save_tiny_sd3_pipeline(root / "sd3", with_t5=False)
    save_tiny_sd3_pipeline(root / "sd3_t5", with_t5=True)
    save_tiny_flux_pipeline(root / "flux")
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray((rng.random((16, 16, 3)) * 255).astype("uint8")).save(root / f"f{i}.png")
    return root


def args_for(workspace, model, output_dir, *extra):
    forget = [workspace / "f0.png", workspace / "f1.png"]
    return quick_sd_script_args(workspace / model, output_dir, forget, PROMPTS, "--keep_from_generations", "2", "--resolution", "16", *extra)


def run(args):
    script.main(script.parse_args(args))


def plain_pipeline(workspace, model):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    if model == "flux":
        return FluxPipeline.from_pretrained(str(workspace / model))
    extra = {} if model == "sd3_t5" else {"text_encoder_3": None, "tokenizer_3": None}
    return StableDiffusion3Pipeline.from_pretrained(str(workspace / model), **extra)


@pytest.mark.parametrize("model", list(MODELS))
def test_lora_with_text_encoders_loads_into_the_plain_pipeline(workspace, tmp_path, model, fresh_accelerate_state):
    out = tmp_path / "lora"
    run(args_for(workspace, model, out, "--train_text_encoder", "--weighting_scheme", "logit_normal"))
    report = json.loads((out / "unlearning_report.json").read_text())
    assert report["model_family"] == ("flux" if model == "flux" else "sd3")
    assert all(np.isfinite(report["metrics"][side][key]) for side in ("before", "after") for key in ("forget_loss", "keep_loss"))
    saved = load_file(str(out / "pytorch_lora_weights.safetensors"))
    prefixes = {"transformer", "text_encoder"} | ({"text_encoder_2"} if model != "flux" else set())
    assert {key.split(".")[0] for key in saved} == prefixes  # T5 is never trained
    assert any(t.abs().sum() > 0 for k, t in saved.items() if k.startswith("transformer.") and "lora_B" in k)
    assert any(k.startswith("transformer.") and ".add_q_proj." in k for k in saved)  # the family's joint-attention preset

    check_script_adapter_in_plain_pipeline(plain_pipeline(workspace, model), out, saved, prefixes, height=16, width=16)


@pytest.mark.parametrize("model", ["sd3", "flux"])
def test_bf16_lora_trains_a_float32_adapter(workspace, tmp_path, model, fresh_accelerate_state):
    out = tmp_path / "bf16"
    # As the docs' commands run them: bf16, 8-bit AdamW, gradient checkpointing.
    run(args_for(workspace, model, out, "--mixed_precision", "bf16", "--use_8bit_adam", "--gradient_checkpointing", "--noise_norm_generations", "1", "--max_sequence_length", "16"))
    saved = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.float32}
    assert any(t.abs().sum() > 0 for k, t in saved.items() if "lora_B" in k)
    # The velocity-difference noise-norm score is reported for flow models, before and after.
    metrics = json.loads((out / "unlearning_report.json").read_text())["metrics"]
    assert all(np.isfinite(metrics[side]["noise_norm"]) and metrics[side]["noise_norm"] > 0 for side in ("before", "after"))


@pytest.mark.parametrize("model,precision", [("sd3", "no"), ("flux", "bf16")])
def test_full_finetune_saves_the_base_with_a_new_transformer(workspace, tmp_path, model, precision, fresh_accelerate_state):
    from diffusers import FlowMatchEulerDiscreteScheduler

    out = tmp_path / "full"
    run(args_for(workspace, model, out, "--train_mode", "full", "--mixed_precision", precision, "--learning_rate", "1e-3"))
    base = workspace / model

    def tensors(folder, name):
        return {k: v for path in sorted((folder / name).glob("*.safetensors")) for k, v in load_file(str(path)).items()}

    for name in ("vae", "text_encoder", "text_encoder_2"):
        saved, original = tensors(out, name), tensors(base, name)
        assert saved.keys() == original.keys() and all(torch.equal(saved[k], original[k]) for k in original), name
    trained, original = tensors(out, "transformer"), tensors(base, "transformer")
    assert {t.dtype for t in trained.values()} == {torch.float32}
    assert any(not torch.equal(trained[k], original[k]) for k in original)
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    if model == "flux":
        loaded = FluxPipeline.from_pretrained(str(out))
    else:
        loaded = StableDiffusion3Pipeline.from_pretrained(str(out), text_encoder_3=None, tokenizer_3=None)
    assert isinstance(loaded.scheduler, FlowMatchEulerDiscreteScheduler)
    loaded.set_progress_bar_config(disable=True)
    image = loaded(PROMPTS[0], height=16, width=16, num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all()


@pytest.mark.parametrize("model", ["sd3", "flux"])
def test_resume_matches_an_uninterrupted_run(workspace, tmp_path, model, fresh_accelerate_state):
    common = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--num_eval_images", "1", "--weighting_scheme", "logit_normal"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(args_for(workspace, model, straight, *common))
    run(args_for(workspace, model, resumed, *common[2:], "--max_train_steps", "2"))
    run(args_for(workspace, model, resumed, *common, "--resume_from_checkpoint", "latest"))
    a = load_file(str(straight / "pytorch_lora_weights.safetensors"))
    b = load_file(str(resumed / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # A resume under another sigma density is refused.
    with pytest.raises(Exception, match="weighting_scheme|family_options"):
        run(args_for(workspace, model, resumed, "--max_train_steps", "6", "--checkpointing_steps", "2", "--num_eval_images", "1", "--resume_from_checkpoint", "latest"))


def test_flow_flags_belong_to_the_flow_families(workspace, tmp_path, capsys):
    from tiny_models import save_tiny_sd_pipeline

    save_tiny_sd_pipeline(tmp_path / "sd")
    args = args_for(workspace, "sd3", tmp_path / "a", "--weighting_scheme", "mode")
    args[1] = str(tmp_path / "sd")
    with pytest.raises(SystemExit):
        script.run_script(lambda: script.main(script.parse_args(args)), "train_unlearn_sd.py")
    assert "--weighting_scheme" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.run_script(lambda: script.main(script.parse_args(args_for(workspace, "flux", tmp_path / "b", "--snr_gamma", "5"))), "train_unlearn_sd.py")
    assert "--weighting_scheme" in capsys.readouterr().err
