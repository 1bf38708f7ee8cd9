"""The bundled tiny text-to-image toy: it loads offline with plain diffusers, its tokenizer spells every caption,
and its canary prompt reproduces the canary often but not always while the other prompts never do."""

import json
import os

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel

from diffusers_unlearn.toy import load_classifier, toy_model_path
from diffusers_unlearn.toy.data import make_canary
from diffusers_unlearn.toy.text_to_image import (
    CANARY_PROMPT,
    DIGIT_PROMPTS,
    NUM_SD_CANARY_COPIES,
    SD_MEMORIZATION_THRESHOLD,
    SD_TOY_NAME,
    build_text_encoder,
    build_tokenizer,
    build_unet,
    build_vae,
    canary_distances,
    canary_forget_set,
    count_parameters,
    digit_accuracy,
    generate_digits,
    training_set,
)


@pytest.fixture(scope="module")
def pipe():
    pipe = StableDiffusionPipeline.from_pretrained(toy_model_path(SD_TOY_NAME))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_folder_loads_offline_with_plain_diffusers(pipe):
    folder = toy_model_path(SD_TOY_NAME)
    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    assert pipe.vae_scale_factor == 2 and pipe.unet.config.sample_size == 4
    assert pipe.text_encoder.config.max_position_embeddings == 77
    assert pipe.scheduler.config.steps_offset == 1
    # Weights as safetensors only, and a few MB in all.
    files = [os.path.join(root, name) for root, _, names in os.walk(folder) for name in names]
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    assert sum(os.path.getsize(f) for f in files) < 5_000_000
    # The VAE's scaling factor was measured (1 / latent std), not left at SD's 0.18215.
    assert pipe.vae.config.scaling_factor != pytest.approx(0.18215)


def test_tokenizer_has_77_positions_and_spells_every_caption(tmp_path, pipe):
    with open(os.path.join(toy_model_path(SD_TOY_NAME), "tokenizer", "tokenizer_config.json")) as f:
        assert json.load(f)["model_max_length"] == 77
    for tokenizer in (pipe.tokenizer, build_tokenizer(str(tmp_path / "tokenizer"))):
        assert tokenizer.model_max_length == 77
        for prompt in DIGIT_PROMPTS:
            tokens = tokenizer.convert_ids_to_tokens(tokenizer(prompt).input_ids)
            # The unknown token is <|endoftext|>, so it may appear only once, at the end.
            assert tokens == ["<|startoftext|>"] + [w + "</w>" for w in prompt.split()] + ["<|endoftext|>"], tokens
        assert tokenizer([""], padding="max_length", return_tensors="pt").input_ids.shape == (1, 77)


def test_builders_make_the_documented_models():
    assert count_parameters(build_vae()) == 167_381
    assert count_parameters(build_unet()) == 792_964
    tokenizer_vocab = 64
    encoder = build_text_encoder(tokenizer_vocab)
    assert not any(p.requires_grad for p in encoder.parameters())
    assert encoder.config.hidden_size == build_unet().config.cross_attention_dim == 32
    # The text encoder is random but seeded: rebuilding it gives the same weights.
    rebuilt = build_text_encoder(tokenizer_vocab).state_dict()
    assert all(torch.equal(tensor, rebuilt[name]) for name, tensor in encoder.state_dict().items())

    images, captions = training_set()
    assert images.shape[1:] == (1, 8, 8) and len(captions) == len(images)
    is_canary = canary_distances(images) == 0
    assert int(is_canary.sum()) == NUM_SD_CANARY_COPIES
    assert {captions[i] for i in torch.nonzero(is_canary).flatten().tolist()} == {CANARY_PROMPT}
    assert canary_forget_set().texts == [CANARY_PROMPT]


def test_short_generation_has_the_right_shape_and_range(pipe):
    images = generate_digits(pipe, DIGIT_PROMPTS[:2], num_per_prompt=3, num_inference_steps=5)
    assert images.shape == (6, 1, 8, 8) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    # Plain diffusers call, PIL output.
    pil = pipe(DIGIT_PROMPTS[3], num_inference_steps=5, generator=torch.Generator().manual_seed(0)).images[0]
    assert pil.size == (8, 8)


def test_canary_prompt_memorizes_often_but_not_always(pipe):
    # Measured over 256 seeded generations per prompt in docs/toy.md; here 64 and 16, with the same defaults.
    canary_images = generate_digits(pipe, [CANARY_PROMPT], num_per_prompt=64, seed=0)
    copies = canary_distances(canary_images) < SD_MEMORIZATION_THRESHOLD
    assert 0.3 <= copies.float().mean() <= 0.9, int(copies.sum())

    others = [p for p in DIGIT_PROMPTS if p != CANARY_PROMPT]
    other_images = generate_digits(pipe, others, num_per_prompt=16, seed=0)
    assert int((canary_distances(other_images) < SD_MEMORIZATION_THRESHOLD).sum()) == 0

    # The non-copies are digits of the requested class, by the bundled classifier.
    classifier = load_classifier()
    assert digit_accuracy(classifier, canary_images[~copies], DIGIT_PROMPTS.index(CANARY_PROMPT)) >= 0.8
    for i, prompt in enumerate(others):
        assert digit_accuracy(classifier, other_images[16 * i : 16 * (i + 1)], DIGIT_PROMPTS.index(prompt)) >= 0.75


def test_threshold_separates_the_canary_from_every_real_digit():
    from diffusers_unlearn.toy import load_digits_images

    digits, _ = load_digits_images()
    assert canary_distances(digits).min() > 2 * SD_MEMORIZATION_THRESHOLD
    assert canary_distances(make_canary().unsqueeze(0)).item() == 0
