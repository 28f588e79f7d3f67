"""Run folders under the checkpoint storage: names, existence, listing, and the run-info file
that ties a Ray Train run folder to its MLflow run and config."""

from __future__ import annotations

import json
import secrets
import time

import pyarrow.fs as pafs

from pipeline import storage

RUN_INFO = "cyclegan_run.json"


def new_run_name(prefix: str) -> str:
    """``PREFIX-DATE-TIME-xxxx``: unique, so a new run never silently resumes another."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def exists(storage_uri: str, name: str) -> bool:
    fs, path = storage.resolve(storage.join(storage_uri, name))
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_runs(storage_uri: str) -> list[str]:
    """The run folders under ``storage_uri`` (empty when it cannot be listed)."""
    try:
        fs, root = storage.resolve(storage_uri)
        infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except Exception:
        return []
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


def read_info(storage_uri: str, name: str) -> dict:
    """The run-info dict of run ``name``; a missing run is an error listing the runs there."""
    fs, path = storage.resolve(storage.join(storage_uri, name, RUN_INFO))
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read())
    except FileNotFoundError:
        raise ValueError(
            f"--resume {name}: no run called {name!r} under {storage.redact(storage_uri)} "
            f"(runs there: {', '.join(list_runs(storage_uri)) or 'none'})"
        ) from None


def write_info(storage_uri: str, name: str, info: dict) -> None:
    """Write the run-info file atomically (a reader sees the old file or the new one)."""
    fs, path = storage.resolve(storage.join(storage_uri, name))
    fs.create_dir(path, recursive=True)
    data = json.dumps(info, indent=2).encode()
    storage.write_bytes_atomic(fs, f"{path.rstrip('/')}/{RUN_INFO}", data)
