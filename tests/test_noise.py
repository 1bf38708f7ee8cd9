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
def test_equivalent_models_give_the_same_loss_terms(method, prediction_type):
    denoiser, forget, keep = batches("unconditional")
    other_schedule = schedule(prediction_type)
    other = Denoiser(AsPrediction(denoiser.model, other_schedule), other_schedule)

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
