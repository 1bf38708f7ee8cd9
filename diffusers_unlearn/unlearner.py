"""One unlearning optimizer step, shared by both training scripts.

The step works with or without `accelerate`. Under accelerate it honours gradient
accumulation (`accelerator.accumulate`), mixed precision (autocast and the fp16 loss
scaler) and several processes: DDP (combiners average their extra gradients by hand) and FSDP2
(accelerate's `fsdp_version: 2`; norms, inner products and clipping over the whole sharded gradient).

Safety: every loss term is checked before any backward pass, and the gradient norm before
the optimizer steps. A non-finite value raises `NonFiniteError` naming the step and the
term, with the gradients cleared and the weights exactly as they were before the step.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping, Optional

import torch

from .gradients import NonFiniteError, combined_gradient_norm, is_sharded
from .objectives.base import DenoisingBatch, Denoiser, UnlearningObjective


@dataclass
class StepOutput:
    """What one call to `Unlearner.step` reports."""

    logs: dict[str, float] = field(default_factory=dict)
    #: True when this micro-batch ended an optimizer step (always True without accumulation).
    optimizer_stepped: bool = True


class Unlearner:
    """Runs an objective, its gradient combiner and the optimizer, one batch at a time.

    Args:
        objective: from `get_objective(...)`.
        denoiser: the model (already `accelerator.prepare`d, if using accelerate) and its schedule.
        optimizer: over the trainable parameters.
        accelerator: an `accelerate.Accelerator`, or None for a plain PyTorch loop.
        lr_scheduler: stepped after every optimizer step.
        max_grad_norm: clip the total gradient norm to this value (None or 0 disables clipping).

    Example:
        >>> unlearner = Unlearner(get_objective("siss"), denoiser, optimizer)
        >>> for step in range(100):
        ...     out = unlearner.step(forget_batch, keep_batch, generator=g)
        ...     print(out.logs["term_keep"], out.logs["term_forget"])
    """

    def __init__(
        self,
        objective: UnlearningObjective,
        denoiser: Denoiser,
        optimizer: torch.optim.Optimizer,
        accelerator=None,
        lr_scheduler=None,
        max_grad_norm: Optional[float] = 1.0,
    ):
        if max_grad_norm is not None and max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be >= 0, got {max_grad_norm}.")
        self.objective = objective
        self.denoiser = denoiser
        self.optimizer = optimizer
        self.accelerator = accelerator
        self.lr_scheduler = lr_scheduler
        self.max_grad_norm = max_grad_norm
        self.combiner = objective.make_combiner()
        check_distributed_setup(accelerator, self.combiner)
        self.optimizer_steps = 0
        # A list, not a generator: clipping must see every parameter (a consumed `filter`
        # iterator would silently clip nothing).
        self.parameters = [p for group in optimizer.param_groups for p in group["params"]]

    # Checkpointing: `checkpoints.Checkpointer` stores this (JSON-able values only, no pickle).
    def state_dict(self) -> dict:
        state = {"optimizer_steps": self.optimizer_steps}
        if hasattr(self.combiner, "state_dict"):
            state["combiner"] = self.combiner.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.optimizer_steps = int(state["optimizer_steps"])
        if "combiner" in state and hasattr(self.combiner, "load_state_dict"):
            self.combiner.load_state_dict(state["combiner"])

    def _accumulate(self):
        if self.accelerator is None:
            return contextlib.nullcontext()
        return self.accelerator.accumulate(self.denoiser.model)

    def _syncs_now(self) -> bool:
        return True if self.accelerator is None else bool(self.accelerator.sync_gradients)

    def step(
        self,
        forget_batch: Optional[DenoisingBatch],
        keep_batch: Optional[DenoisingBatch],
        generator: Optional[torch.Generator] = None,
    ) -> StepOutput:
        """One micro-batch: losses, gradients, and (when accumulation completes) an optimizer step."""
        step_number = self.optimizer_steps + 1
        with self._accumulate():
            terms = self.objective(self.denoiser, forget_batch, keep_batch, generator=generator)
            try:
                logs = self.combiner.backward(terms, self.parameters, self.accelerator, step=step_number)
            except NonFiniteError:
                self.optimizer.zero_grad(set_to_none=True)
                raise
            logs = dict(logs)
            for name in ("keep", "forget"):
                value = getattr(terms, name)
                if value is not None:
                    logs[f"term_{name}"] = float(value.detach())
            for key, value in terms.logs.items():
                logs[key] = float(value.detach()) if torch.is_tensor(value) else float(value)

            stepped = self._syncs_now()
            if stepped:
                logs["grad_norm"] = self._clip_and_check(step_number)
                self.optimizer.step()
                if self.lr_scheduler is not None:
                    self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.optimizer_steps += 1
                logs["lr"] = float(self.optimizer.param_groups[0]["lr"])
        return StepOutput(logs=logs, optimizer_stepped=stepped)

    def _clip_and_check(self, step_number: int) -> float:
        scaler = getattr(self.accelerator, "scaler", None)
        if self.max_grad_norm:
            if self.accelerator is not None:
                # Under FSDP accelerate takes the norm of the whole sharded gradient (DTensor-aware).
                norm = self.accelerator.clip_grad_norm_(self.parameters, self.max_grad_norm)
            elif is_sharded(self.parameters):  # fully_shard without accelerate
                norm = combined_gradient_norm(self.parameters)
                if torch.isfinite(norm) and float(norm) > self.max_grad_norm:
                    with torch.no_grad():
                        for p in self.parameters:
                            if p.grad is not None:
                                p.grad.mul_(self.max_grad_norm / (float(norm) + 1e-6))
            else:
                norm = torch.nn.utils.clip_grad_norm_(self.parameters, self.max_grad_norm)
        else:
            if scaler is not None:
                self.accelerator.unscale_gradients()
            norm = combined_gradient_norm(self.parameters)
        if norm is None:  # accelerate under DeepSpeed, before the engine has measured a norm: nothing to check here
            return float("nan")
        norm = float(norm.full_tensor() if is_sharded([norm]) else norm)
        # Under fp16 the loss scaler skips steps with overflowing gradients by design.
        if not torch.isfinite(torch.tensor(norm)) and scaler is None:
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteError(
                f"Non-finite gradient of the combined keep + forget update at step {step_number}. "
                "No weights were changed. Lower the learning rate or the method's forget weight."
            )
        return norm


def check_distributed_setup(accelerator, combiner=None) -> None:
    """Raise a one-line error, naming the fix, for a distributed set-up the combiners cannot serve.

    FSDP version 1 (flat parameters) is refused; FSDP2 is supported. DeepSpeed is not tested here (not installable
    on the test machine); by construction ZeRO-3 cannot work (its partitioned parameters give `torch.autograd.grad`
    nothing to measure), and neither can `BOMECombiner` (it adds to `.grad` after the backward pass, in which
    accelerate's DeepSpeed engine has already reduced the gradients and stepped).
    """
    if accelerator is None:
        return
    from accelerate.utils import DistributedType

    kind = getattr(accelerator, "distributed_type", None)
    if kind == DistributedType.FSDP and not getattr(accelerator, "is_fsdp2", False):
        raise ValueError(
            "diffusers-unlearn supports FSDP version 2 only: set `fsdp_version: 2` under `fsdp_config` in your "
            "accelerate config (see examples/accelerate_fsdp.yaml)."
        )
    if kind == DistributedType.DEEPSPEED:
        plugin = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None)
        if getattr(plugin, "zero_stage", None) == 3:
            raise ValueError(
                "DeepSpeed ZeRO-3 partitions the parameters, so the unlearning combiners cannot measure gradients: "
                "shard a full fine-tune with FSDP2 instead (examples/accelerate_fsdp.yaml)."
            )
        if getattr(combiner, "name", None) == "bome":
            raise ValueError(
                "EraseDiff's BOME combiner cannot run under DeepSpeed (the engine steps inside backward): launch with "
                "FSDP2 (examples/accelerate_fsdp.yaml) or DDP (examples/accelerate_ddp.yaml)."
            )


def cycle(batches: Iterable) -> Iterator:
    """Loop over a finite iterable forever (a DataLoader is re-iterated, reshuffling each pass)."""
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise ValueError("Cannot cycle over an empty set of batches.")


def step_generator(seed: int, step: int, micro_step: int = 0, process_index: int = 0, device="cpu") -> torch.Generator:
    """A generator determined by (seed, optimizer step, micro-batch, process).

    Drawing every batch and every noise tensor from it makes a resumed run draw exactly what
    an uninterrupted run would have, without saving RNG states.
    """
    value = ((seed * 1_000_003 + step) * 1_009 + micro_step) * 1_013 + process_index
    return torch.Generator(device).manual_seed(value % (2**63 - 1))


@dataclass
class BatchPool:
    """Tensors of one set (forget or keep) kept in memory, sampled uniformly with replacement.

    `x0` are images or cached latents; `class_labels` / `encoder_hidden_states` (cached prompt
    embeddings) are optional and indexed alongside, as is `added_cond`, a family's extra per-item
    conditioning by name (SDXL: pooled `text_embeds` and `time_ids`). When the text encoder trains,
    embeddings cannot be cached: give the token ids as `input_ids` and the function that encodes them
    (with gradients) as `encode`, and each sampled batch gets fresh `encoder_hidden_states`. `encode` may
    also return a conditioning dict (a family's `encode_tokens`); its entries then override those of
    `added_cond` for the batch.

    Example:
        >>> pool = BatchPool(torch.zeros(10, 4, 8, 8), encoder_hidden_states=torch.zeros(10, 77, 64),
        ...                  added_cond={"text_embeds": torch.zeros(10, 32), "time_ids": torch.zeros(10, 6)})
        >>> sorted(pool.sample(3, torch.Generator().manual_seed(0)).added_cond)
        ['text_embeds', 'time_ids']
    """

    x0: torch.Tensor
    class_labels: Optional[torch.Tensor] = None
    encoder_hidden_states: Optional[torch.Tensor] = None
    input_ids: Optional[torch.Tensor] = None
    encode: Optional[Callable[[torch.Tensor], torch.Tensor | Mapping[str, torch.Tensor]]] = None
    added_cond: Optional[dict[str, torch.Tensor]] = None

    def __post_init__(self) -> None:
        if len(self.x0) == 0:
            raise ValueError("A batch pool needs at least one item.")
        if (self.input_ids is None) != (self.encode is None):
            raise ValueError("Give input_ids and encode together.")
        if self.input_ids is not None and self.encoder_hidden_states is not None:
            raise ValueError("Give cached encoder_hidden_states or input_ids with encode, not both.")
        for key, value in (self.added_cond or {}).items():
            if len(value) != len(self.x0):
                raise ValueError(f"added_cond[{key!r}] has {len(value)} rows for {len(self.x0)} items.")

    def __len__(self) -> int:
        return int(self.x0.shape[0])

    def sample(self, batch_size: int, generator: torch.Generator, device=None) -> DenoisingBatch:
        index = torch.randint(0, len(self), (batch_size,), generator=generator)

        def pick(tensor):
            return None if tensor is None else tensor[index].to(device or tensor.device)

        hidden = pick(self.encoder_hidden_states)
        added = {key: pick(value) for key, value in self.added_cond.items()} if self.added_cond else {}
        if self.input_ids is not None:
            encoded = self.encode(pick(self.input_ids))
            if isinstance(encoded, Mapping):
                encoded = dict(encoded)
                hidden = encoded.pop("encoder_hidden_states", None)
                added.update(encoded)
            else:
                hidden = encoded
        return DenoisingBatch(pick(self.x0), pick(self.class_labels), hidden, added or None)


TRAINABLE_WEIGHTS_NAME = "trainable_weights.safetensors"


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters of `model` by name, as whole tensors.

    Under FSDP2 (parameters are DTensor shards) every process must call this: the shards are gathered, and the
    whole tensors land on the CPU of the main process only (the others get an empty dict).
    """
    params = dict(model.named_parameters())
    trainable = {name for name, p in params.items() if p.requires_grad}
    if not is_sharded(list(params.values())):
        return {name: p for name, p in params.items() if name in trainable}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {name: tensor for name, tensor in full.items() if name in trainable}


def save_trainable_state(
    model: torch.nn.Module,
    directory: str,
    file_name: str = TRAINABLE_WEIGHTS_NAME,
    state: Optional[Mapping[str, torch.Tensor]] = None,
) -> str:
    """Write the trainable parameters (the LoRA factors, or every weight when fully fine-tuning)
    to one safetensors file, atomically. Used by checkpoints: the frozen base is not copied.

    `state` is `trainable_state_dict(model)` when already gathered (under FSDP every process gathers, then the
    main process writes)."""
    import os

    from .fileio import atomic_write_bytes, safetensors_bytes

    if state is None:
        state = trainable_state_dict(model)
    path = os.path.join(directory, file_name)
    atomic_write_bytes(path, safetensors_bytes(dict(state)))
    return path


def load_trainable_state(model: torch.nn.Module, directory: str, file_name: str = TRAINABLE_WEIGHTS_NAME) -> None:
    """Copy the weights written by `save_trainable_state` back into `model` (names must match).

    Under FSDP2 every process must call this: each reads the whole tensors and keeps its own shards."""
    import os

    from safetensors.torch import load_file

    path = os.path.join(directory, file_name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: is {directory} a checkpoint of this script?")
    state = load_file(path)
    params = dict(model.named_parameters())
    missing = sorted(set(p for p, v in params.items() if v.requires_grad) - set(state))
    unknown = sorted(set(state) - set(params))
    if missing or unknown:
        raise ValueError(
            f"Checkpoint {directory} does not match the model (missing {missing[:3]}, unexpected {unknown[:3]}). "
            "Resume with the same --train_mode, --rank and --lora_targets."
        )
    if is_sharded(list(params.values())):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
        return
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))
