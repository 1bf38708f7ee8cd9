"""Model families: one small module per diffusers pipeline type (see `base.ModelFamily`).

`family_for_folder(path)` picks the family from the pipeline's `model_index.json` (`_class_name`); `override`
(the scripts' `--model_family`) names one directly. Adding a family is one module with a `ModelFamily` subclass,
one line in `FAMILIES` and one tiny-config test.

Example:
    >>> from diffusers_unlearn.families import available_families, get_family
    >>> available_families()
    ['flux', 'sd', 'sd3', 'sdxl']
    >>> get_family("sdxl").pipeline_class_names
    ('StableDiffusionXLPipeline',)
    >>> family = family_for_folder("path/to/pipeline")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

from ..errors import UserInputError
from .base import Components, ModelFamily, normalize_latents
from .flow import FlowMatchingFamily
from .flux import FluxFamily
from .sd import StableDiffusionFamily
from .sd3 import StableDiffusion3Family
from .sdxl import StableDiffusionXLFamily

FAMILIES: dict[str, ModelFamily] = {
    family.name: family
    for family in (StableDiffusionFamily(), StableDiffusionXLFamily(), StableDiffusion3Family(), FluxFamily())
}


def available_families() -> list[str]:
    """The registry names, sorted (the choices of `--model_family`)."""
    return sorted(FAMILIES)


def supported_pipeline_classes() -> list[str]:
    """Every `model_index.json` `_class_name` some family serves, sorted."""
    return sorted(name for family in FAMILIES.values() for name in family.pipeline_class_names)


def get_family(name: str) -> ModelFamily:
    """The family registered under `name`; a `UserInputError` naming the choices for an unknown one."""
    if name not in FAMILIES:
        raise UserInputError(f"Unknown model family {name!r}; choose one of {', '.join(available_families())}.")
    return FAMILIES[name]


def family_for_pipeline_class(class_name: Optional[str]) -> ModelFamily:
    """The family serving the pipeline class `class_name` (a `model_index.json` `_class_name`)."""
    for family in FAMILIES.values():
        if class_name in family.pipeline_class_names:
            return family
    raise UserInputError(
        f"Unsupported pipeline class {class_name!r}: diffusers-unlearn supports "
        f"{', '.join(supported_pipeline_classes())} (or pass --model_family {'/'.join(available_families())})."
    )


def family_of_pipeline(pipe: Any) -> Optional[ModelFamily]:
    """The family of a pipeline object (its class or a base class, so our Unlearn* subclasses count); None for a
    pipeline no family serves (a DDPM pipeline)."""
    for cls in type(pipe).__mro__:
        for family in FAMILIES.values():
            if cls.__name__ in family.pipeline_class_names:
                return family
    return None


def family_for_folder(
    path: str | os.PathLike,
    override: Optional[str] = None,
    revision: Optional[str] = None,
    cache_dir: Optional[str] = None,
) -> ModelFamily:
    """The family of the pipeline at `path` (a local folder or a Hub id), from its `model_index.json`.

    `override` (a registry name) skips the detection. A folder without `model_index.json`, or a pipeline
    class no family serves, raises `UserInputError` with one line that names the supported classes.

    Example:
        >>> family_for_folder("stabilityai/stable-diffusion-xl-base-1.0").name  # doctest: +SKIP
        'sdxl'
        >>> family_for_folder("my/merged-model", override="sd").name
        'sd'
    """
    if override is not None:
        return get_family(override)
    path = os.fspath(path)
    if os.path.isdir(path):
        index_path = os.path.join(path, "model_index.json")
        if not os.path.isfile(index_path):
            raise UserInputError(
                f"{path} has no model_index.json: not a diffusers pipeline folder (supported pipelines: "
                f"{', '.join(supported_pipeline_classes())})."
            )
        with open(index_path, encoding="utf-8") as handle:
            index = json.load(handle)
    else:
        from diffusers import DiffusionPipeline

        index = DiffusionPipeline.load_config(path, revision=revision, cache_dir=cache_dir)
    return family_for_pipeline_class(index.get("_class_name"))


def components_saved_as_none(path: str | os.PathLike) -> dict[str, None]:
    """{name: None} for each component a local pipeline folder saved as null (an SD3 pipeline without T5), which
    diffusers' `from_pretrained` needs passed explicitly; empty for a Hub id or a folder without them.

    Example:
        >>> StableDiffusion3Pipeline.from_pretrained(folder, **components_saved_as_none(folder))  # doctest: +SKIP
    """
    index_path = os.path.join(os.fspath(path), "model_index.json")
    if not os.path.isfile(index_path):
        return {}
    with open(index_path, encoding="utf-8") as handle:
        index = json.load(handle)
    return {name: None for name, value in index.items() if isinstance(value, list) and value and value[0] is None}


__all__ = [
    "Components",
    "FAMILIES",
    "FlowMatchingFamily",
    "FluxFamily",
    "ModelFamily",
    "StableDiffusion3Family",
    "StableDiffusionFamily",
    "StableDiffusionXLFamily",
    "available_families",
    "components_saved_as_none",
    "family_for_folder",
    "family_for_pipeline_class",
    "family_of_pipeline",
    "get_family",
    "normalize_latents",
    "supported_pipeline_classes",
]
