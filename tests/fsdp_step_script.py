"""Run by test_fsdp.py under torchrun (2 CPU processes, gloo): FSDP2-sharded unlearning steps against the
single-process steps on the union of the ranks' batches, and a checkpoint saved and resumed under FSDP.

accelerate never turns FSDP on for CPU processes (it reserves FSDP for accelerator devices), so
`fsdp_accelerator` builds a CPU Accelerator and switches its state to FSDP version 2 before `prepare`; from
there on accelerate's own FSDP2 code runs (`fully_shard`, backward, `clip_grad_norm_`), as on GPUs.
"""

import json
import os
import sys
import tempfile

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

from diffusers_unlearn import gradients
from diffusers_unlearn.checkpoints import Checkpointer
from diffusers_unlearn.gradients import BOMECombiner, FixedNormCombiner, SumCombiner
from diffusers_unlearn.objectives import DenoisingBatch
from diffusers_unlearn.unlearner import Unlearner, trainable_state_dict

from ddp_step_script import Deterministic
from tiny_models import batches

STEPS = 2
MAX_GRAD_NORM = 0.05  # small enough that clipping acts, so the clipping norm must be the whole-model norm


def fsdp_accelerator() -> Accelerator:
    """A CPU Accelerator whose state says FSDP version 2, sharding each ResnetBlock2D and Attention block."""
    return switch_to_fsdp2(Accelerator(cpu=True))


def switch_to_fsdp2(accelerator: Accelerator) -> Accelerator:
    """Switch a CPU Accelerator of several processes (gloo) to FSDP version 2 before anything is prepared."""
    # Both shared states: each new AcceleratorState() copies PartialState's distributed_type over its own.
    PartialState().distributed_type = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    if os.environ.get("FSDP_VERSION"):  # set from an accelerate config file, as `accelerate launch` sets them
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()
    else:
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=["ResnetBlock2D", "Attention"],
        )
    return accelerator


def make(accelerator, combiner, optimizer_class=torch.optim.SGD, lr=1.0):
    denoiser = batches("unconditional", batch_size=4)[0]  # same seed -> same initial weights
    optimizer = optimizer_class(list(denoiser.model.parameters()), lr=lr)
    if accelerator is not None:
        # One model per accelerator, as in the scripts (accelerate's FSDP2 clip_grad_norm_ compares the
        # parameters with those of every model it prepared).
        accelerator.free_memory()
        denoiser.model, optimizer = accelerator.prepare(denoiser.model, optimizer)
    unlearner = Unlearner(Deterministic(combiner), denoiser, optimizer, accelerator, max_grad_norm=MAX_GRAD_NORM)
    return denoiser, optimizer, unlearner


SHARD_NORMS: list[tuple[float, float]] = []


def recording_norm(tensors):
    """`gradients._norm`, also recording (this process's shard norm, the whole norm) for sharded gradients."""
    whole = ORIGINAL_NORM(tensors)
    if gradients.is_sharded(tensors):
        local = torch.linalg.vector_norm(torch.stack([t.to_local().float().norm() for t in tensors]))
        SHARD_NORMS.append((float(local), float(whole)))
    return whole


ORIGINAL_NORM = gradients._norm


def main(result_path):
    gradients._norm = recording_norm
    accelerator = fsdp_accelerator()
    _, forget, keep = batches("unconditional", batch_size=4)
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = (DenoisingBatch(forget.x0[rank::world]), DenoisingBatch(keep.x0[rank::world]))
    order = torch.cat([torch.arange(r, 4, world) for r in range(world)])
    union = (DenoisingBatch(forget.x0[order]), DenoisingBatch(keep.x0[order]))
    report = {"world_size": world, "max_abs_error": {}, "logs": {}}

    for name, combiner in (
        ("sum", SumCombiner),
        ("fixed_norm", lambda: FixedNormCombiner(scaling_norm=0.3)),
        ("fixed_norm_calibrated", FixedNormCombiner),
        ("bome", lambda: BOMECombiner(eta=10.0)),
    ):
        denoiser, _, unlearner = make(accelerator, combiner())
        sharded_logs = [unlearner.step(*mine).logs for _ in range(STEPS)]
        weights = trainable_state_dict(denoiser.model)  # every process gathers; the main process gets them
        report["sharded_parameter_type"] = type(next(denoiser.model.parameters())).__name__
        reference, _, single = make(None, combiner())
        single_logs = [single.step(*union).logs for _ in range(STEPS)]
        if accelerator.is_main_process:
            expected = dict(reference.model.named_parameters())
            assert set(weights) == set(expected), (len(weights), list(weights)[:3], sorted(set(weights) ^ set(expected))[:3])
            report["max_abs_error"][name] = max(float((weights[k] - expected[k]).abs().max()) for k in expected)
            report.setdefault("moved", {})[name] = max(float((weights[k] - p0).abs().max()) for k, p0 in
                                  batches("unconditional", batch_size=4)[0].model.named_parameters())
            keys = ("grad_norm", "forget_grad_norm", "keep_dot_forget", "bome_weight", "calibrated_scaling_norm")
            report["logs"][name] = [
                {k: (s[k], d[k]) for k in keys if k in s} for s, d in zip(single_logs, sharded_logs)
            ]

    # Parameters collected after the forward pass include FSDP's unsharded copies of the root's: refused, not zero.
    denoiser = make(accelerator, SumCombiner())[0]
    terms = Deterministic(SumCombiner())(denoiser, *mine)
    try:
        FixedNormCombiner(scaling_norm=0.3).backward(terms, list(denoiser.model.parameters()), accelerator)
        report["unsharded_copies"] = None
    except ValueError as error:
        report["unsharded_copies"] = str(error)
        accelerator.backward(terms.keep + terms.forget)  # FSDP expects each forward's backward

    # The norms FixedNormCombiner took: whole ones, where each process's shard alone has another norm.
    report["shard_norms"] = accelerator.gather(torch.tensor([SHARD_NORMS[0][0]])).tolist()
    report["whole_norm"] = SHARD_NORMS[0][1]

    # A checkpoint under FSDP: whole tensors on disk, and resuming gives the uninterrupted run's next step.
    directory = broadcast_directory(accelerator)
    denoiser, optimizer, unlearner = make(accelerator, FixedNormCombiner(scaling_norm=0.3), torch.optim.AdamW, 1e-2)
    checkpointer = Checkpointer(accelerator, unlearner, [denoiser.model], optimizer)
    unlearner.step(*mine)
    path = checkpointer.save(directory, step=1)
    unlearner.step(*mine)
    uninterrupted = trainable_state_dict(denoiser.model)

    resumed_denoiser, resumed_optimizer, resumed = make(accelerator, FixedNormCombiner(), torch.optim.AdamW, 1e-2)
    step, _ = Checkpointer(accelerator, resumed, [resumed_denoiser.model], resumed_optimizer).load(path)
    resumed.step(*mine)
    after_resume = trainable_state_dict(resumed_denoiser.model)
    if accelerator.is_main_process:
        from safetensors.torch import load_file

        saved = load_file(f"{path}/trainable_weights.safetensors")
        full_shapes = {k: list(p.shape) for k, p in batches("unconditional", batch_size=4)[0].model.named_parameters()}
        report["checkpoint"] = {
            "step": step,
            "whole_tensors": all(list(saved[k].shape) == shape for k, shape in full_shapes.items()),
            "resume_error": max(float((after_resume[k] - uninterrupted[k]).abs().max()) for k in uninterrupted),
            "moved_by_second_step": max(float((uninterrupted[k] - saved[k]).abs().max()) for k in saved),
        }
        with open(result_path, "w") as f:
            json.dump(report, f)
    accelerator.wait_for_everyone()


def broadcast_directory(accelerator) -> str:
    """One temporary folder, made by the main process and shared with the others."""
    from accelerate.utils import broadcast_object_list

    names = [tempfile.mkdtemp() if accelerator.is_main_process else None]
    return broadcast_object_list(names)[0]


if __name__ == "__main__":
    main(sys.argv[1])
