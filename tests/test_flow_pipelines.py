"""UnlearnStableDiffusion3Pipeline and UnlearnFluxPipeline on tiny random pipelines: unlearn, adapters that plain
diffusers loads, strength, the velocity-difference noise-norm score (checked against the plain pipeline's own
transformer calls) and the scan CLI."""

import json

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline

from diffusers_unlearn import scan
from diffusers_unlearn.families import get_family
from diffusers_unlearn.metrics.noise_norm import noise_norm_per_prompt
from diffusers_unlearn.pipelines import UnlearnFluxPipeline, UnlearnStableDiffusion3Pipeline
from diffusers_unlearn.pipelines.text_to_image import initial_latents

from tiny_models import save_tiny_flux_pipeline, save_tiny_sd3_pipeline

PLAIN = {"sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}
UNLEARN = {"sd3": UnlearnStableDiffusion3Pipeline, "flux": UnlearnFluxPipeline}
SIZE = {"height": 16, "width": 16}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow_pipelines")
    return {
        "sd3": save_tiny_sd3_pipeline(root / "sd3", with_t5=True),
        "flux": save_tiny_flux_pipeline(root / "flux", guidance_embeds=True),
    }


def load(cls, folder):
    pipe = cls.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompt="a digit seven"):
    return pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt",
                max_sequence_length=77, **SIZE).images


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_saved_pipeline_loads_with_plain_diffusers(folders, kind, tmp_path):
    pipe = load(UNLEARN[kind], folders[kind])
    pipe.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["_class_name"] == PLAIN[kind].__name__
    plain = load(PLAIN[kind], str(tmp_path / "saved"))
    assert torch.equal(generate(plain), generate(pipe))


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_unlearn_adapter_loads_in_plain_diffusers_and_strength_interpolates(folders, kind, tmp_path):
    pipe = load(UNLEARN[kind], folders[kind])
    before = generate(pipe)
    score_before = pipe.memorization_score(["a digit seven"], num_generations=1, num_inference_steps=2, **SIZE)
    forget = [(torch.rand(3, 16, 16) * 2 - 1, "a digit seven")]
    keep = [(torch.rand(3, 16, 16) * 2 - 1, "a photo of a cat")]
    name = pipe.unlearn(forget, keep=keep, max_train_steps=3, learning_rate=5e-2, train_batch_size=1,
                       resolution=16)
    assert name == "siss" and pipe.unlearning_adapters == ["siss"]
    after = generate(pipe)
    assert not torch.allclose(before, after, atol=1e-4)
    score_after = pipe.memorization_score(["a digit seven"], num_generations=1, num_inference_steps=2, **SIZE)
    assert len(score_after) == 1 and score_after[0] > 0 and score_after != score_before

    path = pipe.save_unlearning_adapter(str(tmp_path / "adapter"))
    plain = load(PLAIN[kind], folders[kind])
    plain.load_lora_weights(str(tmp_path / "adapter"), weight_name=path.split("/")[-1], adapter_name="siss")
    assert torch.allclose(generate(plain), after, atol=1e-5)

    # Our loader on a fresh pipeline: the same images at strength 1, the base ones at strength 0.
    fresh = load(UNLEARN[kind], folders[kind])
    assert fresh.load_unlearning_adapter(str(tmp_path / "adapter"), adapter_name="siss") == "siss"
    assert torch.allclose(generate(fresh), after, atol=1e-5)
    fresh.set_unlearning_strength(0.0)
    assert torch.allclose(generate(fresh), before, atol=1e-6)
    fresh.set_unlearning_strength(0.5)
    half = generate(fresh)
    assert not torch.allclose(half, before, atol=1e-5) and not torch.allclose(half, after, atol=1e-5)
    with pytest.raises(ValueError, match="already has an adapter"):
        fresh.load_unlearning_adapter(str(tmp_path / "adapter"), adapter_name="siss")
    with pytest.raises(ValueError, match="are attached"):
        fresh.save_pretrained(tmp_path / "refused")


def test_adapter_for_another_model_is_refused(folders, tmp_path):
    sd3 = load(UNLEARN["sd3"], folders["sd3"])
    sd3.unlearn([(torch.rand(3, 16, 16) * 2 - 1, "a digit seven")], keep=[(torch.rand(3, 16, 16) * 2 - 1, "a cat")],
                max_train_steps=1, train_batch_size=1)
    sd3.save_unlearning_adapter(str(tmp_path / "sd3_adapter"))
    flux = load(UNLEARN["flux"], folders["flux"])
    with pytest.raises(ValueError):
        flux.load_unlearning_adapter(str(tmp_path / "sd3_adapter"))
    assert flux.unlearning_adapters == []


def test_unlearn_makes_its_own_keep_set(folders):
    pipe = load(UNLEARN["sd3"], folders["sd3"])
    pipe.unlearn([(torch.rand(3, 16, 16) * 2 - 1, "a digit seven")], max_train_steps=1, keep_from_generations=2,
                 train_batch_size=1)
    assert pipe.unlearning_adapters == ["siss"]


def _record_transformer_calls(transformer):
    """Every transformer call of a pipeline: (kwargs, output) pairs."""
    calls = []

    def hook(module, args, kwargs, output):
        calls.append((dict(kwargs), output[0] if isinstance(output, tuple) else output.sample))

    return calls, transformer.register_forward_hook(hook, with_kwargs=True)


def test_sd3_noise_norm_equals_the_pipelines_own_guided_branches(folders):
    """Two steps of StableDiffusion3Pipeline with classifier-free guidance (negative prompt "", its default):
    the pipeline's own transformer outputs give ||v(x, c) - v(x, "")|| per step; the score is their mean."""
    pipe = load(UNLEARN["sd3"], folders["sd3"])
    prompts = ["a digit seven", "a photo of a cat"]
    scores = noise_norm_per_prompt(pipe, prompts, 1, seed=3, num_inference_steps=2, guidance_scale=5.0, **SIZE)
    latents = initial_latents(pipe, 1, 3, height=16, width=16)
    for prompt, score in zip(prompts, scores):
        calls, handle = _record_transformer_calls(pipe.transformer)
        pipe(prompt, latents=latents.clone(), num_inference_steps=2, guidance_scale=5.0, max_sequence_length=77,
              output_type="latent", **SIZE)
        handle.remove()
        assert len(calls) == 2
        norms = [(out.chunk(2)[1] - out.chunk(2)[0]).flatten(1).norm(dim=1) for _, out in calls]
        expected = float(torch.stack(norms).mean())
        assert score == pytest.approx(expected, rel=1e-5) and score > 0


def test_flux_noise_norm_is_the_empty_prompt_through_the_same_guided_model(folders):
    """FluxPipeline (guidance-distilled) samples two steps on the prompt; at each recorded call the same
    transformer, fed the pipeline's own encoding of "" with the same latents, timestep and guidance, gives
    v(x, ""). The score is the mean of ||v(x, c) - v(x, "")|| over those steps."""
    pipe = load(UNLEARN["flux"], folders["flux"])
    family = get_family("flux")
    prompts = ["a digit seven", "a photo of a cat"]
    scores = noise_norm_per_prompt(pipe, prompts, 1, seed=3, num_inference_steps=2, guidance_scale=2.5, **SIZE)
    latents = family.latents_to_pipeline(initial_latents(pipe, 1, 3, height=16, width=16))
    empty_hidden, empty_pooled, empty_ids = pipe.encode_prompt("", None, max_sequence_length=512)
    for prompt, score in zip(prompts, scores):
        calls, handle = _record_transformer_calls(pipe.transformer)
        pipe(prompt, latents=latents.clone(), num_inference_steps=2, guidance_scale=2.5, max_sequence_length=512,
             output_type="latent", **SIZE)
        handle.remove()
        assert len(calls) == 2 and calls[0][0]["guidance"].tolist() == [2.5]
        norms = []
        with torch.no_grad():
            for kwargs, out in calls:
                empty = pipe.transformer(**{**kwargs, "encoder_hidden_states": empty_hidden,
                                            "pooled_projections": empty_pooled, "txt_ids": empty_ids})[0]
                norms.append((out - empty).flatten(1).norm(dim=1))
        expected = float(torch.stack(norms).mean())
        assert score == pytest.approx(expected, rel=1e-5) and score > 0


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_noise_norm_is_zero_when_the_transformer_ignores_the_prompt(folders, kind):
    pipe = load(UNLEARN[kind], folders[kind])
    assert noise_norm_per_prompt(pipe, ["a digit seven"], 2, num_inference_steps=2, **SIZE)[0] > 0
    with torch.no_grad():  # no text tokens reach the joint attention, no pooled text reaches the time embedding
        pipe.transformer.context_embedder.weight.zero_()
        pipe.transformer.context_embedder.bias.zero_()
        for parameter in pipe.transformer.time_text_embed.text_embedder.linear_1.parameters():
            parameter.zero_()
    assert noise_norm_per_prompt(pipe, ["a digit seven"], 2, num_inference_steps=2, **SIZE) == [0.0]


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_the_flow_families_report_the_score(kind):
    assert get_family(kind).has_noise_norm_score


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_scan_runs_on_flow_folders(folders, kind, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a digit seven\na photo of a cat\n")
    out = tmp_path / "ranked.jsonl"
    rows = scan.main(["--pretrained_model_name_or_path", folders[kind], "--prompts_file", str(prompts),
                      "--num_generations", "1", "--num_inference_steps", "2", "--height", "16", "--width", "16",
                      "--output_file", str(out), "--device", "cpu", "--first_steps", "0"])  # 0: every step, as below
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    assert sorted(r["caption"] for r in rows) == ["a digit seven", "a photo of a cat"]
    assert all(r["noise_norm"] > 0 for r in rows)
    pipe = load(UNLEARN[kind], folders[kind])
    direct = noise_norm_per_prompt(pipe, ["a digit seven"], 1, num_inference_steps=2, **SIZE)
    assert [r["noise_norm"] for r in rows if r["caption"] == "a digit seven"] == pytest.approx(direct, rel=1e-6)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_noise_norm_on_the_scripts_sampling_pipeline(folders, kind):
    """train_unlearn_sd.py scores with the family's plain sampling pipeline and these keyword arguments."""
    family = get_family(kind)
    components = family.load(folders[kind])
    pipe = family.sampling_pipeline(components, family.evaluation_scheduler(components))
    scores = noise_norm_per_prompt(pipe, ["a digit seven", "a photo of a cat"], 1, seed=0, num_inference_steps=2,
                                   guidance_scale=family.default_guidance_scale, height=16, width=16)
    ours = load(UNLEARN[kind], folders[kind])
    assert scores == pytest.approx(ours.memorization_score(["a digit seven", "a photo of a cat"], num_generations=1,
                                                           num_inference_steps=2, **SIZE), rel=1e-6)
    assert all(score > 0 for score in scores)
