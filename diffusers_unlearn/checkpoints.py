"""Training checkpoints that load without pickle and belong to one run.

A checkpoint is a folder `checkpoint-<step>` holding only safetensors and JSON files:

```
checkpoint.json                  manifest: format, step, run fingerprint, validation history, file list,
                                 and the non-tensor parts of every state below
trainable_weights[_i].safetensors  the trainable parameters of each trained model (LoRA factors or all weights)
pytorch_lora_weights.safetensors the adapter in diffusers' format (LoRA runs), for trying a checkpoint
optimizer.safetensors            optimizer state tensors
lr_scheduler / unlearner / ema / grad_scaler .safetensors   their tensors, if any
rng_state_<process>.safetensors  each process's Python, NumPy, torch (and CUDA) random states
```

Under FSDP2 the weights and the optimizer state are gathered from every process's shards and written whole, keyed
by parameter name (`torch.distributed.checkpoint.state_dict`, full state dicts on the main process's CPU), so a
checkpoint does not depend on the number of processes; on resume every process reads them and keeps its shards.

Nested states (an optimizer's `state_dict()`, say) are split into a JSON tree and a flat dict of tensors; the
JSON names each tensor by its key. Loading builds only dicts, lists, tuples, numbers, strings and tensors, so a
crafted checkpoint cannot run code. A folder holding any file the manifest does not list (an accelerate
`*.pkl`, a `*.bin`) is refused with an error naming the file.

The manifest also records the run's fingerprint (method, hyperparameters, data hashes, base model, LoRA set-up,
seed, batch size, ...). Resuming with a different fingerprint is refused with the differing fields named.

Writes go to `checkpoint-<step>.tmp` and are renamed into place when complete; older checkpoints beyond the
limit are removed only after that, so a kill at any moment leaves the newest complete checkpoint intact.

Example:
    >>> checkpointer = Checkpointer(accelerator, unlearner, [unet], optimizer, lr_scheduler,
    ...                             fingerprint=run_fingerprint(...))  # doctest: +SKIP
    >>> checkpointer.save("out", step=100, validation_history=[])  # doctest: +SKIP
    >>> step, history = checkpointer.load("out/checkpoint-100")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from .errors import UserInputError
from .gradients import is_sharded
from .unlearner import Unlearner, load_trainable_state, save_trainable_state, trainable_state_dict

logger = logging.getLogger(__name__)

FORMAT = "diffusers-unlearn-checkpoint/1"
MANIFEST_NAME = "checkpoint.json"
CHECKPOINT_PREFIX = "checkpoint-"
TMP_SUFFIX = ".tmp"


# ---------------------------------------------------------------------------------------------------------------
# Nested states as JSON + safetensors
# ---------------------------------------------------------------------------------------------------------------


def encode_tree(value: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """A JSON-ready copy of `value` in which every tensor is replaced by {"tensor": key} and stored in `tensors`.

    Dicts keep their key types (an optimizer's state is keyed by int), and tuples stay tuples.
    """
    if torch.is_tensor(value):
        key = path or "value"
        tensors[key] = value.detach().cpu().contiguous()
        return {"tensor": key}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {"dict": [[encode_tree(k, tensors, f"{path}.k{i}"), encode_tree(v, tensors, f"{path}.{i}")]
                         for i, (k, v) in enumerate(value.items())]}
    if isinstance(value, (list, tuple)):
        items = [encode_tree(v, tensors, f"{path}.{i}") for i, v in enumerate(value)]
        return {"tuple" if isinstance(value, tuple) else "list": items}
    raise TypeError(f"Cannot store a {type(value).__name__} at {path or 'the top level'} in a checkpoint.")


def decode_tree(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of `encode_tree`; builds nothing but plain containers, numbers, strings and tensors."""
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, dict) and len(node) == 1:
        (kind, body), = node.items()
        if kind == "tensor" and isinstance(body, str):
            if body not in tensors:
                raise ValueError(f"The checkpoint refers to a tensor {body!r} that its files do not hold.")
            return tensors[body]
        if kind in ("list", "tuple") and isinstance(body, list):
            items = [decode_tree(item, tensors) for item in body]
            return tuple(items) if kind == "tuple" else items
        if kind == "dict" and isinstance(body, list):
            return {decode_tree(k, tensors): decode_tree(v, tensors) for k, v in body}
    raise ValueError(f"Malformed entry in a checkpoint manifest: {str(node)[:80]}")


def _fsync_file(path: str) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def save_tree(directory: str, name: str, value: Any) -> Any:
    """Write the tensors of `value` to `<directory>/<name>.safetensors` (if any); return its JSON tree."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    tree = encode_tree(value, tensors)
    if tensors:
        path = os.path.join(directory, f"{name}.safetensors")
        save_file(tensors, path)
        _fsync_file(path)
    return tree


def load_tree(directory: str, name: str, tree: Any) -> Any:
    """Rebuild a value saved by `save_tree` from its JSON tree and `<directory>/<name>.safetensors`."""
    from safetensors.torch import load_file

    path = os.path.join(directory, f"{name}.safetensors")
    tensors = load_file(path) if os.path.isfile(path) else {}
    return decode_tree(tree, tensors)


# ---------------------------------------------------------------------------------------------------------------
# Random states
# ---------------------------------------------------------------------------------------------------------------


def get_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch and (if present) CUDA random states, in storable types."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


# ---------------------------------------------------------------------------------------------------------------
# Fingerprints
# ---------------------------------------------------------------------------------------------------------------


def run_fingerprint(**fields: Any) -> dict[str, Any]:
    """What produced a run, as plain JSON data (tuples become lists), for comparing a checkpoint with the
    run that wants to resume it. Long lists (item hashes) are kept whole so that a difference can be named.

    Example:
        >>> run_fingerprint(method="siss", seed=0, train_batch_size=(4))["method"]
        'siss'
    """
    return json.loads(json.dumps(fields, sort_keys=True, default=str))


def fingerprint_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable lines, one per field that differs between two fingerprints."""
    lines = []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if old != new:
            lines.append(f"{key}: checkpoint {_short(old)} vs this run {_short(new)}")
    return lines


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 120 else text[:117] + "..."


# ---------------------------------------------------------------------------------------------------------------
# Finding and checking checkpoint folders (cheap: no model needed)
# ---------------------------------------------------------------------------------------------------------------


def list_checkpoints(output_dir: str) -> list[str]:
    """Finished `checkpoint-<step>` folders in `output_dir`, oldest first (temporary `.tmp` folders excluded)."""
    if not os.path.isdir(output_dir):
        return []
    found = [
        d for d in os.listdir(output_dir)
        if d.startswith(CHECKPOINT_PREFIX) and d[len(CHECKPOINT_PREFIX):].isdigit()
        and os.path.isdir(os.path.join(output_dir, d))
    ]
    return sorted(found, key=lambda d: int(d[len(CHECKPOINT_PREFIX):]))


def remove_stale_temporaries(output_dir: str) -> list[str]:
    """Delete `checkpoint-*.tmp` folders left by a run that was killed while writing; returns their names."""
    if not os.path.isdir(output_dir):
        return []
    stale = [d for d in os.listdir(output_dir) if d.startswith(CHECKPOINT_PREFIX) and d.endswith(TMP_SUFFIX)]
    for name in stale:
        shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
        logger.info(f"Removed {name}, an unfinished checkpoint of an interrupted run.")
    return stale


def read_manifest(path: str) -> dict[str, Any]:
    """Check a checkpoint folder without loading any weights and return its manifest.

    Raises `UserInputError` when the folder is missing, holds a file its manifest does not list (any pickle
    file, for instance, which could run code when loaded), or was not written by diffusers-unlearn.
    """
    if not os.path.isdir(path):
        raise UserInputError(f"--resume_from_checkpoint {path}: no such folder. Pass a checkpoint-<step> folder or 'latest'.")
    entries = sorted(os.listdir(path))
    manifest_path = os.path.join(path, MANIFEST_NAME)
    for entry in entries:
        if entry != MANIFEST_NAME and not entry.endswith(".safetensors"):
            raise UserInputError(
                f"Refusing to load checkpoint {path}: it holds {entry}, which diffusers-unlearn did not write "
                "(its checkpoints hold only safetensors and JSON; pickle files can run code when loaded). "
                "Remove the file if you trust the folder, or start a new run."
            )
    if not os.path.isfile(manifest_path):
        raise UserInputError(f"{path} is not a diffusers-unlearn checkpoint: it has no {MANIFEST_NAME}.")
    try:
        with open(manifest_path, encoding="utf-8") as handle:
            manifest = json.load(handle)
    except (OSError, ValueError) as error:
        raise UserInputError(f"{manifest_path} cannot be read ({error}); the checkpoint is damaged.") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserInputError(f"{manifest_path} is not a {FORMAT} manifest.")
    listed = set(manifest.get("files", []))
    for entry in entries:
        if entry != MANIFEST_NAME and entry not in listed:
            raise UserInputError(f"Refusing to load checkpoint {path}: {entry} is not listed in its {MANIFEST_NAME}.")
    missing = sorted(listed - set(entries))
    if missing:
        raise UserInputError(f"Checkpoint {path} is incomplete: {', '.join(missing)} missing.")
    return manifest


def find_resume_checkpoint(
    output_dir: str,
    checkpoint: Optional[str],
    fingerprint: Optional[dict[str, Any]] = None,
    max_train_steps: Optional[int] = None,
) -> Optional[str]:
    """Resolve `--resume_from_checkpoint` (a folder, or "latest" in `output_dir`) and check it; None = start anew.

    Checks the folder's files (`read_manifest`), that it was made by a run with the same `fingerprint` (when
    given; the differing fields are named), and that its step is not beyond `max_train_steps`. Cheap: call it
    before loading models, and again with the fingerprint once the data is known.
    """
    if not checkpoint:
        return None
    if checkpoint == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            return None
        path = os.path.join(output_dir, found[-1])
    else:
        path = checkpoint
    manifest = read_manifest(path)
    if fingerprint is not None:
        differences = fingerprint_differences(manifest.get("fingerprint", {}), fingerprint)
        if differences:
            raise UserInputError(
                f"{path} belongs to another run; it differs in: " + "; ".join(differences)
                + ". Resume with the same settings, or use a new --output_dir."
            )
    if max_train_steps is not None and int(manifest["step"]) > max_train_steps:
        raise UserInputError(
            f"{path} is at step {manifest['step']}, beyond --max_train_steps {max_train_steps}. "
            "Raise --max_train_steps or resume an earlier checkpoint."
        )
    return path


# ---------------------------------------------------------------------------------------------------------------
# Saving and loading the training state
# ---------------------------------------------------------------------------------------------------------------


def trainable_weights_name(index: int) -> str:
    return "trainable_weights.safetensors" if index == 0 else f"trainable_weights_{index}.safetensors"


class Checkpointer:
    """Saves and restores everything a run needs to continue exactly where it stopped.

    Args:
        accelerator: the run's `accelerate.Accelerator` (only its process rank, barriers, `unwrap_model` and
            `scaler` are used; accelerate's own pickle-based `save_state` is not).
        unlearner: its step count and combiner state.
        models: the trained models (prepared or not); only their trainable parameters are stored.
        optimizer, lr_scheduler, ema: optional training state objects with `state_dict` / `load_state_dict`.
        fingerprint: `run_fingerprint(...)` of this run, stored in every checkpoint and checked on resume.
        save_adapter: called with the checkpoint folder (main process) to write the trained adapter there in
            diffusers' `load_lora_weights` format, so an intermediate checkpoint can be tried with plain diffusers
            (`pipe.load_lora_weights("out/checkpoint-200")`). Resuming does not read it.
    """

    def __init__(
        self,
        accelerator,
        unlearner: Unlearner,
        models: Sequence[torch.nn.Module],
        optimizer=None,
        lr_scheduler=None,
        ema=None,
        fingerprint: Optional[dict[str, Any]] = None,
        save_adapter: Optional[Callable[[str], Any]] = None,
    ):
        self.accelerator = accelerator
        self.save_adapter = save_adapter
        self.unlearner = unlearner
        self.models = list(models)
        self.fingerprint = fingerprint or {}
        self.states = {"optimizer": optimizer, "lr_scheduler": lr_scheduler, "unlearner": unlearner, "ema": ema}
        if ema is not None and self._sharded_model() is not None:
            raise ValueError("An EMA of FSDP-sharded weights is not supported: train without --use_ema under FSDP.")

    def _sharded_model(self) -> Optional[torch.nn.Module]:
        """The FSDP2-sharded model this run trains, or None (accelerate's FSDP2 prepares one model per run)."""
        for model in self.models:
            model = self.accelerator.unwrap_model(model)
            if is_sharded(list(model.parameters())):
                return model
        return None

    def _optimizer_state(self, sharded_model: Optional[torch.nn.Module]) -> Optional[dict]:
        """The optimizer's state; under FSDP2 gathered whole and keyed by parameter name (every process must call
        this; the main process gets the tensors)."""
        optimizer = self.states["optimizer"]
        if optimizer is None:
            return None
        if sharded_model is None:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(sharded_model, getattr(optimizer, "optimizer", optimizer), options=options)

    def _load_optimizer_state(self, state: dict, sharded_model: Optional[torch.nn.Module]) -> None:
        optimizer = self.states["optimizer"]
        if sharded_model is None:
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(sharded_model, getattr(optimizer, "optimizer", optimizer), state,
                                 options=StateDictOptions(full_state_dict=True))

    def _stateful(self) -> dict[str, Any]:
        states = {name: obj for name, obj in self.states.items() if obj is not None}
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None:
            states["grad_scaler"] = scaler
        return states

    def save(
        self, output_dir: str, step: int, validation_history: Sequence[dict] = (), total_limit: Optional[int] = None
    ) -> str:
        """Write `checkpoint-<step>` atomically (every process calls this); then prune to `total_limit`."""
        accelerator = self.accelerator
        final = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{step}")
        tmp = final + TMP_SUFFIX
        if accelerator.is_main_process:
            remove_stale_temporaries(output_dir)  # this run's own, or a killed run's
            os.makedirs(tmp)
        accelerator.wait_for_everyone()
        rng_name = f"rng_state_{accelerator.process_index}"
        rng_tree = save_tree(tmp, rng_name, get_rng_state())
        with open(os.path.join(tmp, f"{rng_name}.json.part"), "w", encoding="utf-8") as handle:
            json.dump(rng_tree, handle)  # gathered into the manifest by the main process below
        # Every process: under FSDP the weights and optimizer state are gathered from all shards.
        sharded_model = self._sharded_model()
        weights = [trainable_state_dict(accelerator.unwrap_model(model)) for model in self.models]
        optimizer_state = self._optimizer_state(sharded_model)
        if accelerator.is_main_process:
            for index, (model, state) in enumerate(zip(self.models, weights)):
                save_trainable_state(accelerator.unwrap_model(model), tmp, trainable_weights_name(index), state=state)
            trees = {
                name: save_tree(tmp, name, optimizer_state if name == "optimizer" else obj.state_dict())
                for name, obj in self._stateful().items()
            }
            if self.save_adapter is not None:
                self.save_adapter(tmp)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            rng_trees = {}
            for part in sorted(p for p in os.listdir(tmp) if p.endswith(".json.part")):
                with open(os.path.join(tmp, part), encoding="utf-8") as handle:
                    rng_trees[part[: -len(".json.part")]] = json.load(handle)
                os.remove(os.path.join(tmp, part))
            manifest = {
                "format": FORMAT,
                "step": int(step),
                "fingerprint": self.fingerprint,
                "validation_history": list(validation_history),
                "num_models": len(self.models),
                "states": trees,
                "rng_states": rng_trees,
                "files": sorted(os.listdir(tmp)),
            }
            manifest_path = os.path.join(tmp, MANIFEST_NAME)
            with open(manifest_path, "w", encoding="utf-8") as handle:
                json.dump(manifest, handle, indent=1, sort_keys=True)
                handle.flush()
                os.fsync(handle.fileno())
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
            logger.info(f"Saved {final}")
            # Only now that the new checkpoint is complete may older ones go.
            if total_limit is not None:
                older = [d for d in list_checkpoints(output_dir) if d != os.path.basename(final)]
                while older and len(older) + 1 > total_limit:
                    shutil.rmtree(os.path.join(output_dir, older.pop(0)))
        accelerator.wait_for_everyone()
        return final

    def load(self, path: str) -> tuple[int, list[dict]]:
        """Restore the state saved in `path`; returns (step, validation history). Loads no pickle."""
        manifest = read_manifest(path)
        differences = fingerprint_differences(manifest.get("fingerprint", {}), self.fingerprint)
        if differences:
            raise UserInputError(f"{path} belongs to another run; it differs in: " + "; ".join(differences) + ".")
        if manifest.get("num_models") != len(self.models):
            raise UserInputError(f"{path} holds {manifest.get('num_models')} trained models; this run trains {len(self.models)}.")
        for index, model in enumerate(self.models):
            load_trainable_state(self.accelerator.unwrap_model(model), path, trainable_weights_name(index))
        saved_states = manifest.get("states", {})
        sharded_model = self._sharded_model()
        for name, obj in self._stateful().items():
            if name not in saved_states:
                raise UserInputError(f"{path} holds no {name} state, which this run needs.")
            if name == "optimizer":
                self._load_optimizer_state(load_tree(path, name, saved_states[name]), sharded_model)
            else:
                obj.load_state_dict(load_tree(path, name, saved_states[name]))
            if name == "ema":  # loaded on the CPU; the EMA update needs its shadow weights beside the model's
                obj.to(self.accelerator.device)
        rng_name = f"rng_state_{self.accelerator.process_index}"
        if rng_name in manifest.get("rng_states", {}):
            set_rng_state(load_tree(path, rng_name, manifest["rng_states"][rng_name]))
        else:
            logger.warning(f"{path} has no random state for process {self.accelerator.process_index}; batches and "
                           "noise are still exact (they come from per-step generators).")
        step = int(manifest["step"])
        if self.unlearner.optimizer_steps != step:
            raise ValueError(f"{path}: the unlearner state says step {self.unlearner.optimizer_steps}, the manifest {step}.")
        logger.info(f"Resumed from {path} at step {step}.")
        return step, list(manifest.get("validation_history", []))


__all__ = [
    "Checkpointer",
    "decode_tree",
    "encode_tree",
    "find_resume_checkpoint",
    "fingerprint_differences",
    "list_checkpoints",
    "load_tree",
    "read_manifest",
    "remove_stale_temporaries",
    "run_fingerprint",
    "save_tree",
]
