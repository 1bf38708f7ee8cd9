import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler

from diffusers_unlearn.noise import NoiseSchedule, per_sample_loss
from diffusers_unlearn.objectives import Denoiser, available_objectives, get_objective

from tiny_models import batches, schedule


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_prediction_conversions_round_trip(prediction_type):
    s = schedule(prediction_type)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 1, 8, 8, generator=g)
    eps = torch.randn(6, 1, 8, 8, generator=g)
    t = torch.tensor([0, 1, 10, 500, 998, 999])
    x_t = s.add_noise(x0, eps, t)
    target = s.epsilon_to_prediction(eps, x_t, t)
    if prediction_type == "v_prediction":
        gamma, sigma = s.coefficients(t, x0)
        torch.testing.assert_close(target, gamma * eps - sigma * x0, atol=2e-4, rtol=1e-3)
    if prediction_type == "sample":
        torch.testing.assert_close(target, x0, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(s.to_epsilon(target, x_t, t), eps, atol=1e-4, rtol=1e-4)


def test_schedule_from_any_scheduler_with_alphas_cumprod():
    for scheduler in (DDPMScheduler(), DDIMScheduler(), EulerDiscreteScheduler()):
        s = NoiseSchedule.from_scheduler(scheduler)
        assert s.num_train_timesteps == 1000
        torch.testing.assert_close(s.gamma**2 + s.sigma**2, torch.ones(1000, dtype=torch.float64))
    assert NoiseSchedule.from_scheduler(DDPMScheduler(prediction_type="v_prediction")).prediction_type == (
        "v_prediction"
    )


def test_schedule_rejects_bad_input():
    with pytest.raises(ValueError, match="alphas_cumprod"):
        NoiseSchedule.from_scheduler(object())
    with pytest.raises(ValueError, match="prediction_type"):
        NoiseSchedule(torch.linspace(0.9, 0.1, 10), "x0")
    with pytest.raises(ValueError, match="timestep_range"):
        schedule().sample_timesteps(2, "cpu", timestep_range=(10, 5000))


def test_per_sample_loss_is_a_pixel_mean():
    prediction = torch.zeros(2, 3, 4, 4)
    target = torch.ones(2, 3, 4, 4)
    target[1] *= 2
    torch.testing.assert_close(per_sample_loss(prediction, target), torch.tensor([1.0, 4.0]))


class AsPrediction(torch.nn.Module):
    """An epsilon model re-expressed as an equivalent v- or sample-prediction model."""

    def __init__(self, model, target_schedule):
        super().__init__()
        self.model = model
        self.target_schedule = target_schedule

    def forward(self, x_t, t, **kwargs):
        eps = self.model(x_t, t, **kwargs).sample
        return self.target_schedule.epsilon_to_prediction(eps, x_t, t)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
@pytest.mark.parametrize("method", available_objectives())
def test_equivalent_models_give_the_same_loss_terms_in_epsilon_space(method, prediction_type):
    denoiser, forget, keep = batches("unconditional")
    denoiser.loss_space = "epsilon"
    other_schedule = schedule(prediction_type)
    other = Denoiser(AsPrediction(denoiser.model, other_schedule), other_schedule, loss_space="epsilon")

    terms = []
    for d in (denoiser, other):
        objective = get_objective(method)
        objective.prepare(d, forget)
        terms.append(objective(d, forget, keep, generator=torch.Generator().manual_seed(3)))
    for name in ("keep", "forget"):
        a, b = getattr(terms[0], name), getattr(terms[1], name)
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=2e-4, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_targets_from_the_noisy_input_match_the_definitions(prediction_type):
    s = schedule(prediction_type)
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(5, 1, 8, 8, generator=g), torch.randn(5, 1, 8, 8, generator=g)
    t = torch.tensor([0, 1, 500, 998, 999])
    x_t = s.add_noise(x0, eps, t)
    gamma, sigma = s.coefficients(t, x0)
    expected = {"epsilon": eps, "v_prediction": gamma * eps - sigma * x0, "sample": x0}[prediction_type]
    torch.testing.assert_close(s.target(x_t, x0, t), expected, atol=2e-4, rtol=1e-3)
    torch.testing.assert_close(s.target(x_t, x0, t, "epsilon"), eps, atol=2e-4, rtol=1e-3)
    with pytest.raises(ValueError, match="loss_space"):
        s.target(x_t, x0, t, "v")


def test_native_v_loss_is_the_epsilon_loss_divided_by_alpha_bar():
    """eps_hat - eps = gamma_t (v_hat - v): per item, the epsilon-space loss is alpha_bar_t times the v loss."""
    denoiser, _, keep = batches("unconditional")
    v_schedule = schedule("v_prediction")
    native = Denoiser(denoiser.model, v_schedule)
    epsilon = Denoiser(denoiser.model, v_schedule, loss_space="epsilon")
    from diffusers_unlearn.objectives import denoising_loss

    with torch.no_grad():
        loss_v = denoising_loss(native, keep, torch.Generator().manual_seed(5))
        loss_eps = denoising_loss(epsilon, keep, torch.Generator().manual_seed(5))
    t = v_schedule.sample_timesteps(len(keep), "cpu", torch.Generator().manual_seed(5))
    alpha_bar = v_schedule.alphas_cumprod[t].float()
    torch.testing.assert_close(loss_eps, alpha_bar * loss_v, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(loss_eps, loss_v, rtol=1e-2)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_naive_deletion_keep_term_is_the_official_sd_training_loss(prediction_type):
    """SD 1.5 (epsilon) and SD 2.1 (v): diffusers' train_text_to_image.py computes
    noisy = scheduler.add_noise(latents, noise, t); target = noise or scheduler.get_velocity(latents, noise, t);
    loss = F.mse_loss(unet(noisy, t, encoder_hidden_states).sample.float(), target.float(), reduction="mean")."""
    import torch.nn.functional as F

    denoiser, forget, keep = batches("text", batch_size=3)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, prediction_type=prediction_type)
    native = Denoiser(denoiser.model, NoiseSchedule.from_scheduler(scheduler))
    with torch.no_grad():
        ours = get_objective("naive_deletion")(native, forget, keep, generator=torch.Generator().manual_seed(7)).keep

        g = torch.Generator().manual_seed(7)  # the same draws, in the same order: timesteps, then noise
        latents = keep.x0
        timesteps = torch.randint(0, 1000, (len(latents),), generator=g)
        noise = torch.randn(latents.shape, generator=g)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        target = noise if prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
        model_pred = denoiser.model(noisy, timesteps, keep.encoder_hidden_states).sample
        official = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    torch.testing.assert_close(ours, official, rtol=1e-5, atol=1e-6)
