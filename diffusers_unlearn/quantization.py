"""A bitsandbytes-quantised base denoiser for LoRA unlearning (QLoRA), as diffusers' QLoRA recipes for Flux do.

`--bnb_quantization_config_path` names a JSON file of `diffusers.BitsAndBytesConfig` keyword arguments, the flag
and file of diffusers' official `train_dreambooth_lora_flux.py`. Only the denoiser (UNet or transformer) is
quantised; the text encoders and the VAE load as without the flag. The LoRA adapter trains in float32 on top of
the frozen quantised base and is saved in the plain layout, so it loads into the unquantised pipeline.

Both 4-bit (`"load_in_4bit": true`, NF4 or FP4) and 8-bit (`"load_in_8bit": true`, LLM.int8()) bases are
allowed: peft wraps bitsandbytes' `Linear4bit` and `Linear8bitLt` layers alike, and the adapter is the same.

Everything here is checked before any model loads, with one-line messages that name the fix:
the file must be a JSON object of known `BitsAndBytesConfig` arguments that quantises in 4 or 8 bit;
bitsandbytes must be installed; and a GPU must be present, because diffusers' bitsandbytes loader refuses to
quantise without one (bitsandbytes itself runs NF4 and int8 layers on the CPU; the tests use that).

Example:
    >>> import json, tempfile
    >>> with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
    ...     json.dump({"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}, f)
    >>> config = read_bnb_quantization_config(f.name, compute_dtype=torch.bfloat16)
    >>> config.load_in_4bit, config.bnb_4bit_quant_type, config.bnb_4bit_compute_dtype
    (True, 'nf4', torch.bfloat16)
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
from typing import Any

import torch

from .errors import UserInputError

FLAG = "--bnb_quantization_config_path"
FOUR_BIT_QUANT_TYPES = ("nf4", "fp4")


def _config_argument_names() -> set[str]:
    """The keyword arguments `diffusers.BitsAndBytesConfig` takes by name (it only warns about others)."""
    from diffusers import BitsAndBytesConfig

    parameters = inspect.signature(BitsAndBytesConfig.__init__).parameters
    return {name for name, p in parameters.items() if name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD}


def read_bnb_quantization_config(path: str | os.PathLike, compute_dtype: torch.dtype = torch.float32):
    """The `diffusers.BitsAndBytesConfig` of a JSON file of its keyword arguments, validated.

    `compute_dtype` becomes `bnb_4bit_compute_dtype` when a 4-bit file does not set it (bitsandbytes' own default
    is float32, which computes a bf16 run's layers in float32); the scripts pass the `--mixed_precision` dtype.

    Raises:
        UserInputError: the file is unreadable or not JSON, not an object, names an unknown argument (a typo
            would otherwise be ignored with a warning, and the layers quantised another way), quantises neither
            in 4 nor in 8 bit (or both), or has a 4-bit quant type other than nf4/fp4.
    """
    from diffusers import BitsAndBytesConfig

    where = f"{FLAG} {os.fspath(path)}"
    try:
        with open(path, encoding="utf-8") as handle:
            kwargs = json.load(handle)
    except OSError as error:
        raise UserInputError(f"{where}: cannot read it ({error.strerror or error}); give a readable JSON file such as examples/nf4_config.json.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserInputError(f"{where} is not valid JSON ({error}); see examples/nf4_config.json.") from None
    if not isinstance(kwargs, dict):
        raise UserInputError(f"{where} must hold a JSON object of BitsAndBytesConfig arguments, such as {{\"load_in_4bit\": true, \"bnb_4bit_quant_type\": \"nf4\"}}.")
    unknown = sorted(set(kwargs) - _config_argument_names())
    if unknown:
        raise UserInputError(f"{where}: unknown BitsAndBytesConfig argument(s) {', '.join(unknown)}; the known ones are {', '.join(sorted(_config_argument_names()))}.")
    four, eight = kwargs.get("load_in_4bit", False) is True, kwargs.get("load_in_8bit", False) is True
    if four == eight:
        what = "both" if four else "neither"
        raise UserInputError(f"{where} quantises in {what} 4 and 8 bit; set exactly one of \"load_in_4bit\": true (NF4, as examples/nf4_config.json) or \"load_in_8bit\": true.")
    if four and kwargs.get("bnb_4bit_quant_type", "fp4") not in FOUR_BIT_QUANT_TYPES:
        raise UserInputError(f"{where}: bnb_4bit_quant_type {kwargs['bnb_4bit_quant_type']!r} is not one of {', '.join(FOUR_BIT_QUANT_TYPES)}.")
    if four and "bnb_4bit_compute_dtype" not in kwargs:
        kwargs["bnb_4bit_compute_dtype"] = compute_dtype
    try:
        return BitsAndBytesConfig(**kwargs)
    except (TypeError, ValueError, AttributeError) as error:
        raise UserInputError(f"{where}: {error}.") from None


def bnb_device_available(config) -> bool:
    """Whether diffusers' bitsandbytes loader finds a device it quantises on (its own check: CUDA or XPU; for
    4 bit also Apple's MPS)."""
    if torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available()):
        return True
    return bool(config.load_in_4bit and torch.backends.mps.is_available())


def check_bnb_environment(config) -> None:
    """Refuse, before any model loads, a machine where the quantised load would fail: no bitsandbytes, or no GPU."""
    bits = 4 if config.load_in_4bit else 8
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserInputError(f'{FLAG} needs bitsandbytes: pip install "bitsandbytes>=0.50" (or pip install "diffusers-unlearn[bnb]").')
    if not bnb_device_available(config):
        raise UserInputError(f"{FLAG} ({bits}-bit) needs a CUDA GPU: diffusers' bitsandbytes loader refuses to quantise without one. Leave the flag out on this machine.")


def quantization_summary(config) -> dict[str, Any] | None:
    """The quantisation settings as plain JSON data, for the run's report, model card and checkpoint fingerprint
    (None without quantisation), so a resume onto a differently quantised base is refused."""
    if config is None:
        return None
    settings = {key: value for key, value in config.to_dict().items() if not key.startswith("_")}
    return json.loads(json.dumps(settings, sort_keys=True, default=str))


def quantization_fingerprint_entries(config) -> dict[str, Any]:
    """`{"bnb_quantization": settings}` for `script_fingerprint(..., **entries)` with a quantised base; empty
    without one, so checkpoints of unquantised runs keep their fingerprint."""
    return {} if config is None else {"bnb_quantization": quantization_summary(config)}


__all__ = [
    "FLAG",
    "bnb_device_available",
    "check_bnb_environment",
    "quantization_fingerprint_entries",
    "quantization_summary",
    "read_bnb_quantization_config",
]
