"""Run by test_fsdp.py under torchrun: train_unlearn_ddpm.py with its Accelerator switched to FSDP version 2.

accelerate turns FSDP on only for accelerator devices (`accelerate launch --config_file
examples/accelerate_fsdp.yaml` on GPUs); on CPU processes the script's own Accelerator is switched here, before
the script prepares anything, and everything else is the script as users run it.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_unlearn_ddpm as script  # noqa: E402

from fsdp_step_script import switch_to_fsdp2  # noqa: E402

make_accelerator = script.make_accelerator
script.make_accelerator = lambda args: switch_to_fsdp2(make_accelerator(args))

if __name__ == "__main__":
    script.main(script.parse_args(sys.argv[1:]))
