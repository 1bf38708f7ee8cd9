"""Run by test_unlearner.py under torchrun: compares a 2-process step with a 1-process step, or (with the
argument `nan`) checks that a non-finite loss on one rank stops every rank instead of hanging the others."""

import json
import sys

import torch
from accelerate import Accelerator

from diffusers_unlearn.objectives import DenoisingBatch, LossTerms, UnlearningObjective
from diffusers_unlearn.gradients import BOMECombiner, FixedNormCombiner, NonFiniteError, SumCombiner
from diffusers_unlearn.unlearner import Unlearner

from tiny_models import batches, trainable


class Deterministic(UnlearningObjective):
    """No randomness, so each rank's losses are reproducible in one process."""

    name = "deterministic"

    def __init__(self, combiner):
        super().__init__()
        self._combiner = combiner

    def make_combiner(self):
        return self._combiner

    def __call__(self, denoiser, forget_batch, keep_batch, generator=None):
        # Per-item timesteps and noise derived from the item itself, so batching does not matter.
        t = (keep_batch.x0.flatten(1).sum(1).abs() * 1000).long() % 1000
        noise = torch.sin(7 * keep_batch.x0)
        keep = (denoiser(denoiser.schedule.add_noise(keep_batch.x0, noise, t), t, keep_batch) - noise)
        forget = (denoiser(denoiser.schedule.add_noise(forget_batch.x0, noise, t), t, forget_batch) - noise)
        return LossTerms(keep=keep.pow(2).mean(), forget=-forget.pow(2).mean())


def run(accelerator, combiner, forget, keep):
    denoiser = batches("unconditional", batch_size=4)[0]  # same seed -> same initial weights
    if accelerator is not None:
        denoiser.model = accelerator.prepare(denoiser.model)
        optimizer = accelerator.prepare(torch.optim.SGD(trainable(denoiser.model), lr=1.0))
    else:
        optimizer = torch.optim.SGD(trainable(denoiser.model), lr=1.0)
    before = [p.detach().clone() for p in trainable(denoiser.model)]
    Unlearner(Deterministic(combiner), denoiser, optimizer, accelerator, max_grad_norm=None).step(forget, keep)
    return [b - p.detach() for b, p in zip(before, trainable(denoiser.model))]


def main(result_path):
    accelerator = Accelerator(cpu=True)
    _, forget, keep = batches("unconditional", batch_size=4)
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = (DenoisingBatch(forget.x0[rank::world]), DenoisingBatch(keep.x0[rank::world]))
    # Single-process reference on the union, ordered like the ranks' halves.
    order = torch.cat([torch.arange(r, 4, world) for r in range(world)])
    union = (DenoisingBatch(forget.x0[order]), DenoisingBatch(keep.x0[order]))
    errors = {}
    for name, make in (
        ("sum", SumCombiner),
        ("fixed_norm", lambda: FixedNormCombiner(scaling_norm=0.3)),
        ("bome", lambda: BOMECombiner(eta=10.0)),
    ):
        distributed = run(accelerator, make(), *mine)
        single = run(None, make(), *union)
        errors[name] = max(float((d - s).abs().max()) for d, s in zip(distributed, single))
    if accelerator.is_main_process:
        with open(result_path, "w") as f:
            json.dump({"world_size": world, "max_abs_error": errors}, f)
    accelerator.wait_for_everyone()


def main_nan(result_path):
    """Rank 1's forget batch holds a NaN; every rank must raise NonFiniteError at the same step."""
    accelerator = Accelerator(cpu=True)
    _, forget, keep = batches("unconditional", batch_size=4)
    rank, world = accelerator.process_index, accelerator.num_processes
    forget_x0 = forget.x0[rank::world].clone()
    if rank == 1:
        forget_x0[0, 0, 0, 0] = float("nan")
    messages = {}
    for name, make in (("sum", SumCombiner), ("fixed_norm", lambda: FixedNormCombiner(scaling_norm=0.3))):
        try:
            run(accelerator, make(), DenoisingBatch(forget_x0), DenoisingBatch(keep.x0[rank::world]))
            messages[name] = None
        except NonFiniteError as error:
            messages[name] = str(error)
    with open(f"{result_path}.rank{rank}", "w") as f:
        json.dump(messages, f)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[2] == "nan":
        main_nan(sys.argv[1])
    else:
        main(sys.argv[1])
