"""Gradient combiners: turn an objective's keep and forget terms into gradients in `.grad`.

Three combiners cover every method in the package:

* `SumCombiner`:        g = grad(keep) + grad(forget)
* `FixedNormCombiner`:  g = grad(keep) + c * grad(forget) / ||grad(forget)||   (SISS, reference form)
* `BOMECombiner`:       g = grad(keep) + lam * grad(forget),
                        lam = max(eta - <grad(keep), grad(forget)> / ||grad(forget)||^2, 0)   (EraseDiff)

A combiner runs under a plain PyTorch loop or under `accelerate`: the final backward goes
through `accelerator.backward`, so loss scaling, gradient accumulation and DDP all apply.
Gradients measured with `torch.autograd.grad` fire no DDP hooks, so they are averaged
across processes by hand: the norms are those of the all-reduced gradients.

Under FSDP2 (`fully_shard`, accelerate's `fsdp_version: 2`) each parameter is a DTensor holding one shard per
process. `torch.autograd.grad` with respect to sharded parameters returns nothing (the forward runs on
all-gathered copies), so the gradients are measured by an ordinary backward pass with the graph retained: FSDP
reduce-scatters them, averaged over the processes, into each process's shard of `.grad`. Norms and inner products
are then taken over the whole gradient: each process sums its shard's squares (or products) and the sums are
all-reduced (SUM) over the processes holding the shards, never the norm of one shard.

A zero forget gradient always gives a zero forget contribution, never inf or NaN.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import torch

from .objectives.base import LossTerms


class NonFiniteError(RuntimeError):
    """A loss term or gradient became inf or NaN; raised before the optimizer steps."""


class _Backend:
    """What a combiner needs from the training loop: backward, loss scale, accumulation, all-reduce."""

    def __init__(self, accelerator=None):
        self.accelerator = accelerator

    @property
    def has_scaler(self) -> bool:
        return getattr(self.accelerator, "scaler", None) is not None

    @property
    def loss_scale(self) -> float:
        scaler = getattr(self.accelerator, "scaler", None)
        return float(scaler.get_scale()) if scaler is not None else 1.0

    @property
    def accumulation_steps(self) -> int:
        return int(getattr(self.accelerator, "gradient_accumulation_steps", 1) or 1)

    @property
    def num_processes(self) -> int:
        return int(getattr(self.accelerator, "num_processes", 1) or 1)

    def backward(self, loss: torch.Tensor) -> None:
        if self.accelerator is not None:
            self.accelerator.backward(loss)
        else:
            loss.backward()

    def mean_over_processes(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.num_processes == 1:
            return tensors
        return self.accelerator.reduce(tensors, reduction="mean")

    def averaged_gradients(self, loss: torch.Tensor, params: Sequence[torch.nn.Parameter]) -> list[torch.Tensor]:
        """d(loss)/d(params) averaged over the processes, leaving `.grad` as it was; the graph is kept.

        Replicated parameters (one process, DDP): `torch.autograd.grad`, then an all-reduce (mean).
        FSDP-sharded parameters: an ordinary backward, which FSDP reduce-scatters (mean) into `.grad`; each
        process gets its shard (a DTensor) of the averaged gradient.
        """
        if not is_sharded(params):
            return self.mean_over_processes(_gradients(loss, params, self.loss_scale))
        return _sharded_gradients(loss, params, self.loss_scale, self.accumulation_steps)


def _gradients(loss: torch.Tensor, params: Sequence[torch.nn.Parameter], scale: float) -> list[torch.Tensor]:
    """d(loss)/d(params) without touching `.grad`; the graph is kept for the final backward.

    The loss is multiplied by the mixed-precision loss scale first (so fp16 activation
    gradients do not underflow) and the result divided by it again.
    """
    if not loss.requires_grad:
        return [torch.zeros_like(p) for p in params]
    grads = torch.autograd.grad(loss * scale, list(params), retain_graph=True, allow_unused=True)
    return [
        torch.zeros_like(p) if g is None else (g / scale if scale != 1.0 else g) for g, p in zip(grads, params)
    ]


@functools.lru_cache(maxsize=None)
def _dtensor_class():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support
        return None
    return DTensor


def is_sharded(tensors: Sequence[torch.Tensor]) -> bool:
    """True if any of `tensors` is a DTensor, as FSDP2's (`fully_shard`) parameters and gradients are."""
    dtensor = _dtensor_class()
    return dtensor is not None and any(isinstance(t, dtensor) for t in tensors)


def _sharded_gradients(
    loss: torch.Tensor, params: Sequence[torch.nn.Parameter], scale: float, accumulation_steps: int
) -> list[torch.Tensor]:
    """`_gradients` for FSDP-sharded parameters: each process's shard of the process-averaged gradient.

    Runs `backward(retain_graph=True)` outside `accelerator.backward` (no accumulation division) with `.grad`
    set aside, reads the shards FSDP wrote, and puts the earlier `.grad` back.
    """
    if accumulation_steps > 1:
        raise ValueError(
            "Under FSDP this method's combiner measures gradient norms with an extra backward pass, which "
            "cannot be done inside a gradient-accumulation window (FSDP defers the reduce-scatter to its last "
            "micro-batch). Use --gradient_accumulation_steps 1 with a larger per-process batch, or DDP."
        )
    if not loss.requires_grad:
        return [torch.zeros_like(p) for p in params]
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        (loss * scale if scale != 1.0 else loss).backward(retain_graph=True)
        dtensor = _dtensor_class()
        if any(p.grad is None and p.requires_grad and not isinstance(p, dtensor) for p in params):
            # Between forward and backward FSDP2 registers unsharded copies of some parameters (the root module's);
            # their gradients go to the sharded originals, so these would silently count as zero.
            raise ValueError(
                "Under FSDP, pass the sharded parameters (the optimizer's, or model.parameters() collected before the "
                "forward pass): a parameter given here is an unsharded copy that receives no gradient."
            )
        return [
            torch.zeros_like(p) if p.grad is None else (p.grad / scale if scale != 1.0 else p.grad) for p in params
        ]
    finally:
        for p, grad in zip(params, saved):
            p.grad = grad


def _dot(first: Sequence[torch.Tensor], second: Sequence[torch.Tensor]) -> torch.Tensor:
    """The inner product of two lists of tensors, as if each list were one flat vector (float32).

    A sharded pair (DTensors, the FSDP gradients of one parameter) contributes the product of the local shards,
    summed over the processes that hold the other shards; replicated tensors contribute once.
    """
    dtensor = _dtensor_class()
    total = torch.zeros((), device=first[0].device if first and not is_sharded(first) else "cpu")
    partials: dict[tuple, list] = {}  # (mesh, sharded mesh dims) -> [mesh, dims, local sum]
    for a, b in zip(first, second):
        if dtensor is not None and isinstance(a, dtensor):
            if not isinstance(b, dtensor) or a.placements != b.placements:
                raise ValueError("Cannot take an inner product of tensors sharded differently.")
            local = (a.to_local().float() * b.to_local().float()).sum()
            dims = tuple(i for i, placement in enumerate(a.placements) if placement.is_shard())
            entry = partials.setdefault((id(a.device_mesh), dims), [a.device_mesh, dims, torch.zeros((), device=local.device)])
            entry[2] = entry[2] + local
        else:
            total = total.to(a.device) + (a.float() * b.float()).sum()
    if partials:
        import torch.distributed as dist

        for mesh, dims, local in partials.values():  # the same order on every process: that of `params`
            for dim in dims:
                dist.all_reduce(local, op=dist.ReduceOp.SUM, group=mesh.get_group(dim))
            total = total.to(local.device) + local
    return total


def _norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of a list of tensors as one flat vector; over the whole tensors when they are FSDP shards."""
    if len(tensors) == 0:
        return torch.zeros(())
    if is_sharded(tensors):
        return _dot(tensors, tensors).sqrt()
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.float()) for t in tensors]))


def _check_finite_loss(terms: LossTerms, step: Optional[int], backend: Optional["_Backend"] = None) -> None:
    bad = []
    for name in ("keep", "forget"):
        value = getattr(terms, name)
        if value is not None and not torch.isfinite(value.detach()).all():
            bad.append(name)
    if backend is not None and backend.num_processes > 1:
        # Every process must stop together: one that raised alone would leave the others waiting forever in the
        # next gradient all-reduce.
        flag = torch.tensor([float(len(bad))], device=backend.accelerator.device)
        if float(backend.accelerator.reduce(flag, reduction="sum").item()) > 0 and not bad:
            raise NonFiniteError(
                f"Non-finite loss on another process at step {step}. No weights were changed. "
                "Lower the learning rate, check the input data, or use fp32."
            )
    if bad:
        value = getattr(terms, bad[0]).detach().float()
        raise NonFiniteError(
            f"Non-finite {bad[0]} loss ({value.flatten()[0].item()}) at step {step}. "
            "No weights were changed. Lower the learning rate, check the input data, or use fp32."
        )


def _check_finite_norm(norm: torch.Tensor, term: str, step: Optional[int], backend: Optional["_Backend"] = None) -> bool:
    """True if finite. Under an fp16 loss scaler an overflow is expected now and then: return False,
    and the caller makes the update non-finite so the scaler skips the step and lowers its scale."""
    if torch.isfinite(norm):
        return True
    if backend is not None and backend.has_scaler:
        return False
    raise NonFiniteError(
        f"Non-finite gradient of the {term} term at step {step}. No weights were changed. "
        "Lower the learning rate or the method's forget weight."
    )


class SumCombiner:
    """Plain sum of the terms: one backward pass."""

    name = "sum"

    def backward(
        self,
        terms: LossTerms,
        params: Sequence[torch.nn.Parameter],
        accelerator=None,
        step: Optional[int] = None,
    ) -> dict[str, float]:
        _check_finite_loss(terms, step, _Backend(accelerator))
        parts = [t for t in (terms.keep, terms.forget) if t is not None]
        if not parts:
            raise ValueError("The objective returned neither a keep nor a forget term.")
        total = parts[0] if len(parts) == 1 else parts[0] + parts[1]
        _Backend(accelerator).backward(total)
        return {}


class FixedNormCombiner:
    """SISS's reference update: the forget gradient rescaled to a fixed norm `c`.

    g = grad(keep) + c * grad(forget) / ||grad(forget)||. (SISS returns forget = -L_a, so this is
    g_x - c * g_a / ||g_a||.)

    Cost: one extra backward pass to measure ||grad(forget)||; the gradient itself is dropped
    and the final update is one ordinary backward of keep + (c / ||g_f||) * forget, which by
    linearity has exactly the gradient above. No parameter-sized buffer is kept.

    Args:
        scaling_norm: c. If None, c is calibrated once, on the first call, as
            `relative_norm * ||grad(keep)||` (the rule of thumb: 10% of the keep gradient's norm).
        relative_norm: the fraction used for that calibration.
        norm_refresh_every: 1 (default) measures ||grad(forget)|| exactly at every step. N > 1 reuses
            the last measured norm for N - 1 steps (an approximation: the direction of the forget
            gradient stays exact, its length is lagged), which saves the extra backward pass.
    """

    name = "fixed_norm"

    def __init__(
        self,
        scaling_norm: Optional[float] = None,
        relative_norm: float = 0.1,
        norm_refresh_every: int = 1,
    ):
        if scaling_norm is not None and not scaling_norm >= 0:
            raise ValueError(f"scaling_norm must be >= 0, got {scaling_norm}.")
        if not relative_norm > 0:
            raise ValueError(f"relative_norm must be > 0, got {relative_norm}.")
        if int(norm_refresh_every) < 1:
            raise ValueError(f"norm_refresh_every must be >= 1, got {norm_refresh_every}.")
        self.scaling_norm = None if scaling_norm is None else float(scaling_norm)
        self.relative_norm = float(relative_norm)
        self.norm_refresh_every = int(norm_refresh_every)
        self._calls = 0
        self._last_forget_norm: Optional[float] = None

    def state_dict(self) -> dict:
        return {
            "scaling_norm": self.scaling_norm,
            "calls": self._calls,
            "last_forget_norm": self._last_forget_norm,
        }

    def load_state_dict(self, state: dict) -> None:
        self.scaling_norm = state["scaling_norm"]
        self._calls = int(state["calls"])
        self._last_forget_norm = state["last_forget_norm"]

    def backward(
        self,
        terms: LossTerms,
        params: Sequence[torch.nn.Parameter],
        accelerator=None,
        step: Optional[int] = None,
    ) -> dict[str, float]:
        backend = _Backend(accelerator)
        _check_finite_loss(terms, step, backend)
        logs: dict[str, float] = {}
        if terms.forget is None:
            backend.backward(terms.keep)
            return logs

        if self.scaling_norm is None:
            keep_grads = backend.averaged_gradients(terms.keep, params) if terms.keep is not None else []
            keep_norm = _norm(keep_grads)
            del keep_grads
            if _check_finite_norm(keep_norm, "keep", step, backend):
                self.scaling_norm = self.relative_norm * float(keep_norm)
                logs["calibrated_scaling_norm"] = self.scaling_norm

        overflow = False
        refresh = self._last_forget_norm is None or self._calls % self.norm_refresh_every == 0
        if refresh:
            forget_grads = backend.averaged_gradients(terms.forget, params)
            forget_norm = _norm(forget_grads)
            del forget_grads
            if _check_finite_norm(forget_norm, "forget", step, backend):
                self._last_forget_norm = float(forget_norm)
            else:
                overflow = True
        self._calls += 1

        if overflow or self.scaling_norm is None:
            # fp16 overflow: a NaN update makes the loss scaler skip this step.
            coefficient = float("nan")
        else:
            forget_norm = self._last_forget_norm
            coefficient = 0.0 if forget_norm == 0.0 else self.scaling_norm / forget_norm
        total = terms.forget * coefficient
        if terms.keep is not None:
            total = terms.keep + total
        backend.backward(total)
        logs["forget_grad_norm"] = self._last_forget_norm if self._last_forget_norm is not None else float("nan")
        logs["forget_coefficient"] = coefficient
        return logs


def _hooked_keep_backward(keep: torch.Tensor, params: Sequence[torch.nn.Parameter], forget_grads: Sequence[torch.Tensor],
                          backend: _Backend) -> torch.Tensor:
    """The keep term's ordinary backward, with parameter hooks that read this pass's keep gradient (before it is
    accumulated into .grad, and before DDP averages it, already multiplied by loss scale / accumulation steps);
    returns its inner product with the forget gradient, averaged over the processes."""
    inner = [torch.zeros((), device=params[0].device)]

    def make_hook(forget_grad):
        def hook(grad):
            inner[0] = inner[0] + (grad.float() * forget_grad.float()).sum()
            return grad

        return hook

    handles = [p.register_hook(make_hook(g)) for p, g in zip(params, forget_grads) if p.requires_grad]
    try:
        backend.backward(keep)
    finally:
        for handle in handles:
            handle.remove()
    return backend.mean_over_processes([inner[0]])[0]


def _sharded_keep_backward(keep: torch.Tensor, params: Sequence[torch.nn.Parameter], forget_grads: Sequence[torch.Tensor],
                           backend: _Backend) -> torch.Tensor:
    """`_hooked_keep_backward` for FSDP-sharded parameters, whose hooks never fire: the keep backward runs with
    `.grad` set aside, so what FSDP writes there is this pass's (averaged, scaled) keep gradient; the inner
    product is taken over the whole gradient, and `.grad` becomes the earlier one plus this pass's."""
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        backend.backward(keep)
        inner = _dot([torch.zeros_like(g) if p.grad is None else p.grad for p, g in zip(params, forget_grads)],
                     forget_grads)
    finally:
        with torch.no_grad():
            for p, grad in zip(params, saved):
                if grad is not None:
                    p.grad = grad if p.grad is None else grad.add_(p.grad)
    return inner


class BOMECombiner:
    """EraseDiff's adaptive weight (BOME): g = grad(keep) + lam * grad(forget),

    lam = max(eta - <grad(keep), grad(forget)> / ||grad(forget)||^2, 0).

    Two backward passes: `torch.autograd.grad` measures grad(forget); the ordinary backward of
    the keep term fills `.grad` while parameter hooks read this pass's keep gradient for the
    inner product; then lam * grad(forget) is added to `.grad` with the same loss scale and
    accumulation factor that `accelerator.backward` applied to the keep term. Under FSDP, grad(forget) comes
    from a backward pass with the graph retained and the keep gradient is read from `.grad` (see the module
    docstring); the inner product and ||grad(forget)||^2 are summed over every process's shard.
    """

    name = "bome"

    def __init__(self, eta: float = 1e-3):
        if not eta >= 0:
            raise ValueError(f"eta must be >= 0, got {eta}.")
        self.eta = float(eta)

    def backward(
        self,
        terms: LossTerms,
        params: Sequence[torch.nn.Parameter],
        accelerator=None,
        step: Optional[int] = None,
    ) -> dict[str, float]:
        backend = _Backend(accelerator)
        _check_finite_loss(terms, step, backend)
        if terms.forget is None or terms.keep is None:
            backend.backward(terms.keep if terms.keep is not None else terms.forget)
            return {}

        params = list(params)
        scale = backend.loss_scale
        forget_grads = backend.averaged_gradients(terms.forget, params)
        forget_norm_sq = _dot(forget_grads, forget_grads)
        if not _check_finite_norm(forget_norm_sq, "forget", step, backend):
            backend.backward(terms.keep + terms.forget * float("nan"))  # the fp16 scaler skips this step
            return {"bome_weight": float("nan")}

        # The keep backward goes through accelerator.backward: its gradient arrives multiplied by this factor.
        factor = scale / backend.accumulation_steps
        if is_sharded(params):
            keep_dot_forget = _sharded_keep_backward(terms.keep, params, forget_grads, backend) / factor
        else:
            keep_dot_forget = _hooked_keep_backward(terms.keep, params, forget_grads, backend) / factor

        if float(forget_norm_sq) == 0.0:
            weight = 0.0
        else:
            weight = max(self.eta - float(keep_dot_forget) / float(forget_norm_sq), 0.0)
        if not math.isfinite(weight):
            _check_finite_norm(torch.tensor(weight), "keep", step)
        if weight > 0.0:
            with torch.no_grad():
                for p, g in zip(params, forget_grads):
                    contribution = (g * (weight * factor)).to(p.dtype)
                    if p.grad is None:
                        p.grad = contribution.clone()
                    else:
                        p.grad.add_(contribution)
        return {
            "bome_weight": weight,
            "forget_grad_norm": float(forget_norm_sq) ** 0.5,
            "keep_dot_forget": float(keep_dot_forget),
        }


def combined_gradient_norm(params: Sequence[torch.nn.Parameter]) -> torch.Tensor:
    """The 2-norm of all `.grad`s (inf or NaN if any gradient is non-finite); under FSDP, of the whole gradient,
    not of this process's shard."""
    grads = [p.grad for p in params if p.grad is not None]
    return _norm(grads)
