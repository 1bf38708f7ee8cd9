"""A run's final outputs appear in `--output_dir` all together or not at all; one run per folder at a time.

The final outputs (adapter or full pipeline, `unlearning_report.json`, `README.md`, sample grids) are written
into a hidden staging folder inside the output folder, then swapped into place:

```
output_dir/
  .unlearn_run.json          manifest of the finished run: the list of its top-level files and folders
  .unlearn_staging/          the next run's outputs while they are written; `.unlearn_run.json` inside it,
                             written last, marks it complete
  .unlearn_previous/         the previous run's files while the swap runs
  .unlearn.lock              held (flock) by the run that uses the folder
  checkpoint-*/  logs/       never touched by any of this
```

The swap moves the previous run's files aside, moves the staged ones in, and then renames the staged manifest
over the old one. Each step is a rename, and the whole swap can be repeated from any point, so a run killed
at any moment leaves either the previous run or, once the next start has called `recover_output_dir`, the new
one: a complete staging folder is swapped in (roll forward), an incomplete one is deleted (roll back).

Example (what the scripts do, on the main process):
    >>> check_output_dir("out", overwrite=False, resume_from_checkpoint=None)  # in parse_args  # doctest: +SKIP
    >>> with OutputDirLock("out"):  # doctest: +SKIP
    ...     recover_output_dir("out")
    ...     staged = StagedRun("out")
    ...     save_lora_weights(unet, staged.path)
    ...     atomic_write_json(staged.file("unlearning_report.json"), report)
    ...     staged.commit()  # ['pytorch_lora_weights.safetensors', 'unlearning_report.json']
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
from typing import Any, Callable, Optional, TypeVar

from .errors import UserInputError
from .fileio import atomic_write_json, fsync_directory, is_temporary_name

logger = logging.getLogger(__name__)

FORMAT = "diffusers-unlearn-run/1"
MANIFEST_NAME = ".unlearn_run.json"
STAGING_NAME = ".unlearn_staging"
ASIDE_NAME = ".unlearn_previous"
LOCK_NAME = ".unlearn.lock"
REPORT_NAME = "unlearning_report.json"
_CHECKPOINT = re.compile(r"checkpoint-\d+")


# ---------------------------------------------------------------------------------------------------------------
# Manifests
# ---------------------------------------------------------------------------------------------------------------


def _is_output_name(name: Any) -> bool:
    """A run's outputs are plain top-level names: none of the folder's hidden files, no checkpoint."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and not name.startswith(".")
        and "/" not in name
        and os.sep not in name
        and not _CHECKPOINT.match(name)
    )


def read_manifest(path: str) -> dict[str, Any]:
    """A run manifest (`.unlearn_run.json`): {"format": ..., "files": [top-level names]}."""
    try:
        with open(path, encoding="utf-8") as handle:
            manifest = json.load(handle)
    except (OSError, ValueError) as error:
        raise UserInputError(f"Cannot read the run manifest {path}: {error}. Delete it if you edited it.") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), list):
        raise UserInputError(f"{path} is not a diffusers-unlearn run manifest ({FORMAT}).")
    for name in manifest["files"]:
        if not _is_output_name(name):
            raise UserInputError(f"{path} lists {name!r}, which is not a run output; delete {path} if you edited it.")
    return manifest


def run_files(output_dir: str | os.PathLike) -> Optional[list[str]]:
    """The top-level files and folders of the finished run in `output_dir`, or None if it holds none."""
    path = os.path.join(os.fspath(output_dir), MANIFEST_NAME)
    if not os.path.isfile(path):
        return None
    return list(read_manifest(path)["files"])


def finished_run_marker(output_dir: str | os.PathLike) -> Optional[str]:
    """The file showing that `output_dir` holds a finished run (its manifest, a completely staged run that
    `recover_output_dir` will swap in, or the report of a run written before manifests existed), else None."""
    output_dir = os.fspath(output_dir)
    for path in (
        os.path.join(output_dir, MANIFEST_NAME),
        os.path.join(output_dir, STAGING_NAME, MANIFEST_NAME),
        os.path.join(output_dir, REPORT_NAME),
    ):
        if os.path.isfile(path):
            return path
    return None


# ---------------------------------------------------------------------------------------------------------------
# Checks before any work
# ---------------------------------------------------------------------------------------------------------------


def _continues_a_checkpoint(output_dir: str, resume_from_checkpoint: Optional[str]) -> bool:
    """Whether `--resume_from_checkpoint` resumes a checkpoint (so the run continues the one in `output_dir`).

    "latest" resumes nothing when the folder has no checkpoint: the run would then start anew.
    """
    if not resume_from_checkpoint:
        return False
    if resume_from_checkpoint != "latest":
        return True
    return any(_CHECKPOINT.fullmatch(name) for name in os.listdir(output_dir))


def _refuse_a_file(output_dir: str) -> None:
    if os.path.lexists(output_dir) and not os.path.isdir(output_dir):
        raise UserInputError(f"--output_dir {output_dir} exists and is not a folder; pass a folder path.")


def check_output_dir(
    output_dir: str | os.PathLike, *, overwrite: bool = False, resume_from_checkpoint: Optional[str] = None
) -> None:
    """Refuse an `--output_dir` that is a file, or that holds a finished run, before any work starts.

    A finished run is replaced only with `overwrite` (`--overwrite_output_dir`) or when the run resumes one of
    its checkpoints (`resume_from_checkpoint`, which continues that run). Read-only: safe on every process.
    """
    output_dir = os.fspath(output_dir)
    _refuse_a_file(output_dir)
    if not os.path.isdir(output_dir):
        return
    marker = finished_run_marker(output_dir)
    if marker and not overwrite and not _continues_a_checkpoint(output_dir, resume_from_checkpoint):
        raise UserInputError(
            f"--output_dir {output_dir} already holds a finished run ({os.path.basename(marker)}). Pass "
            "--overwrite_output_dir to replace its outputs when this run finishes, or choose another --output_dir."
        )


# ---------------------------------------------------------------------------------------------------------------
# Staging and the swap
# ---------------------------------------------------------------------------------------------------------------


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def _fsync_tree(path: str) -> None:
    """Flush every file and folder under `path` to disk, so that after a power loss the "complete" marker never
    stands beside missing or truncated data."""
    for root, _, names in os.walk(path):
        for name in names:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_directory(root)


def _complete_swap(output_dir: str) -> list[str]:
    """Move a completely staged run into `output_dir`. Every step is a rename that is skipped when already done,
    so this can be run again after a kill at any point."""
    staging = os.path.join(output_dir, STAGING_NAME)
    aside = os.path.join(output_dir, ASIDE_NAME)
    staged_manifest = os.path.join(staging, MANIFEST_NAME)
    new_files = read_manifest(staged_manifest)["files"]
    old_files = run_files(output_dir) or []
    os.makedirs(aside, exist_ok=True)
    # 1. Aside: the previous run's files, and anything else in the way of a new name.
    for name in sorted(set(old_files) | set(new_files)):
        if name in new_files and not os.path.lexists(os.path.join(staging, name)):
            continue  # already moved in by an interrupted earlier attempt
        target = os.path.join(output_dir, name)
        if os.path.lexists(target):
            _remove(os.path.join(aside, name))
            os.replace(target, os.path.join(aside, name))
    # 2. In: the staged files.
    for name in new_files:
        staged = os.path.join(staging, name)
        if os.path.lexists(staged):
            os.replace(staged, os.path.join(output_dir, name))
    # 3. The new manifest replaces the old one: from here on the folder holds the new run.
    os.replace(staged_manifest, os.path.join(output_dir, MANIFEST_NAME))
    fsync_directory(output_dir)
    shutil.rmtree(staging)
    shutil.rmtree(aside)
    return list(new_files)


def recover_output_dir(output_dir: str | os.PathLike) -> Optional[str]:
    """Finish or undo a final save that a killed run left half done, and remove its temporary files.

    A completely staged run is swapped in; an incomplete staging folder, the previous run's set-aside copy and
    hidden temporary files (`.<name>.<random>.tmp`) are deleted. Checkpoints and logs are never touched. Call it
    while holding the folder's `OutputDirLock` (the scripts do, at start): another run's staging would otherwise
    be deleted. Returns what was done, or None when there was nothing to do.
    """
    output_dir = os.fspath(output_dir)
    if not os.path.isdir(output_dir):
        return None
    done = None
    staging = os.path.join(output_dir, STAGING_NAME)
    if os.path.isdir(staging):
        if os.path.isfile(os.path.join(staging, MANIFEST_NAME)):
            _complete_swap(output_dir)
            done = "completed the final save of an interrupted run"
        else:
            shutil.rmtree(staging)
            done = "removed the incomplete final save of an interrupted run"
    aside = os.path.join(output_dir, ASIDE_NAME)
    if os.path.lexists(aside):
        _remove(aside)
        done = done or "removed the previous run's set-aside copy"
    for name in sorted(os.listdir(output_dir)):
        if is_temporary_name(name):
            _remove(os.path.join(output_dir, name))
            done = done or "removed temporary files of an interrupted run"
    return done


class StagedRun:
    """A fresh staging folder for a run's final outputs, swapped into `output_dir` by `commit()`.

    Write every final output under `path` (or `file(name)`); nothing in `output_dir` changes until `commit()`.
    Use it on the main process, while holding the folder's `OutputDirLock`.
    """

    def __init__(self, output_dir: str | os.PathLike):
        self.output_dir = os.path.abspath(os.fspath(output_dir))
        self.path = os.path.join(self.output_dir, STAGING_NAME)
        recover_output_dir(self.output_dir)  # a leftover staging folder is never mixed into this run's
        os.makedirs(self.path)

    def file(self, name: str) -> str:
        """The path at which to write the output `name` (a top-level file name such as "README.md")."""
        if not _is_output_name(name):
            raise ValueError(f"{name!r} is not a top-level output name.")
        return os.path.join(self.path, name)

    def commit(self) -> list[str]:
        """Swap the staged outputs into `output_dir` (replacing the previous run's); returns their names."""
        # Hidden names (temporary files of a writer) are not outputs; they go with the staging folder.
        entries = sorted(name for name in os.listdir(self.path) if not name.startswith("."))
        if not entries:
            raise RuntimeError(f"Nothing was staged in {self.path}.")
        refused = [name for name in entries if not _is_output_name(name)]
        if refused:
            raise ValueError(f"{refused} cannot be run outputs: checkpoint names are kept out of the swap.")
        _fsync_tree(self.path)
        # Written last and atomically: its presence marks the staging folder complete.
        atomic_write_json(os.path.join(self.path, MANIFEST_NAME), {"format": FORMAT, "files": entries})
        return _complete_swap(self.output_dir)


# ---------------------------------------------------------------------------------------------------------------
# One run per folder
# ---------------------------------------------------------------------------------------------------------------


def is_main_process_from_env() -> bool:
    """Whether this process is rank 0 of its launch (torchrun and accelerate set RANK / LOCAL_RANK), for use
    before the Accelerator exists."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


class OutputDirLock:
    """An exclusive `flock` on `<output_dir>/.unlearn.lock`, so two runs never write into one folder at once.

    The operating system releases the lock when the holding process exits, even after SIGKILL, so a crashed run
    never leaves the folder locked. A second run fails at once with a `UserInputError` naming the holder's pid.
    """

    def __init__(self, output_dir: str | os.PathLike):
        self.output_dir = os.fspath(output_dir)
        self.path = os.path.join(self.output_dir, LOCK_NAME)
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        """Take the lock (creating the folder if needed), or raise `UserInputError` if another run holds it."""
        try:
            import fcntl
        except ImportError:  # Windows: no flock
            logger.warning("File locks are not available on this platform: nothing stops two runs sharing %s.", self.output_dir)
            return
        _refuse_a_file(self.output_dir)  # the clear error, not makedirs' FileExistsError
        os.makedirs(self.output_dir, exist_ok=True)
        # O_CLOEXEC: a subprocess the run starts does not inherit (and keep holding) the lock.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 100).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            raise UserInputError(
                f"--output_dir {self.output_dir} is in use by another run (process {holder}). Wait for it to "
                "finish, or choose another --output_dir."
            ) from None
        # The holder's pid, for the message above (informative only: the flock is what excludes).
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        """Release the lock (the lock file stays: deleting it would let two runs lock different files)."""
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> "OutputDirLock":
        self.acquire()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.release()


Main = TypeVar("Main", bound=Callable[..., Any])


def exclusive_output_dir(main: Main) -> Main:
    """Decorate a script's `main(args)`: on the main process, the whole run holds `args.output_dir`'s lock.

    Under the lock, before `main` starts, an interrupted final save of an earlier run is finished or undone
    (`recover_output_dir`), half-written `checkpoint-N.tmp` folders are removed, and `check_output_dir` runs again, since another run may have finished in the folder
    since `parse_args` checked it. Other processes of a distributed launch run `main` directly.
    """

    @functools.wraps(main)
    def run(args, *more: Any, **kwargs: Any) -> Any:
        if not is_main_process_from_env():
            return main(args, *more, **kwargs)
        with OutputDirLock(args.output_dir):
            done = recover_output_dir(args.output_dir)
            if done:
                logger.warning("%s: %s.", args.output_dir, done)
            # A killed run's half-written checkpoint-N.tmp: removed under the lock, so never another run's.
            from .checkpoints import remove_stale_temporaries

            remove_stale_temporaries(args.output_dir)
            check_output_dir(
                args.output_dir, overwrite=args.overwrite_output_dir, resume_from_checkpoint=args.resume_from_checkpoint
            )
            return main(args, *more, **kwargs)

    return run  # type: ignore[return-value]


__all__ = [
    "LOCK_NAME",
    "MANIFEST_NAME",
    "OutputDirLock",
    "StagedRun",
    "check_output_dir",
    "exclusive_output_dir",
    "finished_run_marker",
    "is_main_process_from_env",
    "read_manifest",
    "recover_output_dir",
    "run_files",
]
