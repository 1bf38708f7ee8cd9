"""The registry of unlearning objectives.

Example:
    >>> from diffusers_unlearn.objectives import get_objective, available_objectives
    >>> available_objectives()
    ['erasediff', 'naive_deletion', 'neggrad', 'siss', 'siss_bernoulli', 'siss_no_is', 'vdu']
    >>> objective = get_objective("siss", lam=0.5, scaling_norm=0.05)
"""

from __future__ import annotations

import inspect
from typing import Optional

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
    accepted = _accepted(cls)
    unknown = sorted(set(hyperparameters) - set(accepted))
    if unknown:
        raise ValueError(f"Method {name!r} has no hyperparameter(s) {unknown}. Accepted: {', '.join(accepted)}.")
    return cls(**hyperparameters)


def _accepted(cls) -> list[str]:
    names = []
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            for p in inspect.signature(klass.__init__).parameters.values():
                if p.name not in ("self",) and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name not in names:
                    names.append(p.name)
            if not any(p.kind == p.VAR_KEYWORD for p in inspect.signature(klass.__init__).parameters.values()):
                break
    return names


def hyperparameters_from_flags(name: str, flags: dict, context: Optional[dict] = None) -> dict:
    """Map command-line flags to the hyperparameters of objective `name`.

    `flags` holds every method flag (`siss_lambda`, `vdu_gamma`, ...) with None for "not given".
    The objective's `flag_prefix` selects its own flags; a flag given for another method is an
    error. `timestep_range` applies to every method. `context` supplies values derived from
    the data (for example n and k) for the hyperparameters the objective accepts and that were
    not given as flags.

    Example:
        >>> hyperparameters_from_flags("siss", {"siss_lambda": 0.3, "vdu_gamma": None})
        {'lam': 0.3}
    """
    if name not in OBJECTIVES:
        raise ValueError(f"Unknown unlearning method {name!r}. Available: {', '.join(available_objectives())}.")
    cls = OBJECTIVES[name]
    accepted = _accepted(cls)
    kwargs = {}
    prefixes = {c.flag_prefix for c in OBJECTIVES.values() if c.flag_prefix}
    for flag, value in flags.items():
        if value is None:
            continue
        if flag == "timestep_range":
            kwargs["timestep_range"] = tuple(value)
            continue
        prefix = next((p for p in sorted(prefixes, key=len, reverse=True) if flag.startswith(p + "_")), None)
        if prefix is None:
            raise ValueError(f"--{flag} is not a method hyperparameter flag.")
        if prefix != cls.flag_prefix:
            raise ValueError(f"--{flag} does not apply to --method {name}; it is a {prefix} hyperparameter.")
        key = flag[len(prefix) + 1 :]
        key = cls.flag_aliases.get(key, key)
        if key not in accepted:
            raise ValueError(f"--{flag} is not a hyperparameter of {name} (accepted: {', '.join(accepted)}).")
        kwargs[key] = value
    for key, value in (context or {}).items():
        if key in accepted and key not in kwargs:
            kwargs[key] = value
    return kwargs


__all__ = [
    "hyperparameters_from_flags",
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
