"""The scripts' final outputs: one whole run in --output_dir even after a SIGKILL, a finished run kept unless
--overwrite_output_dir, one run per folder, equal permissions, reproducible adapter bytes, and --push_to_hub
uploading only the finished run's files (huggingface_hub replaced by a local stand-in)."""

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train_unlearn_ddpm as ddpm_script  # noqa: E402
import train_unlearn_sd as sd_script  # noqa: E402

from diffusers_unlearn.errors import UserInputError  # noqa: E402
from diffusers_unlearn.outputs import LOCK_NAME, MANIFEST_NAME, recover_output_dir, run_files  # noqa: E402
from test_outputs import HOLD_LOCK  # noqa: E402
from test_train_ddpm import base_args, workspace  # noqa: E402,F401  (workspace is a fixture)


def run(args):
    ddpm_script.main(ddpm_script.parse_args(args))


def outputs_of(out: Path) -> dict[str, bytes]:
    """The run's files (relative path -> bytes): everything but hidden files, checkpoints and logs."""
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and not str(p.relative_to(out)).startswith((".", "checkpoint-", "logs"))
    }


def assert_one_clean_run(out: Path) -> None:
    """Exactly the manifest's files, plus checkpoints, logs, the manifest and the lock: no staging or temp files."""
    files = run_files(out)
    extra = {p.name for p in out.iterdir()} - set(files) - {MANIFEST_NAME, LOCK_NAME, "logs"}
    assert all(name.startswith("checkpoint-") and not name.endswith(".tmp") for name in extra), extra
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".tmp-")]


# A wrapper that runs the script and SIGKILLs itself at one point of the final save.
KILL_DURING_SAVE = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {root!r})
    import train_unlearn_ddpm as script

    point = sys.argv[1]
    if point == "swap":  # the staged adapter is about to move into --output_dir
        real_replace = os.replace
        def replace(src, dst):
            if os.path.basename(os.path.dirname(src)) == ".unlearn_staging" and src.endswith(".safetensors"):
                os.kill(os.getpid(), signal.SIGKILL)
            real_replace(src, dst)
        os.replace = replace
    else:  # point names the save function: kill right after it has written the weights into the staging folder
        real_save = getattr(script, point)
        def save_then_die(*args, **kwargs):
            real_save(*args, **kwargs)
            # Checkpoints save the adapter too; die only in the final save, which writes into the staging folder.
            if any(".unlearn_staging" in str(getattr(arg, "path", arg)) for arg in args):
                os.kill(os.getpid(), signal.SIGKILL)
        setattr(script, point, save_then_die)
    script.main(script.parse_args(sys.argv[2:]))
    """
)


def run_killed(point: str, args: list[str]) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    code = KILL_DURING_SAVE.format(root=str(ROOT))
    killed = subprocess.run([sys.executable, "-c", code, point, *args], env=env, cwd=ROOT, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]


@pytest.mark.parametrize("mode, save", [("lora", "save_lora_weights"), ("full", "save_full_pipeline")])
def test_kill_after_the_weights_are_staged_keeps_the_previous_run(workspace, tmp_path, mode, save):  # noqa: F811
    out = tmp_path / "out"
    common = ["--train_mode", mode, "--max_train_steps", "2", "--checkpointing_steps", "1"]
    run(base_args(workspace, out, *common, "--seed", "0"))
    previous = outputs_of(out)
    assert "unlearning_report.json" in previous

    run_killed(save, base_args(workspace, out, *common, "--seed", "1", "--overwrite_output_dir"))
    assert outputs_of(out) == previous  # untouched: the new weights went to the staging folder only
    assert any((out / ".unlearn_staging").iterdir())

    # The next start removes the incomplete staging folder; the run completes and replaces the previous one.
    run(base_args(workspace, out, *common, "--seed", "2", "--overwrite_output_dir"))
    assert_one_clean_run(out)
    assert json.loads((out / "unlearning_report.json").read_text())["seed"] == 2
    assert (out / "checkpoint-2").is_dir()  # checkpoints are not part of the swap
    # The finished run is now protected.
    with pytest.raises(UserInputError, match="already holds a finished run"):
        run(base_args(workspace, out, *common, "--seed", "3"))


def test_kill_during_the_swap_rolls_forward_to_the_new_run(workspace, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    run(base_args(workspace, out, "--max_train_steps", "2", "--seed", "0"))
    run_killed("swap", base_args(workspace, out, "--max_train_steps", "2", "--seed", "1", "--overwrite_output_dir"))
    assert (out / ".unlearn_previous").is_dir()  # killed half way through the swap

    assert recover_output_dir(out) == "completed the final save of an interrupted run"
    assert_one_clean_run(out)
    assert json.loads((out / "unlearning_report.json").read_text())["seed"] == 1
    assert set(run_files(out)) == {
        "README.md", "pytorch_lora_weights.safetensors", "samples_after.png", "samples_before.png", "unlearning_report.json",
    }


def test_finished_run_needs_overwrite_and_a_file_is_refused(workspace, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    run(base_args(workspace, out, "--max_train_steps", "2"))
    with pytest.raises(UserInputError, match="already holds a finished run .*--overwrite_output_dir"):
        ddpm_script.parse_args(base_args(workspace, out, "--max_train_steps", "2"))
    run(base_args(workspace, out, "--max_train_steps", "2", "--seed", "5", "--overwrite_output_dir"))
    assert json.loads((out / "unlearning_report.json").read_text())["seed"] == 5
    assert_one_clean_run(out)

    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for script in (ddpm_script, sd_script):
        with pytest.raises(UserInputError, match="exists and is not a folder"):
            script.parse_args(["--output_dir", str(a_file)])


def test_a_second_run_on_a_locked_folder_fails_at_start(workspace, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(out)], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserInputError, match="in use by another run"):
            run(base_args(workspace, out, "--max_train_steps", "2"))
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing was written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()
        holder.stdin.close()
    run(base_args(workspace, out, "--max_train_steps", "2"))  # the killed holder left no stale lock
    assert_one_clean_run(out)


def test_outputs_share_the_adapters_permissions(workspace, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    previous = os.umask(0o022)
    try:
        run(base_args(workspace, out, "--max_train_steps", "2"))
    finally:
        os.umask(previous)
    modes = {name: oct(stat.S_IMODE((out / name).stat().st_mode)) for name in run_files(out)}
    assert set(modes.values()) == {"0o644"}, modes


class FakeHub:
    """Stands in for huggingface_hub's create_repo and upload_folder; records what would be uploaded."""

    def __init__(self, fail_create: Exception | None = None):
        self.calls: list[str] = []
        self.uploaded: list[str] = []
        self.fail_create = fail_create

    def create_repo(self, repo_id, exist_ok=False, token=None, **kwargs):
        self.calls.append(f"create_repo {repo_id} token={token}")
        if self.fail_create:
            raise self.fail_create
        return SimpleNamespace(repo_id=repo_id if "/" in repo_id else f"user/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, allow_patterns=None, ignore_patterns=None, **kwargs):
        from huggingface_hub.utils import filter_repo_objects

        self.calls.append(f"upload_folder {repo_id}")
        everything = [
            str(p.relative_to(folder_path)).replace(os.sep, "/") for p in Path(folder_path).rglob("*") if p.is_file()
        ]
        # huggingface_hub's own filter, as upload_folder applies it.
        self.uploaded = sorted(filter_repo_objects(everything, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub

    hub = FakeHub()
    monkeypatch.setattr(huggingface_hub, "create_repo", hub.create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", hub.upload_folder)
    return hub


def test_push_to_hub_creates_the_repo_first_and_uploads_only_the_run(workspace, tmp_path, fake_hub, monkeypatch):  # noqa: F811
    out = tmp_path / "my-unlearned"
    real_load = ddpm_script.UNet2DModel.from_pretrained

    def load(*args, **kwargs):
        fake_hub.calls.append("load model")
        return real_load(*args, **kwargs)

    monkeypatch.setattr(ddpm_script.UNet2DModel, "from_pretrained", load)
    (out / "logs").mkdir(parents=True)
    (out / "logs" / "events.out").write_text("tracker file")
    run(base_args(workspace, out, "--max_train_steps", "2", "--checkpointing_steps", "1", "--push_to_hub", "--hub_token", "hf_x"))
    assert fake_hub.calls == ["create_repo my-unlearned token=hf_x", "load model", "upload_folder user/my-unlearned"]
    assert fake_hub.uploaded == [
        "README.md", "pytorch_lora_weights.safetensors", "samples_after.png", "samples_before.png", "unlearning_report.json",
    ]
    assert "user/my-unlearned" in (out / "README.md").read_text()  # the card's loading example names the repo


def test_push_to_hub_uploads_a_full_pipeline_by_its_files(workspace, tmp_path, fake_hub):  # noqa: F811
    out = tmp_path / "full"
    run(base_args(workspace, out, "--train_mode", "full", "--max_train_steps", "1", "--push_to_hub", "--hub_model_id", "org/full"))
    assert "unet/diffusion_pytorch_model.safetensors" in fake_hub.uploaded
    assert {path.split("/")[0] for path in fake_hub.uploaded} == set(run_files(out))


def test_a_bad_hub_repo_fails_before_any_model_loads(workspace, tmp_path, monkeypatch):  # noqa: F811
    import huggingface_hub
    from huggingface_hub.errors import HFValidationError

    hub = FakeHub(fail_create=HFValidationError("Repo id must use alphanumeric chars"))
    monkeypatch.setattr(huggingface_hub, "create_repo", hub.create_repo)
    monkeypatch.setattr(ddpm_script.UNet2DModel, "from_pretrained", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(UserInputError, match="cannot create or open the Hub repo 'bad id!'"):
        run(base_args(workspace, tmp_path / "out", "--push_to_hub", "--hub_model_id", "bad id!"))


@pytest.mark.parametrize("script", [ddpm_script, sd_script])
def test_wandb_with_a_hub_token_is_refused_at_parse_time(script):
    with pytest.raises(UserInputError, match="--hub_token cannot be combined with --report_to wandb"):
        script.parse_args(["--report_to", "wandb", "--hub_token", "hf_x", "--output_dir", "never-created"])
    assert not os.path.exists("never-created")
