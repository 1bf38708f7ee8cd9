import pytest
import torch

from diffusers_unlearn.objectives import available_objectives, get_objective
from diffusers_unlearn.objectives.vdu import precision_from_checkpoints

from tiny_models import batches, trainable


def test_registry_lists_every_method():
    assert available_objectives() == [
        "erasediff",
        "naive_deletion",
        "neggrad",
        "siss",
        "siss_bernoulli",
        "siss_no_is",
        "vdu",
    ]


def test_unknown_name_lists_available_names():
    with pytest.raises(ValueError, match="Available: erasediff, naive_deletion, neggrad, siss"):
        get_objective("retrain")


def test_unknown_hyperparameter_lists_accepted_ones():
    with pytest.raises(ValueError, match="Accepted: .*lam"):
        get_objective("siss", lamda=0.5)


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("siss", {"lam": 1.5}, "lam"),
        ("siss", {"lam": -0.1}, "lam"),
        ("siss_no_is", {"lam": 2.0}, "lam"),
        ("siss_bernoulli", {"lam": 0.0}, "lam"),
        ("siss", {"scaling_norm": -1.0}, "scaling_norm"),
        ("siss", {"relative_norm": 0.0}, "relative_norm"),
        ("siss", {"superfactor": -1.0}, "superfactor"),
        ("siss", {"weighting": "paper"}, "n .* k"),
        ("siss", {"weighting": "paper", "n": 10, "k": 10}, "n > k"),
        ("siss", {"timestep_range": (500, 100)}, "timestep_range"),
        ("erasediff", {"inner_steps": -1}, "K"),
        ("erasediff", {"eta": -1.0}, "eta"),
        ("erasediff", {"weighting": "both"}, "weighting"),
        ("neggrad", {"alpha": 0.0}, "alpha"),
        ("neggrad", {"keep_weight": -1.0}, "keep_weight"),
        ("vdu", {"gamma": -1.0}, "gamma"),
        ("vdu", {"precision": "hessian"}, "precision"),
        ("vdu", {"precision": "checkpoints"}, "checkpoints"),
        ("vdu", {"target_loss": 0.0}, "target_loss"),
    ],
)
def test_invalid_hyperparameters_raise_at_construction(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        get_objective(name, **kwargs)


@pytest.mark.parametrize("kind", ["unconditional", "class", "text"])
@pytest.mark.parametrize("method", available_objectives())
def test_every_objective_on_every_model_kind(method, kind):
    denoiser, forget, keep = batches(kind)
    # vdu: a target above any loss here, so the hinge is active on random weights.
    kwargs = {"erasediff": {"inner_steps": 1}, "vdu": {"target_loss": 100.0}}.get(method, {})
    objective = get_objective(method, **kwargs)
    objective.prepare(denoiser, forget)
    terms = objective(denoiser, forget, keep, generator=torch.Generator().manual_seed(0))
    total = sum(t for t in (terms.keep, terms.forget) if t is not None)
    assert torch.isfinite(total)
    total.backward()
    grads = [p.grad for p in trainable(denoiser.model) if p.grad is not None]
    assert grads and sum(g.abs().sum() for g in grads) > 0


def test_siss_uses_each_items_own_class_label():
    """With different keep/forget labels, L_x and L_a see their own conditioning."""
    denoiser, forget, keep = batches("class")
    calls = []
    original = denoiser.model.forward

    def spy(sample, timestep, class_labels=None, **kwargs):
        calls.append(class_labels.clone())
        return original(sample, timestep, class_labels=class_labels, **kwargs)

    denoiser.model.forward = spy
    get_objective("siss")(denoiser, forget, keep, generator=torch.Generator().manual_seed(0))
    assert len(calls) == 1 and torch.equal(calls[0], torch.cat([keep.class_labels, forget.class_labels]))


def test_erasediff_inner_loop_restores_parameters():
    denoiser, forget, keep = batches("unconditional")
    before = [p.detach().clone() for p in denoiser.model.parameters()]
    objective = get_objective("erasediff", inner_steps=3, inner_lr=0.01)
    terms = objective(denoiser, forget, keep, generator=torch.Generator().manual_seed(0))
    for p, b in zip(denoiser.model.parameters(), before):
        assert torch.equal(p, b)
    assert terms.logs["forget_gap"].item() > 0  # the inner steps really lowered f


def test_erasediff_surrogate_gradient_is_the_first_order_difference():
    denoiser, forget, keep = batches("unconditional")
    params = trainable(denoiser.model)
    objective = get_objective("erasediff", inner_steps=1, inner_lr=0.5, weighting="fixed", fixed_lambda=1.0)
    generator = torch.Generator().manual_seed(0)
    terms = objective(denoiser, forget, keep, generator=generator)
    surrogate = torch.autograd.grad(terms.forget, params)

    # Recompute grad f(theta) - grad f(theta_1) by hand with the same draws.
    g = torch.Generator().manual_seed(0)
    t = denoiser.schedule.sample_timesteps(len(forget), "cpu", g)
    noise = torch.randn(forget.x0.shape, generator=g)
    target = torch.rand(forget.x0.shape, generator=g)

    def f():
        x_t = denoiser.schedule.add_noise(forget.x0, noise, t)
        return (denoiser(x_t, t, forget) - target).pow(2).flatten(1).mean(1).mean()

    grad_theta = torch.autograd.grad(f(), params)
    with torch.no_grad():
        for p, g0 in zip(params, grad_theta):
            p.sub_(0.5 * g0)
    grad_theta_k = torch.autograd.grad(f(), params)
    for s, a, b in zip(surrogate, grad_theta, grad_theta_k):
        torch.testing.assert_close(s, a - b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("precision", ["l2", "fisher"])
def test_vdu_regularizer_is_zero_at_reference_and_has_gradient_pi_times_delta(precision):
    denoiser, forget, _ = batches("unconditional")
    objective = get_objective("vdu", gamma=1.0, precision=precision, fisher_num_samples=4, fisher_sampling_steps=3)
    objective.prepare(denoiser, forget, generator=torch.Generator().manual_seed(0))
    model = denoiser.model
    assert objective.stability_regularizer(model).item() == 0.0

    g = torch.Generator().manual_seed(1)
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    reg = objective.stability_regularizer(model)
    assert reg.item() > 0
    grads = torch.autograd.grad(reg, list(model.parameters()))
    for (name, p), grad in zip(model.named_parameters(), grads):
        pi = objective.precision_of(name, p)
        torch.testing.assert_close(grad, pi * (p.detach() - reference[name]), rtol=1e-5, atol=1e-9)
    if precision == "fisher":
        values = torch.cat([objective.precision_of(n, p).flatten() for n, p in model.named_parameters()])
        assert values.mean().item() == pytest.approx(1.0, rel=1e-4)
        assert values.std().item() > 0  # really data dependent, not all ones


def test_vdu_precision_from_checkpoints_is_inverse_variance():
    a = {"w": torch.tensor([1.0, 2.0])}
    b = {"w": torch.tensor([3.0, 2.5])}
    precision = precision_from_checkpoints([a, b], ["w"], eps=0.0)
    torch.testing.assert_close(precision["w"], 1.0 / torch.tensor([2.0, 0.125]))
    with pytest.raises(ValueError, match="at least 2"):
        precision_from_checkpoints([a], ["w"])


def test_vdu_plasticity_is_bounded():
    denoiser, forget, _ = batches("unconditional")
    objective = get_objective("vdu", target_loss=1e-6)  # every item already above target
    objective.prepare(denoiser, forget)
    terms = objective(denoiser, forget, None, generator=torch.Generator().manual_seed(0))
    assert terms.forget.item() == 0.0


@pytest.mark.parametrize("precision", ["l2", "checkpoints"])
def test_vdu_lora_delta_form_agrees_with_the_full_weight_form(precision):
    from diffusers_unlearn.lora import add_lora, as_plain_unet

    denoiser, forget, _ = batches("unconditional")
    base_state = {n: p.detach().clone() for n, p in denoiser.model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    checkpoints = [{n: p + 0.01 * torch.randn(p.shape, generator=g) for n, p in base_state.items()} for _ in range(3)]

    model = add_lora(denoiser.model, rank=2, lora_alpha=4, targets="attention_conv")
    denoiser.model = model
    objective = get_objective("vdu", precision=precision, checkpoints=checkpoints)
    objective.prepare(denoiser, forget)
    assert objective.stability_regularizer(model).item() == 0.0  # B = 0 at initialisation
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    lora_form = objective.stability_regularizer(model)

    # Full-weight form on the merged model: sum_i pi_i (W_i - W*_i)^2 / 2 over the adapted weights.
    model.fuse_lora()
    model.unload_lora()
    merged = dict(as_plain_unet(model).named_parameters())
    full_form = sum(
        (objective.precision_of(name, merged[name]) * (merged[name] - base_state[name]).pow(2)).sum() / 2
        for name in objective.regularized_names()
    )
    torch.testing.assert_close(lora_form, full_form, rtol=1e-4, atol=1e-8)
    # And every other weight is untouched by the merge.
    others = set(base_state) - set(objective.regularized_names())
    assert all(torch.equal(merged[n], base_state[n]) for n in others)
