"""Where checkpoints live: the run directory under ``train.storage_path`` (a local path or a
URI: s3://, gs://, ...), the newest complete checkpoint in it, and small text files beside them."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pyarrow.fs as pafs

from pipeline.checkpoints._probe import first_line, retry_transient
from pipeline.checkpoints._state import META_FILE, STATE_FILE
from pipeline.data.sources import resolve_filesystem


def run_dir(storage_path: str, name: str) -> str:
    return storage_path.rstrip("/") + "/" + name


def resolve_storage_path(path: str) -> str:
    """Local paths become absolute (Ray workers run in other directories); URIs are kept."""
    if "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))


def newest_checkpoint_path(storage_path: str, name: str) -> str | None:
    """Path (or URI) of the checkpoint with the highest global step under storage_path/name."""
    found = newest_checkpoint(storage_path, name)
    return found[1] if found else None


def newest_checkpoint(storage_path: str, name: str) -> tuple[int, str] | None:
    """``(global_step, path or URI)`` of the newest complete checkpoint under storage_path/name."""
    root = run_dir(resolve_storage_path(storage_path), name)
    fs, base = pafs.FileSystem.from_uri(root) if "://" in root else (pafs.LocalFileSystem(), root)
    infos = _list_with_retries(fs, pafs.FileSelector(base, allow_not_found=True), root)
    best: tuple[int, str] | None = None
    for info in infos:
        if info.type != pafs.FileType.Directory or not Path(info.path).name.startswith(
            "checkpoint"
        ):
            continue
        step = _complete_step(fs, info.path)
        if step is not None and (best is None or (step, info.path) > best):
            best = (step, info.path)
    if best is None:
        return None
    return best[0], best[1] if "://" not in root else root.split("://")[0] + "://" + best[1]


class StorageUnavailableError(OSError):
    """The run directory could not be listed: never taken for "no checkpoint yet", which would
    start the run over, skip the rerun checks and open a new MLflow run."""


LIST_TRIES = 3  # a transient error (an S3 503, a dropped connection) is tried again


def _list_with_retries(fs, selector, root: str) -> list:
    try:
        return retry_transient(lambda: fs.get_file_info(selector), tries=LIST_TRIES)
    except OSError as exc:
        raise StorageUnavailableError(
            f"cannot list the checkpoints in {root} ({first_line(exc)}; tried up to {LIST_TRIES} "
            "times); nothing was started or changed: rerun when the storage answers"
        ) from exc


def _complete_step(fs, path: str) -> int | None:
    """The global step of the checkpoint directory ``path``, or None while it is incomplete.
    Ray Train persists a checkpoint file by file, so a listed ``state.pt`` may still be growing
    (a reader saw a truncated one under load); meta.json names the size of each file."""
    try:
        with fs.open_input_stream(path + "/" + META_FILE) as f:
            meta = json.loads(f.read().decode())
        step = int(meta["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # meta.json not copied yet, or copied in part
    # checkpoints written before meta.json held file sizes: state.pt present is all we can check
    sizes = meta.get("file_sizes") or {STATE_FILE: None}
    for name, size in sizes.items():
        found = fs.get_file_info(path + "/" + name)
        if found.type != pafs.FileType.File or (size is not None and found.size != size):
            return None
    return step


def checkpoint_uri(checkpoint) -> str:
    """A ``ray.train.Checkpoint``'s location with its scheme (``Checkpoint.path`` drops it:
    ``bucket/runs/x/checkpoint_...`` for an S3 checkpoint)."""
    path = checkpoint.path
    fs = checkpoint.filesystem
    if "://" not in path and fs is not None and fs.type_name not in ("local",):
        return f"{fs.type_name}://{path}"
    return path


def read_run_file(run_directory: str, name: str) -> str | None:
    """A small text file of the run directory (local or s3://, gs://...), None when absent."""
    try:
        fs, base = resolve_filesystem(run_directory)
        with fs.open_input_stream(base.rstrip("/") + "/" + name) as f:
            return f.read().decode()
    except (FileNotFoundError, OSError):
        return None


def write_run_file(run_directory: str, name: str, text: str) -> None:
    """Write a small text file into the run directory (created if needed)."""
    fs, base = resolve_filesystem(run_directory)
    fs.create_dir(base, recursive=True)
    with fs.open_output_stream(base.rstrip("/") + "/" + name) as f:
        f.write(text.encode())


class as_local_dir:
    """Context manager: a local directory with the checkpoint's files (downloads URIs)."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self._tmp: str | None = None

    def __enter__(self) -> Path:
        if "://" not in self.path:
            return Path(self.path)
        self._tmp = tempfile.mkdtemp(prefix="dino-ckpt-")
        pafs.copy_files(self.path, self._tmp)
        return Path(self._tmp)

    def __exit__(self, *exc) -> None:
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
