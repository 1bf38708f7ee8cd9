"""Tests for diffusers_unlearn.lora: CPU only, offline, tiny models built from configs."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from torch import nn

from diffusers_unlearn import lora
from diffusers_unlearn.lora import (
    LORA_TARGET_PRESETS,
    LoRAUNet2DModel,
    add_lora,
    as_lora_unet,
    as_plain_unet,
    count_parameters,
    load_lora_weights,
    lora_state_dict,
    lora_weight_deltas,
    make_optimizer,
    prepare_full_finetune,
    read_lora_metadata,
    resolve_lora_targets,
    save_lora_weights,
    trainable_parameters,
)

DDPM_CONFIG = dict(
    sample_size=8,
    in_channels=1,
    out_channels=1,
    block_out_channels=(16, 32),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
)

SD_UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(16, 32),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=4,
    norm_num_groups=8,
)


@pytest.fixture(autouse=True, scope="module")
def single_torch_thread():
    """These models are tiny: one thread is fastest, and with several threads a busy CPU (another test run, a
    small CI machine) makes each op wait on the others, slowing a forward pass from ~10 ms to seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_ddpm_unet(seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(**DDPM_CONFIG).eval()


def make_sd_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**SD_UNET_CONFIG).eval()


def randomize_lora_b(model: nn.Module, seed: int = 1) -> None:
    """lora_B starts at zero; give it values so the adapter changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def ddpm_forward(model: nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(42)
    sample = torch.randn(2, 1, 8, 8, generator=generator)
    with torch.no_grad():
        return model(sample, torch.tensor([3, 7])).sample


def sd_forward(model: nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(42)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    text = torch.randn(2, 5, 32, generator=generator)
    with torch.no_grad():
        return model(sample, torch.tensor([3, 7]), encoder_hidden_states=text).sample


# ------------------------------------------------------------------------------------------------------------
# The UNet2DModel subclass
# ------------------------------------------------------------------------------------------------------------


def test_lora_unet_loads_plain_unet_checkpoint(tmp_path):
    base = make_ddpm_unet()
    base.save_pretrained(tmp_path / "unet")

    loaded = LoRAUNet2DModel.from_pretrained(tmp_path / "unet")
    assert isinstance(loaded, LoRAUNet2DModel)
    assert torch.equal(ddpm_forward(loaded), ddpm_forward(base))

    from_config = LoRAUNet2DModel.from_config(base.config)
    assert isinstance(from_config, LoRAUNet2DModel)
    for method in ("add_adapter", "save_lora_adapter", "load_lora_adapter", "set_adapters", "fuse_lora", "unload_lora"):
        assert callable(getattr(from_config, method))


def test_as_lora_unet_keeps_weights_and_round_trips_to_plain():
    base = make_ddpm_unet()
    expected = ddpm_forward(base)
    weight = base.conv_in.weight

    converted = as_lora_unet(base)
    assert isinstance(converted, LoRAUNet2DModel)
    assert converted.conv_in.weight is weight  # converted in place, nothing copied
    assert torch.equal(ddpm_forward(converted), expected)

    sd_unet = make_sd_unet()
    assert as_lora_unet(sd_unet) is sd_unet

    add_lora(converted, rank=2)
    with pytest.raises(ValueError, match="unload_lora"):
        as_plain_unet(converted)
    converted.unload_lora()
    assert type(as_plain_unet(converted)) is UNet2DModel

    with pytest.raises(TypeError, match="UNet2DModel"):
        as_lora_unet(nn.Linear(2, 2))


# ------------------------------------------------------------------------------------------------------------
# Target presets
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make_model", [make_ddpm_unet, make_sd_unet])
@pytest.mark.parametrize("preset", sorted(LORA_TARGET_PRESETS))
def test_presets_resolve_to_existing_modules(make_model, preset):
    model = make_model()
    targets = resolve_lora_targets(model, preset)
    assert targets
    names = [name for name, _ in model.named_modules()]
    for target in targets:
        assert target in LORA_TARGET_PRESETS[preset]
        assert any(name == target or name.endswith("." + target) for name in names)
    if preset == "attention_conv":
        assert {"conv1", "conv2", "conv_shortcut"} <= set(targets)
        assert not any("time_emb" in t or "linear_" in t for t in targets)
    if preset == "conv":
        assert set(targets) == {"conv1", "conv2"}  # no attention projection


def test_custom_targets_and_errors():
    model = make_ddpm_unet()
    assert resolve_lora_targets(model, "to_q, to_v") == ["to_q", "to_v"]
    assert resolve_lora_targets(model, ["conv1", "to_out.0", "conv1"]) == ["conv1", "to_out.0"]

    with pytest.raises(ValueError) as error:
        resolve_lora_targets(model, "attn")
    for preset in LORA_TARGET_PRESETS:
        assert repr(preset) in str(error.value)
    with pytest.raises(ValueError, match="not_a_layer"):
        resolve_lora_targets(model, ["to_q", "not_a_layer"])

    # A model with no attention layers: the attention preset matches nothing.
    torch.manual_seed(0)
    no_attention = UNet2DModel(
        **{**DDPM_CONFIG, "down_block_types": ("DownBlock2D", "DownBlock2D"), "up_block_types": ("UpBlock2D", "UpBlock2D"),
           "add_attention": False}
    )
    with pytest.raises(ValueError, match="matches no layer"):
        resolve_lora_targets(no_attention, "attention")


# ------------------------------------------------------------------------------------------------------------
# add_lora and parameter helpers
# ------------------------------------------------------------------------------------------------------------


def test_add_lora_freezes_base_and_starts_as_identity():
    base = make_ddpm_unet()
    expected = ddpm_forward(base)
    total = count_parameters(base)

    model = add_lora(base, rank=4, lora_alpha=8, targets="attention_conv")
    assert isinstance(model, LoRAUNet2DModel)
    trainable = trainable_parameters(model)
    names = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trainable and all("lora_A" in name or "lora_B" in name for name in names)
    assert count_parameters(model, trainable_only=True) == sum(p.numel() for p in trainable)
    assert count_parameters(model) > total
    # lora_B starts at zero, so the adapted model equals the base model.
    assert torch.equal(ddpm_forward(model), expected)
    config = model.peft_config["default"]
    assert (config.r, config.lora_alpha) == (4, 8)

    with pytest.raises(ValueError, match="already has an adapter"):
        add_lora(model, rank=4)
    with pytest.raises(ValueError, match="fuse_lora"):
        prepare_full_finetune(model)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rank=0), "rank must be an integer >= 1"),
        (dict(rank=2.5), "rank must be an integer >= 1"),
        (dict(rank=4, lora_alpha=0), "lora_alpha must be a number > 0"),
        (dict(rank=4, lora_alpha=-1.0), "lora_alpha must be a number > 0"),
    ],
)
def test_add_lora_validates_rank_and_alpha(kwargs, message):
    with pytest.raises(ValueError, match=message):
        add_lora(make_ddpm_unet(), **kwargs)


def test_prepare_full_finetune_trains_everything():
    model = make_ddpm_unet().requires_grad_(False)
    model = prepare_full_finetune(model)
    assert count_parameters(model, trainable_only=True) == count_parameters(model)
    assert len(trainable_parameters(model)) == len(list(model.parameters()))


def test_lora_alpha_defaults_to_rank():
    model = add_lora(make_ddpm_unet(), rank=3)
    assert model.peft_config["default"].lora_alpha == 3


# ------------------------------------------------------------------------------------------------------------
# Save / load round trips
# ------------------------------------------------------------------------------------------------------------


def test_lora_round_trip_unet2d(tmp_path):
    base_output = ddpm_forward(make_ddpm_unet())
    model = add_lora(make_ddpm_unet(), rank=4, lora_alpha=8, targets="attention_conv")
    randomize_lora_b(model)
    adapted_output = ddpm_forward(model)
    assert not torch.allclose(adapted_output, base_output, atol=1e-4)

    path = save_lora_weights(model, tmp_path / "adapter", metadata={"method": "siss", "steps": 3})
    assert path == str(tmp_path / "adapter" / "pytorch_lora_weights.safetensors")
    assert sorted(os.listdir(tmp_path / "adapter")) == ["pytorch_lora_weights.safetensors"]

    metadata = read_lora_metadata(tmp_path / "adapter")
    assert metadata["rank"] == 4 and metadata["lora_alpha"] == 8
    assert metadata["method"] == "siss" and json.loads(metadata["steps"]) == 3
    assert set(metadata["target_modules"]) == {"to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "conv_shortcut"}

    # Into a fresh plain UNet2DModel (converted on load).
    fresh = load_lora_weights(make_ddpm_unet(), path)
    assert isinstance(fresh, LoRAUNet2DModel)
    assert fresh.peft_config["default"].lora_alpha == 8
    assert {name for name, p in fresh.named_parameters() if p.requires_grad} == {
        name for name, p in model.named_parameters() if p.requires_grad
    }
    assert torch.allclose(ddpm_forward(fresh), adapted_output, atol=1e-6, rtol=0)

    # And with diffusers' own method, as documented for LoRAUNet2DModel.
    plain_diffusers = LoRAUNet2DModel.from_config(DDPM_CONFIG)
    plain_diffusers.load_state_dict(make_ddpm_unet().state_dict())
    plain_diffusers.load_lora_adapter(
        str(tmp_path / "adapter"), weight_name="pytorch_lora_weights.safetensors", prefix="unet"
    )
    assert torch.allclose(ddpm_forward(plain_diffusers), adapted_output, atol=1e-6, rtol=0)


def test_lora_round_trip_unet2d_condition(tmp_path):
    base_output = sd_forward(make_sd_unet())
    model = add_lora(make_sd_unet(), rank=4, lora_alpha=8, targets="attention")
    randomize_lora_b(model)
    adapted_output = sd_forward(model)
    assert not torch.allclose(adapted_output, base_output, atol=1e-4)

    save_lora_weights(model, tmp_path, metadata={"method": "erasediff"})
    metadata = read_lora_metadata(tmp_path / "pytorch_lora_weights.safetensors")
    assert (metadata["rank"], metadata["lora_alpha"], metadata["method"]) == (4, 8, "erasediff")

    fresh = load_lora_weights(make_sd_unet(), tmp_path, adapter_name="unlearn")
    assert isinstance(fresh, UNet2DConditionModel)
    assert torch.allclose(sd_forward(fresh), adapted_output, atol=1e-6, rtol=0)


def test_load_accepts_unprefixed_save_lora_adapter_files(tmp_path):
    model = add_lora(make_ddpm_unet(), rank=2, lora_alpha=6)
    randomize_lora_b(model)
    model.save_lora_adapter(tmp_path, weight_name="adapter.safetensors")
    fresh = load_lora_weights(make_ddpm_unet(), tmp_path / "adapter.safetensors")
    assert torch.allclose(ddpm_forward(fresh), ddpm_forward(model), atol=1e-6, rtol=0)
    assert read_lora_metadata(tmp_path / "adapter.safetensors")["lora_alpha"] == 6


@pytest.mark.filterwarnings("ignore:While injecting the PEFT adapters:RuntimeWarning")
def test_load_rejects_pickles_missing_files_and_foreign_adapters(tmp_path):
    bin_path = tmp_path / "pytorch_lora_weights.bin"
    torch.save({"x": torch.zeros(1)}, bin_path)
    with pytest.raises(ValueError, match="only .safetensors"):
        load_lora_weights(make_ddpm_unet(), bin_path)
    with pytest.raises(ValueError, match="only .safetensors"):
        load_lora_weights(make_ddpm_unet(), tmp_path, weight_name="pytorch_lora_weights.bin")
    with pytest.raises(FileNotFoundError):
        load_lora_weights(make_ddpm_unet(), tmp_path / "empty_dir_does_not_exist.safetensors")

    # An adapter for the SD UNet names layers the DDPM UNet lacks: an error, not a silently partial load.
    sd_model = add_lora(make_sd_unet(), rank=2, targets="attention")
    save_lora_weights(sd_model, tmp_path / "sd")
    with pytest.raises(ValueError, match="not found|match no layer"):
        load_lora_weights(make_ddpm_unet(), tmp_path / "sd")


def test_load_refuses_partly_loaded_adapter(tmp_path):
    """diffusers-converted keys (to_q.lora.down) mixed with PEFT conv keys (conv1.lora_A): diffusers' loader
    renames keys only when the first key needs it, so it drops the attention weights with a warning."""
    import safetensors.torch
    from diffusers.utils import convert_state_dict_to_diffusers

    model = add_lora(make_ddpm_unet(), rank=2, targets="attention_conv")
    mixed = convert_state_dict_to_diffusers(lora_state_dict(model))
    assert any(".lora.down." in key for key in mixed) and any(".lora_A." in key for key in mixed)
    safetensors.torch.save_file({f"unet.{k}": v.contiguous() for k, v in mixed.items()}, tmp_path / "mixed.safetensors")

    fresh = make_ddpm_unet()
    with pytest.warns(RuntimeWarning), pytest.raises(ValueError, match="match no layer"):
        load_lora_weights(fresh, tmp_path / "mixed.safetensors")
    assert not getattr(fresh, "peft_config", None)
    assert not any("lora_" in name for name, _ in fresh.named_parameters())


def test_sd_adapter_loads_into_plain_pipeline(tmp_path):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    model = add_lora(make_sd_unet(), rank=4, lora_alpha=8, targets="attention_conv")
    randomize_lora_b(model)
    adapted_output = sd_forward(model)
    save_lora_weights(model, tmp_path / "adapter")

    # A tokenizer needs only a vocabulary and a (here trivial) merges file; unknown words map to <|endoftext|>.
    tokenizer_dir = tmp_path / "tokenizer"
    tokenizer_dir.mkdir()
    words = ["a</w>", "digit</w>", "seven</w>", "handwritten</w>"]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{word: i + 2 for i, word in enumerate(words)}}
    (tokenizer_dir / "vocab.json").write_text(json.dumps(vocab))
    (tokenizer_dir / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir), model_max_length=77)

    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_attention_heads=4,
            num_hidden_layers=1, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        )
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(8,), latent_channels=4, norm_num_groups=8, sample_size=16,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=make_sd_unet(),
        scheduler=DDIMScheduler(num_train_timesteps=1000, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    assert torch.allclose(sd_forward(pipe.unet), sd_forward(make_sd_unet()))

    pipe.load_lora_weights(str(tmp_path / "adapter"))  # plain diffusers, no helper of ours
    config = next(iter(pipe.unet.peft_config.values()))
    assert (config.r, config.lora_alpha) == (4, 8)
    assert torch.allclose(sd_forward(pipe.unet), adapted_output, atol=1e-6, rtol=0)

    ids = tokenizer(["a handwritten digit seven"], padding="max_length", return_tensors="pt").input_ids
    assert ids.shape == (1, 77)


def test_text_encoder_lora_round_trip_through_plain_diffusers(tmp_path):
    """add_text_encoder_lora must not go through transformers' version-gated `add_adapter` (transformers 5.24
    refuses peft 0.21 there), and the file it leads to must load into a plain pipeline with equal tensors."""
    from diffusers import StableDiffusionPipeline
    from tiny_models import save_tiny_sd_pipeline

    from diffusers_unlearn.lora import add_text_encoder_lora

    base_dir = save_tiny_sd_pipeline(tmp_path / "base")
    trained = StableDiffusionPipeline.from_pretrained(base_dir)
    ids = trained.tokenizer(["a digit seven"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        base_embedding = trained.text_encoder(ids)[0]

    text_encoder = add_text_encoder_lora(trained.text_encoder, rank=2, lora_alpha=6)
    with torch.no_grad():  # lora_B starts at zero: the adapter starts as the identity
        assert torch.equal(text_encoder(ids)[0], base_embedding)
    trainable_names = [name for name, param in text_encoder.named_parameters() if param.requires_grad]
    assert trainable_names and all(".lora_A." in n or ".lora_B." in n for n in trainable_names)
    assert {n.split(".")[-4] for n in trainable_names} == {"q_proj", "k_proj", "v_proj", "out_proj"}

    randomize_lora_b(text_encoder)
    with torch.no_grad():
        adapted_embedding = text_encoder(ids)[0]
    assert not torch.allclose(adapted_embedding, base_embedding)
    unet = add_lora(trained.unet, rank=2, targets="attention")
    saved_text_encoder = {k: v.clone() for k, v in lora_state_dict(text_encoder).items()}
    save_lora_weights(unet, tmp_path / "adapter", text_encoder=text_encoder)

    plain = StableDiffusionPipeline.from_pretrained(base_dir)
    plain.load_lora_weights(str(tmp_path / "adapter"), adapter_name="unlearned")  # diffusers only
    config = plain.text_encoder.peft_config["unlearned"]
    assert (config.r, config.lora_alpha) == (2, 6)
    loaded = lora_state_dict(plain.text_encoder, "unlearned")
    assert loaded.keys() == saved_text_encoder.keys()
    for key, tensor in saved_text_encoder.items():
        assert torch.equal(loaded[key], tensor), key
    with torch.no_grad():
        assert torch.allclose(plain.text_encoder(ids)[0], adapted_embedding, atol=1e-6, rtol=0)

    # diffusers' pipeline-level adapter calls work on the injected layers too.
    with torch.no_grad():
        trained.set_adapters(["default"], adapter_weights=[0.0])
        assert torch.allclose(trained.text_encoder(ids)[0], base_embedding, atol=1e-6, rtol=0)
        trained.delete_adapters("default")
        assert not getattr(trained.text_encoder, "peft_config", None)
        assert torch.allclose(trained.text_encoder(ids)[0], base_embedding, atol=1e-6, rtol=0)


def test_text_encoder_lora_keeps_earlier_adapters_and_refuses_duplicates():
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffusers_unlearn.lora import add_text_encoder_lora

    config = CLIPTextConfig(
        vocab_size=10, hidden_size=16, intermediate_size=20, num_attention_heads=2, num_hidden_layers=1,
        max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    text_encoder = add_text_encoder_lora(CLIPTextModel(config), rank=2, adapter_name="first")
    add_text_encoder_lora(text_encoder, rank=2, adapter_name="second")
    assert sorted(text_encoder.peft_config) == ["first", "second"]
    # Only the newest adapter trains; the first stays frozen.
    trainable_names = [name for name, param in text_encoder.named_parameters() if param.requires_grad]
    assert trainable_names and all(".second." in name for name in trainable_names)
    with pytest.raises(ValueError, match="already has an adapter named 'first'"):
        add_text_encoder_lora(text_encoder, rank=2, adapter_name="first")
    with pytest.raises(ValueError, match="rank"):
        add_text_encoder_lora(CLIPTextModel(config), rank=0)


# ------------------------------------------------------------------------------------------------------------
# Atomic save
# ------------------------------------------------------------------------------------------------------------


def test_save_is_atomic(tmp_path, monkeypatch):
    model = add_lora(make_ddpm_unet(), rank=2)
    path = save_lora_weights(model, tmp_path, metadata={"method": "first"})
    before = open(path, "rb").read()

    randomize_lora_b(model)

    def failing_fsync(fd):
        raise OSError("disk full (simulated)")

    # The bytes are already in the temporary file when fsync fails: a partial write.
    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        save_lora_weights(model, tmp_path, metadata={"method": "second"})
    monkeypatch.undo()

    assert open(path, "rb").read() == before
    assert read_lora_metadata(path)["method"] == "first"
    assert os.listdir(tmp_path) == ["pytorch_lora_weights.safetensors"]

    save_lora_weights(model, tmp_path, metadata={"method": "second"})
    assert read_lora_metadata(path)["method"] == "second"
    assert os.listdir(tmp_path) == ["pytorch_lora_weights.safetensors"]


def test_save_rejects_bad_arguments(tmp_path):
    model = add_lora(make_ddpm_unet(), rank=2)
    with pytest.raises(ValueError, match="reserved"):
        save_lora_weights(model, tmp_path, metadata={"format": "x"})
    with pytest.raises(ValueError, match=".safetensors"):
        save_lora_weights(model, tmp_path, weight_name="adapter.bin")
    with pytest.raises(ValueError, match="no LoRA adapter named 'other'"):
        save_lora_weights(model, tmp_path, adapter_name="other")
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------------------------
# lora_state_dict and lora_weight_deltas
# ------------------------------------------------------------------------------------------------------------


def test_lora_state_dict_keys():
    model = add_lora(make_ddpm_unet(), rank=2, targets="attention_conv")
    state_dict = lora_state_dict(model)
    assert state_dict and all(".lora_A." in key or ".lora_B." in key for key in state_dict)
    assert "mid_block.attentions.0.to_q.lora_A.weight" in state_dict
    assert "down_blocks.0.resnets.0.conv1.lora_B.weight" in state_dict
    prefixed = lora_state_dict(model, prefix="unet")
    assert set(prefixed) == {f"unet.{key}" for key in state_dict}


@pytest.mark.parametrize("make_model", [make_ddpm_unet, make_sd_unet])
def test_lora_weight_deltas_are_differentiable_and_match_merge(make_model):
    base = make_model()
    base_weights = {key: value.clone() for key, value in base.state_dict().items()}
    model = add_lora(base, rank=4, lora_alpha=8, targets="attention_conv")
    randomize_lora_b(model)

    deltas = lora_weight_deltas(model)
    attention_key = next(key for key in base_weights if key.startswith("mid_block.") and key.endswith("to_q.weight"))
    assert attention_key in deltas
    assert "mid_block.resnets.0.conv1.weight" in deltas
    assert deltas["mid_block.resnets.0.conv1.weight"].ndim == 4
    for key, delta in deltas.items():
        assert delta.shape == base_weights[key].shape
        assert delta.requires_grad

    # Gradients reach every lora_A and lora_B.
    sum(delta.pow(2).sum() for delta in deltas.values()).backward()
    for name, param in model.named_parameters():
        if "lora_" in name:
            assert param.grad is not None and param.grad.abs().sum() > 0, name

    # base + delta equals the weight diffusers writes when fusing the adapter.
    detached = {key: delta.detach().clone() for key, delta in deltas.items()}
    model.fuse_lora()
    model.unload_lora()
    fused = model.state_dict()
    for key, delta in detached.items():
        assert torch.allclose(base_weights[key] + delta, fused[key], atol=1e-6, rtol=1e-5), key


def test_lora_weight_deltas_follow_set_adapters_scale():
    model = add_lora(make_ddpm_unet(), rank=2, lora_alpha=4)
    randomize_lora_b(model)
    full = lora_weight_deltas(model)
    model.set_adapters("default", weights=0.5)
    half = lora_weight_deltas(model)
    for key in full:
        assert torch.allclose(half[key], 0.5 * full[key])


# ------------------------------------------------------------------------------------------------------------
# Optimizer
# ------------------------------------------------------------------------------------------------------------


def _one_step(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
    loss = sum(param.pow(2).sum() for param in params)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def test_make_optimizer_torch_adamw():
    model = add_lora(make_ddpm_unet(), rank=2)
    randomize_lora_b(model)
    params = trainable_parameters(model)
    optimizer = make_optimizer(iter(params), learning_rate=1e-2, betas=(0.8, 0.9), weight_decay=0.0)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.param_groups[0]["betas"] == (0.8, 0.9)
    assert len(optimizer.param_groups[0]["params"]) == len(params)
    before = [param.detach().clone() for param in params]
    _one_step(optimizer, params)
    assert any(not torch.equal(old, new) for old, new in zip(before, params))

    with pytest.raises(ValueError, match="no parameters"):
        make_optimizer([], learning_rate=1e-3)
    with pytest.raises(ValueError, match="learning_rate"):
        make_optimizer(params, learning_rate=0.0)


def test_make_optimizer_8bit_steps_on_cpu():
    pytest.importorskip("bitsandbytes")
    # 4096+ elements, so bitsandbytes keeps 8-bit state for it, plus a small tensor kept in 32 bits.
    params = [nn.Parameter(torch.randn(64, 64)), nn.Parameter(torch.randn(8))]
    optimizer = make_optimizer(params, learning_rate=1e-2, use_8bit_adam=True)
    assert type(optimizer).__name__ == "AdamW8bit"
    before = [param.detach().clone() for param in params]
    _one_step(optimizer, params)
    for old, new in zip(before, params):
        assert not torch.equal(old, new)
        assert torch.isfinite(new).all()


def test_make_optimizer_without_bitsandbytes(monkeypatch):
    # A None entry in sys.modules makes `import bitsandbytes` raise ImportError.
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ImportError, match=r'pip install "diffusers-unlearn\[bnb\]"'):
        make_optimizer([nn.Parameter(torch.zeros(2))], learning_rate=1e-3, use_8bit_adam=True)


def test_module_exports_are_public():
    for name in lora.__all__:
        assert hasattr(lora, name), name
