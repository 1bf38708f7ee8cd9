"""benchmarks/bench_sd_memory.py: the published UNet configs it builds (parameter counts on the meta device), and
one SISS + LoRA step (SDXL through its family's call, and SD 1.5) at a tiny width, in process, in float32 and
without 8-bit Adam (bf16 is slow on CPUs without bf16 instructions)."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest

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
