"""The rectified-flow forward process (FlowMatchSchedule) and every objective on it (issue 11, section 1)."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DModel
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from diffusers_unlearn.noise import FlowMatchSchedule, draw_noise
from diffusers_unlearn.objectives import DenoisingBatch, Denoiser, available_objectives, denoising_loss, get_objective
from diffusers_unlearn.objectives.siss import importance_log_weights, log_density_ratio


def velocity_model(seed: int = 0) -> UNet2DModel:
    """A tiny UNet standing in for a velocity model (it takes the float timesteps sigma * 1000)."""
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8, in_channels=2, out_channels=2, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
    )


def items(count: int, seed: int) -> DenoisingBatch:
    return DenoisingBatch(torch.randn(count, 2, 8, 8, generator=torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("config", [{"shift": 3.0}, {"shift": 1.0}, {"use_dynamic_shifting": True, "shift": 3.0}])
def test_grid_is_the_scheduler_training_grid_noisiest_last(config):
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    schedule = FlowMatchSchedule.from_scheduler(scheduler)
    count = scheduler.config.num_train_timesteps
    official = torch.arange(count)
    ours = count - 1 - official
    torch.testing.assert_close(schedule.sigma[ours].float(), scheduler.sigmas[:count])
    torch.testing.assert_close(schedule.model_timesteps(ours), scheduler.timesteps[official])
    torch.testing.assert_close(schedule.gamma, 1 - schedule.sigma)
    assert bool((schedule.sigma[1:] > schedule.sigma[:-1]).all())  # noise grows with the index, as for DDPM
    scheduler.set_timesteps(7, mu=0.5 if scheduler.config.use_dynamic_shifting else None)  # one that has sampled
    torch.testing.assert_close(FlowMatchSchedule.from_scheduler(scheduler).sigma, schedule.sigma)


@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "none"])
def test_timesteps_are_drawn_as_the_official_scripts_draw_them(scheme):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    schedule = FlowMatchSchedule.from_scheduler(scheduler, weighting_scheme=scheme, logit_mean=0.3, logit_std=1.2, mode_scale=1.29)
    ours = schedule.sample_timesteps(64, "cpu", torch.Generator().manual_seed(4))
    u = compute_density_for_timestep_sampling(scheme, 64, logit_mean=0.3, logit_std=1.2, mode_scale=1.29, generator=torch.Generator().manual_seed(4))
    indices = (u * scheduler.config.num_train_timesteps).long()  # the official scripts' index
    torch.testing.assert_close(schedule.model_timesteps(ours), scheduler.timesteps[indices])
    torch.testing.assert_close(schedule.sigma[ours].float(), scheduler.sigmas[indices])
    restricted = schedule.sample_timesteps(256, "cpu", torch.Generator().manual_seed(5), timestep_range=(100, 200))
    assert int(restricted.min()) >= 100 and int(restricted.max()) < 200
    with pytest.raises(ValueError, match="timestep_range"):
        schedule.sample_timesteps(2, "cpu", timestep_range=(0, 1001))


def test_conversions_and_targets_follow_the_definitions():
    schedule = FlowMatchSchedule.from_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0))
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(5, 2, 4, 4, generator=g), torch.randn(5, 2, 4, 4, generator=g)
    t = torch.tensor([0, 1, 500, 998, 999])
    sigma = schedule.sigma[t].float().view(-1, 1, 1, 1)
    x_t = schedule.add_noise(x0, eps, t)
    torch.testing.assert_close(x_t, (1 - sigma) * x0 + sigma * eps)
    velocity = eps - x0
    torch.testing.assert_close(schedule.target(x_t, x0, t), velocity, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(schedule.target(x_t, x0, t, "epsilon"), eps, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(schedule.to_epsilon(velocity, x_t, t), eps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(schedule.to_sample(velocity, x_t, t), x0, atol=1e-5, rtol=1e-5)
    # Dividing by 1 - sigma amplifies round-off near sigma = 1 (why targets never go through it): away from it only.
    torch.testing.assert_close(schedule.epsilon_to_prediction(eps, x_t, t)[:3], velocity[:3], atol=1e-4, rtol=1e-4)
    preconditioned = FlowMatchSchedule.from_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0), precondition_outputs=True)
    torch.testing.assert_close(preconditioned.target(x_t, x0, t), x0)
    # SD3's preconditioning: model_pred * (-sigmas) + noisy_model_input, regressed onto x0.
    torch.testing.assert_close(preconditioned.output_in_space(velocity, x_t, t), velocity * (-sigma) + x_t)


def test_velocity_targets_stay_finite_in_float64_near_sigma_zero_and_one():
    schedule = FlowMatchSchedule(torch.tensor([1e-12, 1e-6, 0.5, 1 - 1e-9, 1.0]))
    g = torch.Generator().manual_seed(2)
    y = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.arange(5)
    m = schedule.add_noise(y, eps, t)
    for space in ("native", "epsilon"):
        target = schedule.target(m, y, t, space)
        assert target.dtype == torch.float64 and torch.isfinite(target).all()
    torch.testing.assert_close(schedule.target(m, y, t)[1:], (eps - y)[1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(schedule.target(m, y, t, "epsilon")[2:], eps[2:])


def test_siss_delta_and_weights_are_the_closed_form_of_the_flow_process():
    """q(m|y) = N((1 - sigma) y, sigma^2 I): Delta = (||m - (1-s)a||^2 - ||m - (1-s)x||^2) / (2 s^2)."""
    schedule = FlowMatchSchedule.from_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0))
    g = torch.Generator().manual_seed(3)
    x, a, eps = (torch.randn(4, 2, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([10, 300, 700, 990])
    gamma, sigma = schedule.coefficients(t, x)
    m = schedule.add_noise(a, eps, t)
    delta = log_density_ratio(m, x, a, gamma, sigma)
    s = schedule.sigma[t].view(-1, 1, 1, 1)
    direct = (((m - (1 - s) * a) ** 2).flatten(1).sum(1) - ((m - (1 - s) * x) ** 2).flatten(1).sum(1)) / (2 * s.flatten() ** 2)
    torch.testing.assert_close(delta, direct)
    log_w_x, log_w_a = importance_log_weights(delta, 0.5)
    # w_x = q(m|x) / q_lambda(m) from the two Gaussian densities themselves.
    log_q_x = -((m - (1 - s) * x) ** 2).flatten(1).sum(1) / (2 * s.flatten() ** 2)
    log_q_a = -((m - (1 - s) * a) ** 2).flatten(1).sum(1) / (2 * s.flatten() ** 2)
    log_mix = torch.logsumexp(torch.stack([log_q_x + math.log(0.5), log_q_a + math.log(0.5)]), dim=0)
    torch.testing.assert_close(log_w_x, log_q_x - log_mix)
    torch.testing.assert_close(log_w_a, log_q_a - log_mix)


@pytest.mark.parametrize("scheme,precondition", [("logit_normal", False), ("mode", False), ("sigma_sqrt", True), ("cosmap", False)])
def test_naive_deletion_keep_term_is_the_official_sd3_flux_loss(scheme, precondition):
    """train_dreambooth_lora_sd3.py / _flux.py on pinned inputs: sigma from the scheduler index, noisy input
    (1 - sigma) x0 + sigma noise, the model at scheduler.timesteps[index], weighting(sigma) * ||pred - (noise - x0)||^2
    (SD3's preconditioning: pred * (-sigma) + noisy regressed onto x0), mean over elements and the batch."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    schedule = FlowMatchSchedule.from_scheduler(scheduler, weighting_scheme=scheme, precondition_outputs=precondition)
    model = velocity_model()
    keep = items(4, 7)
    with torch.no_grad():
        terms = get_objective("naive_deletion")(Denoiser(model, schedule), None, keep, generator=torch.Generator().manual_seed(9))

        # The official computation, with the same draws (timesteps first, then the noise).
        generator = torch.Generator().manual_seed(9)
        drawn = compute_density_for_timestep_sampling(scheme, 4, logit_mean=0.0, logit_std=1.0, mode_scale=1.29, generator=generator)
        indices = (drawn * scheduler.config.num_train_timesteps).long()
        noise = draw_noise(keep.x0, generator)
        sigmas = scheduler.sigmas[indices].view(-1, 1, 1, 1)
        noisy = (1.0 - sigmas) * keep.x0 + sigmas * noise
        model_pred = model(noisy, scheduler.timesteps[indices]).sample
        target = noise - keep.x0
        if precondition:
            model_pred = model_pred * (-sigmas) + noisy
            target = keep.x0
        weighting = compute_loss_weighting_for_sd3(scheme, sigmas)
        official = torch.mean((weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(4, -1), 1).mean()
    torch.testing.assert_close(terms.keep, official, rtol=1e-5, atol=1e-6)


def test_epsilon_space_loss_is_the_flow_loss_times_one_minus_sigma_squared():
    """eps_hat - eps = (1 - sigma)(v_hat - v), per item."""
    schedule = FlowMatchSchedule.from_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0))
    model = velocity_model()
    keep = items(6, 8)
    with torch.no_grad():
        native = denoising_loss(Denoiser(model, schedule), keep, torch.Generator().manual_seed(5))
        epsilon = denoising_loss(Denoiser(model, schedule, loss_space="epsilon"), keep, torch.Generator().manual_seed(5))
    t = schedule.sample_timesteps(6, "cpu", torch.Generator().manual_seed(5))
    torch.testing.assert_close(epsilon, schedule.gamma[t].float() ** 2 * native, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(epsilon, native, rtol=1e-2)


@pytest.mark.parametrize("method", available_objectives())
def test_every_objective_trains_on_the_flow_process(method):
    """Finite terms and a finite, non-zero gradient for every method on a velocity model."""
    schedule = FlowMatchSchedule.from_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0), weighting_scheme="logit_normal")
    model = velocity_model()
    denoiser = Denoiser(model, schedule)
    forget, keep = items(4, 1), items(4, 2)
    # VDU's hinge stops at target_loss, in the loss space's units: a velocity loss starts near 1 + var(x0) = 2.
    objective = get_objective(method, **({"target_loss": 10.0} if method == "vdu" else {}))
    objective.prepare(denoiser, forget, generator=torch.Generator().manual_seed(0))
    terms = objective(denoiser, forget, keep, generator=torch.Generator().manual_seed(1))
    total = sum(term for term in (terms.keep, terms.forget) if term is not None)
    assert torch.isfinite(total)
    total.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_snr_gamma_is_refused_with_the_flow_weighting_named():
    schedule = FlowMatchSchedule.from_scheduler(FlowMatchEulerDiscreteScheduler())
    denoiser = Denoiser(velocity_model(), schedule, snr_gamma=5.0)
    with pytest.raises(ValueError, match="weighting_scheme"):
        denoising_loss(denoiser, items(2, 0), torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="weighting_scheme"):
        FlowMatchSchedule.from_scheduler(FlowMatchEulerDiscreteScheduler(), weighting_scheme="snr")


def test_vdu_self_generated_samples_are_finite_on_the_flow_process():
    """VDU's data-free Fisher samples from the model itself; the flow grid ends at sigma = 1 (gamma = 0), where
    an x0 estimate through the noise estimate would divide by zero."""
    from diffusers_unlearn.objectives.vdu import sample_ddim

    schedule = FlowMatchSchedule.from_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0))
    with torch.no_grad():
        samples = sample_ddim(Denoiser(velocity_model(), schedule), items(3, 4), num_inference_steps=4, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (3, 2, 8, 8) and torch.isfinite(samples).all()
    objective = get_objective("vdu", precision="fisher", fisher_num_samples=2, fisher_sampling_steps=3)
    objective.prepare(Denoiser(velocity_model(), schedule), items(2, 5), generator=torch.Generator().manual_seed(1))
    precision = objective._precision
    assert precision and all(torch.isfinite(p).all() and p.abs().sum() > 0 for p in precision.values())
