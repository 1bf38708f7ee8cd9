"""UnlearnStableDiffusionXLPipeline, the SDXL noise-norm score and the scan CLI on a tiny SDXL pipeline."""

import json

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from diffusers_unlearn import scan
from diffusers_unlearn.metrics.noise_norm import _sdxl_conditioning, noise_norm_along_trajectory, noise_norm_per_prompt
from diffusers_unlearn.pipelines import UnlearnStableDiffusionXLPipeline

from tiny_models import save_tiny_sdxl_pipeline


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_sdxl_pipeline(tmp_path_factory.mktemp("sdxl") / "model")


@pytest.fixture
def pipe(model_dir):
    pipe = UnlearnStableDiffusionXLPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompt="a digit seven"):
    return pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").images


def test_saved_pipeline_loads_with_plain_diffusers(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    plain = StableDiffusionXLPipeline.from_pretrained(str(tmp_path / "saved"))
    plain.set_progress_bar_config(disable=True)
    assert torch.equal(generate(plain), generate(pipe))


def test_unlearn_trains_an_adapter_that_plain_diffusers_loads(pipe, model_dir, tmp_path):
    before = generate(pipe)
    score_before = pipe.memorization_score(["a digit seven"], num_generations=1, num_inference_steps=2)
    forget = [(torch.rand(3, 16, 16) * 2 - 1, "a digit seven")]
    keep = [(torch.rand(3, 16, 16) * 2 - 1, "a photo of a cat")]
    name = pipe.unlearn(forget, keep=keep, max_train_steps=3, learning_rate=5e-2, train_batch_size=1)
    assert name == "siss" and pipe.unlearning_adapters == ["siss"]
    after = generate(pipe)
    assert not torch.allclose(before, after)
    score_after = pipe.memorization_score(["a digit seven"], num_generations=1, num_inference_steps=2)
    assert len(score_after) == 1 and score_after != score_before
    path = pipe.save_unlearning_adapter(str(tmp_path / "adapter"))
    plain = StableDiffusionXLPipeline.from_pretrained(model_dir)
    plain.set_progress_bar_config(disable=True)
    plain.load_lora_weights(str(tmp_path / "adapter"), weight_name=path.split("/")[-1], adapter_name="siss")
    assert torch.allclose(generate(plain), after, atol=1e-5)


def test_unlearn_makes_its_own_keep_set(pipe):
    forget = [(torch.rand(3, 16, 16) * 2 - 1, "a digit seven")]
    pipe.unlearn(forget, max_train_steps=1, keep_from_generations=2, train_batch_size=1)
    assert pipe.unlearning_adapters == ["siss"]


def test_unlearn_takes_module_names_as_lora_targets(pipe):
    forget = [(torch.rand(3, 16, 16) * 2 - 1, "a digit seven")]
    keep = [(torch.rand(3, 16, 16) * 2 - 1, "a photo of a cat")]
    pipe.unlearn(forget, keep=keep, max_train_steps=1, train_batch_size=1, lora_targets="to_q,to_v")
    assert set(pipe.unet.peft_config["siss"].target_modules) == {"to_q", "to_v"}


def test_noise_norm_matches_a_hand_computed_one_step_value(pipe):
    cond, uncond = _sdxl_conditioning(pipe, ["a digit seven", "a photo of a cat"], "cpu", torch.float32, (16, 16))
    assert torch.equal(uncond["encoder_hidden_states"], torch.zeros_like(uncond["encoder_hidden_states"]))
    assert torch.equal(uncond["text_embeds"], torch.zeros_like(uncond["text_embeds"]))
    assert cond["time_ids"].tolist() == [[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]] * 2
    torch.manual_seed(0)
    latents = torch.randn(2, 4, 2, 2)

    def kwargs(c, n):
        return {"encoder_hidden_states": c["encoder_hidden_states"].expand(n, -1, -1),
                "added_cond_kwargs": {k: c[k].expand(n, -1) for k in ("text_embeds", "time_ids")}}

    score = noise_norm_along_trajectory(pipe.unet, pipe.scheduler, latents, kwargs(cond, 2), kwargs(uncond, 2), 1)
    pipe.scheduler.set_timesteps(1)  # a fresh step index for scale_model_input
    t = pipe.scheduler.timesteps[0]
    x = pipe.scheduler.scale_model_input(latents * pipe.scheduler.init_noise_sigma, t)
    with torch.no_grad():
        expected = (pipe.unet(x, t, **kwargs(cond, 2)).sample - pipe.unet(x, t, **kwargs(uncond, 2)).sample).flatten(1).norm(dim=1)
    assert torch.allclose(score, expected, atol=1e-5) and bool((score > 0).all())


def test_noise_norm_empty_prompt_follows_force_zeros_for_empty_prompt(pipe):
    pipe.register_to_config(force_zeros_for_empty_prompt=False)
    _, uncond = _sdxl_conditioning(pipe, ["a digit seven"], "cpu", torch.float32, (16, 16))
    assert uncond["text_embeds"].abs().sum() > 0


def test_noise_norm_is_zero_when_the_unet_ignores_the_prompt(pipe):
    assert noise_norm_per_prompt(pipe, ["a digit seven"], num_generations=2, num_inference_steps=2)[0] > 0
    with torch.no_grad():
        for name, module in pipe.unet.named_modules():  # no cross-attention output, no pooled-text embedding
            if name.endswith("attn2.to_out.0"):
                module.weight.zero_()
                module.bias.zero_()
        pipe.unet.add_embedding.linear_1.weight.zero_()
    assert noise_norm_per_prompt(pipe, ["a digit seven"], num_generations=2, num_inference_steps=2) == [0.0]


def test_scan_runs_on_an_sdxl_folder(model_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a digit seven\na photo of a cat\n")
    out = tmp_path / "ranked.jsonl"
    rows = scan.main(["--pretrained_model_name_or_path", model_dir, "--prompts_file", str(prompts),
                      "--num_generations", "1", "--num_inference_steps", "2", "--output_file", str(out)])
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    assert sorted(r["caption"] for r in rows) == ["a digit seven", "a photo of a cat"]
    assert all(r["noise_norm"] > 0 for r in rows)
