"""Checkpoint staging folders left behind by killed workers are removed, and only those."""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.checkpoints import STAGING_PREFIX, remove_orphaned_staging


def dead_pid() -> int:
    """A process id that no process has: one above the kernel's largest (``kill`` answers
    ESRCH, as for a process that has exited), found without starting a process."""
    return int(Path("/proc/sys/kernel/pid_max").read_text()) + 1


def test_only_the_folders_of_dead_processes_are_removed(tmp_path):
    orphan = tmp_path / f"{STAGING_PREFIX}{dead_pid()}-abc"
    orphan.mkdir()
    (orphan / "checkpoint.pt").write_bytes(b"x" * 1000)
    live = tmp_path / f"{STAGING_PREFIX}{os.getpid()}-def"
    live.mkdir()
    unrelated = [tmp_path / "tmpabc", tmp_path / f"{STAGING_PREFIX}notapid", tmp_path / "other-1-x"]
    for path in unrelated:
        path.mkdir()
    a_file = tmp_path / f"{STAGING_PREFIX}{dead_pid()}-file"
    a_file.write_text("not a folder")

    assert remove_orphaned_staging(str(tmp_path)) == [str(orphan)]
    assert not orphan.exists()
    assert live.is_dir() and a_file.is_file() and all(p.is_dir() for p in unrelated)
    assert remove_orphaned_staging(str(tmp_path)) == []
