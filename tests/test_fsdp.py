"""FSDP2 (accelerate's `fsdp_version: 2`) on two CPU processes (gloo): the sharded steps equal single-process steps,
the combiners' norms are those of the whole gradient, and checkpoints hold whole tensors and resume exactly."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffusers_unlearn.gradients import _dot, _norm, is_sharded


@pytest.fixture(scope="module")
def fsdp_report(tmp_path_factory):
    script = Path(__file__).with_name("fsdp_step_script.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parent))
    result = tmp_path_factory.mktemp("fsdp") / "result.json"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", "29519", str(script), str(result),
    ]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads(result.read_text())


def test_sharded_steps_equal_single_process_steps(fsdp_report):
    """Two clipped SGD steps under FSDP2 give the single-process weights (union of the ranks' batches)."""
    assert fsdp_report["world_size"] == 2 and fsdp_report["sharded_parameter_type"] == "DTensor"
    for combiner in ("sum", "fixed_norm", "fixed_norm_calibrated", "bome"):
        assert fsdp_report["max_abs_error"][combiner] < 1e-5, (combiner, fsdp_report["max_abs_error"])
        assert fsdp_report["moved"][combiner] > 1e-3, combiner  # the steps changed the weights
    for combiner, steps in fsdp_report["logs"].items():
        for logs in steps:
            for key, (single, sharded) in logs.items():
                assert sharded == pytest.approx(single, rel=1e-4, abs=1e-6), (combiner, key, logs)


def test_norms_are_taken_over_the_whole_sharded_gradient(fsdp_report):
    """Each process's shard has its own norm, unlike the one the combiner used; the latter is the whole norm."""
    shard_a, shard_b = fsdp_report["shard_norms"]
    whole = fsdp_report["whole_norm"]
    assert abs(shard_a - shard_b) > 1e-2 and max(shard_a, shard_b) < 0.9 * whole
    assert whole == pytest.approx((shard_a**2 + shard_b**2) ** 0.5, rel=1e-5)
    assert whole == pytest.approx(fsdp_report["logs"]["fixed_norm"][0]["forget_grad_norm"][0], rel=1e-5)
    assert "pass the sharded parameters" in fsdp_report["unsharded_copies"]  # never silently zero
    # Clipping acted (grad norms above MAX_GRAD_NORM) with the whole-model norm: checked by the equal weights.
    assert all(step["grad_norm"][1] > 0.05 for step in fsdp_report["logs"]["sum"])


def test_checkpoint_under_fsdp_holds_whole_tensors_and_resumes(fsdp_report):
    checkpoint = fsdp_report["checkpoint"]
    assert checkpoint["step"] == 1 and checkpoint["whole_tensors"]
    assert checkpoint["moved_by_second_step"] > 1e-4
    assert checkpoint["resume_error"] < 1e-6  # resumed step 2 == uninterrupted step 2 (AdamW state restored)


def test_dot_and_norm_of_replicated_tensors_are_unchanged():
    first = [torch.tensor([3.0, 4.0]), torch.tensor([[1.0, 2.0]])]
    assert not is_sharded(first)
    assert float(_norm(first)) == pytest.approx(30**0.5)
    assert float(_dot(first, first)) == pytest.approx(30.0)


def test_unsupported_distributed_set_ups_are_refused_with_the_fix():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from diffusers_unlearn.gradients import BOMECombiner, FixedNormCombiner
    from diffusers_unlearn.unlearner import check_distributed_setup

    fsdp1 = SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=False)
    with pytest.raises(ValueError, match="fsdp_version: 2"):
        check_distributed_setup(fsdp1)
    check_distributed_setup(SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=True), BOMECombiner())

    def deepspeed(stage):
        plugin = SimpleNamespace(zero_stage=stage)
        return SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, state=SimpleNamespace(deepspeed_plugin=plugin))

    with pytest.raises(ValueError, match="ZeRO-3 .* FSDP2"):
        check_distributed_setup(deepspeed(3), FixedNormCombiner())
    with pytest.raises(ValueError, match="BOME .* DeepSpeed"):
        check_distributed_setup(deepspeed(2), BOMECombiner())
    check_distributed_setup(deepspeed(2), FixedNormCombiner())  # untested on DeepSpeed itself, but not refused


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def fsdp_environment(config_file: Path) -> dict[str, str]:
    """The FSDP_* variables `accelerate launch --config_file` sets from a config's fsdp_config."""
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(config_file))
    names = {"fsdp_transformer_layer_cls_to_wrap": "FSDP_TRANSFORMER_CLS_TO_WRAP"}
    return {names.get(key, key.upper()): str(value) for key, value in config.fsdp_config.items()}


def test_example_accelerate_configs_load():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    assert load_config_from_file(str(EXAMPLES / "accelerate_ddp.yaml")).distributed_type == DistributedType.MULTI_GPU
    for name, machines in (("accelerate_fsdp.yaml", 1), ("accelerate_fsdp_multinode.yaml", 2)):
        config = load_config_from_file(str(EXAMPLES / name))
        assert config.distributed_type == DistributedType.FSDP and config.num_machines == machines
        assert fsdp_environment(EXAMPLES / name)["FSDP_VERSION"] == "2"


def launch(script: Path, args: list[str], port: int, **env_vars: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(Path(__file__).parent), **env_vars)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               str(script), *args]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600,
                               cwd=Path(__file__).resolve().parents[1])
    assert completed.returncode == 0, completed.stderr[-4000:]
    return completed


def test_train_script_full_fine_tune_under_fsdp_equals_ddp(tmp_path):
    """train_unlearn_ddpm.py --train_mode full, 2 processes, FSDP set up from examples/accelerate_fsdp.yaml: it saves
    the whole UNet, equal to the DDP run's (same per-process batches, SISS's fixed-norm combiner, clipping, AdamW),
    and whole-tensor checkpoints."""
    from safetensors.torch import load_file
    from test_train_ddpm import base_args, save_folder
    from tiny_models import tiny_unet
    from diffusers import DDPMPipeline, DDPMScheduler

    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(tmp_path / "model")
    images = torch.rand(14, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    save_folder(tmp_path / "forget", images[:2], "f")
    save_folder(tmp_path / "keep", images[:10], "k")
    save_folder(tmp_path / "heldout", images[10:], "h")
    extra = ["--train_mode", "full", "--max_train_steps", "2", "--checkpointing_steps", "1", "--learning_rate", "1e-3"]
    here = Path(__file__).parent
    fsdp = launch(here / "fsdp_script_launcher.py", base_args(tmp_path, tmp_path / "fsdp", *extra), 29533,
                  **fsdp_environment(EXAMPLES / "accelerate_fsdp.yaml"))
    launch(here.parent / "train_unlearn_ddpm.py", base_args(tmp_path, tmp_path / "ddp", *extra), 29534)

    assert "FSDP: no validation during training" in fsdp.stderr
    report = json.loads((tmp_path / "fsdp" / "unlearning_report.json").read_text())
    assert report["num_processes"] == 2 and report["train_mode"] == "full"
    base = load_file(str(tmp_path / "model" / "unet" / "diffusion_pytorch_model.safetensors"))
    sharded = load_file(str(tmp_path / "fsdp" / "unet" / "diffusion_pytorch_model.safetensors"))
    replicated = load_file(str(tmp_path / "ddp" / "unet" / "diffusion_pytorch_model.safetensors"))
    checkpoint = load_file(str(tmp_path / "fsdp" / "checkpoint-2" / "trainable_weights.safetensors"))
    assert sharded.keys() == base.keys() == replicated.keys()
    assert max(float((sharded[k] - base[k]).abs().max()) for k in base) > 1e-4  # trained
    for key in base:
        assert sharded[key].shape == base[key].shape, key  # whole, unsharded tensors
        torch.testing.assert_close(sharded[key], replicated[key], rtol=1e-4, atol=1e-5)  # steps are ~1e-3
        torch.testing.assert_close(checkpoint[key], sharded[key], rtol=0, atol=0)


def test_train_script_refuses_lora_under_fsdp(tmp_path):
    import train_unlearn_ddpm as script
    from accelerate.utils import DistributedType
    from diffusers_unlearn.errors import UserInputError

    class FSDPAccelerator:
        distributed_type = DistributedType.FSDP
        is_fsdp2 = True

    args = type("Args", (), {"train_mode": "lora", "use_ema": False})()
    with pytest.raises(UserInputError, match="accelerate_ddp.yaml, or pass --train_mode full"):
        script.check_sharding_arguments(FSDPAccelerator(), args)
    args.train_mode = "full"
    assert script.check_sharding_arguments(FSDPAccelerator(), args) is True
