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


def test_fsdp_version_1_is_refused_with_the_fix():
    from accelerate.utils import DistributedType

    from diffusers_unlearn.unlearner import check_fsdp_version

    class FSDP1Accelerator:
        distributed_type = DistributedType.FSDP
        is_fsdp2 = False

    with pytest.raises(ValueError, match="fsdp_version: 2"):
        check_fsdp_version(FSDP1Accelerator())
    FSDP1Accelerator.is_fsdp2 = True
    check_fsdp_version(FSDP1Accelerator())
