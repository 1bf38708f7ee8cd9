"""The noise-norm memorization score (Wen et al.) on tiny models."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline

from diffusers_unlearn.metrics import noise_norm_along_trajectory, noise_norm_per_class, noise_norm_per_prompt, noise_norm_scores

from tiny_models import save_tiny_sd_pipeline, tiny_unet


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    folder = save_tiny_sd_pipeline(tmp_path_factory.mktemp("sd") / "model")
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, steps_offset=1)
    return pipe


def test_matches_a_hand_computed_one_step_value(pipe):
    torch.manual_seed(0)
    latents = torch.randn(2, 4, 8, 8)
    cond, uncond = torch.randn(2, 77, 32), torch.randn(2, 77, 32)
    score = noise_norm_along_trajectory(
        pipe.unet, pipe.scheduler, latents, {"encoder_hidden_states": cond}, {"encoder_hidden_states": uncond}, 1
    )
    t = pipe.scheduler.timesteps[0]
    with torch.no_grad():
        expected = (pipe.unet(latents, t, encoder_hidden_states=cond).sample - pipe.unet(latents, t, encoder_hidden_states=uncond).sample).flatten(1).norm(dim=1)
    assert torch.allclose(score, expected, atol=1e-5)


def test_zero_when_the_unet_ignores_the_prompt(pipe):
    scores = noise_norm_per_prompt(pipe, ["a digit seven"], num_generations=2, num_inference_steps=3)
    assert scores[0] > 0
    saved = {}
    for name, module in pipe.unet.named_modules():  # cross-attention outputs zeroed: the prompt has no effect
        if name.endswith("attn2.to_out.0"):
            saved[name] = module.weight.detach().clone(), module.bias.detach().clone()
            with torch.no_grad():
                module.weight.zero_()
                module.bias.zero_()
    try:
        assert noise_norm_per_prompt(pipe, ["a digit seven"], num_generations=2, num_inference_steps=3) == [0.0]
    finally:
        modules = dict(pipe.unet.named_modules())
        with torch.no_grad():
            for name, (weight, bias) in saved.items():
                modules[name].weight.copy_(weight)
                modules[name].bias.copy_(bias)


def test_deterministic_paired_and_per_generation(pipe):
    a = noise_norm_per_prompt(pipe, ["a digit seven", "a photo of a cat"], num_generations=3, num_inference_steps=2, seed=4)
    b = noise_norm_per_prompt(pipe, ["a digit seven", "a photo of a cat"], num_generations=3, num_inference_steps=2, seed=4)
    assert a == b and a[0] != a[1]
    table = noise_norm_per_prompt(pipe, ["a digit seven"], num_generations=3, num_inference_steps=2, seed=4, return_per_generation=True)
    assert table.shape == (1, 3) and abs(float(table.mean()) - a[0]) < 1e-6
    with pytest.raises(ValueError, match="num_generations"):
        noise_norm_per_prompt(pipe, ["x"], num_generations=0)


def test_stronger_conditioning_scores_higher(pipe):
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    uncond = torch.zeros(2, 77, 32)
    cond = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(2))
    weak = noise_norm_along_trajectory(pipe.unet, pipe.scheduler, latents, {"encoder_hidden_states": 0.1 * cond}, {"encoder_hidden_states": uncond}, 3)
    strong = noise_norm_along_trajectory(pipe.unet, pipe.scheduler, latents, {"encoder_hidden_states": 3.0 * cond}, {"encoder_hidden_states": uncond}, 3)
    assert bool((strong > weak).all())


def test_class_conditional_and_unconditional_unets():
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    scores = noise_norm_per_class(tiny_unet(num_class_embeds=3), scheduler, [0, 1], num_generations=2, num_inference_steps=3, null_class_label=2)
    assert len(scores) == 2 and all(s > 0 for s in scores)
    with pytest.raises(ValueError, match="unconditional"):
        noise_norm_per_class(tiny_unet(), scheduler, [0])


def test_noise_norm_scores_dispatches_and_batches(pipe):
    prompts = ["a digit seven", "a photo of a cat", "a digit one"]
    reference = noise_norm_per_prompt(pipe, prompts, num_generations=3, num_inference_steps=2, seed=1, return_per_generation=True)
    for batch_size in (1, 4, 64):  # pairs of (prompt, generation) split across UNet calls in different ways
        table = noise_norm_scores(pipe, prompts, num_generations=3, num_inference_steps=2, seed=1, batch_size=batch_size, return_per_generation=True)
        assert torch.allclose(table, reference, rtol=1e-5, atol=1e-6)
    # A plain mapping of components gives the same scores as the pipeline, and the pipeline's scheduler is untouched.
    timesteps_before = pipe.scheduler.timesteps.clone() if pipe.scheduler.timesteps is not None else None
    components = {k: getattr(pipe, k) for k in ("unet", "scheduler", "tokenizer", "text_encoder")}
    from_mapping = noise_norm_scores(components, prompts, num_generations=3, num_inference_steps=2, seed=1)
    assert from_mapping == pytest.approx(reference.mean(dim=1).tolist(), rel=1e-5)
    after = pipe.scheduler.timesteps
    assert (timesteps_before is None and after is None) or torch.equal(after, timesteps_before)
    # The empty prompt is the unconditional branch: it scores exactly 0.
    assert noise_norm_scores(pipe, [""], num_generations=2, num_inference_steps=2) == [0.0]
    with pytest.raises(ValueError, match="text prompts"):
        noise_norm_scores(pipe, [3])
    with pytest.raises(ValueError, match="batch_size"):
        noise_norm_scores(pipe, ["x"], batch_size=0)


def test_seed_changes_the_noise_and_stochastic_schedulers_are_seeded(pipe):
    a = noise_norm_scores(pipe, ["a digit seven"], num_generations=2, num_inference_steps=2, seed=0)
    b = noise_norm_scores(pipe, ["a digit seven"], num_generations=2, num_inference_steps=2, seed=1)
    assert a != b
    ancestral = {"unet": pipe.unet, "scheduler": DDPMScheduler.from_config(pipe.scheduler.config), "tokenizer": pipe.tokenizer, "text_encoder": pipe.text_encoder}
    first = noise_norm_scores(ancestral, ["a digit seven"], num_generations=2, num_inference_steps=3, seed=5)
    torch.manual_seed(123)  # the global RNG must not matter
    assert noise_norm_scores(ancestral, ["a digit seven"], num_generations=2, num_inference_steps=3, seed=5) == first


def test_noise_norm_scores_on_ddpm_components():
    unet = tiny_unet(num_class_embeds=3)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    scores = noise_norm_scores({"unet": unet, "scheduler": scheduler}, [0, 1, 2], num_generations=2, num_inference_steps=2)
    assert scores[0] > 0 and scores[1] > 0 and scores[2] == 0.0  # label 2 is the null label itself
    table = noise_norm_scores({"unet": unet, "scheduler": scheduler}, [0, 1], num_generations=2, num_inference_steps=2, batch_size=1, return_per_generation=True)
    assert table.shape == (2, 2) and torch.allclose(table.mean(dim=1), torch.tensor(scores[:2]), rtol=1e-5)
    with pytest.raises(ValueError, match="class labels"):
        noise_norm_scores({"unet": unet, "scheduler": scheduler}, ["a digit seven"])
    with pytest.raises(ValueError, match="outside"):
        noise_norm_scores({"unet": unet, "scheduler": scheduler}, [3])
    with pytest.raises(ValueError, match="unconditional"):
        noise_norm_scores({"unet": tiny_unet(), "scheduler": scheduler}, [0])


class _AsVPrediction(torch.nn.Module):
    """The same model re-expressed as a v-prediction model: v = (eps - sigma x_t) / gamma."""

    def __init__(self, unet, scheduler):
        super().__init__()
        self.unet, self.alphas_cumprod = unet, scheduler.alphas_cumprod

    def forward(self, x_t, t, **kwargs):
        from types import SimpleNamespace

        eps = self.unet(x_t, t, **kwargs).sample
        alpha_bar = self.alphas_cumprod[int(t)]
        return SimpleNamespace(sample=(eps - (1 - alpha_bar).sqrt() * x_t) / alpha_bar.sqrt())


def test_a_v_prediction_model_is_scored_on_its_noise_estimates(pipe):
    """An epsilon model and its exact v-prediction twin follow the same trajectory and get the same score."""
    torch.manual_seed(0)
    latents = torch.randn(2, 4, 8, 8)
    cond, uncond = torch.randn(2, 77, 32), torch.randn(2, 77, 32)
    args = ({"encoder_hidden_states": cond}, {"encoder_hidden_states": uncond}, 4)
    epsilon_scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    v_scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    score = noise_norm_along_trajectory(pipe.unet, epsilon_scheduler, latents, *args)
    twin = noise_norm_along_trajectory(_AsVPrediction(pipe.unet, v_scheduler), v_scheduler, latents, *args)
    torch.testing.assert_close(twin, score, rtol=1e-3, atol=1e-4)


def test_first_step_form_scores_the_first_step_of_the_full_schedule(pipe):
    """first_steps=1 is the difference at the schedule's FIRST (noisiest) timestep, computed without running the
    rest of the trajectory; first_steps=K averages the first K steps of the same trajectory."""
    torch.manual_seed(0)
    latents = torch.randn(2, 4, 8, 8)
    cond, uncond = torch.randn(2, 77, 32), torch.randn(2, 77, 32)
    branches = ({"encoder_hidden_states": cond}, {"encoder_hidden_states": uncond})
    first = noise_norm_along_trajectory(pipe.unet, pipe.scheduler, latents, *branches, 10, first_steps=1)
    t = pipe.scheduler.timesteps[0]
    assert int(t) > 800  # the first of ten DDIM steps, not the one-step schedule's timestep
    sample = latents * pipe.scheduler.init_noise_sigma
    with torch.no_grad():
        expected = (pipe.unet(sample, t, encoder_hidden_states=cond).sample - pipe.unet(sample, t, encoder_hidden_states=uncond).sample).flatten(1).norm(dim=1)
    assert torch.allclose(first, expected, atol=1e-5)
    # Every step: the same as leaving first_steps out.
    every = noise_norm_along_trajectory(pipe.unet, pipe.scheduler, latents, *branches, 4, first_steps=4)
    assert torch.allclose(every, noise_norm_along_trajectory(pipe.unet, pipe.scheduler, latents, *branches, 4))
    # Through the public entry point, per prompt.
    scores = noise_norm_scores(pipe, ["a digit seven", "a cat"], num_generations=2, num_inference_steps=10, first_steps=1)
    assert len(scores) == 2 and all(s > 0 for s in scores)
    for bad in (0, 11):
        with pytest.raises(ValueError, match="first_steps must be in 1..num_inference_steps"):
            noise_norm_scores(pipe, ["a cat"], num_generations=1, num_inference_steps=10, first_steps=bad)
