import pytest
import torch

from diffusers_unlearn.gradients import BOMECombiner, FixedNormCombiner, SumCombiner
from diffusers_unlearn.objectives import LossTerms

from tiny_models import batches, trainable


def two_terms(seed=0, dtype=torch.float64):
    """Keep and forget losses that share one forward pass of a tiny UNet.

    In float64 by default: the combiners get their gradients from other backward passes than the reference
    below, and in float32 the same gradient summed in another order already differs by ~2e-7. In float64 that
    round-off is ~1e-15, so tight tolerances test the formulas, not the summation order.
    """
    denoiser, forget, keep = batches("unconditional", seed=seed)
    model = denoiser.model.to(dtype)
    t = torch.tensor([10, 200, 500, 900])
    prediction = model((forget.x0 + keep.x0).to(dtype), t).sample
    keep_loss = (prediction - keep.x0.to(dtype)).pow(2).mean()
    forget_loss = -(prediction - forget.x0.to(dtype)).pow(2).mean()
    return model, keep_loss, forget_loss


def reference_grads(model, loss):
    params = trainable(model)
    return [g.clone() for g in torch.autograd.grad(loss, params, retain_graph=True)]


def grads_of(model):
    return [p.grad.clone() for p in trainable(model)]


def flat(grads):
    return torch.cat([g.flatten() for g in grads])


def test_fixed_norm_matches_two_separate_backward_passes():
    model, keep_loss, forget_loss = two_terms()
    g_x = flat(reference_grads(model, keep_loss))
    g_a = flat(reference_grads(model, forget_loss))
    c = 0.37
    expected = g_x + c * g_a / g_a.norm()

    combiner = FixedNormCombiner(scaling_norm=c)
    logs = combiner.backward(LossTerms(keep=keep_loss, forget=forget_loss), trainable(model))
    torch.testing.assert_close(flat(grads_of(model)), expected, rtol=1e-5, atol=1e-7)
    assert logs["forget_grad_norm"] == pytest.approx(g_a.norm().item(), rel=1e-5)


def test_fixed_norm_calibrates_relative_to_the_keep_gradient():
    model, keep_loss, forget_loss = two_terms()
    g_x = flat(reference_grads(model, keep_loss))
    combiner = FixedNormCombiner(scaling_norm=None, relative_norm=0.1)
    combiner.backward(LossTerms(keep=keep_loss, forget=forget_loss), trainable(model))
    assert combiner.scaling_norm == pytest.approx(0.1 * g_x.norm().item(), rel=1e-5)


@pytest.mark.parametrize("combiner", [FixedNormCombiner(scaling_norm=1.0), BOMECombiner(eta=1.0)])
def test_zero_forget_gradient_gives_a_zero_term(combiner):
    model, keep_loss, _ = two_terms()
    g_x = flat(reference_grads(model, keep_loss))
    zero_forget = 0.0 * sum(p.sum() for p in trainable(model))
    if True:
        logs = combiner.backward(LossTerms(keep=keep_loss, forget=zero_forget), trainable(model))
        grads = flat(grads_of(model))
        assert torch.isfinite(grads).all()
        torch.testing.assert_close(grads, g_x)
        assert all(torch.isfinite(torch.tensor(v)) for v in logs.values())


def test_lagged_norm_reuses_the_last_measurement():
    combiner = FixedNormCombiner(scaling_norm=1.0, norm_refresh_every=3)
    model, keep_loss, forget_loss = two_terms()
    first = combiner.backward(LossTerms(keep=keep_loss, forget=forget_loss), trainable(model))
    for call in range(3):
        model, keep_loss, forget_loss = two_terms(seed=5)  # a different forget gradient
        true_norm = flat(reference_grads(model, forget_loss)).norm().item()
        logs = combiner.backward(LossTerms(keep=keep_loss, forget=forget_loss), trainable(model))
        if call < 2:
            assert logs["forget_grad_norm"] == first["forget_grad_norm"] != pytest.approx(true_norm)
        else:  # the 4th call refreshes
            assert logs["forget_grad_norm"] == pytest.approx(true_norm, rel=1e-5)


@pytest.mark.parametrize("eta", [0.0, 1e-3, 10.0])
def test_bome_weight_formula(eta):
    model, keep_loss, forget_loss = two_terms()
    g_r = flat(reference_grads(model, keep_loss))
    g_f = flat(reference_grads(model, forget_loss))
    weight = max(eta - torch.dot(g_r, g_f).item() / g_f.pow(2).sum().item(), 0.0)

    logs = BOMECombiner(eta=eta).backward(LossTerms(keep=keep_loss, forget=forget_loss), trainable(model))
    # The combiner takes its dot products in float32 (for fp16/bf16 models), so its weight is float32-exact.
    assert logs["bome_weight"] == pytest.approx(weight, rel=1e-5, abs=1e-9)
    # Given that weight, the float64 gradient is g_r + weight * g_f to float64 round-off.
    expected = g_r + logs["bome_weight"] * g_f
    torch.testing.assert_close(flat(grads_of(model)), expected, rtol=1e-9, atol=1e-12)
    assert weight > 0  # every case here has the forget term contributing, so a wrong weight would show


def test_bome_adds_to_previously_accumulated_gradients():
    model, keep_loss, forget_loss = two_terms()
    g_r = flat(reference_grads(model, keep_loss))
    g_f = flat(reference_grads(model, forget_loss))
    for p in trainable(model):
        p.grad = torch.ones_like(p)
    logs = BOMECombiner(eta=10.0).backward(LossTerms(keep=keep_loss, forget=forget_loss), trainable(model))
    expected = 1.0 + g_r + logs["bome_weight"] * g_f
    torch.testing.assert_close(flat(grads_of(model)), expected, rtol=1e-5, atol=1e-6)


def test_sum_combiner():
    model, keep_loss, forget_loss = two_terms()
    expected = flat(reference_grads(model, keep_loss + forget_loss))
    SumCombiner().backward(LossTerms(keep=keep_loss, forget=forget_loss), trainable(model))
    torch.testing.assert_close(flat(grads_of(model)), expected)


def test_invalid_combiner_settings():
    with pytest.raises(ValueError, match="scaling_norm"):
        FixedNormCombiner(scaling_norm=-1.0)
    with pytest.raises(ValueError, match="norm_refresh_every"):
        FixedNormCombiner(norm_refresh_every=0)
    with pytest.raises(ValueError, match="eta"):
        BOMECombiner(eta=-0.1)


class ScalerOnly:
    """The parts of an fp16 Accelerator a combiner uses: a loss scaler and a scaled backward."""

    gradient_accumulation_steps = 1
    num_processes = 1

    def __init__(self):
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)

    def backward(self, loss):
        self.scaler.scale(loss).backward()


@pytest.mark.parametrize("combiner", [FixedNormCombiner(scaling_norm=1.0), BOMECombiner(eta=1.0)])
def test_fp16_overflow_in_a_side_gradient_skips_instead_of_stopping(combiner):
    """Under a loss scaler an overflow is routine: the update turns non-finite so the scaler skips it."""
    model, keep_loss, forget_loss = two_terms()
    handle = model.conv_in.weight.register_hook(lambda grad: grad * float("inf"))
    combiner.backward(LossTerms(keep=keep_loss, forget=forget_loss), trainable(model), accelerator=ScalerOnly())
    handle.remove()
    assert not torch.isfinite(flat(grads_of(model))).all()
