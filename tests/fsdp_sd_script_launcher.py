"""Run by test_fsdp_sd.py under torchrun: train_unlearn_sd.py with its Accelerator switched to FSDP version 2
(accelerate enables FSDP only on accelerator devices; see fsdp_script_launcher.py), run as users run it."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_unlearn_sd as script  # noqa: E402

from diffusers_unlearn.errors import run_script  # noqa: E402
from fsdp_step_script import switch_to_fsdp2  # noqa: E402

make_accelerator = script.make_accelerator
script.make_accelerator = lambda args: switch_to_fsdp2(make_accelerator(args))

if __name__ == "__main__":
    run_script(lambda: script.main(script.parse_args(sys.argv[1:])), "train_unlearn_sd.py")
