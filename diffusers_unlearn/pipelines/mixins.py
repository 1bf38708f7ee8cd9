"""`UnlearningMixin`: attach, weigh and inspect unlearning adapters on a diffusers pipeline.

A small class added by multiple inheritance, in the manner of diffusers' own loader mixins: it
delegates to the pipeline's `unet`. A pipeline that uses it still saves a folder that plain
diffusers loads, because the saved `_class_name` is the base class's.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from ..lora import DEFAULT_WEIGHT_NAME, as_plain_unet, load_lora_weights, read_lora_metadata


def _resolve_adapter_file(path_or_repo: str, weight_name: str, token: Optional[str] = None) -> str:
    """A local file or folder, or a Hub repo id (downloaded; only the safetensors file)."""
    if os.path.isfile(path_or_repo):
        return path_or_repo
    if os.path.isdir(path_or_repo):
        path = os.path.join(path_or_repo, weight_name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No {weight_name} in {path_or_repo}.")
        return path
    from huggingface_hub import hf_hub_download

    return hf_hub_download(path_or_repo, weight_name, token=token)


class UnlearningMixin:
    """Adds `load_unlearning_adapter` and `set_unlearning_strength` to a pipeline with a `unet`.

    Subclasses set `_saved_class_name` to the plain diffusers pipeline they extend.
    """

    _saved_class_name: str = ""

    def to_json_string(self) -> str:
        """The pipeline config, naming the plain diffusers class so the saved folder loads without this package."""
        config = json.loads(super().to_json_string())
        if self._saved_class_name:
            config["_class_name"] = self._saved_class_name
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save the pipeline; refuses while an adapter is attached (diffusers would write the adapter's
        layers into the base checkpoint, which plain diffusers cannot load)."""
        if self.unlearning_adapters:
            raise ValueError(
                f"Adapters {self.unlearning_adapters} are attached. Call pipe.unet.fuse_lora() and "
                "pipe.unet.unload_lora() to save a merged model, or save the adapter on its own with "
                "diffusers_unlearn.lora.save_lora_weights."
            )
        from diffusers import UNet2DModel

        if isinstance(self.unet, UNet2DModel):
            self.unet = as_plain_unet(self.unet)  # the config must name UNet2DModel, not our subclass
        return super().save_pretrained(save_directory, *args, **kwargs)

    def load_unlearning_adapter(
        self,
        path_or_repo: str,
        adapter_name: Optional[str] = None,
        strength: float = 1.0,
        weight_name: str = DEFAULT_WEIGHT_NAME,
        token: Optional[str] = None,
    ) -> str:
        """Load an adapter written by the training scripts and activate it at `strength`.

        `path_or_repo` is a folder, a `.safetensors` file or a Hub repo id. The adapter name
        defaults to the unlearning method stored in the file (for example "siss").
        Returns the adapter name.

        Example:
            >>> pipe = UnlearnDDPMPipeline.from_pretrained(toy_model_path("ddpm_unconditional"))
            >>> name = pipe.load_unlearning_adapter("unlearn-ddpm-output")
            >>> pipe.set_unlearning_strength(0.5)   # halfway between the base and the unlearned model
        """
        path = _resolve_adapter_file(path_or_repo, weight_name, token)
        metadata = read_lora_metadata(path)
        adapter_name = adapter_name or str(metadata.get("method", "unlearning"))
        if adapter_name in (getattr(self.unet, "peft_config", None) or {}):
            raise ValueError(f"The pipeline already has an adapter named {adapter_name!r}; pass another adapter_name.")
        self.unet = load_lora_weights(self.unet, path, adapter_name=adapter_name)
        self.unet.requires_grad_(False)
        self.unet.eval()
        self.set_unlearning_strength(strength, adapter_name)
        return adapter_name

    @property
    def unlearning_adapters(self) -> list[str]:
        return sorted(getattr(self.unet, "peft_config", None) or {})

    def set_unlearning_strength(self, strength: float, adapter_name: Optional[str] = None) -> None:
        """Scale an adapter's effect: 0 is the base model, 1 the unlearned model (built on `set_adapters`)."""
        adapters = self.unlearning_adapters
        if not adapters:
            raise ValueError("No unlearning adapter is loaded; call load_unlearning_adapter first.")
        if adapter_name is None:
            if len(adapters) > 1:
                raise ValueError(f"Several adapters are loaded ({adapters}); name one.")
            adapter_name = adapters[0]
        if adapter_name not in adapters:
            raise ValueError(f"No adapter named {adapter_name!r}; loaded: {adapters}.")
        self.unet.set_adapters([adapter_name], weights=[float(strength)])
