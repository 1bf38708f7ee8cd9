import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from diffusers_unlearn.gradients import NonFiniteError
from diffusers_unlearn.objectives import DenoisingBatch, get_objective
from diffusers_unlearn.unlearner import Unlearner, cycle

from tiny_models import batches, trainable


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_unchanged(model, before):
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


def test_non_finite_loss_stops_before_any_weight_changes():
    denoiser, forget, keep = batches("unconditional")
    forget.x0[0, 0, 0, 0] = float("nan")
    optimizer = torch.optim.AdamW(trainable(denoiser.model), lr=1e-3)
    unlearner = Unlearner(get_objective("neggrad", keep_weight=1.0), denoiser, optimizer)
    before = snapshot(denoiser.model)
    with pytest.raises(NonFiniteError, match=r"Non-finite forget loss .* at step 1"):
        unlearner.step(forget, keep, generator=torch.Generator().manual_seed(0))
    assert_unchanged(denoiser.model, before)
    assert all(p.grad is None for p in denoiser.model.parameters())


@pytest.mark.parametrize("method, term", [("naive_deletion", "combined keep \\+ forget"), ("siss", "forget")])
def test_non_finite_gradient_stops_before_any_weight_changes(method, term):
    denoiser, forget, keep = batches("unconditional")
    optimizer = torch.optim.AdamW(trainable(denoiser.model), lr=1e-3)
    unlearner = Unlearner(get_objective(method, scaling_norm=1.0) if method == "siss" else get_objective(method),
                          denoiser, optimizer)
    unlearner.step(forget, keep, generator=torch.Generator().manual_seed(0))  # one healthy step first
    before = snapshot(denoiser.model)
    param = denoiser.model.conv_in.weight
    handle = param.register_hook(lambda grad: grad * float("inf"))
    with pytest.raises(NonFiniteError, match=rf"gradient of the {term}.* at step 2"):
        unlearner.step(forget, keep, generator=torch.Generator().manual_seed(1))
    handle.remove()
    assert_unchanged(denoiser.model, before)
    assert unlearner.optimizer_steps == 1


def test_clipping_sees_every_parameter():
    denoiser, forget, keep = batches("unconditional")
    optimizer = torch.optim.SGD(trainable(denoiser.model), lr=0.0)
    unlearner = Unlearner(get_objective("naive_deletion"), denoiser, optimizer, max_grad_norm=1e-3)
    out = unlearner.step(forget, keep, generator=torch.Generator().manual_seed(0))
    assert out.logs["grad_norm"] > 1e-3  # the pre-clip norm is reported


@pytest.mark.parametrize("method", ["siss", "erasediff", "naive_deletion"])
def test_gradient_accumulation_averages_micro_batch_updates(method, fresh_accelerate_state):
    """Two accumulated micro-batches move the weights by -lr * mean of their combined gradients."""
    kwargs = {"siss": {"scaling_norm": 0.5}, "erasediff": {"eta": 10.0}}.get(method, {})
    denoiser, forget, keep = batches("unconditional", batch_size=4)
    halves = [(DenoisingBatch(forget.x0[i::2]), DenoisingBatch(keep.x0[i::2])) for i in range(2)]

    # Expected: the combined gradient of each micro-batch, computed without accelerate.
    reference_model = batches("unconditional", batch_size=4)[0]
    expected = [torch.zeros_like(p) for p in trainable(reference_model.model)]
    for i, (f, k) in enumerate(halves):
        objective = get_objective(method, **kwargs)
        reference_model.model.zero_grad(set_to_none=True)
        terms = objective(reference_model, f, k, generator=torch.Generator().manual_seed(i))
        objective.make_combiner().backward(terms, trainable(reference_model.model))
        for e, p in zip(expected, trainable(reference_model.model)):
            e.add_(p.grad / 2)

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = accelerator.prepare(denoiser.model)
    denoiser.model = model
    optimizer = accelerator.prepare(torch.optim.SGD(trainable(model), lr=1.0))
    before = snapshot(model)
    unlearner = Unlearner(get_objective(method, **kwargs), denoiser, optimizer, accelerator, max_grad_norm=None)
    stepped = []
    for i, (f, k) in enumerate(halves):
        stepped.append(unlearner.step(f, k, generator=torch.Generator().manual_seed(i)).optimizer_stepped)
    assert stepped == [False, True]
    for p, b, e in zip(trainable(model), before, expected):
        torch.testing.assert_close(b - p.detach(), e, rtol=1e-4, atol=1e-7)


def test_bf16_mixed_precision_step(fresh_accelerate_state):
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    denoiser, forget, keep = batches("unconditional")
    denoiser.model = accelerator.prepare(denoiser.model)
    optimizer = accelerator.prepare(torch.optim.AdamW(trainable(denoiser.model), lr=1e-3))
    before = snapshot(denoiser.model)
    unlearner = Unlearner(get_objective("siss"), denoiser, optimizer, accelerator)
    logs = unlearner.step(forget, keep, generator=torch.Generator().manual_seed(0)).logs
    assert all(torch.isfinite(torch.tensor(v)) for v in logs.values())
    assert any(not torch.equal(p, b) for p, b in zip(denoiser.model.parameters(), before))


def test_unlearner_state_round_trip():
    denoiser, forget, keep = batches("unconditional")
    optimizer = torch.optim.AdamW(trainable(denoiser.model), lr=1e-3)
    unlearner = Unlearner(get_objective("siss"), denoiser, optimizer)
    unlearner.step(forget, keep, generator=torch.Generator().manual_seed(0))
    state = unlearner.state_dict()
    assert state["optimizer_steps"] == 1 and state["combiner"]["scaling_norm"] > 0
    other = Unlearner(get_objective("siss"), denoiser, optimizer)
    other.load_state_dict(state)
    assert other.combiner.scaling_norm == unlearner.combiner.scaling_norm
    assert other.optimizer_steps == 1


def test_cycle_repeats_and_rejects_empty():
    it = cycle([1, 2])
    assert [next(it) for _ in range(5)] == [1, 2, 1, 2, 1]
    with pytest.raises(ValueError, match="empty"):
        next(cycle([]))


def test_two_processes_match_one_process(tmp_path):
    """Under torchrun with 2 CPU processes, one step equals the single-process step on the
    union of the two ranks' batches (the forget-gradient norm is that of the all-reduced g_a)."""
    script = Path(__file__).with_name("ddp_step_script.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parent))
    result = tmp_path / "result.json"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", "29517", str(script), str(result),
    ]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(result.read_text())
    for combiner, max_error in report["max_abs_error"].items():
        assert max_error < 1e-5, (combiner, report)
    assert report["world_size"] == 2


def test_non_finite_loss_on_one_process_stops_every_process(tmp_path):
    """A NaN on rank 1 only: both ranks raise NonFiniteError (before the fix rank 0 waited in the all-reduce)."""
    script = Path(__file__).with_name("ddp_step_script.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parent))
    result = tmp_path / "nan.json"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", "29518", str(script), str(result), "nan",
    ]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-3000:]
    rank0 = json.loads(Path(f"{result}.rank0").read_text())
    rank1 = json.loads(Path(f"{result}.rank1").read_text())
    for combiner in ("sum", "fixed_norm"):
        assert "on another process" in rank0[combiner]
        assert "Non-finite forget loss" in rank1[combiner]
