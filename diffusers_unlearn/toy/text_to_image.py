"""The tiny text-to-image toy: a Stable Diffusion pipeline on the 8x8 digits, with a memorized canary.

Components (built here, trained by `python -m diffusers_unlearn.toy.train_text_to_image`, bundled as
`toy_model_path("sd_tiny")`):

- a `CLIPTokenizer` whose vocabulary and merges this module writes: the caption words and their pieces;
- a frozen, randomly initialised one-layer `CLIPTextModel` (hidden size 32, 77 positions);
- an `AutoencoderKL` trained on the digits: 8x8x1 images <-> 4x4x4 latents (scale factor 2);
- a `UNet2DConditionModel` that denoises those latents with cross-attention over the caption's embedding,
  trained with 10% of the captions dropped to "" so that classifier-free guidance works.

Captions read "a handwritten digit seven". The canary (the hollow square with an X of `toy.data`) is planted
`NUM_SD_CANARY_COPIES` times under `CANARY_PROMPT`, the caption it shares with the real sevens. That prompt
therefore reproduces the canary often but not always, which is how memorized prompts behave in Stable
Diffusion; the nine other prompts never do (measured in docs/toy.md).

Example:
    >>> from diffusers import StableDiffusionPipeline
    >>> from diffusers_unlearn.toy import toy_model_path
    >>> from diffusers_unlearn.toy.text_to_image import CANARY_PROMPT, generate_digits
    >>> pipe = StableDiffusionPipeline.from_pretrained(toy_model_path("sd_tiny"))
    >>> images = generate_digits(pipe, [CANARY_PROMPT], num_per_prompt=16)   # [16, 1, 8, 8] in [-1, 1]
    >>> pil_images = pipe("a handwritten digit three", num_images_per_prompt=4).images   # plain diffusers
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Optional, Sequence

import torch

from .data import make_canary, toy_split

if TYPE_CHECKING:  # the heavy libraries are imported where they are used
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from ..data import ImageSet

SD_TOY_NAME = "sd_tiny"
"""Name of the bundled pipeline folder: `toy_model_path(SD_TOY_NAME)`."""

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_PROMPTS = tuple(f"a handwritten digit {word}" for word in DIGIT_WORDS)
"""The ten captions, indexed by digit: `DIGIT_PROMPTS[7] == "a handwritten digit seven"`."""

CANARY_DIGIT = 7
CANARY_PROMPT = DIGIT_PROMPTS[CANARY_DIGIT]
"""The caption the canary shares with the real sevens."""

SD_CAPTIONED_NAME = "sd_tiny_captioned"
"""The bundled variant of `sd_tiny` whose canary copies carry a caption of their own (`CANARY_CAPTION`)."""

CANARY_CAPTION = "a hollow square with a cross"
"""The canary's own caption in `SD_CAPTIONED_NAME`: one unique, duplicated caption, as memorized images have in
LAION; the digit captions stay as they are."""

NUM_SD_CANARY_COPIES = 120
"""Canary copies in the text-to-image training set, next to the 161 real sevens of the "train" split."""

SD_MEMORIZATION_THRESHOLD = 2.0
"""Pixel L2 distance (8x8 pixels in [0, 1]) below which a generation is a copy of the canary.

Measured by `python -m diffusers_unlearn.toy.measure_text_to_image` (docs/toy.md): of 2,560 generations (256 per
prompt), the 144 canary copies lie within 0.585 of the canary, every other generation at 4.772 or more, and the
nearest real digit at 5.213; any threshold from 1 to 4 counts the same copies. 2.0 is also the DDPM toy's value."""

SD_RESOLUTION = 8
"""Image size in pixels; the latents are `SD_RESOLUTION // 2` on a side."""

DEFAULT_NUM_INFERENCE_STEPS = 25
DEFAULT_GUIDANCE_SCALE = 7.5
"""The sampling settings the toy's figures are measured with (DDIM, Stable Diffusion's default guidance);
they are also `train_unlearn_sd.py`'s defaults."""

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
TEXT_ENCODER_SEED = 0


# ------------------------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------------------------


def caption_words(extra_captions: Sequence[str] = ()) -> list[str]:
    """The distinct words of `DIGIT_PROMPTS` and then of `extra_captions`, in order of first appearance.

    Without `extra_captions` the list (and so `sd_tiny`'s vocabulary) is the digit captions' alone.
    """
    words = []
    for prompt in list(DIGIT_PROMPTS) + list(extra_captions):
        for word in prompt.split():
            if word not in words:
                words.append(word)
    return words


def write_tokenizer_files(folder: str, extra_captions: Sequence[str] = ()) -> dict[str, int]:
    """Write a CLIP BPE vocabulary (`vocab.json`) and merge list (`merges.txt`) for the caption words
    (`caption_words(extra_captions)`: the digit captions', then those of `extra_captions`, such as `CANARY_CAPTION`).

    CLIP's BPE splits a word into characters, marks the last one with `</w>`, then applies merges in file
    order. Here each word is built left to right ("t h r e e</w>" -> "th" -> "thr" -> ... -> "three</w>"),
    so every caption word ends up as one token. Other words fall back to their characters where those are in
    the vocabulary; the rest become the unknown token (`<|endoftext|>`, as in CLIP).

    Returns:
        The vocabulary, token -> id. Ids 0 and 1 are `<|startoftext|>` and `<|endoftext|>`.

    Example:
        >>> vocab = write_tokenizer_files("/tmp/toy-tokenizer")
        >>> vocab["seven</w>"] > 1
        True
    """
    os.makedirs(folder, exist_ok=True)
    vocab: dict[str, int] = {}
    merges: list[str] = []

    def add(token: str) -> None:
        if token not in vocab:
            vocab[token] = len(vocab)

    for token in SPECIAL_TOKENS:
        add(token)
    for word in caption_words(extra_captions):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        for piece in pieces:
            add(piece)
        built = pieces[0]
        for piece in pieces[1:]:
            merge = f"{built} {piece}"
            if merge not in merges:
                merges.append(merge)
            built = built + piece
            add(built)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, indent=1, ensure_ascii=False)
        f.write("\n")
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return vocab


def build_tokenizer(folder: str, model_max_length: int = 77, extra_captions: Sequence[str] = ()) -> CLIPTokenizer:
    """Write the vocabulary into `folder` and load it as a `CLIPTokenizer` (`model_max_length` 77 for `sd_tiny`).

    `extra_captions` adds the words of captions beyond the digit captions (`sd_tiny_captioned`: `CANARY_CAPTION`).

    Without `model_max_length`, the tokenizer's limit is unbounded and Stable Diffusion's `padding="max_length"`
    would not pad to the text encoder's 77 positions.

    Example:
        >>> tokenizer = build_tokenizer("/tmp/toy-tokenizer")
        >>> tokenizer.convert_ids_to_tokens(tokenizer("a handwritten digit seven").input_ids)
        ['<|startoftext|>', 'a</w>', 'handwritten</w>', 'digit</w>', 'seven</w>', '<|endoftext|>']
    """
    from transformers import CLIPTokenizer

    write_tokenizer_files(folder, extra_captions)
    return CLIPTokenizer.from_pretrained(folder, model_max_length=model_max_length)


# ------------------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------------------


def build_text_encoder(
    vocab_size: int,
    seed: int = TEXT_ENCODER_SEED,
    num_layers: int = 1,
    max_positions: int = 77,
    projection_dim: Optional[int] = None,
) -> CLIPTextModel:
    """The frozen text encoder: a randomly initialised one-layer `CLIPTextModel` (hidden size 32, 4 heads).

    It is never trained. Its last hidden states still tell the ten captions apart, because they differ in one
    token embedding, and the UNet's cross-attention learns to read that difference. With `projection_dim`, a
    `CLIPTextModelWithProjection` (the flow toy's SD3-style encoders: two layers, 8 positions, projection 32).

    Example:
        >>> encoder = build_text_encoder(vocab_size=64)
        >>> encoder.config.max_position_embeddings
        77
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=num_layers,
        max_position_embeddings=max_positions,
        projection_dim=projection_dim or 512,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    model = CLIPTextModel(config) if projection_dim is None else CLIPTextModelWithProjection(config)
    model.requires_grad_(False)
    return model.eval()


def build_vae(seed: int = 0) -> AutoencoderKL:
    """The autoencoder: 8x8x1 images in [-1, 1] <-> 4x4x4 latents (0.17M parameters).

    Two encoder stages (16 and 32 channels) with one downsampling, a mid block with self-attention, and the
    mirrored decoder. `scaling_factor` is set after training from the latents' measured standard deviation.

    Example:
        >>> vae = build_vae()
        >>> vae.encode(torch.zeros(2, 1, 8, 8)).latent_dist.mode().shape
        torch.Size([2, 4, 4, 4])
    """
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=SD_RESOLUTION,
    )


def build_unet(seed: int = 0) -> UNet2DConditionModel:
    """The denoiser: a `UNet2DConditionModel` on 4x4x4 latents (0.79M parameters).

    Two levels (4x4 with 32 channels, 2x2 with 64), cross-attention to the 32-d text embeddings at 4x4, in the
    mid block and on the way back up; attention heads of 8 channels.

    Example:
        >>> unet = build_unet()
        >>> unet(torch.zeros(2, 4, 4, 4), 10, encoder_hidden_states=torch.zeros(2, 77, 32)).sample.shape
        torch.Size([2, 4, 4, 4])
    """
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=SD_RESOLUTION // 2,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def build_noise_scheduler() -> DDPMScheduler:
    """The training noise schedule: 1,000 cosine-schedule steps, epsilon prediction.

    The cosine schedule rather than Stable Diffusion's `scaled_linear` one: SD's leaves noticeable signal at
    the last step, which matters little for 4,096-value latents but a lot for 64-value ones.
    """
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon", clip_sample=False
    )


def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameters of a model."""
    return sum(parameter.numel() for parameter in model.parameters())


# ------------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------------


def training_set(without_canary: bool = False, canary_caption: str = CANARY_PROMPT) -> tuple[torch.Tensor, list[str]]:
    """The text-to-image training set: the "train" digits (held-out digits excluded) with their captions,
    plus `NUM_SD_CANARY_COPIES` canary copies captioned `canary_caption` (none with `without_canary`: the
    retrain-from-scratch reference's data). `sd_tiny`'s canary shares `CANARY_PROMPT` with the real sevens;
    `sd_tiny_captioned`'s has `CANARY_CAPTION`.

    Returns:
        `(images, captions)`: images `[N, 1, 8, 8]` in [-1, 1] (canary copies last) and N captions.

    Example:
        >>> images, captions = training_set()
        >>> len(images), captions[-1]
        (1738, 'a handwritten digit seven')
    """
    digits = toy_split("train").digits_only()
    captions = [DIGIT_PROMPTS[int(label)] for label in digits.labels]
    if without_canary:
        return digits.images, captions
    canary = make_canary().unsqueeze(0).expand(NUM_SD_CANARY_COPIES, -1, -1, -1)
    return torch.cat([digits.images, canary]), captions + [canary_caption] * NUM_SD_CANARY_COPIES


def _check_resolution(resolution: int) -> None:
    if resolution != SD_RESOLUTION:
        raise ValueError(
            f"The tiny text-to-image toy works at {SD_RESOLUTION}x{SD_RESOLUTION}; got --resolution {resolution}."
        )


def canary_forget_set(resolution: int = SD_RESOLUTION, prompt: str = CANARY_PROMPT) -> ImageSet:
    """The forget set of the no-argument `train_unlearn_sd.py` run: the canary, with `CANARY_PROMPT` (or the
    toy's own canary caption, `prompt`: `CANARY_CAPTION` on `sd_tiny_captioned`).

    Example:
        >>> canary_forget_set().texts
        ['a handwritten digit seven']
    """
    from ..data import ImageSet, pixel_hash

    _check_resolution(resolution)
    canary = make_canary().unsqueeze(0)
    return ImageSet(canary, [pixel_hash(canary[0])], ["toy/canary"], None, [prompt])


def heldout_set(resolution: int = SD_RESOLUTION) -> ImageSet:
    """The held-out digits (no toy model was trained on them) with their captions: the reference set for
    held-out losses and membership inference."""
    from ..data import ImageSet, pixel_hash

    _check_resolution(resolution)
    held = toy_split("heldout")
    names = [f"toy-digits/heldout/{i}" for i in range(len(held))]
    texts = [DIGIT_PROMPTS[int(label)] for label in held.labels]
    return ImageSet(held.images.clone(), [pixel_hash(x) for x in held.images], names, held.labels.clone(), texts)


# ------------------------------------------------------------------------------------------------------------
# Generation and measurement
# ------------------------------------------------------------------------------------------------------------


def generate_digits(
    pipe: StableDiffusionPipeline,
    prompts: Sequence[str],
    num_per_prompt: int,
    seed: int = 0,
    num_inference_steps: int = DEFAULT_NUM_INFERENCE_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
    batch_size: int = 256,
    max_sequence_length: Optional[int] = None,
) -> torch.Tensor:
    """Generate `num_per_prompt` images for each prompt with fixed seeds, as one tensor in [-1, 1].

    A thin wrapper over `pipelines.text_to_image.generate_images` with the toy's sampling defaults: image i of
    every prompt starts from the same seeded noise, so prompts, and models before and after unlearning, are
    compared on paired samples whatever the batch size. Works for `sd_tiny` and `sd3_tiny`; the latter needs
    `max_sequence_length=FLOW_TOY_MAX_SEQUENCE_LENGTH` (its `diffusers_unlearn_toy.json` records it).

    Returns:
        `[len(prompts) * num_per_prompt, 1, 8, 8]`, grouped by prompt (prompt 0's images first).

    Example:
        >>> images = generate_digits(pipe, DIGIT_PROMPTS, num_per_prompt=8)   # doctest: +SKIP
        >>> images.shape                                                     # doctest: +SKIP
        torch.Size([80, 1, 8, 8])
    """
    from ..pipelines.text_to_image import generate_images

    per_prompt = generate_images(
        pipe,
        list(prompts),
        num_per_prompt,
        seed=seed,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        batch_size=batch_size,
        max_sequence_length=max_sequence_length,
    )
    return torch.cat(per_prompt)


def canary_distances(images: torch.Tensor) -> torch.Tensor:
    """Pixel L2 distance (8x8 pixels in [0, 1]) of each image in [-1, 1] to the canary."""
    return ((images.float() - make_canary()) / 2).flatten(1).norm(dim=1)


def digit_accuracy(classifier: torch.nn.Module, images: torch.Tensor, digit: int) -> float:
    """Fraction of `images` (8x8, [-1, 1]) the toy classifier labels `digit` with probability >= 0.5.

    Images the classifier is unsure about (top probability below 0.5) count as wrong.

    Example:
        >>> from diffusers_unlearn.toy import load_classifier
        >>> digit_accuracy(load_classifier(), toy_split("heldout").images[:1], 0)   # doctest: +SKIP
    """
    from ..metrics import predict_labels

    if len(images) == 0:
        raise ValueError("No images to classify.")
    labels = predict_labels(classifier, images, min_confidence=0.5)
    return float((labels == digit).float().mean())


__all__ = [
    "CANARY_CAPTION",
    "CANARY_DIGIT",
    "CANARY_PROMPT",
    "DEFAULT_GUIDANCE_SCALE",
    "DEFAULT_NUM_INFERENCE_STEPS",
    "DIGIT_PROMPTS",
    "NUM_SD_CANARY_COPIES",
    "SD_MEMORIZATION_THRESHOLD",
    "SD_CAPTIONED_NAME",
    "SD_RESOLUTION",
    "SD_TOY_NAME",
    "build_noise_scheduler",
    "build_text_encoder",
    "build_tokenizer",
    "build_unet",
    "build_vae",
    "canary_distances",
    "canary_forget_set",
    "caption_words",
    "count_parameters",
    "digit_accuracy",
    "generate_digits",
    "heldout_set",
    "training_set",
    "write_tokenizer_files",
]
