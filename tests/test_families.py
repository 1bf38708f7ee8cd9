"""The model-family layer (diffusers_unlearn.families) on tiny random SD and SDXL pipelines.

What is checked against diffusers itself, not against our own code: prompt encodings against the pipelines'
`encode_prompt`, SDXL's `time_ids` against `_get_add_time_ids`, naive deletion's keep term against the official
SDXL training loss (transcribed from train_text_to_image_lora_sdxl.py), and saved adapters against the plain
pipelines' `load_lora_weights`, `set_adapters` and `fuse_lora`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import os

import pytest
import torch
import torch.nn.functional as F
from tiny_models import save_tiny_sd_pipeline, save_tiny_sdxl_pipeline, tiny_vae

from diffusers_unlearn import families
from diffusers_unlearn.errors import UserInputError
from diffusers_unlearn.lora import add_lora, add_text_encoder_lora, lora_state_dict, resolve_lora_targets
from diffusers_unlearn.objectives import DenoisingBatch, Denoiser, get_objective
from diffusers_unlearn.objectives.base import concat_conditioning
from diffusers_unlearn.unlearner import BatchPool

PROMPTS = ["a photo of a cat", "a digit"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Saved tiny pipelines: {"sd": ..., "sdxl": ..., "sdxl_v": ... (v-prediction)}."""
    root = tmp_path_factory.mktemp("families")
    return {
        "sd": save_tiny_sd_pipeline(root / "sd"),
        "sdxl": save_tiny_sdxl_pipeline(root / "sdxl"),
        "sdxl_v": save_tiny_sdxl_pipeline(root / "sdxl_v", prediction_type="v_prediction"),
    }


def images(count: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---------------------------------------------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------------------------------------------


def test_family_detected_from_model_index_and_overridden(folders):
    assert families.family_for_folder(folders["sd"]).name == "sd"
    assert families.family_for_folder(folders["sdxl"]).name == "sdxl"
    # The override wins over model_index.json (for a pipeline saved under another class name).
    assert families.family_for_folder(folders["sd"], override="sdxl").name == "sdxl"
    with pytest.raises(UserInputError, match="Unknown model family 'kandinsky'; choose one of flux, sd, sd3, sdxl"):
        families.family_for_folder(folders["sd"], override="kandinsky")


def test_every_family_names_real_diffusers_pipelines():
    import diffusers

    for name in families.available_families():
        family = families.get_family(name)
        assert family.name == name
        for class_name in family.pipeline_class_names:
            assert hasattr(diffusers, class_name), class_name
            assert families.family_for_pipeline_class(class_name) is family
        assert hasattr(family.plain_pipeline_class, "load_lora_weights")
        assert family.lora_prefixes == (family.denoiser_name, *family.lora_text_encoder_names)
        assert set(family.lora_text_encoder_names) <= set(family.text_encoder_names)


def test_unsupported_pipeline_class_is_one_line_naming_the_supported_ones(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(UserInputError) as error:
        families.family_for_folder(tmp_path)
    message = str(error.value)
    assert "\n" not in message
    assert "'KandinskyPipeline'" in message
    assert "StableDiffusionPipeline, StableDiffusionXLPipeline" in message

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserInputError, match="no model_index.json"):
        families.family_for_folder(empty)


# ---------------------------------------------------------------------------------------------------------------
# Loading and conditioning
# ---------------------------------------------------------------------------------------------------------------


def test_sdxl_load_keeps_an_upcast_vae_in_float32_and_takes_a_separate_vae(folders):
    family = families.get_family("sdxl")
    half = family.load(folders["sdxl"], torch.float16)
    assert half["unet"].dtype == half["text_encoder"].dtype == half["text_encoder_2"].dtype == torch.float16
    assert half["vae"].config.force_upcast and half["vae"].dtype == torch.float32
    assert type(half["scheduler"]).__name__ == "EulerDiscreteScheduler"  # the pipeline's own, for sampling
    assert not any(p.requires_grad for p in half["unet"].parameters())

    # --pretrained_vae_model_name_or_path: a VAE folder without subfolder; bf16 does not need the upcast.
    separate = family.load(folders["sdxl"], torch.bfloat16, vae_path=f"{folders['sdxl']}/vae")
    assert separate["vae"].dtype == torch.bfloat16


def test_sdxl_encode_prompts_matches_the_pipeline(folders):
    from diffusers import StableDiffusionXLPipeline

    family = families.get_family("sdxl")
    components = family.load(folders["sdxl"])
    cond = family.encode_prompts(
        components, PROMPTS, original_sizes=[(600, 800), (16, 16)], crops_top_left=[(10, 20), (0, 0)],
        target_size=(16, 16),
    )
    assert sorted(cond) == ["encoder_hidden_states", "text_embeds", "time_ids"]
    assert cond["encoder_hidden_states"].shape == (2, 77, 64)  # 32 + 32 features, both encoders
    assert cond["text_embeds"].shape == (2, 32)
    assert cond["time_ids"].tolist() == [[600, 800, 10, 20, 16, 16], [16, 16, 0, 0, 16, 16]]

    ids = family.tokenize(components, PROMPTS)
    assert ids.shape == (2, 2, 77)
    assert not torch.equal(ids[:, 0], ids[:, 1])  # the second tokenizer pads with "!"
    with torch.no_grad():
        first = components["text_encoder"](ids[:, 0], output_hidden_states=True)
        second = components["text_encoder_2"](ids[:, 1], output_hidden_states=True)
    # Penultimate layers of both encoders, side by side; not the last layer.
    torch.testing.assert_close(cond["encoder_hidden_states"][..., :32], first.hidden_states[-2], rtol=0, atol=0)
    torch.testing.assert_close(cond["encoder_hidden_states"][..., 32:], second.hidden_states[-2], rtol=0, atol=0)
    assert not torch.allclose(cond["encoder_hidden_states"][..., 32:], second.hidden_states[-1])
    # Pooled: text_encoder_2's projection, not text_encoder's pooled output.
    torch.testing.assert_close(cond["text_embeds"], second.text_embeds, rtol=0, atol=0)
    assert not torch.allclose(cond["text_embeds"], first.pooler_output)

    # diffusers' own pipeline gives the same conditioning.
    pipe = StableDiffusionXLPipeline.from_pretrained(folders["sdxl"])
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(cond["encoder_hidden_states"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond["text_embeds"], pooled, rtol=0, atol=0)
    time_ids = pipe._get_add_time_ids((600, 800), (10, 20), (16, 16), torch.float32, text_encoder_projection_dim=32)
    torch.testing.assert_close(cond["time_ids"][:1], time_ids)

    # Defaults: an uncropped image at the model's native resolution (8 latents x VAE scale 2 = 16 px).
    default = family.encode_prompts(components, PROMPTS[:1])
    assert default["time_ids"].tolist() == [[16, 16, 0, 0, 16, 16]]
    with pytest.raises(ValueError, match="2 original sizes"):
        family.encode_prompts(components, PROMPTS[:1], original_sizes=[(16, 16), (16, 16)])


def test_sd_encode_prompts_matches_the_pipeline(folders):
    from diffusers import StableDiffusionPipeline

    family = families.get_family("sd")
    components = family.load(folders["sd"])
    # Micro-conditioning arguments are accepted and ignored: SD has none.
    cond = family.encode_prompts(components, PROMPTS, original_sizes=[(600, 800)] * 2)
    assert sorted(cond) == ["encoder_hidden_states"]
    pipe = StableDiffusionPipeline.from_pretrained(folders["sd"])
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, do_classifier_free_guidance=False)
    torch.testing.assert_close(cond["encoder_hidden_states"], embeds, rtol=0, atol=0)
    assert family.tokenize(components, PROMPTS).shape == (2, 77)


@pytest.mark.parametrize(
    "config, expected",
    [
        (dict(scaling_factor=0.5), lambda z: z * 0.5),
        (dict(scaling_factor=0.5, shift_factor=0.25), lambda z: (z - 0.25) * 0.5),
        (
            dict(scaling_factor=0.5, latents_mean=(0.1, -0.2, 0.3, 0.0), latents_std=(2.0, 1.0, 0.5, 4.0)),
            lambda z: (z - torch.tensor([0.1, -0.2, 0.3, 0.0]).reshape(1, 4, 1, 1))
            * 0.5
            / torch.tensor([2.0, 1.0, 0.5, 4.0]).reshape(1, 4, 1, 1),
        ),
    ],
    ids=["scaling", "shift", "mean_std"],
)
def test_encode_images_normalises_as_the_vae_config_says(config, expected):
    torch.manual_seed(0)
    vae = tiny_vae(**config)
    pixels = images(3)
    with torch.no_grad():
        raw = vae.encode(pixels).latent_dist.mode()
    latents = families.get_family("sdxl").encode_images({"vae": vae}, pixels, batch_size=2)
    assert latents.shape == (3, 4, 8, 8) and latents.dtype == torch.float32
    torch.testing.assert_close(latents, expected(raw), rtol=1e-6, atol=1e-6)


def test_encode_images_upcasts_a_float16_vae_that_asks_for_it():
    torch.manual_seed(0)
    vae = tiny_vae(force_upcast=True).half()
    reference = copy.deepcopy(vae).float()  # the same (float16-rounded) weights, in float32
    pixels = images(2)
    latents = families.get_family("sd").encode_images({"vae": vae}, pixels)
    assert vae.dtype == torch.float16  # put back afterwards
    with torch.no_grad():
        expected = reference.encode(pixels).latent_dist.mode() * vae.config.scaling_factor
    torch.testing.assert_close(latents, expected, rtol=0, atol=0)


def test_schedule_is_the_ddpm_training_schedule_of_the_scheduler_config(folders):
    from diffusers import DDPMScheduler

    family = families.get_family("sdxl")
    components = family.load(folders["sdxl_v"])
    official = DDPMScheduler.from_pretrained(folders["sdxl_v"], subfolder="scheduler")  # what the scripts train with
    schedule = family.schedule(components)
    assert schedule.prediction_type == "v_prediction"
    torch.testing.assert_close(schedule.alphas_cumprod, official.alphas_cumprod.double(), rtol=0, atol=0)
    assert family.schedule(components, prediction_type="epsilon").prediction_type == "epsilon"


def test_lora_target_presets():
    family = families.get_family("sdxl")
    assert family.lora_targets("attention") == ("to_q", "to_k", "to_v", "to_out.0")
    assert "conv1" in family.lora_targets("attention_conv")
    with pytest.raises(UserInputError, match="Unknown LoRA target preset 'mlp' for the sdxl family"):
        family.lora_targets("mlp")


# ---------------------------------------------------------------------------------------------------------------
# Family-agnostic batches and the Denoiser's call hook
# ---------------------------------------------------------------------------------------------------------------


def extra(count: int, offset: float = 0.0) -> dict[str, torch.Tensor]:
    return {"text_embeds": torch.arange(count * 2.0).reshape(count, 2) + offset, "time_ids": torch.ones(count, 6)}


def test_denoising_batch_carries_extra_conditioning():
    batch = DenoisingBatch(torch.zeros(2, 4, 8, 8), None, torch.zeros(2, 5, 8), extra(2))
    assert DenoisingBatch(torch.zeros(1)).added_cond is None  # positional constructions are unchanged

    moved = batch.to("cpu", torch.float64)
    assert moved.added_cond["text_embeds"].dtype == torch.float64
    assert moved.conditioning().keys() == {"encoder_hidden_states", "text_embeds", "time_ids"}
    rebuilt = DenoisingBatch.from_conditioning(batch.x0, batch.conditioning())
    assert rebuilt.same_conditioning(batch) and rebuilt.added_cond.keys() == batch.added_cond.keys()

    other = DenoisingBatch(batch.x0, None, batch.encoder_hidden_states, extra(2, offset=1.0))
    assert not batch.same_conditioning(other)
    assert not batch.same_conditioning(DenoisingBatch(batch.x0, None, batch.encoder_hidden_states))

    both = concat_conditioning(batch, other)
    assert both.added_cond["text_embeds"].shape == (4, 2)
    torch.testing.assert_close(both.added_cond["text_embeds"][2:], other.added_cond["text_embeds"])
    with pytest.raises(ValueError, match="different extra conditioning"):
        concat_conditioning(batch, DenoisingBatch(batch.x0, None, batch.encoder_hidden_states))


def test_batch_pool_samples_extra_conditioning_with_the_same_index():
    count = 10
    x0 = torch.arange(count, dtype=torch.float32).reshape(count, 1, 1, 1).expand(count, 4, 2, 2).contiguous()
    time_ids = torch.arange(count, dtype=torch.float32).reshape(count, 1).expand(count, 6).contiguous()
    pool = BatchPool(x0, encoder_hidden_states=torch.zeros(count, 3, 8), added_cond={"time_ids": time_ids})
    batch = pool.sample(6, torch.Generator().manual_seed(0))
    assert torch.equal(batch.added_cond["time_ids"][:, 0], batch.x0[:, 0, 0, 0])
    with pytest.raises(ValueError, match="3 rows for 10 items"):
        BatchPool(x0, added_cond={"time_ids": time_ids[:3]})

    # A trainable text encoder returning a conditioning dict: its entries join the cached ones.
    def encode(ids):
        values = ids.float()
        return {"encoder_hidden_states": values.reshape(-1, 1, 1).expand(-1, 3, 8), "text_embeds": values[:, None]}

    pool = BatchPool(x0, input_ids=torch.arange(count), encode=encode, added_cond={"time_ids": time_ids})
    batch = pool.sample(6, torch.Generator().manual_seed(0))
    assert sorted(batch.added_cond) == ["text_embeds", "time_ids"]
    assert torch.equal(batch.added_cond["text_embeds"][:, 0], batch.x0[:, 0, 0, 0])
    assert torch.equal(batch.encoder_hidden_states[:, 0, 0], batch.x0[:, 0, 0, 0])


@pytest.fixture(scope="module")
def sdxl_setup(folders):
    family = families.get_family("sdxl")
    components = family.load(folders["sdxl"])
    cond = family.encode_prompts(components, PROMPTS * 2, original_sizes=[(20, 24), (16, 16)] * 2)
    latents = family.encode_images(components, images(4))
    return family, components, DenoisingBatch.from_conditioning(latents, cond)


def test_naive_deletion_runs_on_sdxl_latents_with_the_family_call(sdxl_setup):
    family, components, batch = sdxl_setup
    unet = add_lora(copy.deepcopy(components["unet"]), rank=2, targets=family.lora_targets("attention"))
    denoiser = Denoiser(unet, family.schedule(components), call=family.call)
    terms = get_objective("naive_deletion")(denoiser, None, batch, generator=torch.Generator().manual_seed(0))
    assert terms.keep.ndim == 0 and torch.isfinite(terms.keep)
    terms.keep.backward()
    grads = [p.grad for p in unet.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)

    # The time_ids reach the UNet: other sizes give another output.
    x_t, t = torch.randn_like(batch.x0), torch.full((len(batch),), 500)
    with torch.no_grad():
        output = denoiser.model_output(x_t, t, batch)
        other_sizes = {**batch.added_cond, "time_ids": batch.added_cond["time_ids"] * 2}
        resized = DenoisingBatch(batch.x0, None, batch.encoder_hidden_states, other_sizes)
        assert not torch.allclose(output, denoiser.model_output(x_t, t, resized))
        # Without a call hook the Denoiser passes extra conditioning as added_cond_kwargs: the same output.
        plain = Denoiser(unet, denoiser.schedule)
        torch.testing.assert_close(plain.model_output(x_t, t, batch), output, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"needs \['text_embeds', 'time_ids'\]"):
        denoiser.model_output(x_t, t, DenoisingBatch(batch.x0, None, batch.encoder_hidden_states))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_naive_deletion_keep_term_is_the_official_sdxl_training_loss(folders, prediction_type):
    """train_text_to_image_lora_sdxl.py: prompt_embeds = both encoders' hidden_states[-2] concatenated, pooled =
    text_encoder_2's output[0]; add_time_ids = original_size + crop_top_left + target_size; noisy =
    scheduler.add_noise(latents, noise, t); target = noise or scheduler.get_velocity(latents, noise, t);
    loss = F.mse_loss(unet(noisy, t, prompt_embeds, added_cond_kwargs={"text_embeds", "time_ids"}).sample.float(),
    target.float(), reduction="mean"), with DDPMScheduler.from_pretrained(path, subfolder="scheduler")."""
    from diffusers import DDPMScheduler

    folder = folders["sdxl" if prediction_type == "epsilon" else "sdxl_v"]
    family = families.get_family("sdxl")
    components = family.load(folder)
    originals, crops, target_size = [(20, 24), (32, 16), (16, 16)], [(2, 4), (0, 8), (0, 0)], (16, 16)
    prompts = ["a photo of a cat", "a digit", "a"]
    latents = family.encode_images(components, images(3))
    cond = family.encode_prompts(components, prompts, originals, crops, target_size)
    keep = DenoisingBatch.from_conditioning(latents, cond)
    with torch.no_grad():
        naive_deletion = get_objective("naive_deletion")
        ours = naive_deletion(family.denoiser(components), None, keep, torch.Generator().manual_seed(7)).keep

        # The official script's formulas, written out.
        noise_scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
        embeds_list = []
        for tokenizer, text_encoder in (
            (components["tokenizer"], components["text_encoder"]),
            (components["tokenizer_2"], components["text_encoder_2"]),
        ):
            ids = tokenizer(
                prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                return_tensors="pt",
            ).input_ids
            output = text_encoder(ids, output_hidden_states=True, return_dict=False)
            pooled_prompt_embeds = output[0]
            embeds_list.append(output[-1][-2])
        prompt_embeds = torch.concat(embeds_list, dim=-1)
        add_time_ids = torch.cat([torch.tensor([list(o + c + target_size)]) for o, c in zip(originals, crops)])
        g = torch.Generator().manual_seed(7)  # the same draws, in the same order: timesteps, then noise
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(latents),), generator=g)
        noise = torch.randn(latents.shape, generator=g)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        target = noise if prediction_type == "epsilon" else noise_scheduler.get_velocity(latents, noise, timesteps)
        model_pred = components["unet"](
            noisy, timesteps, prompt_embeds,
            added_cond_kwargs={"time_ids": add_time_ids, "text_embeds": pooled_prompt_embeds}, return_dict=False,
        )[0]
        official = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    torch.testing.assert_close(ours, official, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Adapters through plain diffusers
# ---------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def diffusers_warnings():
    """Collect the messages diffusers logs at WARNING or above (its loggers do not propagate to pytest's)."""
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def randomize_lora_b(model: torch.nn.Module, seed: int) -> None:
    """lora_B starts at zero (the adapter is the identity); give it values so that it changes outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def outputs(family, components, ids, cond, x_t) -> dict[str, torch.Tensor]:
    """Every adapted component's output on pinned inputs: the UNet and each text encoder."""
    with torch.no_grad():
        result = {"unet": family.call(components["unet"], x_t, torch.tensor([500]), cond)}
        for position, name in enumerate(family.text_encoder_names):
            encoder_ids = ids if ids.ndim == 2 else ids[:, position]
            result[name] = components[name](encoder_ids)[0]  # the last layer: a one-layer encoder's LoRA shows
    return result


def assert_outputs(actual, expected, equal: bool):
    for name in expected:
        close = torch.allclose(actual[name], expected[name], atol=1e-5, rtol=1e-5)
        assert close == equal, name


@pytest.mark.parametrize("family_name", ["sd", "sdxl"])
def test_saved_adapter_loads_into_the_plain_pipeline(folders, tmp_path, family_name):
    family = families.get_family(family_name)
    folder = folders[family_name]
    trained = family.load(folder)
    ids = family.tokenize(trained, PROMPTS[:1])
    cond = family.encode_prompts(trained, PROMPTS[:1])
    x_t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    base = outputs(family, trained, ids, cond, x_t)

    add_lora(trained["unet"], rank=2, lora_alpha=4, targets=family.lora_targets("attention"))
    text_encoders = {
        name: add_text_encoder_lora(trained[name], rank=2, lora_alpha=3) for name in family.text_encoder_names
    }
    for seed, name in enumerate(["unet", *family.text_encoder_names]):
        randomize_lora_b(trained[name], seed)
    adapted = outputs(family, trained, ids, cond, x_t)
    assert_outputs(adapted, base, equal=False)
    path = family.save_adapter(tmp_path / "adapter", trained["unet"], text_encoders, metadata={"method": "test"})

    measure = functools.partial(outputs, family, ids=ids, cond=cond, x_t=x_t)  # outputs of given components
    check_adapter_in_plain_pipeline(family, folder, path, trained, measure, adapted)


def check_adapter_in_plain_pipeline(family, folder, path, trained, measure, adapted) -> None:
    """The adapter file at `path` (saved from `trained`'s components: the denoiser with rank 2, alpha 4, the text
    encoders with rank 2, alpha 3) loads into the family's plain pipeline from `folder` with plain diffusers, with
    no key missing or unexpected and equal tensors; the loaded pipeline's outputs (`measure(components)`) equal
    `adapted`; `set_adapters(adapter_weights=[0.5])` halves every scaling and `fuse_lora` merges at that weight."""
    from safetensors import safe_open

    denoiser = family.denoiser_name
    with safe_open(path, framework="pt") as handle:
        file_keys = list(handle.keys())
    assert {key.split(".")[0] for key in file_keys} == set(family.lora_prefixes)

    plain = family.plain_pipeline_class.from_pretrained(folder)
    with diffusers_warnings() as warnings:
        plain.load_lora_weights(os.path.dirname(path), adapter_name="unlearned")  # plain diffusers only
    assert not [m for m in warnings if "unexpected" in m.lower() or "missing" in m.lower()], warnings
    components = plain.components
    for prefix in family.lora_prefixes:
        # Every key of the file landed in the component (none unexpected), every LoRA weight came from it
        # (none missing), with equal tensors and the saved rank and alpha.
        expected = {k.removeprefix(f"{prefix}."): k for k in file_keys if k.startswith(f"{prefix}.")}
        loaded = lora_state_dict(components[prefix], "unlearned")
        saved = lora_state_dict(trained[prefix])
        assert loaded.keys() == expected.keys() == saved.keys(), prefix
        for key in loaded:
            assert torch.equal(loaded[key], saved[key]), key
        config = components[prefix].peft_config["unlearned"]
        assert (config.r, config.lora_alpha) == ((2, 4) if prefix == denoiser else (2, 3))
    assert_outputs(measure(components), adapted, equal=True)

    plain.set_adapters(["unlearned"], adapter_weights=[0.5])
    for prefix in family.lora_prefixes:
        scalings = {
            layer.scaling["unlearned"]
            for layer in components[prefix].modules()
            if "unlearned" in getattr(layer, "scaling", {})
        }
        assert scalings == {0.5 * (2.0 if prefix == denoiser else 1.5)}, prefix
    half = measure(components)
    assert_outputs(half, adapted, equal=False)

    # Merges at the set weight, into every component with LoRA (named: FluxPipeline fuses only its transformer
    # by default).
    plain.fuse_lora(components=list(family.lora_prefixes))
    plain.unload_lora_weights()
    fused = measure(plain.components)
    assert_outputs(fused, half, equal=True)
    assert not any(hasattr(m, "lora_A") for m in plain.components[denoiser].modules())


def test_save_adapter_refuses_a_text_encoder_the_family_lacks(folders, tmp_path):
    family = families.get_family("sd")
    components = family.load(folders["sd"])
    unet = add_lora(components["unet"], rank=2, targets=family.lora_targets("attention"))
    encoder = add_text_encoder_lora(components["text_encoder"], rank=2)
    with pytest.raises(ValueError, match=r"no text encoder\(s\) \['text_encoder_2'\]"):
        family.save_adapter(tmp_path, unet, {"text_encoder_2": encoder})
    assert not list(tmp_path.iterdir())


def test_presets_match_layers_of_the_tiny_sdxl_unet(sdxl_setup):
    family, components, _ = sdxl_setup
    for preset in family.lora_target_presets:
        assert resolve_lora_targets(components["unet"], family.lora_targets(preset))


def test_batch_slicing_keeps_extra_conditioning():
    """VDU's Fisher samples and the likelihood metrics slice batches; SDXL's text_embeds and time_ids go along."""
    batch = DenoisingBatch(torch.arange(3.0).view(3, 1), None, torch.zeros(3, 2, 4),
                           {"text_embeds": torch.arange(3.0).view(3, 1), "time_ids": torch.arange(18.0).view(3, 6)})
    picked = batch.select(torch.tensor([2, 0, 2]))
    assert picked.x0.flatten().tolist() == [2.0, 0.0, 2.0]
    assert picked.added_cond["text_embeds"].flatten().tolist() == [2.0, 0.0, 2.0]
    assert torch.equal(picked.added_cond["time_ids"][1], batch.added_cond["time_ids"][0])
    assert batch.select(slice(1, 2)).added_cond["time_ids"].shape == (1, 6)


def test_likelihood_metrics_run_on_sdxl_conditioning(folders):
    from diffusers_unlearn.metrics import denoising_losses

    family = families.get_family("sdxl")
    components = family.load(folders["sdxl"])
    cond = family.encode_prompts(components, ["a digit", "a cat"])
    batch = DenoisingBatch.from_conditioning(torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), cond)
    losses = denoising_losses(family.denoiser(components), batch, num_timesteps=3, seed=0, batch_size=4)
    assert losses.shape == (2,) and torch.isfinite(losses).all()
