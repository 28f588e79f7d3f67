"""Listing the images under a folder, without leaving it through symlinks."""

from __future__ import annotations

import os
import posixpath
from typing import NamedTuple

import pyarrow.fs as pafs

from pipeline.storage.errors import wrap_error

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


class ImageListing(NamedTuple):
    """What :func:`list_images` found under a folder."""

    keys: list[str]
    """Image keys: sorted relative POSIX paths."""
    others: int
    """Files of other kinds."""
    skipped: list[tuple[str, str]]
    """(key, reason) of each symlink left out (local folders only)."""


def _walk_local(base: str) -> tuple[list[str], list[tuple[str, str]]]:
    """Files under a local folder (relative POSIX paths) without leaving it: a symlink is
    followed only to a file inside the folder, a symlinked folder never (it may loop, and what
    it holds lies outside or is listed in its own place). Symlinks left out come with why."""
    root = os.path.realpath(base)
    files: list[str] = []
    skipped: list[tuple[str, str]] = []
    pending = [""]
    while pending:
        rel = pending.pop()
        with os.scandir(os.path.join(base, rel)) as entries:
            for entry in entries:
                key = f"{rel}/{entry.name}" if rel else entry.name
                if entry.is_symlink():
                    target = os.path.realpath(entry.path)
                    if os.path.commonpath([root, target]) != root:
                        skipped.append((key, f"a symlink to {target}, outside the folder"))
                    elif os.path.isdir(target):
                        skipped.append((key, "a symlinked folder (not followed)"))
                    elif os.path.isfile(target):
                        files.append(key)
                    else:
                        skipped.append((key, f"a broken symlink (to {target})"))
                elif entry.is_dir(follow_symlinks=False):
                    pending.append(key)
                elif entry.is_file(follow_symlinks=False):
                    files.append(key)
    return files, sorted(skipped)


def list_images(folder: str) -> ImageListing:
    """The images under ``folder``; a local folder is listed without following symlinks out
    of it or into a folder (see :func:`_walk_local`)."""
    from pipeline.storage import resolve

    filesystem, base = resolve(folder)
    try:
        if isinstance(filesystem, pafs.LocalFileSystem):
            files, skipped = _walk_local(base)
        else:
            infos = filesystem.get_file_info(pafs.FileSelector(base, recursive=True))
            files = [
                posixpath.relpath(info.path, base)
                for info in infos
                if info.type == pafs.FileType.File
            ]
            skipped = []
    except Exception as exc:
        raise wrap_error(folder, exc, "list images") from None
    keys = sorted(k for k in files if k.lower().endswith(IMAGE_EXTENSIONS))
    return ImageListing(keys, len(files) - len(keys), skipped)
