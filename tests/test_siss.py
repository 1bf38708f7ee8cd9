import math

import pytest
import torch

from diffusers_unlearn.objectives import DenoisingBatch, get_objective
from diffusers_unlearn.objectives.siss import importance_log_weights, log_density_ratio

from tiny_models import batches


def closed_form_weights(delta: float, lam: float) -> tuple[float, float]:
    w_x = 1.0 / ((1 - lam) + lam * math.exp(-delta))
    w_a = 1.0 / ((1 - lam) * math.exp(delta) + lam)
    return w_x, w_a


@pytest.mark.parametrize("lam", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("delta", [-20.0, -3.0, -0.5, 0.0, 0.5, 3.0, 20.0])
def test_importance_weights_match_closed_form(lam, delta):
    log_w_x, log_w_a = importance_log_weights(torch.tensor([delta], dtype=torch.float64), lam)
    expected_x, expected_a = closed_form_weights(delta, lam)
    assert math.isclose(log_w_x.exp().item(), expected_x, rel_tol=1e-12)
    assert math.isclose(log_w_a.exp().item(), expected_a, rel_tol=1e-12)


def test_importance_weights_are_exact_at_lambda_zero_and_one():
    delta = torch.tensor([-700.0, -5.0, 0.0, 2.5, 700.0], dtype=torch.float64)
    log_w_x, log_w_a = importance_log_weights(delta, 0.0)
    # lam = 0: q_lam = q(.|x), so w_x = 1 and w_a = q(m|a)/q(m|x) = exp(-Delta).
    assert torch.equal(log_w_x, torch.zeros_like(delta))
    torch.testing.assert_close(log_w_a, -delta)
    log_w_x, log_w_a = importance_log_weights(delta, 1.0)
    assert torch.equal(log_w_a, torch.zeros_like(delta))
    torch.testing.assert_close(log_w_x, delta)


@pytest.mark.parametrize("lam", [0.0, 0.3, 0.5, 1.0])
def test_importance_weights_stay_finite_for_huge_deltas(lam):
    delta = torch.tensor([-1e6, -1e4, -1e3, 1e3, 1e4, 1e6], dtype=torch.float64)
    log_w_x, log_w_a = importance_log_weights(delta, lam)
    w_x, w_a = log_w_x.exp(), log_w_a.exp()
    if 0 < lam < 1:
        assert torch.isfinite(w_x).all() and torch.isfinite(w_a).all()
        # Saturation limits: w_x -> 1/(1-lam) for Delta >> 0, w_a -> 1/lam for Delta << 0.
        assert math.isclose(w_x[-1].item(), 1 / (1 - lam), rel_tol=1e-12)
        assert math.isclose(w_a[0].item(), 1 / lam, rel_tol=1e-12)
        assert w_x[0].item() == 0.0 and w_a[-1].item() == 0.0
    else:
        # At the ends one weight is exp(+-Delta) by definition; its log stays finite.
        assert torch.isfinite(log_w_x).all() and torch.isfinite(log_w_a).all()
    assert not torch.isnan(w_x).any() and not torch.isnan(w_a).any()


def test_log_density_ratio_matches_direct_formula():
    g = torch.Generator().manual_seed(0)
    m, x, a = (torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    gamma = torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64).view(3, 1, 1, 1)
    sigma = (1 - gamma**2).sqrt()
    direct = (((m - gamma * a) ** 2).flatten(1).sum(1) - ((m - gamma * x) ** 2).flatten(1).sum(1)) / (
        2 * sigma.flatten() ** 2
    )
    torch.testing.assert_close(log_density_ratio(m, x, a, gamma, sigma), direct)


@pytest.mark.parametrize("lam", [0.25, 0.5, 0.75])
def test_importance_sampling_is_unbiased_on_a_gaussian_toy(lam):
    """E_{m ~ q_lam}[w_x f(m)] = E_{m ~ q(.|x)}[f(m)] (and likewise for a).

    Tolerance: 5 standard errors of the importance-sampled estimate (n = 400,000 draws).
    """
    g = torch.Generator().manual_seed(1)
    n, d = 400_000, 3
    x = torch.tensor([0.5, -0.2, 0.1], dtype=torch.float64)
    a = torch.tensor([-0.3, 0.4, 0.0], dtype=torch.float64)
    gamma, sigma = torch.tensor(0.8, dtype=torch.float64), torch.tensor(0.6, dtype=torch.float64)

    def f(m):
        return (m**2).sum(-1) + torch.sin(3 * m[..., 0])

    from_a = torch.rand(n, generator=g, dtype=torch.float64) < lam
    eps = torch.randn(n, d, generator=g, dtype=torch.float64)
    m = torch.where(from_a[:, None], gamma * a, gamma * x) + sigma * eps
    delta = log_density_ratio(m, x.expand(n, d), a.expand(n, d), gamma.expand(n, 1), sigma.expand(n, 1))
    log_w_x, log_w_a = importance_log_weights(delta, lam)

    for log_w, center in ((log_w_x, x), (log_w_a, a)):
        weighted = log_w.exp() * f(m)
        estimate, stderr = weighted.mean().item(), weighted.std().item() / math.sqrt(n)
        reference = f(gamma * center + sigma * torch.randn(n, d, generator=g, dtype=torch.float64))
        truth, truth_err = reference.mean().item(), reference.std().item() / math.sqrt(n)
        assert abs(estimate - truth) < 5 * math.hypot(stderr, truth_err), (estimate, truth)


def test_siss_lambda_zero_never_draws_forget_items():
    denoiser, forget, keep = batches("unconditional", batch_size=16)
    terms = get_objective("siss", lam=0.0)(denoiser, forget, keep, generator=torch.Generator().manual_seed(0))
    assert terms.logs["forget_fraction"].item() == 0.0
    assert terms.logs["w_x_mean"].item() == pytest.approx(1.0)
    terms = get_objective("siss", lam=1.0)(denoiser, forget, keep, generator=torch.Generator().manual_seed(0))
    assert terms.logs["forget_fraction"].item() == 1.0
    assert torch.isfinite(terms.keep) and torch.isfinite(terms.forget)


def test_siss_rejects_unpaired_batches():
    denoiser, forget, keep = batches("unconditional", batch_size=4)
    short = DenoisingBatch(forget.x0[:2])
    with pytest.raises(ValueError, match="element by element"):
        get_objective("siss")(denoiser, short, keep)


def test_siss_paper_weighting():
    denoiser, forget, keep = batches("unconditional")
    g = torch.Generator().manual_seed(0)
    plain = get_objective("siss", scaling_norm=1.0)(denoiser, forget, keep, generator=g)
    g = torch.Generator().manual_seed(0)
    paper = get_objective("siss", weighting="paper", n=100, k=4, superfactor=0.5)(
        denoiser, forget, keep, generator=g
    )
    torch.testing.assert_close(paper.keep, plain.keep * (100 / 96))
    torch.testing.assert_close(paper.forget, plain.forget * (1.5 * 4 / 96))
