"""The SD3 and Flux families (diffusers_unlearn.families.sd3 / .flux) on tiny random pipelines.

Checked against diffusers itself, not against our own code: prompt encodings against the pipelines'
`encode_prompt` (SD3 with and without T5, Flux), Flux's packing and ids against `FluxPipeline`'s static helpers,
the families' transformer calls against the calls the pipelines make, naive deletion's keep term against the
official SD3 and Flux LoRA scripts' loss (transcribed), and saved adapters against the plain pipelines'
`load_lora_weights`, `set_adapters` and `fuse_lora`.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from test_families import assert_outputs, check_adapter_in_plain_pipeline, randomize_lora_b
from tiny_models import save_tiny_flux_pipeline, save_tiny_sd3_pipeline

from diffusers_unlearn import families
from diffusers_unlearn.errors import UserInputError
from diffusers_unlearn.families.flux import latent_image_ids, pack_latents, unpack_latents
from diffusers_unlearn.lora import add_lora, add_text_encoder_lora, read_lora_metadata, resolve_lora_targets
from diffusers_unlearn.objectives import DenoisingBatch, get_objective

PROMPTS = ["a photo of a cat", "a handwritten digit seven"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Saved tiny pipelines: SD3 with and without T5, Flux with and without the guidance embedding."""
    root = tmp_path_factory.mktemp("flow_families")
    return {
        "sd3": save_tiny_sd3_pipeline(root / "sd3"),
        "sd3_no_t5": save_tiny_sd3_pipeline(root / "sd3_no_t5", with_t5=False),
        "flux": save_tiny_flux_pipeline(root / "flux"),
        "flux_no_guidance": save_tiny_flux_pipeline(root / "flux_no_guidance", guidance_embeds=False),
    }


@pytest.fixture(scope="module")
def loaded(folders):
    """Each folder's components, loaded once by its family (tests that change them take deep copies)."""
    return {key: families.family_for_folder(folder).load(folder) for key, folder in folders.items()}


def family_of(key: str):
    return families.get_family("sd3" if key.startswith("sd3") else "flux")


def plain_pipeline(components, key):
    """The plain diffusers pipeline over already loaded components (as `from_pretrained` would build it)."""
    family = family_of(key)
    parts = {name: components[name] for name in family.component_names}
    if key.startswith("sd3"):
        parts.update(tokenizer_3=components["tokenizer_3"], text_encoder_3=components["text_encoder_3"])
    return family.plain_pipeline_class(**parts)


def images(count: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---------------------------------------------------------------------------------------------------------------
# Detection, loading, options
# ---------------------------------------------------------------------------------------------------------------


def test_families_detected_from_model_index_and_loaded(folders, loaded):
    assert families.family_for_folder(folders["sd3"]).name == "sd3"
    assert families.family_for_folder(folders["sd3_no_t5"]).name == "sd3"
    assert families.family_for_folder(folders["flux"]).name == "flux"
    assert {"FluxPipeline", "StableDiffusion3Pipeline"} <= set(families.supported_pipeline_classes())

    sd3 = loaded["sd3"]
    assert type(sd3["transformer"]).__name__ == "SD3Transformer2DModel"
    assert type(sd3["text_encoder_3"]).__name__ == "T5EncoderModel"
    assert type(sd3["tokenizer_3"]).__name__ in ("T5TokenizerFast", "T5Tokenizer")  # one class in transformers 5
    assert type(sd3["scheduler"]).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert not any(p.requires_grad for p in sd3["transformer"].parameters())
    # A pipeline saved without T5: None in its place, as StableDiffusion3Pipeline(text_encoder_3=None).
    assert loaded["sd3_no_t5"]["text_encoder_3"] is None and loaded["sd3_no_t5"]["tokenizer_3"] is None
    assert "text_encoder_3" not in families.get_family("sd3").component_names  # not required in a folder
    flux = loaded["flux"]
    assert type(flux["transformer"]).__name__ == "FluxTransformer2DModel"
    assert type(flux["text_encoder"]).__name__ == "CLIPTextModel"
    assert type(flux["text_encoder_2"]).__name__ == "T5EncoderModel"

    half = families.get_family("sd3").load(folders["sd3_no_t5"], torch.bfloat16, denoiser_dtype=torch.float32)
    assert half["transformer"].dtype == torch.float32 and half["text_encoder"].dtype == torch.bfloat16


def test_options_are_validated_and_leave_the_registered_family_unchanged():
    sd3 = families.get_family("sd3")
    assert sd3.max_sequence_length == 77  # train_dreambooth_lora_sd3.py's default
    assert families.get_family("flux").max_sequence_length == 512  # train_dreambooth_lora_flux.py's default
    longer = sd3.with_options(max_sequence_length=256)
    assert longer.max_sequence_length == 256 and sd3.max_sequence_length == 77
    assert longer != sd3 and longer == sd3.with_options(max_sequence_length=256)
    assert "max_sequence_length=256" in repr(longer)
    with pytest.raises(UserInputError, match=r"--max_sequence_length must be an integer in \[1, 512\]"):
        sd3.with_options(max_sequence_length=513)
    with pytest.raises(UserInputError, match="Unknown --weighting_scheme 'uniform'"):
        sd3.with_options(weighting_scheme="uniform")
    with pytest.raises(UserInputError, match="--guidance_scale must be a number >= 0"):
        families.get_family("flux").with_options(guidance_scale=-1.0)
    with pytest.raises(TypeError, match=r"Unknown option\(s\) \['precondition_outputs'\] for the flux family"):
        families.get_family("flux").with_options(precondition_outputs=True)


def test_lora_presets_match_the_tiny_transformers(loaded):
    for key in ("sd3", "flux"):
        family, transformer = family_of(key), loaded[key]["transformer"]
        for preset in family.lora_target_presets:
            targets = family.lora_targets(preset)
            assert resolve_lora_targets(transformer, targets) == list(targets), (key, preset)
        assert {"to_q", "add_q_proj", "to_add_out"} <= set(family.lora_targets("attention"))
    with pytest.raises(UserInputError, match="Unknown LoRA target preset 'conv' for the sd3 family"):
        families.get_family("sd3").lora_targets("conv")


# ---------------------------------------------------------------------------------------------------------------
# Conditioning
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["sd3", "sd3_no_t5"])
def test_sd3_encode_prompts_matches_the_pipeline(loaded, key):
    components = loaded[key]
    pipe = plain_pipeline(components, key)
    for length in (77, 20):
        family = families.get_family("sd3").with_options(max_sequence_length=length)
        cond = family.encode_prompts(components, PROMPTS)
        assert sorted(cond) == ["encoder_hidden_states", "pooled_projections"]
        with torch.no_grad():
            embeds, _, pooled, _ = pipe.encode_prompt(
                PROMPTS, PROMPTS, PROMPTS, device="cpu", do_classifier_free_guidance=False,
                max_sequence_length=length,
            )
        assert cond["encoder_hidden_states"].shape == (2, 77 + length, 80)  # CLIP 77 tokens, then T5's
        assert cond["pooled_projections"].shape == (2, 64)  # both CLIP projections
        torch.testing.assert_close(cond["encoder_hidden_states"], embeds, rtol=0, atol=0)
        torch.testing.assert_close(cond["pooled_projections"], pooled, rtol=0, atol=0)

    family = families.get_family("sd3")
    ids = family.tokenize(components, PROMPTS)
    with_t5 = key == "sd3"
    assert family.token_lengths(components) == ((77, 77, 77) if with_t5 else (77, 77))
    assert ids.shape == (2, 231 if with_t5 else 154) and ids.dtype == torch.long
    # The ids are the tokenizers' own, side by side; the second CLIP tokenizer pads with "!".
    first = components["tokenizer"](PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    torch.testing.assert_close(ids[:, :77], first, rtol=0, atol=0)
    assert not torch.equal(ids[:, :77], ids[:, 77:154])
    cond = family.encode_tokens(components, ids)
    clip_features = cond["encoder_hidden_states"][:, :77]
    assert torch.count_nonzero(clip_features[..., 64:]) == 0  # 32 + 32 CLIP features, zero-padded to 80
    t5_part = cond["encoder_hidden_states"][:, 77:]
    assert (torch.count_nonzero(t5_part) > 0) == with_t5  # without T5: zeros in its place
    with pytest.raises(ValueError, match=r"token ids must have shape \(N, "):
        family.encode_tokens(components, ids[:, :100])


@pytest.mark.parametrize("key", ["flux", "flux_no_guidance"])
def test_flux_encode_prompts_matches_the_pipeline(loaded, key):
    components = loaded[key]
    family = families.get_family("flux")
    cond = family.encode_prompts(components, PROMPTS)
    pipe = plain_pipeline(components, key)
    with torch.no_grad():
        embeds, pooled, text_ids = pipe.encode_prompt(PROMPTS, PROMPTS, device="cpu")
    assert cond["encoder_hidden_states"].shape == (2, 512, 48)
    torch.testing.assert_close(cond["encoder_hidden_states"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond["pooled_projections"], pooled, rtol=0, atol=0)
    assert text_ids.shape == (512, 3) and not text_ids.any()  # what `call` builds: zeros, one row per T5 token
    if key == "flux":
        # A guidance-distilled transformer: the script's --guidance_scale per item, cached with the prompt.
        assert cond["guidance"].tolist() == [3.5, 3.5]
        lower = family.with_options(guidance_scale=1.0).encode_prompts(components, PROMPTS[:1])
        assert lower["guidance"].tolist() == [1.0]
    else:
        assert "guidance" not in cond
    assert family.tokenize(components, PROMPTS).shape == (2, 77 + 512)
    short = family.with_options(max_sequence_length=16).encode_prompts(components, PROMPTS)
    assert short["encoder_hidden_states"].shape == (2, 16, 48)


def test_flux_packing_and_ids_are_the_pipelines():
    from diffusers import FluxPipeline

    latents = torch.randn(3, 4, 6, 10, generator=torch.Generator().manual_seed(0))
    packed = pack_latents(latents)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(latents, 3, 4, 6, 10), rtol=0, atol=0)
    assert torch.equal(unpack_latents(packed, 6, 10), latents)
    # The pipeline unpacks from pixel sizes: latents times the VAE scale factor (2 here).
    torch.testing.assert_close(
        unpack_latents(packed, 6, 10), FluxPipeline._unpack_latents(packed, 12, 20, 2), rtol=0, atol=0
    )
    ids = latent_image_ids(6, 10, dtype=torch.bfloat16)
    expected = FluxPipeline._prepare_latent_image_ids(3, 3, 5, "cpu", torch.bfloat16)
    assert ids.dtype == torch.bfloat16
    torch.testing.assert_close(ids, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="must be even"):
        pack_latents(torch.zeros(1, 4, 5, 6))


# ---------------------------------------------------------------------------------------------------------------
# The transformer calls
# ---------------------------------------------------------------------------------------------------------------


def test_sd3_call_is_the_transformer_call(loaded):
    family, components = families.get_family("sd3"), loaded["sd3"]
    cond = family.encode_prompts(components, PROMPTS)
    x_t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    timesteps = torch.tensor([997.0, 31.5])
    with torch.no_grad():
        ours = family.call(components["transformer"], x_t, timesteps, cond)
        direct = components["transformer"](
            hidden_states=x_t, timestep=timesteps, encoder_hidden_states=cond["encoder_hidden_states"],
            pooled_projections=cond["pooled_projections"], return_dict=False,
        )[0]
    torch.testing.assert_close(ours, direct, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"needs \['pooled_projections'\]"):
        family.call(components["transformer"], x_t, timesteps, {"encoder_hidden_states": cond["encoder_hidden_states"]})


@pytest.mark.parametrize("key", ["flux", "flux_no_guidance"])
def test_flux_call_is_the_pipeline_call_on_packed_latents(loaded, key):
    """FluxPipeline.__call__'s transformer call: packed latents, timestep / 1000, guidance, text_ids, img_ids."""
    from diffusers import FluxPipeline

    family, components = families.get_family("flux"), loaded[key]
    transformer = components["transformer"]
    cond = family.encode_prompts(components, PROMPTS)
    pipe = plain_pipeline(components, key)
    with torch.no_grad():
        embeds, pooled, text_ids = pipe.encode_prompt(PROMPTS, PROMPTS, device="cpu")
    x_t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    timesteps = torch.tensor([750.0, 12.25])
    guidance = torch.full([1], 3.5).expand(2) if key == "flux" else None
    with torch.no_grad():
        ours = family.call(transformer, x_t, timesteps, cond)
        packed = FluxPipeline._pack_latents(x_t, 2, 4, 8, 8)
        image_ids = FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", x_t.dtype)
        prediction = transformer(
            hidden_states=packed, timestep=timesteps / 1000, guidance=guidance, pooled_projections=pooled,
            encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=image_ids, return_dict=False,
        )[0]
        expected = FluxPipeline._unpack_latents(prediction, 16, 16, pipe.vae_scale_factor)
    assert ours.shape == x_t.shape
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)

    if key == "flux":
        with torch.no_grad():
            other = family.call(transformer, x_t, timesteps, {**cond, "guidance": cond["guidance"] * 2})
        assert not torch.allclose(other, ours)  # the guidance value reaches the transformer
        without = {k: v for k, v in cond.items() if k != "guidance"}
        with pytest.raises(ValueError, match=r"needs \['guidance'\]"):
            family.call(transformer, x_t, timesteps, without)


# ---------------------------------------------------------------------------------------------------------------
# Naive deletion's keep term is the official fine-tuning loss
# ---------------------------------------------------------------------------------------------------------------


def official_flow_loss(key, family, components, latents, prompts, seed):
    """train_dreambooth_lora_sd3.py / train_dreambooth_lora_flux.py's loss, written out (the draws in our order:
    u first, then the noise, from one generator):

        u = compute_density_for_timestep_sampling(weighting_scheme, bsz, logit_mean, logit_std, mode_scale)
        indices = (u * noise_scheduler_copy.config.num_train_timesteps).long()
        timesteps = noise_scheduler_copy.timesteps[indices]
        sigmas = get_sigmas(timesteps)   # noise_scheduler_copy.sigmas at the matching step index
        noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
        SD3:  model_pred = transformer(hidden_states=noisy_model_input, timestep=timesteps,
                                       encoder_hidden_states=prompt_embeds, pooled_projections=pooled_prompt_embeds)[0]
              if precondition_outputs: model_pred = model_pred * (-sigmas) + noisy_model_input
        Flux: model_pred = transformer(hidden_states=_pack_latents(noisy_model_input), timestep=timesteps / 1000,
                                       guidance=guidance_scale expanded (guidance_embeds only), pooled_projections,
                                       encoder_hidden_states, txt_ids=text_ids, img_ids=latent_image_ids)[0]
              model_pred = _unpack_latents(model_pred, height * vae_scale_factor, width * vae_scale_factor)
        weighting = compute_loss_weighting_for_sd3(weighting_scheme, sigmas)
        target = model_input if precondition_outputs else noise - model_input
        loss = mean(mean((weighting * (model_pred - target) ** 2).reshape(bsz, -1), 1))
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    scheme = family.weighting_scheme
    precondition = bool(getattr(family, "precondition_outputs", False))
    noise_scheduler_copy = FlowMatchEulerDiscreteScheduler.from_config(components["scheduler"].config)
    pipe = plain_pipeline(components, key)
    transformer = components["transformer"]
    bsz = latents.shape[0]
    if key.startswith("sd3"):
        prompt_embeds, _, pooled_prompt_embeds, _ = pipe.encode_prompt(
            prompts, prompts, prompts, device="cpu", do_classifier_free_guidance=False,
            max_sequence_length=family.max_sequence_length,
        )
    else:
        prompt_embeds, pooled_prompt_embeds, text_ids = pipe.encode_prompt(
            prompts, prompts, device="cpu", max_sequence_length=family.max_sequence_length
        )

    g = torch.Generator().manual_seed(seed)
    u = compute_density_for_timestep_sampling(
        weighting_scheme=scheme, batch_size=bsz, logit_mean=family.logit_mean, logit_std=family.logit_std,
        mode_scale=family.mode_scale, generator=g,
    )
    noise = torch.randn(latents.shape, generator=g)
    indices = (u * noise_scheduler_copy.config.num_train_timesteps).long()
    timesteps = noise_scheduler_copy.timesteps[indices]
    step_indices = [(noise_scheduler_copy.timesteps == t).nonzero().item() for t in timesteps]
    sigmas = noise_scheduler_copy.sigmas[step_indices].flatten().reshape(bsz, 1, 1, 1)
    noisy_model_input = (1.0 - sigmas) * latents + sigmas * noise
    if key.startswith("sd3"):
        model_pred = transformer(
            hidden_states=noisy_model_input, timestep=timesteps, encoder_hidden_states=prompt_embeds,
            pooled_projections=pooled_prompt_embeds, return_dict=False,
        )[0]
        if precondition:
            model_pred = model_pred * (-sigmas) + noisy_model_input
    else:
        height, width = latents.shape[2:]
        packed = FluxPipeline._pack_latents(noisy_model_input, bsz, latents.shape[1], height, width)
        guidance = torch.tensor([family.guidance_scale]).expand(bsz) if transformer.config.guidance_embeds else None
        image_ids = FluxPipeline._prepare_latent_image_ids(bsz, height // 2, width // 2, "cpu", latents.dtype)
        model_pred = transformer(
            hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
            pooled_projections=pooled_prompt_embeds, encoder_hidden_states=prompt_embeds, txt_ids=text_ids,
            img_ids=image_ids, return_dict=False,
        )[0]
        model_pred = FluxPipeline._unpack_latents(
            model_pred, height * pipe.vae_scale_factor, width * pipe.vae_scale_factor, pipe.vae_scale_factor
        )
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=scheme, sigmas=sigmas)
    target = latents if precondition else noise - latents
    loss = torch.mean((weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(bsz, -1), 1)
    return loss.mean()


@pytest.mark.parametrize(
    "key, options",
    [
        ("sd3", {}),
        ("sd3", {"weighting_scheme": "logit_normal", "logit_mean": 0.3, "precondition_outputs": True}),
        ("sd3_no_t5", {"weighting_scheme": "sigma_sqrt", "max_sequence_length": 12}),
        ("flux", {}),
        ("flux_no_guidance", {"weighting_scheme": "mode", "guidance_scale": 1.0, "max_sequence_length": 24}),
    ],
    ids=["sd3", "sd3_logit_normal_precondition", "sd3_no_t5_sigma_sqrt", "flux", "flux_no_guidance_mode"],
)
def test_naive_deletion_keep_term_is_the_official_loss(loaded, key, options):
    components = loaded[key]
    family = family_of(key).with_options(**options)
    prompts = ["a photo of a cat", "a digit", "seven"]
    latents = family.encode_images(components, images(3))
    keep = DenoisingBatch.from_conditioning(latents, family.encode_prompts(components, prompts))
    with torch.no_grad():
        denoiser = family.denoiser(components)
        ours = get_objective("naive_deletion")(denoiser, None, keep, torch.Generator().manual_seed(7)).keep
        official = official_flow_loss(key, family, components, latents, prompts, seed=7)
    torch.testing.assert_close(ours, official, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("key", ["sd3_no_t5", "flux"])
def test_siss_trains_a_transformer_lora_through_the_family_call(loaded, key):
    """SISS stacks the forget and keep batches (guidance included) into one call; gradients reach the LoRA."""
    family, components = family_of(key), loaded[key]
    transformer = add_lora(
        copy.deepcopy(components["transformer"]), rank=2, targets=family.lora_targets("attention")
    )
    latents = family.encode_images(components, images(4, seed=1))
    forget = DenoisingBatch.from_conditioning(latents[:2], family.encode_prompts(components, ["seven"] * 2))
    keep = DenoisingBatch.from_conditioning(latents[2:], family.encode_prompts(components, PROMPTS))
    denoiser = family.denoiser({**components, "transformer": transformer})
    terms = get_objective("siss")(denoiser, forget, keep, generator=torch.Generator().manual_seed(0))
    total = terms.keep + terms.forget
    assert torch.isfinite(total)
    total.backward()
    grads = [p.grad for p in transformer.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_flow_schedule_is_built_from_the_family_options(loaded):
    family = families.get_family("sd3").with_options(weighting_scheme="logit_normal", precondition_outputs=True)
    schedule = family.schedule(loaded["sd3"])
    assert schedule.prediction_type == "flow_prediction"
    assert schedule.weighting_scheme == "logit_normal" and schedule.precondition_outputs
    with pytest.raises(UserInputError, match="flow matching"):
        family.schedule(loaded["sd3"], prediction_type="epsilon")


# ---------------------------------------------------------------------------------------------------------------
# Adapters through plain diffusers
# ---------------------------------------------------------------------------------------------------------------


def adapted_outputs(family, components, ids, cond, x_t) -> dict[str, torch.Tensor]:
    """Every LoRA-carrying component's output on pinned inputs: the transformer and each CLIP encoder."""
    by_tokenizer = family._split(components, ids)
    tokenizer_of = {encoder: tokenizer for tokenizer, encoder, _ in family.text_encoders}
    with torch.no_grad():
        result = {"transformer": family.call(components["transformer"], x_t, torch.tensor([500.0]), cond)}
        for name in family.lora_text_encoder_names:
            result[name] = components[name](by_tokenizer[tokenizer_of[name]])[0]
    return result


@pytest.mark.parametrize("key", ["sd3", "flux"])
def test_saved_adapter_loads_into_the_plain_pipeline(folders, loaded, tmp_path, key):
    family = family_of(key)
    trained = {name: copy.deepcopy(component) for name, component in loaded[key].items()}
    ids = family.tokenize(trained, PROMPTS[:1])
    cond = family.encode_prompts(trained, PROMPTS[:1])
    x_t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    base = adapted_outputs(family, trained, ids, cond, x_t)

    add_lora(trained["transformer"], rank=2, lora_alpha=4, targets=family.lora_targets("attention"))
    text_encoders = {
        name: add_text_encoder_lora(trained[name], rank=2, lora_alpha=3) for name in family.lora_text_encoder_names
    }
    for seed, name in enumerate(family.lora_prefixes):
        randomize_lora_b(trained[name], seed)
    adapted = adapted_outputs(family, trained, ids, cond, x_t)
    assert_outputs(adapted, base, equal=False)
    untrained = "text_encoder_2" if key == "flux" else "text_encoder_3"  # T5: not in the adapter files
    with pytest.raises(ValueError, match=rf"no text encoder\(s\) \['{untrained}'\]"):
        family.save_adapter(tmp_path / "refused", trained["transformer"], {untrained: trained["text_encoder"]})
    path = family.save_adapter(tmp_path / "adapter", trained["transformer"], text_encoders, metadata={"method": "t"})

    header = read_lora_metadata(path, denoiser_prefix="transformer")
    assert (header["rank"], header["lora_alpha"], header["method"]) == (2, 4, "t")
    measure = functools.partial(adapted_outputs, family, ids=ids, cond=cond, x_t=x_t)  # outputs of given components
    check_adapter_in_plain_pipeline(family, folders[key], path, trained, measure, adapted)


def test_sampling_pipeline_without_t5_is_the_plain_pipeline(loaded):
    from diffusers import FlowMatchEulerDiscreteScheduler

    components = loaded["sd3_no_t5"]
    family = families.get_family("sd3")
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(components["scheduler"].config)
    pipe = family.sampling_pipeline(components, scheduler)
    assert type(pipe).__name__ == "StableDiffusion3Pipeline" and pipe.text_encoder_3 is None
    assert family.native_resolution(components) == (16, 16)
    image = pipe("a digit", num_inference_steps=2, height=16, width=16, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 3, 16, 16) and torch.isfinite(image).all()
    assert families.get_family("flux").native_resolution(loaded["flux"]) == (256, 256)  # FluxPipeline's default
