"""The registry of unlearning objectives.

Example:
    >>> from diffusers_unlearn.objectives import get_objective, available_objectives
    >>> available_objectives()
    ['erasediff', 'naive_deletion', 'neggrad', 'siss', 'siss_bernoulli', 'siss_no_is', 'vdu']
    >>> objective = get_objective("siss", lam=0.5, scaling_norm=0.05)
"""

from __future__ import annotations

import inspect

from .base import DenoisingBatch, Denoiser, LossTerms, UnlearningObjective, denoising_loss
from .baselines import NaiveDeletion, NegGrad
from .erasediff import EraseDiff
from .siss import SISS, SISSBernoulli, SISSNoIS
from .vdu import VDU

OBJECTIVES: dict[str, type[UnlearningObjective]] = {
    cls.name: cls for cls in (NaiveDeletion, NegGrad, SISS, SISSNoIS, SISSBernoulli, EraseDiff, VDU)
}


def available_objectives() -> list[str]:
    return sorted(OBJECTIVES)


def get_objective(name: str, **hyperparameters) -> UnlearningObjective:
    """Build an objective by registry name; hyperparameters are validated immediately."""
    if name not in OBJECTIVES:
        raise ValueError(f"Unknown unlearning method {name!r}. Available: {', '.join(available_objectives())}.")
    cls = OBJECTIVES[name]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "kwargs")]
    if cls is SISSBernoulli:
        accepted = sorted(set(accepted) | set(inspect.signature(SISS.__init__).parameters) - {"self"})
    unknown = sorted(set(hyperparameters) - set(accepted))
    if unknown:
        raise ValueError(f"Method {name!r} has no hyperparameter(s) {unknown}. Accepted: {', '.join(accepted)}.")
    return cls(**hyperparameters)


__all__ = [
    "OBJECTIVES",
    "available_objectives",
    "get_objective",
    "DenoisingBatch",
    "Denoiser",
    "LossTerms",
    "UnlearningObjective",
    "denoising_loss",
    "NaiveDeletion",
    "NegGrad",
    "SISS",
    "SISSNoIS",
    "SISSBernoulli",
    "EraseDiff",
    "VDU",
]
