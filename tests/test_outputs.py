"""Final outputs: staged and swapped in whole, recovered after a kill, one run per folder, same permissions for
every file, reproducible safetensors bytes (diffusers_unlearn.outputs and diffusers_unlearn.fileio)."""

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image

from diffusers_unlearn import outputs
from diffusers_unlearn.errors import UserInputError
from diffusers_unlearn.fileio import atomic_write_text, canonical_safetensors, safetensors_bytes
from diffusers_unlearn.outputs import (
    LOCK_NAME,
    MANIFEST_NAME,
    OutputDirLock,
    StagedRun,
    check_output_dir,
    recover_output_dir,
    run_files,
)

ROOT = Path(__file__).resolve().parents[1]


def write_run(output_dir: Path, files: dict[str, str]) -> list[str]:
    """Stage `files` ({relative path: text}) and swap them in as one run."""
    staged = StagedRun(output_dir)
    for name, text in files.items():
        atomic_write_text(os.path.join(staged.path, name), text)
    return staged.commit()


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (relative path -> text), hidden files included."""
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


RUN_A = {"pytorch_lora_weights.safetensors": "adapter A", "unlearning_report.json": "report A", "README.md": "card A",
         "samples_after.png": "grid A", "forget_class_samples_after.png": "class grid A"}
RUN_B = {"unet/diffusion_pytorch_model.safetensors": "unet B", "model_index.json": "index B",
         "unlearning_report.json": "report B", "README.md": "card B", "samples_after.png": "grid B"}
KEPT = {"checkpoint-4/checkpoint.json": "ckpt", "logs/events": "log"}  # never part of a run's swap


def with_kept_files(folder: Path) -> None:
    for name, text in KEPT.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


def visible(folder: Path) -> dict[str, str]:
    return {name: text for name, text in snapshot(folder).items() if not name.startswith(".") and name not in KEPT}


def test_commit_replaces_the_previous_run_whole_and_leaves_checkpoints_and_logs(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with_kept_files(out)
    assert write_run(out, RUN_A) == sorted(RUN_A)
    assert visible(out) == RUN_A
    # A full pipeline after an adapter: the adapter and the extra class grid of run A go, unet/ comes in.
    assert write_run(out, RUN_B) == ["README.md", "model_index.json", "samples_after.png", "unet", "unlearning_report.json"]
    assert visible(out) == RUN_B
    assert run_files(out) == sorted({name.split("/")[0] for name in RUN_B})
    assert {n: t for n, t in snapshot(out).items() if n in KEPT} == KEPT
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [MANIFEST_NAME]


class Interrupted(BaseException):
    """Stands in for a kill: nothing catches it, so the folder is left as a kill would leave it."""


def count_renames(monkeypatch, tmp_path) -> int:
    calls = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda *a: (calls.append(a), real_replace(*a))[1])
    out = tmp_path / "count"
    out.mkdir()
    write_run(out, RUN_A)
    calls.clear()
    write_run(out, RUN_B)
    monkeypatch.undo()
    return len(calls)


def test_an_interruption_at_any_rename_leaves_one_whole_run_after_recovery(tmp_path, monkeypatch):
    """Every os.replace of the final save (file writes, the swap, the manifest) is interrupted in turn."""
    total = count_renames(monkeypatch, tmp_path)
    assert total >= 10
    outcomes = []
    for stop_at in range(total):
        out = tmp_path / f"out{stop_at}"
        out.mkdir()
        with_kept_files(out)
        write_run(out, RUN_A)
        real_replace, seen = os.replace, []

        def replace(src, dst, *, stop_at=stop_at, real_replace=real_replace, seen=seen):
            if len(seen) == stop_at:
                raise Interrupted
            seen.append(src)
            real_replace(src, dst)

        monkeypatch.setattr(os, "replace", replace)
        with pytest.raises(Interrupted):
            write_run(out, RUN_B)
        monkeypatch.undo()
        assert recover_output_dir(out) is not None
        assert recover_output_dir(out) is None  # idempotent: nothing left to do
        result = visible(out)
        assert result in (RUN_A, RUN_B), stop_at
        outcomes.append("A" if result == RUN_A else "B")
        assert {n: t for n, t in snapshot(out).items() if n in KEPT} == KEPT
        assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [MANIFEST_NAME], stop_at
    # Before the "complete" marker the previous run stays; after it the new run is rolled forward.
    assert outcomes == sorted(outcomes) and outcomes[0] == "A" and outcomes[-1] == "B"


KILL_MID_SWAP = textwrap.dedent(
    """
    import os, signal, sys
    from diffusers_unlearn.fileio import atomic_write_text
    from diffusers_unlearn.outputs import StagedRun
    out, files = sys.argv[1], sys.argv[2:]
    real_replace = os.replace
    def replace(src, dst):
        if os.path.basename(os.path.dirname(src)) == ".unlearn_staging" and os.path.basename(src) == "README.md":
            os.kill(os.getpid(), signal.SIGKILL)  # the staged card is about to move in
        real_replace(src, dst)
    staged = StagedRun(out)
    for name in files:
        atomic_write_text(os.path.join(staged.path, name), name + " B")
    os.replace = replace
    staged.commit()
    """
)


def test_sigkill_mid_swap_is_rolled_forward(tmp_path):
    out = tmp_path / "out"
    write_run(out, {"README.md": "README.md A", "old.txt": "old.txt A"})
    new = ["README.md", "samples.png", "unlearning_report.json"]
    killed = subprocess.run([sys.executable, "-c", KILL_MID_SWAP, str(out), *new], cwd=ROOT)
    assert killed.returncode == -signal.SIGKILL
    assert (out / ".unlearn_previous").is_dir()  # the swap was under way
    recover_output_dir(out)
    assert visible(out) == {name: name + " B" for name in new}
    assert run_files(out) == new


def test_recovery_removes_incomplete_staging_and_temporary_files_only(tmp_path):
    out = tmp_path / "out"
    write_run(out, RUN_A)
    with_kept_files(out)
    (out / ".unlearn_staging").mkdir()
    (out / ".unlearn_staging" / "pytorch_lora_weights.safetensors").write_text("half a run")
    (out / ".pytorch_lora_weights.safetensors.0123abcd.tmp").write_text("temp")
    (out / ".tmp-xyz").write_text("temp of an earlier version")
    (out / "checkpoint-6.tmp").mkdir()  # the checkpointer's own, not ours to remove
    assert recover_output_dir(out) == "removed the incomplete final save of an interrupted run"
    assert visible(out) == RUN_A
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [MANIFEST_NAME, "checkpoint-4", "checkpoint-6.tmp", "logs", *RUN_A]
    )


def test_check_output_dir(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    with pytest.raises(UserInputError, match="exists and is not a folder"):
        check_output_dir(a_file)
    check_output_dir(tmp_path / "new")  # a new folder
    unfinished = tmp_path / "unfinished"
    (unfinished / "checkpoint-5").mkdir(parents=True)
    check_output_dir(unfinished)  # checkpoints only: a new run or a resume may use it
    finished = tmp_path / "finished"
    finished.mkdir()
    write_run(finished, {"unlearning_report.json": "{}"})
    with pytest.raises(UserInputError, match="already holds a finished run .*--overwrite_output_dir"):
        check_output_dir(finished)
    check_output_dir(finished, overwrite=True)
    check_output_dir(finished, resume_from_checkpoint="some/checkpoint-5")
    # "latest" continues the run only if there is a checkpoint to continue; otherwise it would start anew.
    with pytest.raises(UserInputError, match="finished run"):
        check_output_dir(finished, resume_from_checkpoint="latest")
    (finished / "checkpoint-5").mkdir()
    check_output_dir(finished, resume_from_checkpoint="latest")
    legacy = tmp_path / "legacy"  # written before run manifests existed
    legacy.mkdir()
    (legacy / "unlearning_report.json").write_text("{}")
    with pytest.raises(UserInputError, match=r"finished run \(unlearning_report.json\)"):
        check_output_dir(legacy)


def test_a_tampered_manifest_is_refused(tmp_path):
    out = tmp_path / "out"
    write_run(out, RUN_A)
    (out / MANIFEST_NAME).write_text(json.dumps({"format": outputs.FORMAT, "files": ["checkpoint-4"]}))
    with pytest.raises(UserInputError, match="not a run output"):
        run_files(out)


HOLD_LOCK = textwrap.dedent(
    """
    import sys, time
    from diffusers_unlearn.outputs import OutputDirLock
    OutputDirLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    sys.stdin.read()  # hold the lock until killed
    """
)


def test_lock_refuses_a_second_run_and_a_killed_holder_frees_it(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(out)], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserInputError, match=rf"in use by another run \(process {holder.pid}\)"):
            OutputDirLock(out).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()
        holder.stdin.close()
    with OutputDirLock(out):  # the OS released the dead holder's lock
        assert (out / LOCK_NAME).is_file()
    with OutputDirLock(out):  # and a released lock can be taken again
        pass


def test_lock_on_a_file_path_is_a_clear_error(tmp_path):
    (tmp_path / "out").write_text("")
    with pytest.raises(UserInputError, match="not a folder"):
        OutputDirLock(tmp_path / "out").acquire()


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_every_writer_gives_the_same_permissions(tmp_path, umask):
    from diffusers_unlearn.fileio import atomic_write_json
    from diffusers_unlearn.hub import write_model_card
    from diffusers_unlearn.images import save_image_atomic
    from diffusers_unlearn.lora import add_lora, save_lora_weights
    from diffusers_unlearn.unlearner import save_trainable_state
    from tiny_models import tiny_unet

    previous = os.umask(umask)
    try:
        unet = add_lora(tiny_unet(), rank=2, targets="attention")
        written = [save_lora_weights(unet, tmp_path), save_trainable_state(unet, str(tmp_path))]
        atomic_write_json(tmp_path / "unlearning_report.json", {})
        written.append(str(tmp_path / "unlearning_report.json"))
        report = {"method": "siss", "metrics": {"before": {"x": 1.0}, "after": {"x": 0.0}}}
        written.append(write_model_card(str(tmp_path), report, base_model="base"))
        save_image_atomic(Image.new("L", (4, 4)), str(tmp_path / "samples.png"))
        written.append(str(tmp_path / "samples.png"))
    finally:
        os.umask(previous)
    modes = {os.path.basename(p): oct(stat.S_IMODE(os.stat(p).st_mode)) for p in written}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes


def test_safetensors_header_is_canonical_and_loads():
    from safetensors.torch import load

    metadata = {"method": "siss", "base_model": "b", "format": "pt", "zeta": "1", "alpha": "2", "mid": "3"}
    tensors = {"b.weight": torch.arange(3.0), "a.weight": torch.ones(2, 2, dtype=torch.float16)}
    data = safetensors_bytes(tensors, metadata)
    size = int.from_bytes(data[:8], "little")
    assert size % 8 == 0
    header = json.loads(data[8 : 8 + size])
    assert header["__metadata__"] == metadata
    assert data[8 : 8 + size].rstrip(b" ") == json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    assert canonical_safetensors(data) == data
    loaded = load(data)
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)


CANONICAL_BYTES = textwrap.dedent(
    """
    import hashlib, torch
    from diffusers_unlearn.fileio import safetensors_bytes
    metadata = {f"key{i}": str(i) for i in range(8)}
    print(hashlib.sha256(safetensors_bytes({"w": torch.arange(4.0)}, metadata)).hexdigest())
    """
)


def test_safetensors_bytes_are_the_same_in_separate_processes():
    # safetensors orders metadata by a randomly seeded hash map: the bytes would differ from process to process.
    digests = {subprocess.run([sys.executable, "-c", CANONICAL_BYTES], cwd=ROOT, capture_output=True, text=True, check=True).stdout for _ in range(3)}
    assert len(digests) == 1
