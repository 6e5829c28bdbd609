"""Writing files so that a failure (a full disk, a missing directory) names the file and leaves
nothing half-written behind."""

import os
from pathlib import Path

import mlx.core as mx


def save_safetensors(file, arrays, metadata=None):
    """mx.save_safetensors, through a Python file: a failed write then raises OSError with its
    reason (ENOSPC, ...) and the file name, where MLX's own writer says only that it failed; and
    `file` keeps its name (MLX appends .safetensors to a path without it)."""
    try:
        with open(file, "wb") as f:
            mx.save_safetensors(f, arrays, metadata=metadata)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(file)) from None


def replace_atomically(path, write):
    """Call write(temporary path), then move the result over `path`: a failed or interrupted write
    never leaves a damaged `path`, nor the temporary file, behind. An OSError names `path`."""
    path = Path(path)
    temporary = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        write(temporary)
        with open(temporary, "rb") as f:
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except OSError as e:
        if str(e.filename) != str(temporary):
            raise
        raise OSError(e.errno, e.strerror, str(path)) from None
    finally:
        temporary.unlink(missing_ok=True)


def check_directory_path(directory):
    """Raise NotADirectoryError when `directory`, or the nearest of its parents that exists, is
    not a directory: it could then not be written."""
    directory = Path(directory)
    existing = next(p for p in (directory, *directory.absolute().parents) if p.exists())
    if not existing.is_dir():
        where = "" if existing == directory.absolute() else f" {existing}"
        raise NotADirectoryError(f"{directory}:{where} is a file, not a directory")

