"""UnlearnStableDiffusionPipeline and the mixin's memorization_score / unlearn on tiny models."""

import json
import re

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


def lora_unet(seed=1):
    unet = add_lora(tiny_condition_unet(), rank=4, lora_alpha=8, targets="attention")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return unet


def test_adapters_in_every_layout_load(model_dir, tmp_path):
    from peft.utils import get_peft_model_state_dict

    trained = lora_unet()
    expected = unet_output(trained)
    # 1. Plain diffusers: StableDiffusionPipeline.save_lora_weights (unet.-prefixed keys, no method entry).
    StableDiffusionPipeline.save_lora_weights(
        str(tmp_path / "plain"), unet_lora_layers=get_peft_model_state_dict(trained),
        unet_lora_adapter_metadata=trained.peft_config["default"].to_dict(),
    )
    # 2. A bare PEFT file without the prefix, which diffusers' pipeline loader would skip without an error.
    trained.save_lora_adapter(str(tmp_path / "bare"), weight_name="pytorch_lora_weights.safetensors")
    for folder, name in (("plain", "unlearning"), ("bare", "unlearning")):
        pipe = UnlearnStableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
        base = unet_output(pipe.unet)
        assert pipe.load_unlearning_adapter(str(tmp_path / folder)) == name
        assert torch.allclose(unet_output(pipe.unet), expected, atol=1e-5), folder
        pipe.set_unlearning_strength(0.0)
        assert torch.equal(unet_output(pipe.unet), base), folder
        pipe.set_unlearning_strength(0.5)
        half = unet_output(pipe.unet)
        assert not torch.allclose(half, base) and not torch.allclose(half, expected)


def test_two_adapters_and_named_strength(model_dir, tmp_path):
    save_lora_weights(lora_unet(1), tmp_path / "a", metadata={"method": "siss"})
    save_lora_weights(lora_unet(2), tmp_path / "b", metadata={"method": "siss"})
    pipe = UnlearnStableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
    pipe.load_unlearning_adapter(str(tmp_path / "a"))
    assert pipe.load_unlearning_adapter(str(tmp_path / "b"), adapter_name="second", strength=0.0) == "second"
    assert pipe.unlearning_adapters == ["second", "siss"]
    with pytest.raises(ValueError, match="Several adapters"):
        pipe.set_unlearning_strength(1.0)
    with pytest.raises(ValueError, match="No adapter named"):
        pipe.set_unlearning_strength(1.0, "missing")
    pipe.set_unlearning_strength(1.0, "siss")
    assert torch.allclose(unet_output(pipe.unet), unet_output(lora_unet(1)), atol=1e-5)


def test_adapter_for_another_model_is_refused(model_dir, tmp_path):
    ddpm_adapter = add_lora(tiny_unet(), rank=2, targets="attention")
    save_lora_weights(ddpm_adapter, tmp_path / "ddpm")
    pipe = UnlearnStableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
    base = unet_output(pipe.unet)
    with pytest.raises(ValueError, match="not found in the base model"):  # peft's own error: no layer matches at all
        pipe.load_unlearning_adapter(str(tmp_path / "ddpm"))
    assert pipe.unlearning_adapters == [] and torch.equal(unet_output(pipe.unet), base)
    # Some keys match and some do not: diffusers only warns, we refuse and leave the pipeline as it was.
    from safetensors.torch import load_file, save_file

    path = save_lora_weights(lora_unet(), tmp_path / "partial")
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("attn1.to_q.lora_A.weight"))
    tensors[re.sub(r"^unet\.\w+_blocks?\.\d*", "unet.up_blocks.7", key)] = tensors[key].clone()
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="match no layer"):
        pipe.load_unlearning_adapter(str(tmp_path / "partial"))
    assert pipe.unlearning_adapters == [] and torch.equal(unet_output(pipe.unet), base)
    with pytest.raises(FileNotFoundError):
        pipe.load_unlearning_adapter(str(tmp_path))


def test_memorization_score_follows_the_adapter(model_dir, tmp_path):
    save_lora_weights(lora_unet(), tmp_path / "adapter", metadata={"method": "siss"})
    pipe = UnlearnStableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
    kwargs = dict(num_generations=2, num_inference_steps=2, seed=3)
    base = pipe.memorization_score(["a digit seven"], **kwargs)
    assert pipe.memorization_score(["a digit seven"], **kwargs) == base  # deterministic
    pipe.load_unlearning_adapter(str(tmp_path / "adapter"))
    assert pipe.memorization_score(["a digit seven"], **kwargs) != base
    pipe.set_unlearning_strength(0.0)
    assert pipe.memorization_score(["a digit seven"], **kwargs) == pytest.approx(base, rel=1e-6)
    table = pipe.memorization_score(["a digit seven", "a photo of a cat"], return_per_generation=True, **kwargs)
    assert table.shape == (2, 2)


def test_unlearn_removes_the_toy_canary(caplog):
    """The in-process API with the script's toy recipe: the seven prompt stops drawing the canary."""
    from diffusers_unlearn.toy import toy_model_path
    from diffusers_unlearn.toy.text_to_image import SD_MEMORIZATION_THRESHOLD, canary_distances, canary_forget_set, generate_digits

    pipe = UnlearnStableDiffusionPipeline.from_pretrained(toy_model_path("sd_tiny"), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    prompt = "a handwritten digit seven"

    def canary_rate():
        images = generate_digits(pipe, [prompt], num_per_prompt=64, seed=0)
        return (canary_distances(images) < SD_MEMORIZATION_THRESHOLD).float().mean().item()

    before = canary_rate()
    canary = canary_forget_set().images[0]
    with caplog.at_level("INFO"):
        pipe.unlearn(
            forget=[(canary, prompt)], max_train_steps=200, learning_rate=2e-3, lora_targets="conv",
            keep_from_generations=64, memorization_threshold=SD_MEMORIZATION_THRESHOLD,
        )
    assert "rejected as forget copies" in caplog.text
    after = canary_rate()
    assert before >= 0.3
    assert after <= 0.1 * before, (before, after)


def test_unlearn_anchor_prompt_joins_the_keep_set(model_dir, monkeypatch, caplog):
    """anchor_prompt=: its generations (no forget copy) are trained as keep items under every forget prompt, also
    when every generation of the forget prompt itself is a copy; a DDPM pipeline refuses it."""
    from diffusers_unlearn import training

    seen = {}

    class Captured(Exception):
        pass

    def capture(unet, schedule, forget_pool, keep_pool, **kwargs):
        seen["keep"] = keep_pool
        raise Captured  # no training: the keep set is what is checked

    monkeypatch.setattr(training, "train_adapter", capture)
    pipe = UnlearnStableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    forget = [(torch.rand(3, 16, 16, generator=g) * 2 - 1, "a digit seven"), (torch.rand(3, 16, 16, generator=g) * 2 - 1, "a photo of a cat")]
    # A huge threshold makes every generation a "copy": without the anchor the keep set would be empty.
    with pytest.raises(ValueError, match="keep set is empty"):
        pipe.unlearn(forget=forget, keep_from_generations=2, memorization_threshold=1e9)
    with caplog.at_level("INFO"), pytest.raises(Captured):
        pipe.unlearn(forget=forget, keep_from_generations=2, memorization_threshold=1e-9, anchor_prompt="", num_anchor_generations=3)
    assert "anchor_prompt '': 3 generation(s) kept" in caplog.text
    assert len(seen["keep"]) == 2 * 2 + 2 * 3  # two generations per forget prompt, and the 3 anchors under each
    with pytest.raises(ValueError, match="forget copy: choose another anchor"):
        pipe.unlearn(forget=forget, keep_from_generations=2, memorization_threshold=1e9, anchor_prompt="")
    ddpm = UnlearnDDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=1000))
    with pytest.raises(ValueError, match="anchor_prompt applies to text-to-image"):
        ddpm.unlearn(forget=torch.zeros(1, 1, 8, 8), anchor_prompt="")
