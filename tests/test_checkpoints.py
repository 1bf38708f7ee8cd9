"""Checkpoints: no pickle, one run per checkpoint, nothing lost when a run is killed while saving."""

import json
import os
import pickle
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffusers_unlearn.checkpoints import (
    MANIFEST_NAME,
    decode_tree,
    encode_tree,
    fingerprint_differences,
    get_rng_state,
    list_checkpoints,
    read_manifest,
    run_fingerprint,
    set_rng_state,
)
from diffusers_unlearn.errors import UserInputError

from test_train_ddpm import base_args, run, workspace  # noqa: F401 (workspace is a fixture)

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------------
# The JSON + safetensors codec
# ---------------------------------------------------------------------------------------------------------------


def round_trip(value):
    tensors = {}
    tree = json.loads(json.dumps(encode_tree(value, tensors)))  # what a manifest holds
    return decode_tree(tree, {key: tensor.clone() for key, tensor in tensors.items()})


def adamw_after_steps(model, steps):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for i in range(steps):
        model(torch.full((2, 4), float(i))).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


def test_optimizer_state_survives_the_codec_exactly():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = adamw_after_steps(model, 3)
    state = optimizer.state_dict()
    restored = round_trip(state)
    assert list(restored["state"]) == [0, 1]  # int keys stay ints
    assert isinstance(restored["param_groups"][0]["betas"], tuple)

    twin = torch.nn.Linear(4, 3)
    twin.load_state_dict(model.state_dict())
    twin_optimizer = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    twin_optimizer.load_state_dict(restored)
    for opt, net in ((optimizer, model), (twin_optimizer, twin)):
        net(torch.ones(2, 4)).pow(2).sum().backward()
        opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_8bit_adam_state_survives_the_codec():
    pytest.importorskip("bitsandbytes")
    from diffusers_unlearn.lora import make_optimizer

    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(64, 128))  # >= 4096 elements: 8-bit state
    optimizer = make_optimizer([weight], 1e-2, use_8bit_adam=True)
    weight.pow(2).sum().backward()
    optimizer.step()
    twin = torch.nn.Parameter(weight.detach().clone())
    twin_optimizer = make_optimizer([twin], 1e-2, use_8bit_adam=True)
    twin_optimizer.load_state_dict(round_trip(optimizer.state_dict()))
    for param, opt in ((weight, optimizer), (twin, twin_optimizer)):
        opt.zero_grad()
        param.pow(3).sum().backward()
        opt.step()
    assert torch.equal(weight, twin)


def test_lr_scheduler_state_is_plain_json():
    from diffusers.optimization import get_scheduler

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = get_scheduler("linear", optimizer=optimizer, num_warmup_steps=2, num_training_steps=10)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    tensors = {}
    tree = encode_tree(scheduler.state_dict(), tensors)
    assert tensors == {}
    other_optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    other = get_scheduler("linear", optimizer=other_optimizer, num_warmup_steps=2, num_training_steps=10)
    other.load_state_dict(decode_tree(json.loads(json.dumps(tree)), {}))
    other_optimizer.step()
    other.step()
    optimizer.step()
    scheduler.step()
    assert other.get_last_lr() == scheduler.get_last_lr()


def test_codec_refuses_objects_and_malformed_trees():
    with pytest.raises(TypeError, match="Cannot store a object"):
        encode_tree({"x": object()}, {})
    with pytest.raises(ValueError, match="Malformed"):
        decode_tree({"callable": "os.system"}, {})
    with pytest.raises(ValueError, match="files do not hold"):
        decode_tree({"tensor": "missing"}, {})


def test_random_states_round_trip():
    state = get_rng_state()
    draws = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    set_rng_state(round_trip(state))
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == draws


def test_fingerprint_differences_name_the_fields():
    saved = run_fingerprint(method="siss", seed=0, lora={"rank": 4})
    current = run_fingerprint(method="naive_deletion", seed=1, lora={"rank": 4})
    lines = fingerprint_differences(saved, current)
    assert len(lines) == 2
    assert lines[0].startswith("method:") and '"siss"' in lines[0] and '"naive_deletion"' in lines[0]
    assert lines[1].startswith("seed:")
    assert fingerprint_differences(saved, dict(saved)) == []


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint folders written by the DDPM script
# ---------------------------------------------------------------------------------------------------------------

COMMON = ["--validation_steps", "100", "--checkpointing_steps", "2"]


@pytest.fixture
def checkpointed(workspace, tmp_path):  # noqa: F811
    """An unfinished run: killed right after its step-2 checkpoint (simulated by not running on)."""
    out = tmp_path / "out"
    run(base_args(workspace, out, "--max_train_steps", "2", *COMMON))
    return out


def test_checkpoint_holds_only_safetensors_and_json(checkpointed):
    folder = checkpointed / "checkpoint-2"
    files = sorted(os.listdir(folder))
    assert MANIFEST_NAME in files
    assert all(name == MANIFEST_NAME or name.endswith(".safetensors") for name in files), files
    manifest = read_manifest(str(folder))
    assert manifest["step"] == 2
    assert manifest["fingerprint"]["method"] == "siss"
    assert {"optimizer", "lr_scheduler", "unlearner"} <= set(manifest["states"])
    assert manifest["states"]["unlearner"]  # the combiner's calibrated norm is stored
    # The adapter in diffusers' format, equal to what the run (which ended at this step) saved as its output.
    in_checkpoint = load_file(str(folder / "pytorch_lora_weights.safetensors"))
    final = load_file(str(checkpointed / "pytorch_lora_weights.safetensors"))
    assert in_checkpoint.keys() == final.keys() and all(torch.equal(in_checkpoint[k], final[k]) for k in final)


def test_crafted_pickle_in_a_checkpoint_is_refused_and_never_loaded(workspace, checkpointed, tmp_path):  # noqa: F811
    marker = tmp_path / "code-ran"

    class RunsCode:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    folder = checkpointed / "checkpoint-2"
    (folder / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(RunsCode()))
    with pytest.raises(UserInputError, match="custom_checkpoint_0.pkl"):
        run(base_args(workspace, checkpointed, "--max_train_steps", "4", *COMMON, "--resume_from_checkpoint", "latest"))
    assert not marker.exists()


def test_a_checkpoint_in_accelerates_pickle_format_is_refused(workspace, tmp_path):  # noqa: F811
    folder = tmp_path / "foreign"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    (folder / "optimizer.bin").write_bytes(pickle.dumps({"state": {}}))
    with pytest.raises(UserInputError, match="optimizer.bin"):
        run(base_args(workspace, tmp_path / "out", "--resume_from_checkpoint", str(folder)))
    (folder / "optimizer.bin").unlink()
    with pytest.raises(UserInputError, match="no checkpoint.json"):
        run(base_args(workspace, tmp_path / "out", "--resume_from_checkpoint", str(folder)))


def test_unlisted_or_missing_files_are_refused(checkpointed):
    folder = checkpointed / "checkpoint-2"
    (folder / "extra.safetensors").write_bytes(b"")
    with pytest.raises(UserInputError, match="extra.safetensors is not listed"):
        read_manifest(str(folder))
    (folder / "extra.safetensors").unlink()
    (folder / "optimizer.safetensors").unlink()
    with pytest.raises(UserInputError, match="incomplete: optimizer.safetensors missing"):
        read_manifest(str(folder))


def test_resume_uses_no_pickle(workspace, checkpointed, monkeypatch):  # noqa: F811
    def forbidden(*args, **kwargs):
        raise AssertionError("torch.load called while resuming")

    monkeypatch.setattr(torch, "load", forbidden)
    run(base_args(workspace, checkpointed, "--max_train_steps", "4", *COMMON, "--resume_from_checkpoint", "latest"))
    assert (checkpointed / "checkpoint-4").is_dir()


def test_resuming_another_runs_checkpoint_names_the_differences(workspace, checkpointed):  # noqa: F811
    args = base_args(workspace, checkpointed, "--max_train_steps", "4", *COMMON, "--resume_from_checkpoint", "latest",
                     "--method", "naive_deletion", "--seed", "1")
    at = args.index("--siss_scaling_norm")
    del args[at:at + 2]  # a siss flag, refused for naive_deletion
    with pytest.raises(UserInputError) as info:
        run(args)
    message = str(info.value)
    assert "belongs to another run" in message
    assert "method: checkpoint" in message and "seed: checkpoint 0 vs this run 1" in message
    assert not (checkpointed / "checkpoint-4").exists()


def test_a_checkpoint_beyond_max_train_steps_is_refused(workspace, checkpointed):  # noqa: F811
    with pytest.raises(UserInputError, match="step 2, beyond --max_train_steps 1"):
        run(base_args(workspace, checkpointed, "--max_train_steps", "1", *COMMON, "--resume_from_checkpoint", "latest"))


def test_validation_history_survives_a_resume(workspace, tmp_path):  # noqa: F811
    common = ["--validation_steps", "2", "--checkpointing_steps", "3"]
    straight = tmp_path / "straight"
    run(base_args(workspace, straight, "--max_train_steps", "6", *common))
    resumed = tmp_path / "resumed"
    run(base_args(workspace, resumed, "--max_train_steps", "3", *common))
    run(base_args(workspace, resumed, "--max_train_steps", "6", *common, "--resume_from_checkpoint", "latest"))
    history = [json.loads((out / "unlearning_report.json").read_text())["validation"] for out in (straight, resumed)]
    assert [entry["step"] for entry in history[0]] == [2, 4]
    assert history[1] == history[0]


# ---------------------------------------------------------------------------------------------------------------
# A kill while writing a checkpoint
# ---------------------------------------------------------------------------------------------------------------

KILL_DURING_SECOND_CHECKPOINT = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
import train_unlearn_ddpm as script
from diffusers_unlearn import checkpoints

real_save_tree = checkpoints.save_tree

def save_tree_then_die(directory, name, value):
    tree = real_save_tree(directory, name, value)
    if name == "optimizer" and os.path.basename(directory) == "checkpoint-4.tmp":
        os.kill(os.getpid(), signal.SIGKILL)  # half of checkpoint-4 is on disk
    return tree

checkpoints.save_tree = save_tree_then_die
script.main(script.parse_args(sys.argv[2:]))
"""


def test_a_kill_while_checkpointing_keeps_the_last_complete_checkpoint(workspace, tmp_path):  # noqa: F811
    common = ["--validation_steps", "100", "--checkpointing_steps", "2", "--checkpoints_total_limit", "1"]
    killed = tmp_path / "killed"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    process = subprocess.run(
        [sys.executable, "-c", KILL_DURING_SECOND_CHECKPOINT, str(ROOT), *base_args(workspace, killed, "--max_train_steps", "6", *common)],
        env=env, cwd=str(Path(__file__).parent), capture_output=True, text=True,
    )
    assert process.returncode == -signal.SIGKILL, process.stderr[-2000:]
    assert list_checkpoints(str(killed)) == ["checkpoint-2"]
    assert read_manifest(str(killed / "checkpoint-2"))["step"] == 2  # complete, not pruned early
    assert (killed / "checkpoint-4.tmp").is_dir()

    # The next start removes the half-written folder before doing anything else.
    with pytest.raises(UserInputError, match="differs in"):
        run(base_args(workspace, killed, "--max_train_steps", "6", *common, "--resume_from_checkpoint", "latest", "--seed", "9"))
    assert not (killed / "checkpoint-4.tmp").exists()

    run(base_args(workspace, killed, "--max_train_steps", "6", *common, "--resume_from_checkpoint", "latest"))
    assert not [p for p in killed.iterdir() if p.name.endswith(".tmp")]
    assert list_checkpoints(str(killed)) == ["checkpoint-6"]

    straight = tmp_path / "straight"
    run(base_args(workspace, straight, "--max_train_steps", "6", *common))
    a = load_file(str(straight / "pytorch_lora_weights.safetensors"))
    b = load_file(str(killed / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
