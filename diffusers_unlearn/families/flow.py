"""What the rectified-flow families (SD3.x, Flux.1) share: their training options, the flow-matching schedule and
token ids of tokenizers with different lengths.

Token ids: the CLIP tokenizers pad to 77, T5 to `max_sequence_length` (SD3's script: 77, Flux's: 512), so the
ids of one prompt cannot be stacked into (N, encoders, length) as SDXL's are. `tokenize` returns ONE integer
tensor (N, total length) instead: each tokenizer's ids side by side along the last axis, in the order of
`text_encoders` (a tokenizer the pipeline lacks, as SD3 without T5, contributes nothing). `token_lengths` gives
the split. One tensor keeps `BatchPool.input_ids` (indexed by rows) working unchanged for every family.

Example:
    >>> from diffusers_unlearn.families import get_family
    >>> sd3 = get_family("sd3").with_options(max_sequence_length=128, weighting_scheme="logit_normal")
    >>> sd3.max_sequence_length, sd3.weighting_scheme
    (128, 'logit_normal')
    >>> split_token_ids(torch.arange(10).reshape(1, 10), (4, 6))[1].tolist()
    [[4, 5, 6, 7, 8, 9]]
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from ..errors import UserInputError
from ..noise import NoiseSchedule
from .base import Components, ModelFamily

# What the official SD3/Flux scripts accept for --weighting_scheme (diffusers' compute_density_for_timestep_sampling
# and compute_loss_weighting_for_sd3).
_WEIGHTING_SCHEMES = ("none", "sigma_sqrt", "logit_normal", "mode", "cosmap")

# The SD3 and Flux pipelines refuse a longer T5 sequence.
MAX_T5_SEQUENCE_LENGTH = 512


def split_token_ids(input_ids: torch.Tensor, lengths: Sequence[int], family: str = "") -> list[torch.Tensor]:
    """Split ids of several tokenizers, side by side along the last axis, into one (N, length) tensor each.

    Example:
        >>> [part.shape[-1] for part in split_token_ids(torch.zeros(2, 7, dtype=torch.long), (3, 4))]
        [3, 4]
    """
    if input_ids.ndim != 2 or input_ids.shape[-1] != sum(lengths):
        owner = f"{family} " if family else ""
        raise ValueError(
            f"The {owner}token ids must have shape (N, {sum(lengths)}) (the tokenizers' ids side by side, lengths "
            f"{list(lengths)}), got {tuple(input_ids.shape)}; make them with the family's tokenize."
        )
    return list(torch.split(input_ids, list(lengths), dim=-1))


class FlowMatchingFamily(ModelFamily):
    """Base of the rectified-flow families: a transformer denoiser trained on `FlowMatchSchedule`.

    A family instance carries the training options of the official SD3/Flux LoRA scripts that change the
    conditioning or the schedule: `max_sequence_length` (T5's padded length), `weighting_scheme`, `logit_mean`,
    `logit_std` and `mode_scale` (how sigma is drawn and the loss weighted). The registered instance has the
    scripts' defaults; `with_options(...)` returns a configured copy. The instances stay immutable.
    """

    denoiser_name = "transformer"
    #: The option names `with_options` accepts, with their defaults.
    option_defaults: dict[str, Any] = {
        "max_sequence_length": 77,
        "weighting_scheme": "none",
        "logit_mean": 0.0,
        "logit_std": 1.0,
        "mode_scale": 1.29,
    }

    def __init__(self, **options: Any):
        unknown = sorted(set(options) - set(self.option_defaults))
        if unknown:
            raise TypeError(
                f"Unknown option(s) {unknown} for the {self.name} family; it takes {sorted(self.option_defaults)}."
            )
        values = {**self.option_defaults, **options}
        length = values["max_sequence_length"]
        if isinstance(length, bool) or not isinstance(length, int) or not 1 <= length <= MAX_T5_SEQUENCE_LENGTH:
            raise UserInputError(
                f"--max_sequence_length must be an integer in [1, {MAX_T5_SEQUENCE_LENGTH}], got {length!r}."
            )
        if values["weighting_scheme"] not in _WEIGHTING_SCHEMES:
            raise UserInputError(
                f"Unknown --weighting_scheme {values['weighting_scheme']!r}; choose one of "
                f"{', '.join(_WEIGHTING_SCHEMES)}."
            )
        if not float(values["logit_std"]) > 0:
            raise UserInputError(f"--logit_std must be > 0, got {values['logit_std']!r}.")
        for key, value in values.items():
            setattr(self, key, value)

    def options(self) -> dict[str, Any]:
        """The family's options, by name (for run fingerprints and model cards)."""
        return {key: getattr(self, key) for key in self.option_defaults}

    def with_options(self, **changes: Any) -> "FlowMatchingFamily":
        """A copy of the family with some options changed (the scripts' flags); the registered one is unchanged.

        Example:
            >>> from diffusers_unlearn.families import get_family
            >>> get_family("flux").with_options(guidance_scale=1.0).guidance_scale
            1.0
        """
        return type(self)(**{**self.options(), **changes})

    def __repr__(self) -> str:
        changed = {key: value for key, value in self.options().items() if value != self.option_defaults[key]}
        details = "".join(f", {key}={value!r}" for key, value in changed.items())
        return f"{type(self).__name__}(name={self.name!r}{details})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.options() == self.options()

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted(self.options().items()))))

    # -- the forward process ---------------------------------------------------------------------------------

    # The velocity-difference score ||v(x, c) - v(x, "")|| (metrics.noise_norm; for a guidance-distilled Flux the
    # empty prompt through the same model).
    has_noise_norm_score = True

    def evaluation_scheduler(self, components: Components, prediction_type: Optional[str] = None) -> Any:
        """A fresh copy of the pipeline's own flow-matching sampler (DDIM does not apply to a flow)."""
        scheduler = components["scheduler"]
        return type(scheduler).from_config(scheduler.config)

    def schedule_options(self) -> dict[str, Any]:
        """The keyword arguments of `FlowMatchSchedule.from_scheduler` this family passes."""
        return {
            "weighting_scheme": self.weighting_scheme,
            "logit_mean": float(self.logit_mean),
            "logit_std": float(self.logit_std),
            "mode_scale": float(self.mode_scale),
        }

    def schedule(self, components: Components, prediction_type: Optional[str] = None) -> NoiseSchedule:
        """The flow-matching training schedule of the pipeline's FlowMatchEulerDiscreteScheduler config, as the
        official scripts read it (a fresh copy's sigmas, the shift applied), with the family's options.
        Flow models predict the velocity: `prediction_type` may only be None or "flow_prediction".

        Example:
            >>> schedule = get_family("sd3").schedule(components)  # doctest: +SKIP
            >>> schedule.prediction_type  # doctest: +SKIP
            'flow_prediction'
        """
        from ..noise import FlowMatchSchedule

        if prediction_type not in (None, "flow_prediction"):
            raise UserInputError(
                f"The {self.name} family is trained with flow matching (velocity prediction); "
                f"--prediction_type {prediction_type!r} does not apply to it."
            )
        return FlowMatchSchedule.from_scheduler(components["scheduler"], **self.schedule_options())

    # -- tokens ----------------------------------------------------------------------------------------------

    def _tokenizer_length(self, components: Components, tokenizer_name: str) -> int:
        """How long `tokenize` pads the ids of one tokenizer (overridden per family)."""
        raise NotImplementedError

    def _present_tokenizers(self, components: Components) -> list[str]:
        return [name for name, _, _ in self.text_encoders if components.get(name) is not None]

    def token_lengths(self, components: Components) -> tuple[int, ...]:
        """The length of each tokenizer's ids in `tokenize`'s output, in order (absent tokenizers left out).

        Example:
            >>> get_family("flux").token_lengths(components)  # doctest: +SKIP
            (77, 512)
        """
        return tuple(self._tokenizer_length(components, name) for name in self._present_tokenizers(components))

    def tokenize(self, components: Components, prompts: Sequence[str]) -> torch.Tensor:
        """Token ids of `prompts`: every tokenizer's ids (CLIP padded to its `model_max_length`, T5 to
        `max_sequence_length`, both truncated) side by side along the last axis, shape (N, sum of lengths).

        Example:
            >>> get_family("flux").tokenize(components, ["a photo of a cat"]).shape  # doctest: +SKIP
            torch.Size([1, 589])
        """
        ids = []
        for name in self._present_tokenizers(components):
            ids.append(
                components[name](
                    list(prompts),
                    padding="max_length",
                    max_length=self._tokenizer_length(components, name),
                    truncation=True,
                    return_tensors="pt",
                ).input_ids
            )
        return torch.cat(ids, dim=-1)

    def _split(self, components: Components, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """`tokenize`'s ids by tokenizer name."""
        names = self._present_tokenizers(components)
        return dict(zip(names, split_token_ids(input_ids, self.token_lengths(components), self.name)))

    @staticmethod
    def vae_scale_factor(components: Components) -> int:
        """Pixels per latent position: 2 ** (VAE levels - 1), as the pipelines compute it."""
        return 2 ** (len(components["vae"].config.block_out_channels) - 1)


__all__ = ["FlowMatchingFamily", "MAX_T5_SEQUENCE_LENGTH", "split_token_ids"]
