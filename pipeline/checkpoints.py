"""Checkpoint files on local or object storage: names, staging, reporting, verified loading and
the newest loadable checkpoint of a run. Resume and model loading both go through here.

A run folder holds Ray Train's ``checkpoint_<time>/`` folders, each with ``checkpoint.pt`` (the
plain dict of ``cyclegan.checkpoint``) and ``checkpoint.pt.sha256`` beside it.
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pyarrow.fs as pafs
import torch

from cyclegan.checkpoint import file_sha256, save_checkpoint
from pipeline import storage

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_PREFIX = "checkpoint_"
STAGING_PREFIX = "cyclegan-checkpoint-"
"""Checkpoint staging folders are named ``STAGING_PREFIX + pid + "-" + random``."""


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, altered or not a checkpoint; names the file."""


def file_type(fs: pafs.FileSystem, path: str, where: str) -> pafs.FileType:
    try:
        return fs.get_file_info(path).type
    except Exception as exc:
        raise CheckpointError(str(storage.wrap_error(where, exc, "stat"))) from None


def _read(fs: pafs.FileSystem, path: str, where: str) -> bytes:
    try:
        with fs.open_input_stream(path) as stream:
            return stream.read()
    except FileNotFoundError:
        raise CheckpointError(f"{where}: not found") from None
    except Exception as exc:
        raise CheckpointError(str(storage.wrap_error(where, exc, "read"))) from None


def load(
    fs: pafs.FileSystem,
    path: str,
    where: str,
    *,
    verify: bool = True,
    require_digest: bool = False,
    mmap: bool = False,
    map_location: str | torch.device = "cpu",
) -> dict:
    """A ``torch.save`` file loaded with ``weights_only=True``, checked against its ``.sha256``
    file when ``verify`` and one exists. With ``require_digest`` a missing ``.sha256`` file is
    an error: the pipeline writes one beside every checkpoint, so inside a run a file without
    one is still being uploaded or was copied in part. A file the user names directly (an
    official ``.pth``) need not have one. Local files may be memory-mapped (only the pickle is
    read until a tensor is touched: cheap when only the step is needed)."""
    if isinstance(fs, pafs.LocalFileSystem):
        if not os.path.isfile(path):
            raise CheckpointError(f"{where}: not found")
        sidecar = path + ".sha256"
        if verify and os.path.isfile(sidecar):
            _check_digest(Path(sidecar).read_text().strip(), file_sha256(path), where, sidecar)
        elif verify and require_digest:
            raise _no_digest(where, sidecar)
        try:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except Exception as exc:
            if mmap:  # files from old torch versions cannot be mapped; read them whole
                return load(fs, path, where, verify=False, map_location=map_location)
            raise CheckpointError(f"{where}: cannot be loaded: {exc}") from None
    data = _read(fs, path, where)
    sidecar = path + ".sha256"
    if verify and file_type(fs, sidecar, where) == pafs.FileType.File:
        expected = _read(fs, sidecar, where).decode().strip()
        _check_digest(expected, hashlib.sha256(data).hexdigest(), where, sidecar)
    elif verify and require_digest:
        raise _no_digest(where, sidecar)
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"{where}: cannot be loaded: {exc}") from None


def _no_digest(where: str, sidecar: str) -> CheckpointError:
    return CheckpointError(
        f"{where}: its checksum file {posixpath.basename(sidecar)} is missing (every checkpoint "
        "a run saves has one; this one is still being copied, or was copied without it)"
    )


def _check_digest(expected: str, actual: str, where: str, sidecar: str) -> None:
    if actual != expected:
        raise CheckpointError(
            f"{where}: does not match its checksum file {posixpath.basename(sidecar)} "
            "(changed or partly copied after it was saved)"
        )


def checkpoint_folders(fs: pafs.FileSystem, run_dir: str, where: str) -> list[str]:
    """The ``checkpoint_*`` folders of a run folder that hold a checkpoint file."""
    try:
        infos = fs.get_file_info(pafs.FileSelector(run_dir, allow_not_found=True))
    except Exception as exc:
        raise CheckpointError(str(storage.wrap_error(where, exc, "list"))) from None
    folders = sorted(
        i.path
        for i in infos
        if i.type == pafs.FileType.Directory and i.base_name.startswith(CHECKPOINT_PREFIX)
    )
    # A folder without the file is one still being written, or emptied by a failure.
    return [
        f
        for f in folders
        if file_type(fs, posixpath.join(f, CHECKPOINT_FILE), where) == pafs.FileType.File
    ]


def _step(fs: pafs.FileSystem, folder: str, where: str) -> int:
    if not isinstance(fs, pafs.LocalFileSystem):
        # Reading the step of a remote checkpoint means downloading it whole: order those by
        # folder name alone (Ray names them by the time they were written).
        return 0
    state = load(fs, posixpath.join(folder, CHECKPOINT_FILE), where, verify=False, mmap=True)
    return int(state.get("step", -1)) if isinstance(state, dict) else -1


def newest_loadable(
    fs: pafs.FileSystem,
    run_dir: str,
    where: str,
    *,
    first: str | None = None,
    map_location: str | torch.device = "cpu",
    on_skip: Callable[[str, Exception], None] | None = None,
) -> tuple[str, dict]:
    """``(path, checkpoint)`` of the newest checkpoint of a run that loads and verifies.

    Newest is the highest step; at equal steps the later folder (Ray names them by time). The
    folder ``first`` (the one Ray hands a restarted worker) is tried before the others. A
    checkpoint that fails, or has no ``.sha256`` file, is passed to ``on_skip`` and the next
    older one is tried."""

    def label(folder: str) -> str:
        return storage.join(where, posixpath.basename(folder.rstrip("/")), CHECKPOINT_FILE)

    failures: list[CheckpointError] = []

    def skip(folder: str, exc: CheckpointError) -> None:
        failures.append(exc)
        if on_skip is not None:
            on_skip(label(folder), exc)

    steps = {}
    for folder in checkpoint_folders(fs, run_dir, where):
        try:
            steps[folder] = _step(fs, folder, label(folder))
        except CheckpointError as exc:  # not even its step can be read: unusable
            skip(folder, exc)
    ordered = sorted(steps, key=lambda f: (steps[f], f), reverse=True)
    if first is not None and first.rstrip("/") in {f.rstrip("/") for f in ordered}:
        first = first.rstrip("/")
        ordered = [first] + [f for f in ordered if f.rstrip("/") != first]
    for folder in ordered:
        path = posixpath.join(folder, CHECKPOINT_FILE)
        try:
            return path, load(
                fs, path, label(folder), require_digest=True, map_location=map_location
            )
        except CheckpointError as exc:
            skip(folder, exc)
    why = f" (newest: {failures[0]}; {len(failures)} tried)" if failures else ""
    raise CheckpointError(
        f"{where}: no {CHECKPOINT_FILE} here and no {CHECKPOINT_PREFIX}* folder holding one "
        f"that loads and verifies{why}"
    )


# staging: a worker writes a checkpoint into a folder of its own before Ray Train persists it


def remove_orphaned_staging(base: str) -> list[str]:
    """Remove the checkpoint staging folders under ``base`` whose process is gone (a worker
    killed while reporting leaves its folder, a whole checkpoint, behind); returns their paths."""
    removed = []
    with os.scandir(base) as entries:
        for entry in entries:
            pid = entry.name[len(STAGING_PREFIX) :].split("-", 1)[0]
            if not (entry.name.startswith(STAGING_PREFIX) and pid.isdigit()):
                continue
            if not entry.is_dir(follow_symlinks=False) or _process_exists(int(pid)):
                continue
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
    return removed


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def staging_base() -> str:
    """Where a worker stages its checkpoints: the Ray node's own temp folder (what a lost node
    leaves behind is Ray's, like its spilled objects), else the system's."""
    import ray

    if ray.is_initialized():
        try:
            base = os.path.join(ray.get_runtime_context().get_temp_dir(), "cyclegan-staging")
            os.makedirs(base, exist_ok=True)
            return base
        except (OSError, AssertionError, AttributeError):
            pass
    return tempfile.gettempdir()


def report(runtime, metrics: dict, ckpt: dict | None, say: Callable[[str], None]) -> None:
    """Report ``metrics`` (a barrier on every rank) with ``ckpt`` where this rank passes one
    (rank 0); the checkpoint is staged in a folder named after this process."""
    if ckpt is None:
        runtime.report(metrics, None)
        return
    base = staging_base()
    for path in remove_orphaned_staging(base):
        say(f"[train] removed {path}, left by a worker that was killed while reporting")
    with tempfile.TemporaryDirectory(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=base) as tmp:
        save_checkpoint(ckpt, Path(tmp) / CHECKPOINT_FILE)
        runtime.report(metrics, runtime.checkpoint_class.from_directory(tmp))
