"""UnlearnStableDiffusionPipeline and the mixin's memorization_score / unlearn on tiny models."""

import json

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, StableDiffusionPipeline

from diffusers_unlearn.lora import add_lora, save_lora_weights
from diffusers_unlearn.pipelines import ClassConditionalDDPMPipeline, UnlearnDDPMPipeline, UnlearnStableDiffusionPipeline

from tiny_models import save_tiny_sd_pipeline, tiny_condition_unet, tiny_unet


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_sd_pipeline(tmp_path_factory.mktemp("sd") / "model")


def unet_output(unet):
    torch.manual_seed(0)
    x, hidden = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    with torch.no_grad():
        return unet(x, 10, encoder_hidden_states=hidden).sample


def test_saved_pipeline_loads_with_plain_diffusers(model_dir, tmp_path):
    pipe = UnlearnStableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
    pipe.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    plain = StableDiffusionPipeline.from_pretrained(str(tmp_path / "saved"), safety_checker=None)
    assert torch.equal(unet_output(plain.unet), unet_output(pipe.unet))


def test_adapter_loads_and_strength_interpolates(model_dir, tmp_path):
    trained = add_lora(tiny_condition_unet(), rank=4, lora_alpha=8, targets="attention")
    for name, p in trained.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    save_lora_weights(trained, tmp_path / "adapter", metadata={"method": "siss"})
    pipe = UnlearnStableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
    base = unet_output(pipe.unet)
    assert pipe.load_unlearning_adapter(str(tmp_path / "adapter")) == "siss"
    assert torch.allclose(unet_output(pipe.unet), unet_output(trained), atol=1e-5)
    pipe.set_unlearning_strength(0.0)
    assert torch.allclose(unet_output(pipe.unet), base, atol=1e-6)
    with pytest.raises(ValueError, match="already has an adapter"):
        pipe.load_unlearning_adapter(str(tmp_path / "adapter"))
    with pytest.raises(ValueError, match="Adapters .* are attached"):
        pipe.save_pretrained(tmp_path / "refused")


def test_memorization_score_sd_and_ddpm(model_dir):
    pipe = UnlearnStableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
    scores = pipe.memorization_score(["a digit seven", "a photo of a cat"], num_generations=2, num_inference_steps=2)
    assert len(scores) == 2 and all(s > 0 for s in scores)
    conditional = UnlearnDDPMPipeline(unet=tiny_unet(num_class_embeds=3), scheduler=DDPMScheduler(num_train_timesteps=1000))
    assert len(conditional.memorization_score([0, 1], num_generations=2, num_inference_steps=2)) == 2
    unconditional = UnlearnDDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=1000))
    with pytest.raises(ValueError, match="unconditional"):
        unconditional.memorization_score([0])


def test_unlearn_in_process_sd(model_dir):
    pipe = UnlearnStableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    base = unet_output(pipe.unet)
    g = torch.Generator().manual_seed(0)
    forget = [(torch.rand(3, 16, 16, generator=g) * 2 - 1, "a digit seven")]
    name = pipe.unlearn(forget=forget, max_train_steps=3, train_batch_size=2, keep_from_generations=2, scaling_norm=0.5)
    assert name == "siss" and pipe.unlearning_adapters == ["siss"]
    assert not torch.allclose(unet_output(pipe.unet), base)
    pipe.set_unlearning_strength(0.0)
    assert torch.allclose(unet_output(pipe.unet), base, atol=1e-6)
    with pytest.raises(ValueError, match="non-empty prompt"):
        pipe.unlearn(forget=[(forget[0][0], " ")], adapter_name="other")
    with pytest.raises(ValueError, match="expected"):
        pipe.unlearn(forget=[(torch.zeros(3, 8, 8), "a digit seven")], adapter_name="other")


def test_unlearn_in_process_ddpm():
    pipe = UnlearnDDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=1000))
    g = torch.Generator().manual_seed(0)
    forget, keep = torch.rand(2, 1, 8, 8, generator=g) * 2 - 1, torch.rand(6, 1, 8, 8, generator=g) * 2 - 1
    assert pipe.unlearn(forget=forget, keep=keep, max_train_steps=2, train_batch_size=2, scaling_norm=0.5) == "siss"
    assert pipe.unlearning_adapters == ["siss"]
    assert isinstance(pipe, DDPMPipeline) and not isinstance(pipe, ClassConditionalDDPMPipeline)
