"""A start prints only our own output: no third-party import noise, and bitsandbytes only where it is used."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOISE = ("[transformers]", "torchvision", "gemm_4bit", "kernels")


def run_python(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "command",
    [
        ["train_unlearn_ddpm.py", "--help"],
        ["train_unlearn_sd.py", "--help"],
        ["-m", "diffusers_unlearn.scan", "--help"],
        ["-m", "diffusers_unlearn.evaluate", "--help"],
    ],
    ids=["ddpm", "sd", "scan", "evaluate"],
)
def test_help_prints_only_argparse_help(command):
    completed = run_python(*command)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.startswith("usage:"), completed.stdout[:200]
    for marker in NOISE:
        assert marker not in completed.stdout, marker
    assert completed.stderr == ""


# Runs in a fresh interpreter. Every `import` statement goes through builtins.__import__, even when the module is
# already loaded, so wrapping it sees which of our modules asks for bitsandbytes. (diffusers itself imports
# bitsandbytes whenever it is installed, so "bitsandbytes" in sys.modules says nothing about our code.)
IMPORT_PROBE = r"""
import builtins, importlib.util, json, sys

ours = []
original_import = builtins.__import__

def recording_import(name, globals=None, locals=None, fromlist=(), level=0):
    importer = (globals or {}).get("__name__", "")
    if name.split(".")[0] == "bitsandbytes" and level == 0:
        if importer.startswith("diffusers_unlearn") or importer.startswith("train_unlearn") or importer == "__main__":
            ours.append(importer)
    return original_import(name, globals, locals, fromlist, level)

builtins.__import__ = recording_import

def load_script(name):
    spec = importlib.util.spec_from_file_location(name, name + ".py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module

load_script("train_unlearn_ddpm").parse_args(["--output_dir", sys.argv[1] + "/ddpm"])
ddpm_loads = sorted(m for m in sys.modules if "stable_diffusion" in m)
load_script("train_unlearn_sd").parse_args(["--output_dir", sys.argv[1] + "/sd"])
import diffusers_unlearn.scan, diffusers_unlearn.evaluate
after_start = list(ours)

import torch
from diffusers_unlearn.lora import make_optimizer
weight = torch.nn.Parameter(torch.ones(64, 64))
optimizer = make_optimizer([weight], learning_rate=0.1, use_8bit_adam=True)
weight.sum().backward()
optimizer.step()
print(json.dumps({"after_start": after_start, "after_8bit": ours, "optimizer": type(optimizer).__name__,
                  "changed": bool((weight.detach() != 1).all()), "ddpm_loads": ddpm_loads}))
"""


def test_start_imports_bitsandbytes_and_stable_diffusion_only_where_used(tmp_path):
    pytest.importorskip("bitsandbytes")
    completed = run_python("-c", IMPORT_PROBE, str(tmp_path))
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    # Importing the scripts and the CLI modules and parsing a default configuration: no import from us.
    assert result["after_start"] == []
    # The probe does see our import when 8-bit AdamW is asked for, and the optimizer steps on the CPU.
    assert result["after_8bit"] == ["diffusers_unlearn.lora"]
    assert result["optimizer"] == "AdamW8bit" and result["changed"]
    # The DDPM script does not import diffusers' Stable Diffusion pipeline (nor ours) that it never uses.
    assert result["ddpm_loads"] == []


@pytest.mark.parametrize(
    ("logger_name", "harmless"),
    [
        (
            "transformers.utils.import_utils",
            "`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil` "
            "for backward compatibility.",
        ),
        (
            "bitsandbytes.backends.cpu.ops",
            "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'. Please make "
            "sure you already `pip install kernels` and the kernels >= 0.11.1",
        ),
    ],
)
def test_filters_drop_exactly_the_known_message(logger_name, harmless, caplog):
    """Each filter drops its one message; other messages of the same logger still reach the handlers."""
    import diffusers_unlearn  # noqa: F401  (installs the filters)

    logger = logging.getLogger(logger_name)
    with caplog.at_level(logging.WARNING, logger=logger_name):
        logger.warning(harmless)
        logger.warning("`CLIPImageProcessor` is deprecated and will be removed")  # another message
        logger.warning("Failed to load CPU gemm_8bit_forward")  # a near miss
    assert [record.getMessage() for record in caplog.records] == [
        "`CLIPImageProcessor` is deprecated and will be removed",
        "Failed to load CPU gemm_8bit_forward",
    ]
