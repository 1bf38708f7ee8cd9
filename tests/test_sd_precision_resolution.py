"""The real-model path of train_unlearn_sd.py and the SD pipeline mixin (issue 10, section 3): bf16 mixed
precision (script in LoRA and full mode, `pipe.unlearn` on a bf16 pipeline), generation at --resolution below
the model's native size, VAE latent scaling/upcasting, and a full fine-tune saved like its base model."""

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

from tiny_models import save_tiny_sd_pipeline  # noqa: E402

PROMPTS = ["a digit seven", "a photo of a cat"]


def save_rich_base(tiny_folder, folder):
    """The tiny pipeline as a real SD 1.5 folder looks: PNDMScheduler, a (tiny) safety checker and feature
    extractor, requires_safety_checker; the VAE stored in float16 (diffusers would load it as float32)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    tiny = StableDiffusionPipeline.from_pretrained(str(tiny_folder), safety_checker=None)
    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=1)
    checker = StableDiffusionSafetyChecker(
        CLIPConfig(text_config={**small, "vocab_size": 10}, vision_config={**small, "image_size": 32, "patch_size": 8}, projection_dim=16)
    )
    extractor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1)
    vae = AutoencoderKL.from_pretrained(str(tiny_folder), subfolder="vae", torch_dtype=torch.float16)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer, unet=tiny.unet, scheduler=scheduler,
        safety_checker=checker, feature_extractor=extractor, requires_safety_checker=True,
    )
    pipe.save_pretrained(str(folder))
    return folder


def with_sample_size(folder, copy, sample_size):
    """A copy of a pipeline folder whose UNet config claims another native size (the weights do not depend on it)."""
    shutil.copytree(folder, copy)
    config_path = Path(copy) / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config["sample_size"] = sample_size
    config_path.write_text(json.dumps(config))
    return copy


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd_real_path")
    save_tiny_sd_pipeline(root / "model")  # 16 px native (UNet sample_size 8, VAE scale factor 2)
    save_rich_base(root / "model", root / "rich")
    with_sample_size(root / "model", root / "native64", 32)  # claims 64 px native
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray((rng.random((16, 16, 3)) * 255).astype("uint8")).save(root / f"f{i}.png")
    return root


def run(workspace, model, output_dir, *extra):
    args = [
        "--pretrained_model_name_or_path", str(workspace / model),
        "--forget_images", str(workspace / "f0.png"), str(workspace / "f1.png"),
        "--forget_prompts", *PROMPTS,
        "--keep_from_generations", "2",
        "--output_dir", str(output_dir),
        "--train_batch_size", "2", "--max_train_steps", "2", "--validation_steps", "1",
        "--num_eval_images", "2", "--num_validation_images", "2", "--num_inference_steps", "2",
        "--noise_norm_generations", "1", "--siss_scaling_norm", "0.5",
        *extra,
    ]
    script.main(script.parse_args(args))
    return json.loads((Path(output_dir) / "unlearning_report.json").read_text())


def finite_metrics(report):
    for phase in ("before", "after"):
        for key in ("forget_loss", "keep_loss", "noise_norm", "memorization_rate"):
            value = report["metrics"][phase][key]
            assert value is not None and np.isfinite(value), (phase, key, value)


def test_bf16_lora_with_text_encoder_trains_fp32_adapter(workspace, tmp_path, fresh_accelerate_state):
    """--mixed_precision bf16 used to crash in the first generation (a float32 UNet fed bf16 embeddings)."""
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "lora"
    report = run(workspace, "model", out, "--mixed_precision", "bf16", "--train_text_encoder")
    finite_metrics(report)
    saved = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert {tensor.dtype for tensor in saved.values()} == {torch.float32}  # the adapter trained in fp32
    assert any(key.startswith("text_encoder.") for key in saved)
    assert any(tensor.abs().sum() > 0 for key, tensor in saved.items() if "lora_B" in key)
    pipe = StableDiffusionPipeline.from_pretrained(str(workspace / "model"), safety_checker=None)
    pipe.load_lora_weights(str(out))


def component_tensors(folder, name):
    files = sorted((Path(folder) / name).glob("*.safetensors"))
    return {key: value for path in files for key, value in load_file(str(path)).items()}


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_full_finetune_saves_the_base_pipeline_with_a_new_unet(workspace, tmp_path, precision, fresh_accelerate_state):
    """The saved folder is the base model (scheduler class and config, safety checker, feature extractor, every
    component in its stored dtype) with only the UNet's weights changed; plain diffusers loads and runs it."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    base, out = workspace / "rich", tmp_path / "full"
    run(workspace, "rich", out, "--train_mode", "full", "--mixed_precision", precision, "--learning_rate", "1e-3")

    def without_version(path):  # diffusers' own provenance fields differ between any two saves
        config = json.loads(Path(path).read_text())
        config.pop("_diffusers_version", None)
        config.pop("_name_or_path", None)
        return config

    assert without_version(out / "model_index.json") == without_version(base / "model_index.json")
    assert without_version(out / "scheduler" / "scheduler_config.json") == without_version(base / "scheduler" / "scheduler_config.json")
    assert json.loads((out / "feature_extractor" / "preprocessor_config.json").read_text()) == json.loads(
        (base / "feature_extractor" / "preprocessor_config.json").read_text()
    )
    for name in ("vae", "text_encoder", "safety_checker"):
        saved, original = component_tensors(out, name), component_tensors(base, name)
        assert saved.keys() == original.keys(), name
        for key in original:
            assert saved[key].dtype == original[key].dtype and torch.equal(saved[key], original[key]), (name, key)
    assert {t.dtype for t in component_tensors(out, "vae").values()} == {torch.float16}  # as the base stores it
    unet, base_unet = component_tensors(out, "unet"), component_tensors(base, "unet")
    assert {t.dtype for t in unet.values()} == {t.dtype for t in base_unet.values()} == {torch.float32}
    assert any(not torch.equal(unet[key], base_unet[key]) for key in base_unet)

    pipe = StableDiffusionPipeline.from_pretrained(str(out))
    assert isinstance(pipe.scheduler, PNDMScheduler) and pipe.safety_checker is not None and pipe.feature_extractor is not None
    pipe.set_progress_bar_config(disable=True)
    images = pipe(PROMPTS[0], num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 16, 16, 3)


def test_generation_at_resolution_below_the_native_size(workspace, tmp_path, fresh_accelerate_state):
    """A UNet whose sample_size means 64 px, trained on 16 px images: every generation (keep set, evaluation,
    validation, noise norm) runs at --resolution, not at the native size."""
    report = run(workspace, "native64", tmp_path / "res", "--resolution", "16")
    assert report["resolution"] == 16
    finite_metrics(report)
    assert report["num_keep_items"] == 4  # two 16 px generations per forget prompt, compared with the forget images


def test_generate_images_matches_the_pipeline_output_and_takes_a_size(workspace):
    """float32 images equal the pipeline's own decoded output bit for bit; height/width change the size."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from diffusers_unlearn.pipelines.text_to_image import generate_images, initial_latents

    pipe = StableDiffusionPipeline.from_pretrained(str(workspace / "native64"), safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # deterministic, as the script samples
    pipe.set_progress_bar_config(disable=True)
    ours = generate_images(pipe, [PROMPTS[0]], 2, seed=3, num_inference_steps=2)[0]
    reference = pipe([PROMPTS[0]] * 2, num_inference_steps=2, latents=initial_latents(pipe, 2, 3), output_type="pt").images
    assert ours.shape == (2, 3, 64, 64)
    assert torch.equal(ours, (reference.float() * 2 - 1).clamp(-1, 1))
    assert generate_images(pipe, [PROMPTS[0]], 1, num_inference_steps=2, height=16, width=24)[0].shape == (1, 3, 16, 24)
    with pytest.raises(ValueError, match="multiple of the VAE scale factor 2"):
        generate_images(pipe, [PROMPTS[0]], 1, num_inference_steps=2, height=15, width=16)


def test_pipeline_unlearn_in_bf16(workspace):
    """`pipe.unlearn` on a pipeline loaded in bfloat16: frozen weights stay bf16, the adapter trains in fp32;
    `memorization_score` works on the result."""
    from diffusers_unlearn.pipelines import UnlearnStableDiffusionPipeline

    pipe = UnlearnStableDiffusionPipeline.from_pretrained(str(workspace / "model"), torch_dtype=torch.bfloat16, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    forget = [(torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1, PROMPTS[0])]
    assert pipe.unlearn(forget=forget, max_train_steps=2, train_batch_size=2, keep_from_generations=2, scaling_norm=0.5) == "siss"
    lora = {p.dtype for n, p in pipe.unet.named_parameters() if "lora_" in n}
    frozen = {p.dtype for n, p in pipe.unet.named_parameters() if "lora_" not in n}
    assert lora == {torch.float32} and frozen == {torch.bfloat16}
    assert any(p.abs().sum() > 0 for n, p in pipe.unet.named_parameters() if "lora_B" in n)
    scores = pipe.memorization_score(PROMPTS, num_generations=1, num_inference_steps=2)
    assert len(scores) == 2 and all(np.isfinite(s) for s in scores)


def test_pipeline_unlearn_and_score_below_the_native_size(workspace):
    """A 64 px-native pipeline: `unlearn(resolution=16)` on 16 px images (keep set generated at 16 px) and
    `memorization_score(height=16, width=16)`."""
    from diffusers_unlearn.pipelines import UnlearnStableDiffusionPipeline

    pipe = UnlearnStableDiffusionPipeline.from_pretrained(str(workspace / "native64"), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    forget = [(torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1, PROMPTS[0])]
    with pytest.raises(ValueError, match="pass resolution="):
        pipe.unlearn(forget=forget, max_train_steps=1)
    assert pipe.unlearn(forget=forget, resolution=16, max_train_steps=2, train_batch_size=2, keep_from_generations=2, scaling_norm=0.5) == "siss"
    scores = pipe.memorization_score(PROMPTS, num_generations=1, num_inference_steps=2, height=16, width=16)
    assert len(scores) == 2 and all(np.isfinite(s) for s in scores)


def tiny_vae(**config):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8), latent_channels=4, norm_num_groups=8, sample_size=16, layers_per_block=1, **config,
    )


@pytest.mark.parametrize(
    "config, to_model",
    [
        ({"scaling_factor": 0.5}, lambda z: z * 0.5),
        ({"scaling_factor": 0.5, "shift_factor": 0.25}, lambda z: (z - 0.25) * 0.5),
        ({"scaling_factor": 0.5, "latents_mean": [0.1, 0.2, 0.3, 0.4], "latents_std": [1.0, 2.0, 4.0, 0.5]},
         lambda z: (z - torch.tensor([0.1, 0.2, 0.3, 0.4]).view(1, 4, 1, 1)) * 0.5 / torch.tensor([1.0, 2.0, 4.0, 0.5]).view(1, 4, 1, 1)),
    ],
)
def test_latents_honour_shift_factor_and_latent_statistics(config, to_model):
    from diffusers_unlearn.pipelines.text_to_image import decode_latents, encode_latents

    vae = tiny_vae(**config)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        raw = vae.encode(images).latent_dist.mode()
        expected_images = vae.decode(raw).sample
    latents = encode_latents(vae, images)
    assert torch.allclose(latents, to_model(raw), atol=1e-6)
    assert torch.allclose(decode_latents(vae, latents), expected_images.clamp(-1, 1), atol=1e-5)


def test_float16_vae_with_force_upcast_runs_in_float32():
    from diffusers_unlearn.pipelines.text_to_image import decode_latents, encode_latents

    vae = tiny_vae(force_upcast=True).to(torch.float16)
    seen = []
    vae.encoder.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].dtype))
    vae.decoder.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].dtype))
    latents = encode_latents(vae, torch.zeros(1, 3, 16, 16))
    images = decode_latents(vae, latents)
    assert seen == [torch.float32, torch.float32]
    assert vae.dtype == torch.float16 and latents.dtype == images.dtype == torch.float32
