"""Cheap checks of `--pretrained_model_name_or_path`, run before any model is loaded.

A local folder is recognised by what its model_index.json says it holds (the `_class_name` and the class of
each component), so a Stable Diffusion folder given to the DDPM script, or the other way round, fails at once
with a message naming what was expected. A path that does not exist is an error unless it is shaped like a
Hub id ("org/name"). Only `check_hub_model` touches the network (for one small file, or the local cache).

Example:
    >>> check_model_path("/tmp/nope", DDPM)  # doctest: +SKIP
    UserInputError: --pretrained_model_name_or_path: no such local folder and not a Hub id: /tmp/nope. ...
"""

from __future__ import annotations

import argparse
import json
import os
import re
from dataclasses import dataclass, field
from typing import Optional

from .errors import UserInputError

FLAG = "--pretrained_model_name_or_path"
# "org/name" with the characters the Hub allows; a path such as ./nope, /tmp/nope, ~/m or a/b/c never matches.
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class ModelKind:
    """What a training script can load: the component classes it needs (None: any class) and the only other
    components a folder may hold."""

    description: str
    script: str
    required: dict[str, Optional[str]]
    optional: tuple[str, ...] = field(default=())

    def accepts(self, components: dict[str, str]) -> bool:
        """Whether a pipeline with these {component: class name} is of this kind."""
        if any(name not in components or cls not in (None, components[name]) for name, cls in self.required.items()):
            return False
        return set(components) <= set(self.required) | set(self.optional)


DDPM = ModelKind(
    "a DDPM pipeline folder (DDPMPipeline: a UNet2DModel in unet/ and a scheduler in scheduler/)",
    "train_unlearn_ddpm.py",
    {"unet": "UNet2DModel", "scheduler": None},
)
STABLE_DIFFUSION = ModelKind(
    "a Stable Diffusion 1.x/2.x folder (StableDiffusionPipeline: a UNet2DConditionModel, an AutoencoderKL, "
    "a CLIPTextModel, a tokenizer and a scheduler)",
    "train_unlearn_sd.py",
    {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel", "tokenizer": None, "scheduler": None},
    ("safety_checker", "feature_extractor", "image_encoder"),
)
STABLE_DIFFUSION_XL = ModelKind(
    "a Stable Diffusion XL folder (StableDiffusionXLPipeline: a UNet2DConditionModel, an AutoencoderKL, a "
    "CLIPTextModel and a CLIPTextModelWithProjection with their tokenizers, and a scheduler)",
    "train_unlearn_sd.py",
    {
        "unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel",
        "text_encoder_2": "CLIPTextModelWithProjection", "tokenizer": None, "tokenizer_2": None, "scheduler": None,
    },
    ("image_encoder", "feature_extractor"),
)
STABLE_DIFFUSION_3 = ModelKind(
    "a Stable Diffusion 3.x folder (StableDiffusion3Pipeline: an SD3Transformer2DModel, an AutoencoderKL, two "
    "CLIPTextModelWithProjection and optionally a T5EncoderModel with their tokenizers, and a scheduler)",
    "train_unlearn_sd.py",
    {
        "transformer": "SD3Transformer2DModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModelWithProjection",
        "text_encoder_2": "CLIPTextModelWithProjection", "tokenizer": None, "tokenizer_2": None, "scheduler": None,
    },
    ("text_encoder_3", "tokenizer_3", "image_encoder", "feature_extractor"),
)
FLUX = ModelKind(
    "a Flux.1 folder (FluxPipeline: a FluxTransformer2DModel, an AutoencoderKL, a CLIPTextModel and a "
    "T5EncoderModel with their tokenizers, and a scheduler)",
    "train_unlearn_sd.py",
    {
        "transformer": "FluxTransformer2DModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel",
        "text_encoder_2": "T5EncoderModel", "tokenizer": None, "tokenizer_2": None, "scheduler": None,
    },
    ("image_encoder", "feature_extractor"),
)
KINDS = (DDPM, STABLE_DIFFUSION, STABLE_DIFFUSION_XL, STABLE_DIFFUSION_3, FLUX)
# What train_unlearn_sd.py takes, by model family (its --model_family choices).
TEXT_TO_IMAGE_KINDS = {"sd": STABLE_DIFFUSION, "sdxl": STABLE_DIFFUSION_XL, "sd3": STABLE_DIFFUSION_3, "flux": FLUX}


def looks_like_hub_id(name: str) -> bool:
    """True for a string shaped like a Hub repo id, "org/name" (ids without an organisation are not accepted:
    such a string is far more often a mistyped local folder)."""
    return bool(_HUB_ID.fullmatch(name)) and ".." not in name and "--" not in name


def pipeline_components(path: str) -> tuple[str, dict[str, str]]:
    """(pipeline class name, {component: class name}) of a local pipeline folder, from its model_index.json.

    Without model_index.json the folder is described by unet/config.json's `_class_name` alone (diffusers loads
    components by subfolder, so such folders work). Raises `UserInputError` when neither file is readable.
    """
    index_path = os.path.join(path, "model_index.json")
    if os.path.isfile(index_path):
        return _components_of_index(_read_json(index_path))
    unet_config = os.path.join(path, "unet", "config.json")
    if os.path.isfile(unet_config):
        return "pipeline without model_index.json", {"unet": str(_read_json(unet_config).get("_class_name"))}
    raise UserInputError(
        f"{FLAG} {path} is not a diffusers pipeline folder: it has no model_index.json (and no unet/config.json). "
        "Point it at a folder saved with the pipeline's save_pretrained."
    )


def _components_of_index(index: dict) -> tuple[str, dict[str, str]]:
    components = {
        name: value[1]
        for name, value in index.items()
        # Absent components are saved as [null, null].
        if not name.startswith("_") and isinstance(value, list) and len(value) == 2 and value[1] is not None
    }
    return str(index.get("_class_name", "pipeline")), components


def _check_kind(source: str, pipeline: str, components: dict[str, str], kind: ModelKind | tuple[ModelKind, ...]) -> None:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if any(k.accepts(components) for k in kinds):
        return
    listed = ", ".join(f"{name}: {cls}" for name, cls in sorted(components.items()))
    other = next((k for k in KINDS if k not in kinds and k.accepts(components)), None)
    hint = f" Use {other.script} for it." if other is not None and other.script != kinds[0].script else ""
    wanted = " or ".join(k.description for k in kinds)
    raise UserInputError(f"{source} holds a {pipeline} ({listed}), but {kinds[0].script} needs {wanted}.{hint}")


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as file:
            value = json.load(file)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserInputError(f"{path} cannot be read as JSON ({error}); the model folder is damaged.") from None
    if not isinstance(value, dict):
        raise UserInputError(f"{path} is not a JSON object; the model folder is damaged.")
    return value


def check_model_path(path: str, kind: ModelKind | tuple[ModelKind, ...], flag: str = FLAG) -> None:
    """Refuse, before anything loads, a `--pretrained_model_name_or_path` (or the model flag `flag`) that is
    neither a local folder nor shaped like a Hub id, a file, or a local folder of another kind of model than `kind`
    (one kind, or a tuple of the kinds a script takes; the error names what it holds, what was expected, and which
    script takes it). A Hub id is checked by `check_hub_model`, which may need the network.
    """
    if os.path.isdir(path):
        _check_kind(path, *pipeline_components(path), kind)
        return
    if os.path.exists(path):
        raise UserInputError(f"{flag} {path} is a file; pass a model folder (saved with save_pretrained) or a Hub id.")
    if not looks_like_hub_id(path):
        raise UserInputError(
            f"{flag}: no such local folder and not a Hub id: {path}. Pass a folder saved with save_pretrained, "
            "or a Hub id such as org/model-name."
        )


def check_number_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """`--learning_rate` (once its default is set), `--memorization_threshold` and `--keep_generation_threshold`
    must be > 0, `--near_duplicate_distance` >= 0; `parser.error` otherwise (an unset optional flag passes)."""
    for name in ("learning_rate", "memorization_threshold", "keep_generation_threshold"):
        value = getattr(args, name)
        if value is not None and not value > 0:  # `not >` also refuses NaN
            parser.error(f"--{name} must be > 0, got {value}.")
    if args.near_duplicate_distance is not None and not args.near_duplicate_distance >= 0:
        parser.error(f"--near_duplicate_distance must be >= 0 (0: exact copies only), got {args.near_duplicate_distance}.")


def check_hub_model(repo_id: str, kind: ModelKind | tuple[ModelKind, ...], revision: Optional[str] = None, cache_dir: Optional[str] = None) -> None:
    """Fetch a Hub model's model_index.json (a few hundred bytes; from the local cache when offline) and check
    its kind, before any weights load. A repo that cannot be found, reached or read becomes one
    `UserInputError` line instead of `from_pretrained`'s chained tracebacks; a repo without model_index.json is
    left to `from_pretrained`.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        index_path = hf_hub_download(repo_id, "model_index.json", revision=revision, cache_dir=cache_dir)
    except LocalEntryNotFoundError:  # offline (HF_HUB_OFFLINE=1 or no connection) and not in the cache
        raise UserInputError(
            f"{FLAG} {repo_id}: no such local folder, and the Hub id is not in the local cache while the Hub "
            "cannot be reached (HF_HUB_OFFLINE set, or no connection). Pass a local folder, or download the model first."
        ) from None
    except EntryNotFoundError:  # the repo exists without model_index.json: from_pretrained loads by subfolder
        return
    except GatedRepoError:
        raise UserInputError(f"{FLAG} {repo_id} is gated: accept its terms on the Hub and log in (hf auth login).") from None
    except RepositoryNotFoundError:
        raise UserInputError(
            f"{FLAG}: no such local folder and no such Hub repo (or it is private): {repo_id}. Check the id, or log in."
        ) from None
    except RevisionNotFoundError:
        raise UserInputError(f"--revision {revision} does not exist in {repo_id}.") from None
    except (HfHubHTTPError, OSError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserInputError(f"{FLAG} {repo_id}: the Hub could not be read ({reason}).") from None
    pipeline, components = _components_of_index(_read_json(index_path))
    _check_kind(repo_id, pipeline, components, kind)


__all__ = [
    "DDPM",
    "STABLE_DIFFUSION",
    "STABLE_DIFFUSION_XL",
    "STABLE_DIFFUSION_3",
    "FLUX",
    "TEXT_TO_IMAGE_KINDS",
    "ModelKind",
    "check_hub_model",
    "check_model_path",
    "check_number_flags",
    "looks_like_hub_id",
    "pipeline_components",
]
