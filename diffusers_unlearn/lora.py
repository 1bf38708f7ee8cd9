"""LoRA adapters for diffusers UNets: target presets, training setup, and save/load in diffusers' format.

Both `UNet2DModel` (DDPM) and `UNet2DConditionModel` (Stable Diffusion) are supported. `UNet2DModel` has no
PEFT adapter methods in diffusers, so this module adds them with a small subclass, `LoRAUNet2DModel`.

A saved adapter is one safetensors file, by default `pytorch_lora_weights.safetensors`, in the layout that
`StableDiffusionPipeline.save_lora_weights` writes:

- the keys are PEFT's LoRA keys with a `unet.` prefix, for example
  `unet.mid_block.attentions.0.to_q.lora_A.weight`;
- the header holds the adapter's `LoraConfig` (rank, alpha, targets) under diffusers' `lora_adapter_metadata`
  key. Without it, diffusers' loader would assume alpha = rank;
- extra entries you pass (for example `{"method": "siss"}`) are also stored in the header, as strings.

So a Stable Diffusion adapter loads with plain `pipe.load_lora_weights(dir)`, and a DDPM adapter loads with
`LoRAUNet2DModel.load_lora_adapter(dir, weight_name="pytorch_lora_weights.safetensors", prefix="unet")`.

Example:
    >>> from diffusers import UNet2DModel
    >>> unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
    ...                    layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    ...                    up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)
    >>> unet = add_lora(unet, rank=4, lora_alpha=8, targets="attention")
    >>> optimizer = make_optimizer(trainable_parameters(unet), learning_rate=1e-4)
    >>> # ... train ...
    >>> path = save_lora_weights(unet, "out", metadata={"method": "siss"})  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch
from diffusers import UNet2DModel
from diffusers.loaders import PeftAdapterMixin
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY, LORA_WEIGHT_NAME_SAFE
from torch import nn

from .fileio import atomic_write_bytes, safetensors_bytes

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_WEIGHT_NAME",
    "LORA_TARGET_PRESETS",
    "LoRAUNet2DModel",
    "add_lora",
    "add_text_encoder_lora",
    "as_lora_unet",
    "as_plain_unet",
    "count_parameters",
    "load_lora_weights",
    "lora_state_dict",
    "lora_weight_deltas",
    "make_optimizer",
    "prepare_full_finetune",
    "read_lora_metadata",
    "resolve_lora_targets",
    "save_lora_weights",
    "trainable_parameters",
]

DEFAULT_WEIGHT_NAME = LORA_WEIGHT_NAME_SAFE  # "pytorch_lora_weights.safetensors"

# The prefix diffusers' pipeline loaders expect in front of UNet keys (`StableDiffusionPipeline.unet_name`).
UNET_PREFIX = "unet"
TEXT_ENCODER_PREFIX = "text_encoder"

_ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
_RESNET_CONV_TARGETS = ("conv1", "conv2", "conv_shortcut")

LORA_TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    # The attention projections: the usual choice for Stable Diffusion LoRA.
    "attention": _ATTENTION_TARGETS,
    # Attention plus the ResNet convolutions. Small DDPM UNets have few attention layers, so an adapter
    # restricted to them can be too weak to unlearn anything.
    "attention_conv": _ATTENTION_TARGETS + _RESNET_CONV_TARGETS,
    # The two 3x3 convolutions of every ResNet block, no attention: the text conditioning stays untouched.
    "conv": ("conv1", "conv2"),
}

# Layer types that peft's LoRA can wrap. Matching custom target names only against these gives a clear error
# here instead of an obscure one inside peft.
_LORA_SUPPORTED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)

# Header keys owned by safetensors, diffusers or `read_lora_metadata`; extra metadata may not use them.
_RESERVED_METADATA_KEYS = frozenset({"format", LORA_ADAPTER_METADATA_KEY, "rank", "lora_alpha", "target_modules"})


# ---------------------------------------------------------------------------------------------------------------
# The UNet2DModel subclass
# ---------------------------------------------------------------------------------------------------------------


class LoRAUNet2DModel(UNet2DModel, PeftAdapterMixin):
    """`UNet2DModel` with diffusers' PEFT adapter methods.

    It adds `add_adapter`, `save_lora_adapter`, `load_lora_adapter`, `set_adapters`, `fuse_lora`, `unload_lora`
    and the rest of `PeftAdapterMixin`. The weights and config are those of `UNet2DModel`, so it loads from any
    directory a plain `UNet2DModel` was saved to.

    Before you put the model in a pipeline or `save_pretrained` it for plain diffusers, call `unload_lora()` (or
    `fuse_lora()` then `unload_lora()`) and `as_plain_unet(model)`. Otherwise the saved config names this class.

    Example:
        >>> unet = LoRAUNet2DModel.from_pretrained("path/to/ddpm", subfolder="unet")  # doctest: +SKIP
        >>> unet.load_lora_adapter("adapter_dir", weight_name="pytorch_lora_weights.safetensors",
        ...                        prefix="unet")  # doctest: +SKIP
    """


def as_lora_unet(model: nn.Module) -> nn.Module:
    """Return `model` with diffusers' PEFT adapter methods.

    A plain `UNet2DModel` is converted in place to `LoRAUNet2DModel` by changing its class. Nothing is copied:
    the returned object is `model` itself, with the same weights, device and dtype. A model that already has the
    methods, such as `UNet2DConditionModel` or `LoRAUNet2DModel`, is returned unchanged.

    Example:
        >>> unet = as_lora_unet(UNet2DModel(sample_size=8, block_out_channels=(32, 64),
        ...                                 norm_num_groups=8))  # doctest: +SKIP
        >>> type(unet).__name__  # doctest: +SKIP
        'LoRAUNet2DModel'
    """
    if isinstance(model, PeftAdapterMixin):
        return model
    if type(model) is UNet2DModel:
        # Changing the class keeps every attribute, parameter, buffer and hook, so the caller's references
        # (optimizers, EMA copies, accelerate wrappers) stay valid. The subclass adds methods only.
        model.__class__ = LoRAUNet2DModel
        return model
    raise TypeError(
        f"Cannot add LoRA adapter methods to {type(model).__name__}: expected a UNet2DModel, a UNet2DConditionModel "
        "or another diffusers model with PeftAdapterMixin. For a subclass of UNet2DModel, define "
        "`class MyLoRAUNet(MyUNet, PeftAdapterMixin)` yourself."
    )


def as_plain_unet(model: nn.Module) -> nn.Module:
    """Turn a `LoRAUNet2DModel` without adapters back into a plain `UNet2DModel`, in place.

    Call it before `save_pretrained` or before building a pipeline, so that the saved config names
    `UNet2DModel` and the result loads with plain diffusers. Other models are returned unchanged.

    Example:
        >>> unet.fuse_lora(); unet.unload_lora()  # doctest: +SKIP
        >>> as_plain_unet(unet).save_pretrained("merged/unet")  # doctest: +SKIP
    """
    if type(model) is not LoRAUNet2DModel:
        return model
    if _has_lora_layers(model):
        raise ValueError(
            "The model still has LoRA layers. Call `model.unload_lora()` first (after `model.fuse_lora()` if you "
            "want to keep the adapter's effect in the base weights)."
        )
    model.__class__ = UNet2DModel
    return model


def _has_lora_layers(model: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(module, BaseTunerLayer) for module in model.modules())


# ---------------------------------------------------------------------------------------------------------------
# Target modules
# ---------------------------------------------------------------------------------------------------------------


def _lora_capable_module_names(model: nn.Module) -> list[str]:
    """Names of the layers LoRA can wrap, as they appear in the un-adapted model."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    names = []
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            # Already adapted: the wrapper carries the original name; its children (base_layer, lora_A, ...)
            # are skipped below because they are not named like targets of the un-adapted model.
            names.append(name)
        elif isinstance(module, _LORA_SUPPORTED_LAYERS) and not _is_inside_lora_wrapper(name):
            names.append(name)
    return names


def _is_inside_lora_wrapper(name: str) -> bool:
    parts = name.split(".")
    return any(part in {"base_layer", "lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"} for part in parts)


def _matches(module_name: str, target: str) -> bool:
    # The same rule peft applies to a list of `target_modules`: the full name, or a suffix after a dot.
    return module_name == target or module_name.endswith("." + target)


def resolve_lora_targets(
    model: nn.Module, preset_or_list: str | Sequence[str], presets: Optional[Mapping[str, Sequence[str]]] = None
) -> list[str]:
    """Turn a preset name or a list of module names into the `target_modules` for a `LoraConfig`.

    `preset_or_list` is one of:
    - a preset in `LORA_TARGET_PRESETS`: `"attention"` (to_q, to_k, to_v, to_out.0), `"attention_conv"`
      (attention plus the ResNet convolutions conv1, conv2 and conv_shortcut) or `"conv"` (conv1 and
      conv2 of every ResNet block, no attention). Names the model lacks are dropped, for example `conv_shortcut` in a UNet whose blocks
      keep their width;
    - custom module names, as a comma-separated string or a list. A name matches a module whose full name equals
      it or ends with `"." + name`, as in peft. Every custom name must match at least one LoRA-capable layer.

    `presets` replaces `LORA_TARGET_PRESETS` (a model family's `lora_target_presets`, e.g. SD3's with the joint
    attention's context projections).

    Raises `ValueError`, listing the presets, when nothing matches.

    Example:
        >>> resolve_lora_targets(unet, "attention")  # doctest: +SKIP
        ['to_q', 'to_k', 'to_v', 'to_out.0']
        >>> resolve_lora_targets(unet, "to_q,to_v")  # doctest: +SKIP
        ['to_q', 'to_v']
    """
    module_names = _lora_capable_module_names(model)
    model_name = type(model).__name__
    presets = LORA_TARGET_PRESETS if presets is None else presets
    choices = ", ".join(repr(name) for name in presets)

    if isinstance(preset_or_list, str) and preset_or_list.strip() in presets:
        preset = preset_or_list.strip()
        found = [t for t in presets[preset] if any(_matches(n, t) for n in module_names)]
        if not found:
            raise ValueError(
                f"LoRA target preset {preset!r} matches no layer of {model_name} "
                f"(it looks for {list(presets[preset])}). Choose another preset ({choices}) "
                "or pass module names."
            )
        return found

    if isinstance(preset_or_list, str):
        requested = [part.strip() for part in preset_or_list.split(",")]
    else:
        requested = [str(part).strip() for part in preset_or_list]
    requested = [name for name in requested if name]
    if not requested:
        raise ValueError(f"No LoRA targets given. Use a preset ({choices}) or a list of module names.")

    unknown = [t for t in requested if not any(_matches(n, t) for n in module_names)]
    if unknown:
        raise ValueError(
            f"Unknown LoRA target(s) {unknown}: not a preset ({choices}) and no Linear/Conv layer of "
            f"{model_name} is named like that (a name must equal a module's name or end it after a dot, "
            "for example 'to_q' or 'attentions.0.to_q')."
        )
    # Keep the order given, drop duplicates.
    return list(dict.fromkeys(requested))


# ---------------------------------------------------------------------------------------------------------------
# Adding LoRA, or preparing a full fine-tune
# ---------------------------------------------------------------------------------------------------------------


def add_lora(
    model: nn.Module,
    rank: int = 4,
    lora_alpha: float | None = None,
    targets: str | Sequence[str] = "attention",
    adapter_name: str = "default",
    init_lora_weights: bool | str = True,
    presets: Optional[Mapping[str, Sequence[str]]] = None,
) -> nn.Module:
    """Attach a trainable LoRA adapter to a UNet (or a transformer) and freeze everything else.

    `targets` is a preset name of `presets` (default `LORA_TARGET_PRESETS`; pass a model family's
    `lora_target_presets`) or module names, as `resolve_lora_targets` reads them.

    The adapter's output is scaled by `lora_alpha / rank`; `lora_alpha` defaults to `rank` (scale 1). With
    `init_lora_weights=True`, lora_B starts at zero, so the adapted model starts equal to the base model.
    A `UNet2DModel` is converted to `LoRAUNet2DModel` in place (see `as_lora_unet`); use the returned model.

    Only the new adapter's parameters have `requires_grad=True` afterwards.

    Example:
        >>> unet = add_lora(unet, rank=4, lora_alpha=8, targets="attention_conv")  # doctest: +SKIP
        >>> params = trainable_parameters(unet)  # lora_A / lora_B only  # doctest: +SKIP
    """
    from peft import LoraConfig

    lora_alpha = _checked_rank_and_alpha(rank, lora_alpha)
    model = as_lora_unet(model)
    _check_new_adapter_name(model, adapter_name)

    config = LoraConfig(
        r=rank,
        lora_alpha=lora_alpha,
        target_modules=resolve_lora_targets(model, targets, presets),
        init_lora_weights=init_lora_weights,
    )
    model.add_adapter(config, adapter_name=adapter_name)
    _train_only_adapter(model, adapter_name)
    return model


TEXT_ENCODER_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def add_text_encoder_lora(
    text_encoder: nn.Module, rank: int = 4, lora_alpha: float | None = None, adapter_name: str = "default"
) -> nn.Module:
    """LoRA on a CLIP text encoder's attention projections (q, k, v, out), as diffusers' LoRA scripts do with
    `--train_text_encoder`. Only the adapter trains; the base text encoder stays frozen.

    The layers are injected with peft itself, not with transformers' `add_adapter`: transformers' PEFT integration
    is gated on a minimum peft version (5.24 asks for peft >= 0.22, which does not exist), peft's injection is
    not. The result is what `add_adapter` builds: the same LoRA layers, `text_encoder.peft_config[adapter_name]`,
    the new adapter active. So `save_lora_weights(..., text_encoder=...)` and diffusers' `load_lora_weights`,
    `set_adapters` and `delete_adapters` work with it.

    Example:
        >>> text_encoder = add_text_encoder_lora(pipe.text_encoder, rank=4)  # doctest: +SKIP
    """
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    lora_alpha = _checked_rank_and_alpha(rank, lora_alpha)
    _check_new_adapter_name(text_encoder, adapter_name)

    text_encoder.requires_grad_(False)
    config = LoraConfig(
        r=rank, lora_alpha=lora_alpha, init_lora_weights=True, target_modules=list(TEXT_ENCODER_LORA_TARGETS)
    )
    # peft adds the config to `text_encoder.peft_config` (creating it for the first adapter).
    inject_adapter_in_model(config, text_encoder, adapter_name=adapter_name)
    # transformers' flag for "adapters are attached": its `load_adapter` (diffusers' loader) then refuses a
    # duplicate name, and diffusers' `delete_adapters` drops the config with the layers, as after `add_adapter`.
    text_encoder._hf_peft_config_loaded = True
    for module in text_encoder.modules():
        if isinstance(module, BaseTunerLayer):
            module.set_adapter(adapter_name)
    _train_only_adapter(text_encoder, adapter_name)
    return text_encoder


def _checked_rank_and_alpha(rank: int, lora_alpha: float | None) -> float:
    """Validate a LoRA rank and alpha; return alpha, which defaults to the rank (scale 1)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be an integer >= 1, got {rank!r}.")
    if lora_alpha is None:
        lora_alpha = rank
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not lora_alpha > 0:
        raise ValueError(f"lora_alpha must be a number > 0, got {lora_alpha!r}.")
    return lora_alpha


def _check_new_adapter_name(model: nn.Module, adapter_name: str) -> None:
    existing = getattr(model, "peft_config", None) or {}
    if adapter_name in existing:
        raise ValueError(
            f"The {type(model).__name__} already has an adapter named {adapter_name!r}; choose another "
            f"adapter_name (existing: {sorted(existing)})."
        )


def _train_only_adapter(model: nn.Module, adapter_name: str) -> None:
    """Freeze everything except `adapter_name`'s lora_A and lora_B.

    Set explicitly rather than relying on how peft marks adapters, so that the base weights and any other
    adapter stay frozen whatever the peft version.
    """
    model.requires_grad_(False)
    for module in _lora_layers(model, adapter_name).values():
        module.lora_A[adapter_name].requires_grad_(True)
        module.lora_B[adapter_name].requires_grad_(True)


def prepare_full_finetune(model: nn.Module) -> nn.Module:
    """Make every parameter trainable: the alternative to LoRA, for full fine-tuning.

    Example:
        >>> unet = prepare_full_finetune(unet)  # doctest: +SKIP
        >>> count_parameters(unet, trainable_only=True) == count_parameters(unet)  # doctest: +SKIP
        True
    """
    if _has_lora_layers(model):
        raise ValueError(
            "The model has LoRA layers; a full fine-tune would train the base weights and the adapter together. "
            "Call `model.fuse_lora()` and/or `model.unload_lora()` first, or train only the adapter."
        )
    model.requires_grad_(True)
    return model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters with `requires_grad=True`, as a list.

    A list, not a `filter(...)` iterator: an iterator is consumed by the optimizer, and a later
    `clip_grad_norm_` over it silently clips nothing.

    Example:
        >>> optimizer = make_optimizer(trainable_parameters(unet), learning_rate=1e-4)  # doctest: +SKIP
    """
    return [param for param in model.parameters() if param.requires_grad]


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters in `model` (each shared parameter once).

    Example:
        >>> count_parameters(nn.Linear(3, 2))
        8
    """
    return sum(param.numel() for param in model.parameters() if param.requires_grad or not trainable_only)


# ---------------------------------------------------------------------------------------------------------------
# Adapter weights
# ---------------------------------------------------------------------------------------------------------------


def _check_adapter(model: nn.Module, adapter_name: str) -> None:
    adapters = getattr(model, "peft_config", None) or {}
    if adapter_name not in adapters:
        raise ValueError(
            f"{type(model).__name__} has no LoRA adapter named {adapter_name!r} "
            f"(adapters: {sorted(adapters) or 'none'}). Add one with `add_lora` or `load_lora_weights`."
        )


def _lora_layers(model: nn.Module, adapter_name: str) -> dict[str, Any]:
    """The peft LoRA layers that carry `adapter_name`, keyed by module name."""
    from peft.tuners.lora import LoraLayer

    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A
    }


def lora_state_dict(
    model: nn.Module, adapter_name: str = "default", prefix: str | None = None
) -> dict[str, torch.Tensor]:
    """The adapter's weights in the key layout of diffusers' LoRA files.

    Keys are PEFT's (`<module>.lora_A.weight`, `<module>.lora_B.weight`) without the adapter name. With
    `prefix="unet"`, each key starts with `unet.`, as inside a pipeline's LoRA file. The tensors are detached and
    share storage with the model.

    diffusers' training examples pass this dict through `convert_state_dict_to_diffusers`, which renames only the
    attention keys (`to_q.lora_A` -> `to_q.lora.down`) and leaves conv keys alone. diffusers' loader checks only
    the first key of a file to decide whether to rename the keys back. So an `attention_conv` adapter whose first
    key is a conv comes back without its attention weights, with only a warning. PEFT's names load correctly in
    every case; diffusers' own `save_lora_adapter` writes them too.

    Example:
        >>> sd = lora_state_dict(unet, prefix="unet")  # doctest: +SKIP
        >>> next(iter(sd))  # doctest: +SKIP
        'unet.down_blocks.1.attentions.0.to_q.lora_A.weight'
    """
    from peft.utils import get_peft_model_state_dict

    _check_adapter(model, adapter_name)
    state_dict = get_peft_model_state_dict(model, adapter_name=adapter_name)
    head = f"{prefix}." if prefix else ""
    return {f"{head}{key}": tensor.detach() for key, tensor in state_dict.items()}


def lora_weight_deltas(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The weight change each LoRA layer applies: B @ A * scaling, shaped like the base weight.

    The result is a differentiable function of lora_A and lora_B, so a loss on it (for example a penalty on the
    size of the change) back-propagates into the adapter. Keys are the base weights' names in the un-adapted
    model, for example `"mid_block.attentions.0.to_q.weight"`, so `base_state_dict[key] + delta` is the merged
    weight. For Conv2d the delta has the conv weight's shape (out, in, kh, kw). The scaling includes any weight
    set with `set_adapters`, as in the forward pass.

    Example:
        >>> deltas = lora_weight_deltas(unet)  # doctest: +SKIP
        >>> penalty = sum(d.pow(2).sum() for d in deltas.values())  # doctest: +SKIP
        >>> penalty.backward()  # gradients reach lora_A and lora_B  # doctest: +SKIP
    """
    _check_adapter(model, adapter_name)
    deltas = {}
    for name, module in _lora_layers(model, adapter_name).items():
        if module.use_dora.get(adapter_name, False):
            # DoRA rescales the merged weight by a magnitude vector; its delta is not B @ A * scaling.
            raise NotImplementedError(f"lora_weight_deltas does not support DoRA (layer {name!r}).")
        # peft's get_delta_weight builds the delta from lora_A/lora_B weights with plain differentiable ops
        # (matmul, or a convolution for conv kernels larger than 1x1); it does not detach. The tests check
        # both the gradients and that base + delta equals the weight after merging.
        delta = module.get_delta_weight(adapter_name)
        base_weight = module.get_base_layer().weight
        if delta.shape != base_weight.shape:
            raise RuntimeError(
                f"LoRA delta for {name!r} has shape {tuple(delta.shape)}, base weight {tuple(base_weight.shape)}."
            )
        deltas[f"{name}.weight"] = delta
    return deltas


# ---------------------------------------------------------------------------------------------------------------
# Saving and loading
# ---------------------------------------------------------------------------------------------------------------


def _adapter_metadata(model: nn.Module, adapter_name: str) -> dict[str, Any]:
    """The adapter's `LoraConfig` as a JSON-ready dict, as diffusers' training scripts store it.

    Only the fields that differ from `LoraConfig()` are kept, plus r, lora_alpha and target_modules. diffusers'
    loader rebuilds the config with `LoraConfig(**metadata)`, and fields an older peft does not know would make
    that call fail.
    """
    from peft import LoraConfig

    config = model.peft_config[adapter_name].to_dict()
    defaults = LoraConfig().to_dict()
    always = {"r", "lora_alpha", "target_modules"}
    metadata = {}
    for key, value in config.items():
        if key in always or value != defaults.get(key):
            if isinstance(value, set):
                value = sorted(value)  # JSON has no sets; sorted for a reproducible header
            metadata[key] = value
    metadata.pop("peft_version", None)
    metadata.pop("base_model_name_or_path", None)
    return metadata


def _header_entries(extra: Mapping[str, Any] | None) -> dict[str, str]:
    """Extra header entries; safetensors headers hold strings only, so non-strings are stored as JSON."""
    entries = {}
    for key, value in (extra or {}).items():
        key = str(key)
        if key in _RESERVED_METADATA_KEYS:
            raise ValueError(f"Metadata key {key!r} is reserved; reserved keys: {sorted(_RESERVED_METADATA_KEYS)}.")
        entries[key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return entries


def _atomic_write_safetensors(tensors: dict[str, torch.Tensor], path: str, header: dict[str, str]) -> None:
    """Write a safetensors file so that `path` only ever holds a complete file.

    The bytes go to a temporary file in the same directory and are renamed over `path` when complete
    (`fileio.atomic_write`). The header is canonical (sorted keys), so the same weights and header entries
    always give the same bytes.
    """
    atomic_write_bytes(path, safetensors_bytes(tensors, header))


def save_lora_weights(
    model: nn.Module,
    output_dir: str | os.PathLike,
    adapter_name: str = "default",
    metadata: Mapping[str, Any] | None = None,
    weight_name: str = DEFAULT_WEIGHT_NAME,
    text_encoder: nn.Module | None = None,
    text_encoder_2: nn.Module | None = None,
    pipeline_class: type | None = None,
    denoiser_prefix: str = UNET_PREFIX,
) -> str:
    """Save one adapter as a diffusers LoRA file and return the path written.

    With `text_encoder` (a transformers text model carrying an adapter of the same name, as with the SD script's
    `--train_text_encoder`), its LoRA goes into the same file under `text_encoder.`, where
    `StableDiffusionPipeline.load_lora_weights` looks for it. `text_encoder_2` (SDXL's second encoder) goes
    under `text_encoder_2.`. `pipeline_class` is the diffusers pipeline (or LoRA loader mixin) whose
    `save_lora_weights` class method lays out the file: `StableDiffusionPipeline` by default,
    `StableDiffusionXLPipeline` when `text_encoder_2` is given. `denoiser_prefix` is the pipeline's name for
    `model` and the prefix of its keys: "unet" (default) or "transformer" (with `pipeline_class`
    `StableDiffusion3Pipeline` or `FluxPipeline`, whose loaders read `transformer.` keys).

    The file is what `StableDiffusionPipeline.save_lora_weights` writes, for both UNet types: `unet.`-prefixed
    keys and the adapter's `LoraConfig` (rank, alpha, targets) in the header, so loaders restore alpha even when
    it differs from the rank. `metadata` adds string entries to the header, for example the unlearning method;
    read them back with `read_lora_metadata`. The write is atomic: the file at the final path is either the
    previous one or the complete new one.

    Example:
        >>> path = save_lora_weights(unet, "out", metadata={"method": "siss"})  # doctest: +SKIP
        >>> read_lora_metadata(path)["method"]  # doctest: +SKIP
        'siss'
    """
    from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

    if pipeline_class is None:
        with_second_encoder = text_encoder_2 is not None
        pipeline_class = StableDiffusionXLLoraLoaderMixin if with_second_encoder else StableDiffusionLoraLoaderMixin
    _check_adapter(model, adapter_name)
    if not weight_name.endswith(".safetensors"):
        raise ValueError(f"weight_name must end with .safetensors, got {weight_name!r}.")
    output_dir = os.fspath(output_dir)
    if os.path.isfile(output_dir):
        # diffusers only logs an error in this case and writes nothing.
        raise ValueError(f"output_dir {output_dir!r} is a file; pass a directory.")
    os.makedirs(output_dir, exist_ok=True)

    adapter_metadata = _adapter_metadata(model, adapter_name)
    # diffusers stores each component's config with the component's prefix ("unet.r", "unet.lora_alpha", ...)
    # under one header key, and strips the prefix again when loading into that component.
    combined = {f"{denoiser_prefix}.{key}": value for key, value in adapter_metadata.items()}
    # Keyword arguments of the loader's save_lora_weights, e.g. text_encoder_2_lora_layers=...
    text_encoder_kwargs = {}
    for prefix, encoder in ((TEXT_ENCODER_PREFIX, text_encoder), (f"{TEXT_ENCODER_PREFIX}_2", text_encoder_2)):
        if encoder is None:
            continue
        _check_adapter(encoder, adapter_name)
        encoder_metadata = _adapter_metadata(encoder, adapter_name)
        combined.update({f"{prefix}.{key}": value for key, value in encoder_metadata.items()})
        text_encoder_kwargs[f"{prefix}_lora_layers"] = lora_state_dict(encoder, adapter_name)
        text_encoder_kwargs[f"{prefix}_lora_adapter_metadata"] = encoder_metadata
    header = {
        "format": "pt",
        LORA_ADAPTER_METADATA_KEY: json.dumps(combined, indent=2, sort_keys=True),
        **_header_entries(metadata),
    }
    written = []

    def atomic_save(state_dict: dict[str, torch.Tensor], filename: str) -> None:
        # diffusers adds its adapter-metadata header only in its default save function; a custom one (needed
        # here for the extra entries and the atomic write) must add it itself, which `header` does.
        _atomic_write_safetensors(state_dict, filename, header)
        written.append(filename)

    # The pipeline's class method prefixes the keys with "unet." (or "transformer.") exactly as plain diffusers
    # does. It needs no pipeline instance, and the file layout is the same for a DDPM UNet2DModel.
    pipeline_class.save_lora_weights(
        save_directory=output_dir,
        weight_name=weight_name,
        save_function=atomic_save,
        safe_serialization=True,
        **{
            f"{denoiser_prefix}_lora_layers": lora_state_dict(model, adapter_name),
            f"{denoiser_prefix}_lora_adapter_metadata": adapter_metadata,
        },
        **text_encoder_kwargs,
    )
    if not written:
        raise RuntimeError(f"diffusers wrote no LoRA file to {output_dir!r}.")
    return written[0]


def _resolve_lora_file(path_or_dir: str | os.PathLike, weight_name: str) -> tuple[str, str]:
    """Split a file or directory argument into (directory, file name), refusing pickled formats."""
    path = os.fspath(path_or_dir)
    if os.path.isdir(path):
        directory, name = path, weight_name
    else:
        directory, name = os.path.split(path)
        directory = directory or "."
    if not name.endswith(".safetensors"):
        raise ValueError(
            f"Refusing to load {os.path.join(directory, name)!r}: only .safetensors LoRA files are loaded. "
            ".bin/.pt/.pth files are pickles, which can run code when loaded. Convert a file you trust with "
            "`safetensors.torch.save_file(torch.load(path, weights_only=True), 'pytorch_lora_weights.safetensors')`."
        )
    full_path = os.path.join(directory, name)
    if not os.path.isfile(full_path):
        raise FileNotFoundError(f"No LoRA file at {full_path!r}.")
    return directory, name


def read_lora_metadata(
    path: str | os.PathLike, weight_name: str = DEFAULT_WEIGHT_NAME, denoiser_prefix: str = UNET_PREFIX
) -> dict[str, Any]:
    """Read an adapter file's header: rank, alpha, target modules, and any extra entries saved with it.

    `path` is the file or the directory holding `weight_name`; the rank, alpha and targets are those of the
    denoiser, whose entries carry `denoiser_prefix` ("unet", or "transformer" for SD3 and Flux files). `rank` and `lora_alpha` are None when the file
    has no adapter config (for example one written without `unet_lora_adapter_metadata`; diffusers then assumes
    alpha = rank). Extra entries are returned as the strings stored.

    Example:
        >>> read_lora_metadata("out")  # doctest: +SKIP
        {'rank': 4, 'lora_alpha': 8, 'target_modules': ['to_k', 'to_out.0', 'to_q', 'to_v'], 'method': 'siss'}
    """
    from safetensors import safe_open

    directory, name = _resolve_lora_file(path, weight_name)
    with safe_open(os.path.join(directory, name), framework="pt", device="cpu") as handle:
        header = dict(handle.metadata() or {})

    config = json.loads(header.get(LORA_ADAPTER_METADATA_KEY) or "{}")
    # Pipeline files prefix each field with the component ("unet.r"); files from `save_lora_adapter` do not.
    config = {key.removeprefix(f"{denoiser_prefix}."): value for key, value in config.items()}
    result: dict[str, Any] = {
        "rank": config.get("r"),
        "lora_alpha": config.get("lora_alpha"),
        "target_modules": config.get("target_modules"),
    }
    for key, value in header.items():
        if key not in _RESERVED_METADATA_KEYS:
            result[key] = value
    return result


def load_lora_weights(
    model: nn.Module,
    path_or_dir: str | os.PathLike,
    adapter_name: str = "default",
    weight_name: str = DEFAULT_WEIGHT_NAME,
    denoiser_prefix: str = UNET_PREFIX,
) -> nn.Module:
    """Load a LoRA adapter from a safetensors file into a UNet (or a transformer) and return the model.

    Works for `UNet2DModel` (converted to `LoRAUNet2DModel` in place) and `UNet2DConditionModel`. Files with
    `unet.`-prefixed keys (pipeline files, `save_lora_weights`) and files without a prefix
    (`save_lora_adapter`) both load; `denoiser_prefix="transformer"` reads SD3/Flux pipeline files instead. Only safetensors is accepted; a `.bin`/`.pt` path raises `ValueError`.
    The adapter becomes the active one and, as after `add_lora`, the only trainable parameters, so training
    can resume from it. Raises `ValueError` if some weights in the file match no layer of
    the model (diffusers itself only warns), and removes the partly loaded adapter again.

    Example:
        >>> unet = load_lora_weights(UNet2DModel.from_pretrained("ddpm/unet"), "out")  # doctest: +SKIP
    """
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft
    from safetensors import safe_open

    directory, name = _resolve_lora_file(path_or_dir, weight_name)
    with safe_open(os.path.join(directory, name), framework="pt", device="cpu") as handle:
        file_keys = list(handle.keys())
        header = handle.metadata() or {}

    # A file written for a pipeline prefixes the denoiser's keys with "unet." (or "transformer."); a bare model
    # file has no prefix.
    prefix = denoiser_prefix if any(key.startswith(f"{denoiser_prefix}.") for key in file_keys) else None
    if prefix is not None:
        file_keys = [key.removeprefix(f"{prefix}.") for key in file_keys if key.startswith(f"{prefix}.")]
    if not file_keys:
        raise ValueError(f"{os.path.join(directory, name)!r} holds no LoRA weights.")
    if LORA_ADAPTER_METADATA_KEY not in header:
        logger.warning(
            "%s has no LoRA config in its header; diffusers will assume lora_alpha == rank.",
            os.path.join(directory, name),
        )

    model = as_lora_unet(model)
    model.load_lora_adapter(directory, weight_name=name, prefix=prefix, adapter_name=adapter_name)

    # diffusers only warns when file keys match no layer. Fail loudly instead: a partly loaded adapter gives
    # a model that is neither the base model nor the unlearned one.
    expected = set(convert_unet_state_dict_to_peft(dict.fromkeys(file_keys)).keys())
    loaded = set(lora_state_dict(model, adapter_name).keys()) if adapter_name in model.peft_config else set()
    missing = sorted(expected - loaded)
    if missing:
        if adapter_name in model.peft_config:
            model.delete_adapters(adapter_name)  # leave the model as it was, not half adapted
        raise ValueError(
            f"{len(missing)} LoRA weights in {os.path.join(directory, name)!r} match no layer of "
            f"{type(model).__name__}, for example {missing[:3]}. Is this adapter for a different model?"
        )
    _train_only_adapter(model, adapter_name)
    return model


# ---------------------------------------------------------------------------------------------------------------
# Optimizer
# ---------------------------------------------------------------------------------------------------------------


def make_optimizer(
    params: Iterable[nn.Parameter] | Iterable[dict[str, Any]],
    learning_rate: float,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 1e-2,
    eps: float = 1e-8,
    use_8bit_adam: bool = False,
) -> torch.optim.Optimizer:
    """AdamW over `params`: torch's, or bitsandbytes' 8-bit AdamW with `use_8bit_adam=True`.

    8-bit AdamW keeps the optimizer state in 8 bits for tensors of at least 4096 elements (smaller ones stay in
    32 bits). It needs `pip install "diffusers-unlearn[bnb]"`.

    Example:
        >>> model = nn.Linear(4, 4)
        >>> optimizer = make_optimizer(model.parameters(), learning_rate=1e-3)
        >>> type(optimizer).__name__
        'AdamW'
    """
    # Materialise once: a generator would be consumed here and be empty for anyone iterating it later.
    params = list(params)
    if not params:
        raise ValueError("make_optimizer got no parameters; is everything frozen? (see trainable_parameters)")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate!r}.")

    if use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as error:
            raise ImportError(
                "use_8bit_adam=True needs bitsandbytes. Install it with "
                '`pip install "diffusers-unlearn[bnb]"` (or `pip install "bitsandbytes>=0.50"`).'
            ) from error
        optimizer_class = bnb.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    return optimizer_class(params, lr=learning_rate, betas=betas, weight_decay=weight_decay, eps=eps)
