"""The official CycleGAN datasets: download one by name and import it as shards.

Names and URLs are those of the official repository's ``datasets/download_cyclegan_dataset.sh``:
``https://efrosgans.eecs.berkeley.edu/cyclegan/datasets/NAME.zip``, a zip holding
``NAME/trainA``, ``trainB``, ``testA``, ``testB``. :func:`download_official` fetches the zip into
a work folder inside DEST (nothing is written anywhere else), computes its SHA-256 and checks it
against an expected one, checks every member before extracting any (no path that leaves the
folder, no links, size and compression-ratio limits against zip bombs), extracts the split
folders, imports them with :func:`pipeline.image_import.prepare` and removes the work folder,
whatever happened.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import io
import os
import posixpath
import re
import shutil
import ssl
import stat
import sys
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass

import pyarrow.fs as pafs
from tqdm import tqdm

from pipeline import storage
from pipeline.image_import import prepare
from pipeline.shards import (
    DATASET_NAMES,
    MANIFEST_NAME,
    build_manifest,
    read_manifest,
    write_manifest,
)

OFFICIAL_BASE_URL = "https://efrosgans.eecs.berkeley.edu/cyclegan/datasets"
OFFICIAL_NAMES = (
    "apple2orange",
    "summer2winter_yosemite",
    "horse2zebra",
    "monet2photo",
    "cezanne2photo",
    "ukiyoe2photo",
    "vangogh2photo",
    "maps",
    "cityscapes",
    "facades",
    "iphone2dslr_flower",
    "ae_photos",
    "mini",
    "mini_pix2pix",
    "mini_colorization",
    "grumpifycat",
)
# Names the official server does not serve, with what to do instead (as the official script says).
NOT_SERVED = {
    "cityscapes": "the official server does not provide cityscapes (license): download "
    "gtFine_trainvaltest.zip and leftImg8bit_trainvaltest.zip from https://cityscapes-dataset.com, "
    "arrange them as trainA/ trainB/ testA/ testB/ and run python -m pipeline.prepare",
}

MIB = 1024 * 1024
GIB = 1024 * MIB
CHUNK_BYTES = MIB
# zipfile reads a member's header, then its data in one call: a small buffer serves the former.
HEADER_BUFFER_BYTES = 64 * 1024
TIMEOUT_S = 60.0
WORK_PREFIX = ".download-"
# Resource forks that zips made on macOS carry beside the files; never images.
IGNORED_TOP_FOLDERS = ("__MACOSX",)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class DownloadError(RuntimeError):
    """A download, or its archive, was refused; the message names the URL or the member."""


@dataclass(frozen=True)
class ZipLimits:
    """What an archive may hold; checked on its directory before anything is extracted, and
    again on the bytes as they are extracted."""

    archive_bytes: int = 32 * GIB
    """The largest download accepted."""
    members: int = 1_000_000
    """The most entries (files and folders)."""
    member_bytes: int = 1 * GIB
    """The largest uncompressed file."""
    total_bytes: int = 64 * GIB
    """The most uncompressed bytes in all."""
    ratio: int = 100
    """The highest uncompressed/compressed ratio of a file over ``ratio_floor_bytes``: images
    barely compress, a zip bomb compresses a thousandfold."""
    ratio_floor_bytes: int = MIB


DEFAULT_LIMITS = ZipLimits()


def dataset_url(name: str, base_url: str = OFFICIAL_BASE_URL) -> str:
    """The URL of the official dataset ``name`` under ``base_url``; raises :class:`DownloadError`
    for a name that is not an official one (listing those) or that the official server lacks."""
    if name not in OFFICIAL_NAMES:
        raise DownloadError(
            f"unknown dataset {name!r}; the official CycleGAN datasets are: "
            f"{', '.join(OFFICIAL_NAMES)}"
        )
    base = base_url.rstrip("/")
    if name in NOT_SERVED and base == OFFICIAL_BASE_URL:
        raise DownloadError(f"{name}: {NOT_SERVED[name]}")
    if not base.startswith(("http://", "https://")):
        raise DownloadError(f"--url {base_url}: not an http:// or https:// URL")
    return f"{base}/{name}.zip"


def fetch(
    url: str, filesystem: pafs.FileSystem, path: str, limits: ZipLimits, progress: bool | None
) -> str:
    """Download ``url`` to ``path`` on ``filesystem`` with a progress bar on stderr (``None``:
    only on a terminal); return the SHA-256 of the bytes as hex."""
    request = urllib.request.Request(url, headers={"User-Agent": "cyclegan-pipeline"})
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        hint = ""
        if isinstance(exc.reason, ssl.SSLError):
            hint = (
                "; the server's certificate was refused: to download without TLS, pass --url "
                "with http:// and --sha256 with the archive's known hash"
            )
        raise DownloadError(f"{url}: cannot download ({exc.reason}){hint}") from None
    except (OSError, ValueError, http.client.HTTPException) as exc:
        raise DownloadError(f"{url}: cannot download ({exc})") from None
    total = int(response.headers.get("Content-Length") or 0) or None
    if total and total > limits.archive_bytes:
        response.close()
        raise DownloadError(f"{url}: {total} bytes, over the limit of {limits.archive_bytes} bytes")
    digest, size = hashlib.sha256(), 0
    bar = tqdm(
        total=total,
        desc=url.rsplit("/", 1)[-1],
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        disable=None if progress is None else not progress,
        dynamic_ncols=True,
    )
    with response, bar, filesystem.open_output_stream(path) as out:
        while True:
            try:
                chunk = response.read(CHUNK_BYTES)
            except (OSError, http.client.HTTPException) as exc:
                raise DownloadError(
                    f"{url}: the download broke off after {size} bytes ({exc})"
                ) from None
            if not chunk:
                break
            size += len(chunk)
            if size > limits.archive_bytes:
                raise DownloadError(f"{url}: over the limit of {limits.archive_bytes} bytes")
            digest.update(chunk)
            out.write(chunk)
            bar.update(len(chunk))
    if total is not None and size != total:
        raise DownloadError(f"{url}: the download ended after {size} of {total} bytes")
    return digest.hexdigest()


def member_parts(name: str) -> list[str]:
    """The path of zip member ``name`` as parts; raises :class:`DownloadError` for a path that
    would leave the folder it is extracted into (``../x``, ``/x``, ``C:x``, ``a\\..\\..\\x``)."""
    normal = name.replace("\\", "/")
    parts = [p for p in normal.split("/") if p not in ("", ".")]
    if normal.startswith("/") or re.match(r"^[A-Za-z]:", normal) or ".." in parts:
        raise DownloadError(f"member {name!r}: its path leaves the folder it is extracted into")
    return parts


def checked_files(archive: zipfile.ZipFile, limits: ZipLimits) -> dict[str, list[str]]:
    """The files of ``archive`` (member name -> path parts), once every member passed the
    checks; raises :class:`DownloadError` naming the first member that fails one."""
    infos = archive.infolist()
    if len(infos) > limits.members:
        raise DownloadError(f"{len(infos)} members, over the limit of {limits.members}")
    files: dict[str, list[str]] = {}
    seen: set[str] = set()
    total = 0
    for info in infos:
        parts = member_parts(info.filename)
        where = f"member {info.filename!r}"
        if stat.S_ISLNK(info.external_attr >> 16):
            raise DownloadError(f"{where}: a symbolic link; the archive may hold only files")
        if info.is_dir():
            continue
        if info.flag_bits & 0x1:
            raise DownloadError(f"{where}: encrypted")
        key = "/".join(parts)
        if key in seen:
            raise DownloadError(f"{where}: the archive holds {key!r} twice")
        seen.add(key)
        if info.file_size > limits.member_bytes:
            raise DownloadError(
                f"{where}: {info.file_size} bytes, over the limit of {limits.member_bytes}"
            )
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > limits.ratio_floor_bytes and ratio > limits.ratio:
            raise DownloadError(
                f"{where}: compressed {ratio:.0f}:1, over the limit of {limits.ratio}:1 "
                "(a zip bomb?)"
            )
        total += info.file_size
        if total > limits.total_bytes:
            raise DownloadError(
                f"{where}: the files up to here hold {total} bytes, over the limit of "
                f"{limits.total_bytes}"
            )
        files[info.filename] = parts
    return files


def split_files(files: dict[str, list[str]]) -> dict[str, list[str]]:
    """The files inside the split folders (``trainA``, ...), as member name -> path below the
    folder that holds the splits (``NAME/`` in the official zips, or the archive's top)."""
    files = {n: p for n, p in files.items() if p[0] not in IGNORED_TOP_FOLDERS}
    roots: set[tuple[str, ...]] = set()
    for parts in files.values():
        at = next((i for i, p in enumerate(parts[:-1]) if p in DATASET_NAMES), None)
        if at is not None:
            roots.add(tuple(parts[:at]))
    if not roots:
        top = sorted({parts[0] for parts in files.values()})[:10]
        raise DownloadError(
            f"no {', '.join(DATASET_NAMES)} folders in the archive (it holds: {', '.join(top)})"
        )
    if len(roots) > 1:
        shown = ", ".join("/".join(r) + "/" if r else "(top)" for r in sorted(roots))
        raise DownloadError(f"split folders in more than one place in the archive: {shown}")
    (root,) = roots
    depth = len(root)
    return {
        name: parts[depth:]
        for name, parts in files.items()
        if tuple(parts[:depth]) == root and len(parts) > depth + 1 and parts[depth] in DATASET_NAMES
    }


def extract(
    archive: zipfile.ZipFile, members: dict[str, list[str]], filesystem: pafs.FileSystem, base: str
) -> None:
    """Write ``members`` (name -> path parts) under ``base``, each no larger than its header
    says; raises :class:`DownloadError` naming a member that cannot be read."""
    folders: set[str] = set()
    for name, parts in members.items():
        target = posixpath.join(base, *parts)
        folder = posixpath.dirname(target)
        if folder not in folders:
            filesystem.create_dir(folder, recursive=True)
            folders.add(folder)
        info = archive.getinfo(name)
        written = 0
        try:
            with archive.open(info) as source, filesystem.open_output_stream(target) as out:
                while chunk := source.read(CHUNK_BYTES):
                    written += len(chunk)
                    if written > info.file_size:
                        raise DownloadError(f"member {name!r}: larger than its header says")
                    out.write(chunk)
        except (zipfile.BadZipFile, NotImplementedError, zlib.error, EOFError) as exc:
            raise DownloadError(f"member {name!r}: cannot be read ({exc})") from None


class _ArchiveFile(io.RawIOBase):
    """A pyarrow random-access file as the Python file :mod:`zipfile` expects: pyarrow refuses
    a seek before the start with ArrowInvalid where zipfile expects OSError (a short file)."""

    def __init__(self, native) -> None:
        self._native = native

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._native.tell()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        start = {io.SEEK_SET: 0, io.SEEK_CUR: self._native.tell(), io.SEEK_END: self._native.size()}
        position = start[whence] + offset
        if position < 0:
            raise OSError(errno.EINVAL, "seek before the start of the archive")
        return self._native.seek(position)

    def readinto(self, buffer) -> int:
        data = self._native.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def unpack(
    url: str, filesystem: pafs.FileSystem, zip_path: str, folder: str, limits: ZipLimits
) -> None:
    """Check the zip at ``zip_path`` (downloaded from ``url``) and extract its split folders
    into ``folder``; then delete the zip."""
    try:
        with (
            filesystem.open_input_file(zip_path) as native,
            io.BufferedReader(_ArchiveFile(native), HEADER_BUFFER_BYTES) as raw,
            zipfile.ZipFile(raw) as archive,
        ):
            extract(archive, split_files(checked_files(archive, limits)), filesystem, folder)
    except zipfile.BadZipFile as exc:
        raise DownloadError(f"{url}: not a zip archive ({exc})") from None
    except DownloadError as exc:
        raise DownloadError(f"{url}: {exc}") from None
    # The images are out: the archive's room goes back before the shards take theirs.
    filesystem.delete_file(zip_path)


def download_official(
    name: str,
    dest: str,
    *,
    base_url: str = OFFICIAL_BASE_URL,
    sha256: str | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
    limits: ZipLimits = DEFAULT_LIMITS,
) -> dict:
    """Download the official dataset ``name`` and import it as shards under ``dest``.

    Returns :func:`pipeline.image_import.prepare`'s summary plus ``url`` and ``sha256`` (the
    archive's, also printed on stderr once downloaded). A ``sha256`` that does not match
    refuses the archive before it is opened. Raises :class:`DownloadError`,
    :class:`pipeline.image_import.PrepareError`, :class:`pipeline.shards.DatasetError` or
    :class:`pipeline.storage.StorageError`; DEST then holds nothing new (the folders this call
    created for a local DEST are removed).
    """
    url = dataset_url(name, base_url)
    expected = (sha256 or "").strip().lower() or None
    if expected is not None and not _SHA256.match(expected):
        raise DownloadError(f"--sha256 {sha256!r}: not 64 hex digits")
    filesystem, dest_path = storage.resolve(dest)
    created = _first_missing(dest_path) if isinstance(filesystem, pafs.LocalFileSystem) else None
    work = storage.join(dest, WORK_PREFIX + name)
    _, work_path = storage.resolve(work)
    try:
        # Refuse a DEST that holds a dataset (without overwrite) before, not after, the download.
        storage.check_access(dest, write=True)
        if not overwrite:
            _refuse_a_dataset(dest)
        _remove_folder(filesystem, work_path)  # a killed run's
        try:
            filesystem.create_dir(work_path, recursive=True)
            zip_path = posixpath.join(work_path, f"{name}.zip")
            digest = fetch(url, filesystem, zip_path, limits, progress)
            print(f"{url}: sha256 {digest}", file=sys.stderr)
            if expected is not None and digest != expected:
                raise DownloadError(
                    f"{url}: SHA-256 {digest} does not match the expected {expected}; "
                    "nothing was imported"
                )
            unpack(url, filesystem, zip_path, posixpath.join(work_path, "extracted"), limits)
        except OSError as exc:  # pyarrow's, writing to or reading from the work folder
            raise storage.wrap_error(work, exc, "download") from None
        summary = prepare(
            storage.join(work, "extracted"), dest, overwrite=overwrite, progress=progress
        )
        # The manifest names where the images came from: the URL, not the work folder.
        manifest = read_manifest(dest, check_shards=False)
        write_manifest(dest, build_manifest(url, manifest.datasets, manifest.paired_test))
    except BaseException:
        _remove_folder(filesystem, work_path)
        if created:
            shutil.rmtree(created, ignore_errors=True)
        raise
    _remove_folder(filesystem, work_path)
    return {**summary, "url": url, "sha256": digest}


def _first_missing(path: str) -> str | None:
    """The outermost folder of local ``path`` that does not exist yet (``path`` itself, or
    one of its parents), or None if ``path`` exists: what this run creates, and removes again
    if it fails."""
    missing = None
    while not os.path.exists(path):
        missing, path = path, os.path.dirname(path)
    return missing


def _refuse_a_dataset(dest: str) -> None:
    """Raise :class:`DownloadError` if ``dest`` already holds a dataset."""
    filesystem, base = storage.resolve(dest)
    if filesystem.get_file_info(posixpath.join(base, MANIFEST_NAME)).type != pafs.FileType.NotFound:
        raise DownloadError(
            f"{storage.redact(dest)}: already holds a dataset ({MANIFEST_NAME}); pass "
            "--overwrite to replace it"
        )


def _remove_folder(filesystem: pafs.FileSystem, path: str) -> None:
    """Remove the work folder at ``path`` if it is there; a failure is reported, not raised,
    so it never hides the error being handled."""
    try:
        if filesystem.get_file_info(path).type != pafs.FileType.NotFound:
            filesystem.delete_dir(path)
    except Exception as exc:
        print(f"warning: could not remove {path}: {storage.redact(str(exc))}", file=sys.stderr)
