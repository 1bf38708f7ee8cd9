"""--noise_offset and --snr_gamma (min-SNR-gamma weighting) as the objectives see them, through `Denoiser`.

The reference side of each comparison is diffusers' train_text_to_image_lora.py loss, transcribed here from its
formulas (the script itself is not importable) with diffusers' own scheduler and `compute_snr`.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from diffusers_unlearn.noise import NoiseSchedule, draw_noise, per_sample_loss
from diffusers_unlearn.objectives import Denoiser, available_objectives, get_objective
from diffusers_unlearn.objectives.siss import log_density_ratio

from tiny_models import batches, tiny_condition_unet


def official_lora_loss(unet, scheduler, latents, hidden, noise, timesteps, snr_gamma, noise_offset, offset):
    """train_text_to_image_lora.py's loss on given draws (noise, its offset term, timesteps)."""
    if noise_offset:
        noise = noise + noise_offset * offset
    noisy_latents = scheduler.add_noise(latents, noise, timesteps)
    if scheduler.config.prediction_type == "epsilon":
        target = noise
    else:
        target = scheduler.get_velocity(latents, noise, timesteps)
    model_pred = unet(noisy_latents, timesteps, hidden, return_dict=False)[0]
    if snr_gamma is None:
        return F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    snr = compute_snr(scheduler, timesteps)
    mse_loss_weights = torch.stack([snr, snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    if scheduler.config.prediction_type == "epsilon":
        mse_loss_weights = mse_loss_weights / snr
    elif scheduler.config.prediction_type == "v_prediction":
        mse_loss_weights = mse_loss_weights / (snr + 1)
    loss = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    loss = loss.mean(dim=list(range(1, len(loss.shape)))) * mse_loss_weights
    return loss.mean()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("snr_gamma, noise_offset", [(5.0, 0.0), (1.0, 0.0), (5.0, 0.1), (None, 0.1)])
def test_naive_deletion_keep_term_is_the_official_loss(prediction_type, snr_gamma, noise_offset):
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    unet = tiny_condition_unet(seed=1)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(6, 4, 8, 8, generator=g)
    hidden = torch.randn(6, 5, 32, generator=g)
    from diffusers_unlearn.objectives import DenoisingBatch

    denoiser = Denoiser(unet, NoiseSchedule.from_scheduler(scheduler), noise_offset=noise_offset, snr_gamma=snr_gamma)
    terms = get_objective("naive_deletion")(denoiser, None, DenoisingBatch(latents, None, hidden), generator=torch.Generator().manual_seed(7))

    # The same draws, in our order: timesteps, noise, then the offset term.
    pinned = torch.Generator().manual_seed(7)
    timesteps = torch.randint(0, 1000, (6,), generator=pinned)
    noise = torch.randn(latents.shape, generator=pinned)
    offset = torch.randn(6, 4, 1, 1, generator=pinned) if noise_offset else None
    expected = official_lora_loss(unet, scheduler, latents, hidden, noise, timesteps, snr_gamma, noise_offset, offset)
    torch.testing.assert_close(terms.keep, expected, rtol=2e-5, atol=1e-7)


def test_noise_offset_is_the_official_formula_with_a_pinned_generator():
    like = torch.zeros(3, 4, 6, 5)
    noise = draw_noise(like, torch.Generator().manual_seed(11), noise_offset=0.1)
    g = torch.Generator().manual_seed(11)
    expected = torch.randn(like.shape, generator=g)
    expected += 0.1 * torch.randn((like.shape[0], like.shape[1], 1, 1), generator=g)  # official: noise += ...
    assert torch.equal(noise, expected)
    # One offset per item and channel: the difference to plain noise is constant over the positions.
    plain = torch.randn(like.shape, generator=torch.Generator().manual_seed(11))
    difference = noise - plain
    assert torch.allclose(difference, difference[..., :1, :1].expand_as(difference))
    assert difference.abs().max() > 0


def test_defaults_draw_and_weigh_exactly_as_before():
    denoiser, _, keep = batches("text")
    like = keep.x0
    old_noise = torch.randn(like.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float32)
    assert torch.equal(denoiser.noise(like, torch.Generator().manual_seed(2)), old_noise)
    prediction, target = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    assert torch.equal(denoiser.loss(prediction, target, t), per_sample_loss(prediction, target))

    # naive_deletion's keep term as the code computed it before these options existed.
    terms = get_objective("naive_deletion")(denoiser, None, keep, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    schedule = denoiser.schedule
    timesteps = schedule.sample_timesteps(len(keep), like.device, g)
    noise = torch.randn(like.shape, generator=g, dtype=torch.float32)
    x_t = schedule.add_noise(like, noise, timesteps)
    old = per_sample_loss(denoiser.predict(x_t, timesteps, keep), denoiser.target(x_t, like, timesteps)).mean()
    assert torch.equal(terms.keep, old)


@pytest.mark.parametrize("name", available_objectives())
@pytest.mark.parametrize("option", [{"noise_offset": 0.5}, {"snr_gamma": 0.01}])
def test_every_objective_gets_both_options_without_a_branch_of_its_own(name, option):
    """Each objective's terms change when the denoiser carries the option, and stay finite."""
    # vdu: a target above any loss here, so the hinge is active on random weights.
    kwargs = {"neggrad": {"keep_weight": 1.0}, "vdu": {"target_loss": 100.0}}.get(name, {})
    results = []
    for options in ({}, option):
        denoiser, forget, keep = batches("unconditional")
        for key, value in options.items():
            setattr(denoiser, key, value)
        terms = get_objective(name, **kwargs)(denoiser, forget, keep, generator=torch.Generator().manual_seed(4))
        results.append([term.detach() for term in (terms.keep, terms.forget) if term is not None])
    if name == "vdu" and "snr_gamma" not in option:
        # VDU's keep term is its parameter-space stability pull; its forget term draws the noise.
        assert not torch.equal(results[0][1], results[1][1])
    else:
        assert any(not torch.equal(a, b) for a, b in zip(*results))
    assert all(torch.isfinite(term).all() for term in results[1])


def test_siss_density_ratio_with_noise_offset_matches_the_full_gaussian():
    """Delta under the offset noise's covariance sigma^2 (I + o^2 11^T per channel), against a dense Gaussian."""
    g = torch.Generator().manual_seed(0)
    shape = (3, 2, 2, 3)
    x, a = torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)
    m = torch.randn(shape, generator=g, dtype=torch.float64)
    gamma = torch.tensor([0.9, 0.5, 0.2], dtype=torch.float64).view(-1, 1, 1, 1)
    sigma = (1 - gamma**2).sqrt()
    offset = 0.3
    channels, positions = shape[1], shape[2] * shape[3]
    block = torch.eye(positions, dtype=torch.float64) + offset**2 * torch.ones(positions, positions, dtype=torch.float64)
    covariance = torch.block_diag(*[block] * channels)
    expected = []
    for i in range(shape[0]):
        scale = sigma[i].item() ** 2 * covariance
        q_x = torch.distributions.MultivariateNormal((gamma[i] * x[i]).flatten(), scale)
        q_a = torch.distributions.MultivariateNormal((gamma[i] * a[i]).flatten(), scale)
        expected.append(q_x.log_prob(m[i].flatten()) - q_a.log_prob(m[i].flatten()))
    delta = log_density_ratio(m, x, a, gamma, sigma, noise_offset=offset)
    torch.testing.assert_close(delta, torch.stack(expected), rtol=1e-9, atol=1e-9)
    # Without the offset the dense Gaussian is isotropic, and the old formula is unchanged.
    plain = log_density_ratio(m, x, a, gamma, sigma)
    assert not torch.allclose(plain, delta)


@pytest.mark.parametrize("space, expected", [("epsilon", 1.0), ("v_prediction", 0.0), ("sample", 0.0)])
def test_min_snr_weights_at_zero_terminal_snr(space, expected):
    schedule = NoiseSchedule(torch.tensor([0.9, 0.0]))
    weights = schedule.min_snr_weights(torch.tensor([1]), 5.0, space)
    assert weights.tolist() == [expected]


def test_erasediff_uniform_term_is_weighted_in_epsilon_space():
    """EraseDiff's forget term compares noise estimates with u, so a v-prediction model's term takes the epsilon
    weight min(SNR, gamma) / SNR, not the v weight."""
    denoiser, forget, keep = batches("unconditional")
    denoiser.schedule = NoiseSchedule(denoiser.schedule.alphas_cumprod, "v_prediction")
    denoiser.snr_gamma = 2.0
    prediction, target = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    t = torch.tensor([0, 100, 600, 999])
    snr = denoiser.schedule.snr(t)
    eps_weights = (snr.clamp(max=2.0) / snr).float()
    v_weights = (snr.clamp(max=2.0) / (snr + 1)).float()
    torch.testing.assert_close(denoiser.loss(prediction, target, t, space="epsilon"), per_sample_loss(prediction, target) * eps_weights)
    torch.testing.assert_close(denoiser.loss(prediction, target, t), per_sample_loss(prediction, target) * v_weights)


@pytest.mark.parametrize("kwargs, message", [
    ({"noise_offset": -0.1}, "noise_offset"),
    ({"noise_offset": math.inf}, "noise_offset"),
    ({"snr_gamma": 0.0}, "snr_gamma"),
    ({"snr_gamma": math.nan}, "snr_gamma"),
])
def test_bad_options_raise_one_clear_error(kwargs, message):
    denoiser, _, _ = batches("unconditional")
    with pytest.raises(ValueError, match=message):
        Denoiser(denoiser.model, denoiser.schedule, **kwargs)


def test_noise_offset_refuses_inputs_without_a_channel_axis():
    """Packed (batch, tokens, features) latents have no per-channel offset to add."""
    with pytest.raises(ValueError, match="image-shaped"):
        draw_noise(torch.zeros(2, 16, 64), torch.Generator().manual_seed(0), noise_offset=0.1)
    assert draw_noise(torch.zeros(2, 16, 64), torch.Generator().manual_seed(0)).shape == (2, 16, 64)
