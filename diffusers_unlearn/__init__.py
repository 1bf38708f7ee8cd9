"""diffusers-unlearn: remove specific training data from diffusion models.

Example:
    >>> from diffusers_unlearn import get_objective, Unlearner
    >>> objective = get_objective("siss", lam=0.5)
"""

from __future__ import annotations

import importlib

from .third_party_logs import install_filters as _install_log_filters

__version__ = "0.1.0"

# Before any submodule imports diffusers or transformers: they print two known-harmless messages while being
# imported (see third_party_logs.py). Only those two messages are filtered.
_install_log_filters()

# Public names -> the module that defines them. Imported on first use, so that
# `import diffusers_unlearn` stays cheap.
_LAZY = {
    "NoiseSchedule": "noise",
    "per_sample_loss": "noise",
    "get_objective": "objectives",
    "available_objectives": "objectives",
    "OBJECTIVES": "objectives",
    "DenoisingBatch": "objectives",
    "Denoiser": "objectives",
    "LossTerms": "objectives",
    "SumCombiner": "gradients",
    "FixedNormCombiner": "gradients",
    "BOMECombiner": "gradients",
    "NonFiniteError": "gradients",
    "Unlearner": "unlearner",
    "LoRAUNet2DModel": "lora",
    "add_lora": "lora",
    "save_lora_weights": "lora",
    "load_lora_weights": "lora",
    "make_optimizer": "lora",
    "recover_output_dir": "outputs",
    "UnlearnStableDiffusionXLPipeline": "pipelines",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'diffusers_unlearn' has no attribute {name!r}")
