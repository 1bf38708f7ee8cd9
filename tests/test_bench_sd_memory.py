"""benchmarks/bench_sd_memory.py: the published UNet and transformer configs it builds (parameter counts on the
meta device), and one SISS + LoRA step (SDXL, SD3 and Flux through their families' calls, and SD 1.5) at a tiny
width, in process, in float32 and without 8-bit Adam (bf16 is slow on CPUs without bf16 instructions)."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_sd_memory", ROOT / "benchmarks" / "bench_sd_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "family,params",
    # The published UNets' parameter counts: SD 1.5, SD 2.1 and SDXL base 1.0.
    [("sd15", 859_520_964), ("sd21", 865_910_724), ("sdxl", 2_567_463_684)],
)
def test_full_size_configs_have_the_published_parameter_counts(bench, family, params):
    counts = bench.count_parameters(family, 1.0, bench.FAMILY_SPECS[family]["resolution"])
    assert counts["unet_params"] == params
    assert 0 < counts["lora_params"] < params / 100


def test_sdxl_config_is_sdxl_base(bench):
    config = bench.unet_config("sdxl", 1.0, 1024)
    assert config["sample_size"] == 128
    assert config["block_out_channels"] == [320, 640, 1280]
    assert config["transformer_layers_per_block"] == [1, 2, 10]
    assert config["attention_head_dim"] == [5, 10, 20]
    assert config["cross_attention_dim"] == 2048
    assert config["addition_embed_type"] == "text_time"
    assert config["projection_class_embeddings_input_dim"] == 1280 + 6 * config["addition_time_embed_dim"]


@pytest.mark.parametrize("family,scale", [("sdxl", 0.05), ("sd15", 0.1)])
def test_lora_step_runs_at_tiny_width(bench, fresh_accelerate_state, family, scale):
    args = argparse.Namespace(setup="lora", family=family, device="cpu", scale=scale, resolution=32, warmup=0,
                              repeats=1, use_8bit_adam=False, threads=None,
                              mixed_precision="no")
    row = bench.run_one(args)
    assert row["family"] == family and row["setup"] == "lora"
    assert row["step_s"] > 0 and row["peak_gb"] > 0
    assert 0 < row["trainable_params_m"] < row["total_params_m"] / 10


def test_sd3_and_flux_configs_are_the_published_ones(bench):
    sd3 = bench.model_config("sd3", 1.0, 1024)
    assert (sd3["num_layers"], sd3["num_attention_heads"], sd3["attention_head_dim"]) == (24, 24, 64)
    assert (sd3["joint_attention_dim"], sd3["pooled_projection_dim"], sd3["caption_projection_dim"]) == (4096, 2048, 1536)
    assert (sd3["patch_size"], sd3["in_channels"], sd3["out_channels"], sd3["sample_size"]) == (2, 16, 16, 128)
    assert sd3["pos_embed_max_size"] == 384 and sd3["qk_norm"] == "rms_norm"
    assert list(sd3["dual_attention_layers"]) == list(range(13))
    flux = bench.model_config("flux", 1.0, 1024)
    assert (flux["num_layers"], flux["num_single_layers"], flux["num_attention_heads"]) == (19, 38, 24)
    assert (flux["attention_head_dim"], flux["joint_attention_dim"], flux["pooled_projection_dim"]) == (128, 4096, 768)
    assert flux["in_channels"] == 64 and flux["guidance_embeds"] is True
    assert list(flux["axes_dims_rope"]) == [16, 56, 56] and sum(flux["axes_dims_rope"]) == flux["attention_head_dim"]
    # Reduced width: fewer heads of the same width; SD3's text stream follows the hidden width.
    small = bench.model_config("sd3", 0.125, 256)
    assert small["num_attention_heads"] == 3 and small["caption_projection_dim"] == 3 * 64
    assert small["sample_size"] == 32 and small["num_layers"] == 24
    assert bench.model_config("flux", 0.01, 256)["num_attention_heads"] == 1


@pytest.mark.parametrize(
    "family,transformer,components",
    # SD3.5 medium's transformer (without its positional-embedding buffer) and FLUX.1-dev's; CLIP-L (with its
    # projection for SD3), CLIP-G, T5-XXL's encoder and the 16-channel VAE.
    [("sd3", 2_243_171_520, [123_650_304, 694_659_840, 4_762_310_656, 83_819_683]),
     ("flux", 11_901_408_320, [123_060_480, 4_762_310_656, 83_819_683])],
)
def test_sd3_and_flux_full_size_counts(bench, family, transformer, components):
    counts = bench.count_parameters(family, 1.0, 1024)
    assert counts["transformer_params"] == transformer
    assert [row["params"] for row in counts["components"]] == components
    assert 0 < counts["lora_params"] < transformer / 500
    # NF4: about a quarter of the bf16 bytes (4 of 16 bits, plus absmax and the non-Linear parameters).
    assert 0.25 < counts["transformer_nf4_estimate_gb"] / counts["transformer_bf16_gb"] < 0.3
    # SD3's 384 x 384 positional embedding is a buffer of the hidden width; Flux computes its rotary one.
    assert counts["transformer_buffer_elements"] == (384 * 384 * 1536 if family == "sd3" else 0)


def test_nf4_estimate_of_one_linear(bench):
    layer = torch.nn.Linear(128, 64)  # 8192 weights: 4096 B of codes + 128 blocks x 4 B absmax; bias in bf16
    assert bench.nf4_bytes(layer) == 4096 + 128 * 4 + 64 * 2


def run_flow_lora_at_tiny_width(bench, family, **changes):
    """The lora set-up in process: one head, 32 px, 8 T5 tokens, float32, one torch thread (restored after)."""
    options = dict(setup="lora", family=family, device="cpu", scale=0.01, resolution=32, warmup=0, repeats=1,
                   use_8bit_adam=False, threads=1, mixed_precision="no", max_sequence_length=8, bnb_4bit=False)
    threads = torch.get_num_threads()
    try:
        return bench.run_one(argparse.Namespace(**{**options, **changes}))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_flow_lora_step_runs_at_tiny_width(bench, fresh_accelerate_state, family):
    row = run_flow_lora_at_tiny_width(bench, family)
    assert row["family"] == family and row["setup"] == "lora" and not row["bnb_4bit"]
    assert row["step_s"] > 0 and row["peak_gb"] > 0
    assert 0 < row["trainable_params_m"] < row["total_params_m"] / 10


def test_nf4_base_lora_step_runs_on_the_cpu(bench, fresh_accelerate_state):
    """--bnb_4bit: the built transformer reloaded through diffusers' BitsAndBytesConfig (NF4); on a CPU-only machine
    the benchmark lifts diffusers' GPU check while it loads, and restores it afterwards."""
    from diffusers.quantizers.bitsandbytes.bnb_quantizer import BnB4BitDiffusersQuantizer

    check = BnB4BitDiffusersQuantizer.validate_environment
    row = run_flow_lora_at_tiny_width(bench, "sd3", mixed_precision="bf16", bnb_4bit=True)
    assert row["bnb_4bit"] and row["step_s"] > 0
    # The packed NF4 weights count half: fewer stored elements than the bf16 model's parameters.
    bf16_params = sum(p.numel() for p in bench.build_model(0.01, 32, "sd3").parameters()) / 1e6
    assert row["total_params_m"] < bf16_params
    assert BnB4BitDiffusersQuantizer.validate_environment is check
