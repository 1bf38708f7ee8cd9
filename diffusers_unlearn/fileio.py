"""Atomic file writes with ordinary permissions, and safetensors files with reproducible bytes.

Every file the package writes (adapters, reports, model cards, sample grids, checkpoint weights) goes through
`atomic_write`: the bytes go to a temporary file beside the target, are flushed to disk, and are renamed over
the target, so a reader (or a run killed mid-write) sees either the previous file or the complete new one.
The temporary file is created with mode 0o666 filtered by the umask, like any file `open()` creates, so all
outputs get the same permissions (`tempfile.mkstemp` would make them readable by the owner only).

Example:
    >>> atomic_write_text("out/report.json", "{}\\n")  # doctest: +SKIP
    >>> atomic_write_bytes("out/w.safetensors", safetensors_bytes({"w": torch.ones(2)}, {"method": "siss"}))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import uuid
from typing import IO, Any, Callable, Mapping, Optional

TMP_SUFFIX = ".tmp"


def temporary_name(path: str | os.PathLike) -> str:
    """A fresh temporary path beside `path`: hidden, `.<name>.<random>.tmp`, in the same directory (so the
    final rename stays on one file system)."""
    directory, name = os.path.split(os.path.abspath(os.fspath(path)))
    return os.path.join(directory, f".{name}.{uuid.uuid4().hex}{TMP_SUFFIX}")


def is_temporary_name(name: str) -> bool:
    """Whether a file name is one `temporary_name` makes (or the `.tmp-*` names of earlier versions)."""
    return (name.startswith(".") and name.endswith(TMP_SUFFIX)) or name.startswith(".tmp-")


def fsync_directory(directory: str | os.PathLike) -> None:
    """Flush a directory's entries (new names, renames) to disk, where the platform allows it."""
    # The rename itself is durable only once the directory entry is on disk. Not every platform can open a
    # directory for this; the write is still atomic there, just possibly not yet durable.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Create or replace the file `path` with what `write(handle)` writes to a binary handle, atomically.

    The parent directory is created if needed. On any failure (including KeyboardInterrupt) the temporary
    file is removed and a previous file at `path` is left untouched.
    """
    path = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    tmp = temporary_name(path)
    # 0o666 & ~umask: the permissions any newly created file gets.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_directory(directory)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (see `atomic_write`)."""
    atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` as UTF-8 to `path` atomically (see `atomic_write`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    """Write `data` as indented JSON (keys in insertion order) to `path` atomically."""
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def canonical_safetensors(data: bytes) -> bytes:
    """The same safetensors file with a canonical header: keys sorted, compact JSON, padded with spaces to a
    multiple of 8 bytes.

    safetensors writes the `__metadata__` entries in hash-map order, which changes from one process to the
    next, so two identical runs would give different bytes. The tensor data is unchanged: its offsets in the
    header are relative to the start of the data section.
    """
    header_size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_size])
    body = data[8 + header_size :]
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    # The 8-byte size prefix plus a header padded to a multiple of 8 keeps the data section 8-byte aligned.
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + body


def safetensors_bytes(tensors: Mapping[str, Any], metadata: Optional[Mapping[str, str]] = None) -> bytes:
    """A safetensors file (as bytes) of CPU copies of `tensors`, with `metadata` in a canonical header, so the
    same tensors and metadata always give the same bytes."""
    import safetensors.torch

    tensors = {key: tensor.detach().contiguous().cpu() for key, tensor in tensors.items()}
    return canonical_safetensors(safetensors.torch.save(tensors, metadata=dict(metadata) if metadata else None))


__all__ = [
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "canonical_safetensors",
    "fsync_directory",
    "is_temporary_name",
    "safetensors_bytes",
    "temporary_name",
]
