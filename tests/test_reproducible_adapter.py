"""Two identical Stable Diffusion runs write byte-identical adapter files, which plain diffusers loads."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train_unlearn_sd as script  # noqa: E402

from test_train_sd import base_args, workspace  # noqa: E402,F401  (workspace is a fixture)


def test_two_identical_runs_give_identical_adapter_bytes_that_plain_diffusers_loads(workspace, tmp_path):  # noqa: F811
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    files = []
    for name in ("first", "second"):
        out = tmp_path / name
        script.main(script.parse_args(base_args(workspace, out, "--max_train_steps", "2", "--noise_norm_generations", "0")))
        files.append(out / "pytorch_lora_weights.safetensors")
    # safetensors writes header entries (format, adapter config, method, base model) in hash-map order.
    assert files[0].read_bytes() == files[1].read_bytes()
    assert load_file(str(files[0]))
    pipe = StableDiffusionPipeline.from_pretrained(str(workspace / "model"), safety_checker=None)
    pipe.load_lora_weights(str(files[0].parent))
    assert pipe.unet.peft_config
