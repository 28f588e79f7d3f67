"""The shard format: images as Parquet shards under a dataset root, described by a manifest.

Layout of a dataset root (local folder or ``s3://``/``gs://`` URI)::

    ROOT/manifest.json              written last, in one atomic step
    ROOT/trainA/part-00000.parquet  one folder per domain/split: trainA, trainB, testA, testB
    ROOT/trainA/part-00001.parquet
    ...

Parquet columns: ``key`` (string, the image's relative POSIX path inside its domain folder),
``image`` (binary, encoded bytes), ``width`` and ``height`` (int32), ``format`` (string, e.g.
``JPEG``, ``PNG``).

``manifest.json``::

    {"format_version": 1, "created_at": "2026-11-28T14:31:00Z", "source": "...",
     "paired_test": false,
     "datasets": {"trainA": {"count": 1000, "bytes": 12345678,
                             "shards": ["trainA/part-00000.parquet", ...],
                             "skipped": [{"key": "x.jpg", "reason": "..."}]}, ...}}

``bytes`` is the total size of the encoded images. Only datasets that exist appear. A root
without a manifest is not a dataset, so an interrupted write never looks complete.

Replacing a dataset (``--overwrite``) never deletes the old one first: :func:`start_dataset`
picks a generation id, the new shards are written beside the old ones under names that carry it
(``trainA/part-1f2e3d4c-00000.parquet``), :func:`write_manifest` switches to them by replacing
the manifest atomically, and only then :func:`remove_unlisted_shards` deletes the old shards.
Until the switch readers see the old dataset, whole; a write that fails half-way deletes its own
shards and leaves the old dataset be. No rename is needed, which object stores do not have.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import storage

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
DATASET_NAMES = ("trainA", "trainB", "testA", "testB")
DEFAULT_SHARD_BYTES = 64 * 1024 * 1024
# Row groups are the unit a streaming reader fetches; a few MiB keeps reader memory flat.
ROW_GROUP_BYTES = 8 * 1024 * 1024
GENERATION_PATTERN = re.compile(r"^[0-9a-f]{8}$")
SHARD_PATTERN = re.compile(r"^part-(?:[0-9a-f]{8}-)?(\d{5,})\.parquet$")

SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("format", pa.string(), nullable=False),
    ]
)


class DatasetError(RuntimeError):
    """A dataset root that cannot be read or written as asked; the message names the root."""


def shard_name(index: int, generation: str = "") -> str:
    """The file name of shard ``index``: ``part-00000.parquet``, ``part-00001.parquet``, ...;
    with a ``generation`` (see :func:`start_dataset`) ``part-<generation>-00000.parquet``."""
    return f"part-{generation}-{index:05d}.parquet" if generation else f"part-{index:05d}.parquet"


def _check_name(name: str) -> None:
    if name not in DATASET_NAMES:
        raise ValueError(f"dataset name {name!r} is not one of {', '.join(DATASET_NAMES)}")


def check_key(key: str) -> None:
    """Refuse a key that is not a relative POSIX path inside its folder (``../x``, ``/x``,
    ``a//b``, ``a\\b``): keys are written by ShardWriter and turned into paths by readers."""
    parts = key.split("/")
    if not key or key.startswith("/") or "\\" in key or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"key {key!r} is not a relative POSIX path")


class ShardWriter:
    """Writes one dataset (e.g. ``trainA``) of a root as Parquet shards.

    Use as a context manager; :meth:`add` appends an image, :meth:`skip` records a rejected
    one, and closing returns the dataset's manifest entry. A new shard starts once the current
    one holds ``shard_bytes`` of image data. Leaving the block with an exception deletes the
    shards written so far. ``generation`` (from :func:`start_dataset`) goes into the shard
    names, so they never collide with the shards of a dataset being replaced.
    """

    def __init__(
        self,
        root_uri: str,
        name: str,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        generation: str = "",
    ) -> None:
        _check_name(name)
        if shard_bytes <= 0:
            raise ValueError(f"shard_bytes: must be positive, got {shard_bytes}")
        if generation and not GENERATION_PATTERN.match(generation):
            raise ValueError(f"generation: {generation!r} is not 8 hex digits")
        self.root_uri = root_uri
        self.name = name
        self.shard_bytes = shard_bytes
        self.generation = generation
        self.filesystem, self._base = storage.resolve(root_uri)
        self._row_group_bytes = min(shard_bytes, ROW_GROUP_BYTES)
        self._keys: set[str] = set()
        self._skipped: list[dict[str, str]] = []
        self._shards: list[str] = []
        self._rows: dict[str, list] = {field.name: [] for field in SCHEMA}
        self._buffered_bytes = 0
        self._shard_bytes_written = 0
        self._writer: pq.ParquetWriter | None = None
        self._count = 0
        self._bytes = 0
        self._entry: dict | None = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    @property
    def written(self) -> list[str]:
        """Full paths (for :attr:`filesystem`) of the shards written so far."""
        return [posixpath.join(self._base, rel) for rel in self._shards]

    def add(self, key: str, image_bytes: bytes, width: int, height: int, fmt: str) -> None:
        """Append one encoded image under ``key`` (unique within the dataset)."""
        if self._entry is not None:
            raise RuntimeError(f"{self._uri()}: add() after close()")
        check_key(key)
        if key in self._keys:
            raise ValueError(f"{self._uri()}: duplicate key {key!r}")
        size = len(image_bytes)
        if self._writer is not None and self._shard_bytes_written + size > self.shard_bytes:
            self._finish_shard()
        self._keys.add(key)
        for column, value in zip(SCHEMA.names, (key, image_bytes, width, height, fmt), strict=True):
            self._rows[column].append(value)
        self._buffered_bytes += size
        self._shard_bytes_written += size
        self._count += 1
        self._bytes += size
        if self._writer is None:
            self._open_shard()
        if self._buffered_bytes >= self._row_group_bytes:
            self._flush()

    def skip(self, key: str, reason: str) -> None:
        """Record that ``key`` was left out and why (listed in the manifest)."""
        self._skipped.append({"key": key, "reason": reason})

    def close(self) -> dict:
        """Finish the last shard and return the manifest entry of this dataset."""
        if self._entry is None:
            if self._writer is not None:
                self._finish_shard()
            self._entry = {
                "count": self._count,
                "bytes": self._bytes,
                "shards": list(self._shards),
                "skipped": list(self._skipped),
            }
        return self._entry

    def abort(self) -> None:
        """Stop writing and delete the shards written so far (best effort)."""
        if self._writer is not None:
            # The stream may already be broken; the deletion below must still run.
            with contextlib.suppress(Exception):
                self._writer.close()
            self._writer = None
        delete_files(self.filesystem, self.written)
        self._shards = []

    def _uri(self) -> str:
        return storage.join(self.root_uri, self.name)

    def _open_shard(self) -> None:
        rel = f"{self.name}/{shard_name(len(self._shards), self.generation)}"
        path = posixpath.join(self._base, rel)
        try:
            if isinstance(self.filesystem, pafs.LocalFileSystem):
                self.filesystem.create_dir(posixpath.dirname(path), recursive=True)
            self._writer = pq.ParquetWriter(
                path,
                SCHEMA,
                filesystem=self.filesystem,
                # Encoded images do not compress further; the small columns do.
                compression={
                    "key": "zstd",
                    "image": "none",
                    "width": "zstd",
                    "height": "zstd",
                    "format": "zstd",
                },
                use_dictionary=["format"],
            )
        except Exception as exc:
            raise storage.wrap_error(storage.join(self.root_uri, rel), exc, "open shard") from None
        self._shards.append(rel)

    def _flush(self) -> None:
        if not self._rows["key"]:
            return
        table = pa.Table.from_pydict(self._rows, schema=SCHEMA)
        try:
            self._writer.write_table(table)
        except Exception as exc:
            raise storage.wrap_error(self._uri(), exc, "write shard") from None
        self._rows = {field.name: [] for field in SCHEMA}
        self._buffered_bytes = 0

    def _finish_shard(self) -> None:
        self._flush()
        try:
            self._writer.close()
        except Exception as exc:
            raise storage.wrap_error(self._uri(), exc, "close shard") from None
        self._writer = None
        self._shard_bytes_written = 0


def delete_files(filesystem: pafs.FileSystem, paths: list[str]) -> None:
    """Delete ``paths`` where they exist, ignoring failures (used to clean up after errors)."""
    for path in paths:
        # Cleanup must never hide the error that triggered it.
        with contextlib.suppress(Exception):
            filesystem.delete_file(path)


def build_manifest(source: str, datasets: dict[str, dict], paired_test: bool = False) -> dict:
    """A manifest dict for ``datasets`` (name -> entry from :meth:`ShardWriter.close`)."""
    for name in datasets:
        _check_name(name)
    return {
        "format_version": FORMAT_VERSION,
        "created_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "source": source,
        "paired_test": paired_test,
        "datasets": {name: datasets[name] for name in DATASET_NAMES if name in datasets},
    }


def write_manifest(root_uri: str, manifest: dict) -> str:
    """Write ``manifest`` as ``ROOT/manifest.json`` in one atomic step; return its URI."""
    _validate(root_uri, manifest)
    filesystem, base = storage.resolve(root_uri)
    data = (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode()
    uri = storage.join(root_uri, MANIFEST_NAME)
    try:
        storage.write_bytes_atomic(filesystem, posixpath.join(base, MANIFEST_NAME), data)
    except Exception as exc:
        raise storage.wrap_error(uri, exc, "write manifest") from None
    return uri


def _validate(root_uri: str, manifest: dict) -> None:
    where = storage.redact(storage.join(root_uri, MANIFEST_NAME))
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DatasetError(
            f"{where}: format_version {manifest.get('format_version')!r} is not {FORMAT_VERSION}"
        )
    datasets = manifest.get("datasets")
    if not isinstance(datasets, dict):
        raise DatasetError(f"{where}: 'datasets' is missing or not an object")
    for name, entry in datasets.items():
        if name not in DATASET_NAMES:
            raise DatasetError(f"{where}: unknown dataset {name!r}; expected {DATASET_NAMES}")
        for field, kind in (("count", int), ("bytes", int), ("shards", list), ("skipped", list)):
            if not isinstance(entry.get(field), kind):
                raise DatasetError(f"{where}: datasets.{name}.{field} is missing or not {kind}")


@dataclass
class Manifest:
    """A dataset root's manifest, with paths ready for :attr:`filesystem`."""

    root: str
    """The root URI as given."""
    filesystem: pafs.FileSystem
    """The filesystem holding the shards (from :func:`pipeline.storage.resolve`)."""
    base_path: str
    """The root's path on :attr:`filesystem`."""
    format_version: int
    created_at: str
    source: str
    paired_test: bool
    datasets: dict[str, dict]
    """Dataset name -> entry (``count``, ``bytes``, ``shards``, ``skipped``)."""

    def _entry(self, name: str) -> dict:
        if name not in self.datasets:
            valid = ", ".join(self.datasets) or "none"
            raise DatasetError(
                f"{storage.redact(self.root)}: no dataset {name!r} in the manifest "
                f"(it has: {valid})"
            )
        return self.datasets[name]

    def count(self, name: str) -> int:
        """The number of images in dataset ``name``."""
        return int(self._entry(name)["count"])

    def shard_paths(self, name: str) -> list[str]:
        """Full paths of dataset ``name``'s shards, usable with :attr:`filesystem`."""
        return [posixpath.join(self.base_path, rel) for rel in self._entry(name)["shards"]]

    def skipped(self, name: str) -> list[dict]:
        """The images of dataset ``name`` that were left out, with reasons."""
        return list(self._entry(name)["skipped"])


def read_manifest(root_uri: str, check_shards: bool = True) -> Manifest:
    """Load ``ROOT/manifest.json``; with ``check_shards``, also check every listed shard exists.

    Raises :class:`DatasetError` (no manifest, bad manifest, missing shards) or
    :class:`pipeline.storage.StorageError` (storage unreachable, access denied).
    """
    filesystem, base = storage.resolve(root_uri)
    uri = storage.join(root_uri, MANIFEST_NAME)
    try:
        with filesystem.open_input_stream(posixpath.join(base, MANIFEST_NAME)) as stream:
            raw = stream.read()
    except Exception as exc:
        error = storage.wrap_error(uri, exc, "read manifest")
        if error.kind in ("missing", "not_a_directory"):
            raise DatasetError(
                f"{storage.redact(root_uri)}: not a dataset root, {MANIFEST_NAME} not found "
                "(create one with python -m pipeline.prepare or python -m pipeline.synth)"
            ) from None
        raise error from None
    try:
        manifest = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{storage.redact(uri)}: not valid JSON ({exc})") from None
    _validate(root_uri, manifest)
    result = Manifest(
        root=root_uri,
        filesystem=filesystem,
        base_path=base,
        format_version=manifest["format_version"],
        created_at=manifest.get("created_at", ""),
        source=manifest.get("source", ""),
        paired_test=bool(manifest.get("paired_test", False)),
        datasets=manifest["datasets"],
    )
    if check_shards:
        _check_shards_exist(result)
    return result


def _check_shards_exist(manifest: Manifest) -> None:
    # One listing per dataset folder instead of one request per shard.
    for name in manifest.datasets:
        folder = posixpath.join(manifest.base_path, name)
        try:
            listing = manifest.filesystem.get_file_info(
                pafs.FileSelector(folder, allow_not_found=True)
            )
        except Exception as exc:
            raise storage.wrap_error(
                storage.join(manifest.root, name), exc, "list shards"
            ) from None
        present = {info.path.rstrip("/") for info in listing if info.type == pafs.FileType.File}
        missing = [p for p in manifest.shard_paths(name) if p not in present]
        if missing:
            shown = ", ".join(posixpath.relpath(p, manifest.base_path) for p in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise DatasetError(
                f"{storage.redact(manifest.root)}: the manifest lists shards that do not exist: "
                f"{shown}{more}"
            )


def _holds_dataset(root_uri: str, overwrite: bool) -> bool:
    """Check ``root_uri`` is writable and refuse an existing dataset unless ``overwrite``;
    whether it holds one."""
    storage.check_access(root_uri, write=True)
    filesystem, base = storage.resolve(root_uri)
    try:
        exists = (
            filesystem.get_file_info(posixpath.join(base, MANIFEST_NAME)).type == pafs.FileType.File
        )
    except Exception as exc:
        raise storage.wrap_error(root_uri, exc, "look for an old dataset") from None
    if exists and not overwrite:
        raise DatasetError(
            f"{storage.redact(root_uri)}: already holds a dataset ({MANIFEST_NAME}); "
            "pass --overwrite to replace it"
        )
    return exists


def start_dataset(root_uri: str, overwrite: bool) -> str:
    """Get ``root_uri`` ready for a new dataset without touching the one it may hold: check it
    is writable, refuse an existing dataset unless ``overwrite``; return the generation id to
    pass to :class:`ShardWriter` (``""`` when there is no dataset to replace). Finish with
    :func:`write_manifest`, then :func:`remove_unlisted_shards`."""
    return uuid.uuid4().hex[:8] if _holds_dataset(root_uri, overwrite) else ""


def remove_unlisted_shards(root_uri: str, manifest: dict) -> list[str]:
    """Delete the shard files in the dataset folders of ``root_uri`` that ``manifest`` (just
    written) does not list: those of the dataset it replaced, and any left by a killed run.
    Returns the URIs of those that could not be deleted; the new dataset is in place either
    way."""
    filesystem, base = storage.resolve(root_uri)
    listed = {
        posixpath.join(base, rel)
        for entry in manifest["datasets"].values()
        for rel in entry["shards"]
    }
    left: list[str] = []
    for name in DATASET_NAMES:
        folder = posixpath.join(base, name)
        try:
            stale = [p for p in _shard_files(filesystem, folder) if p not in listed]
        except Exception:
            left.append(storage.join(root_uri, name) + "/")
            continue
        for path in stale:
            try:
                filesystem.delete_file(path)
            except FileNotFoundError:
                pass
            except Exception:
                left.append(storage.join(root_uri, posixpath.relpath(path, base)))
        if name not in manifest["datasets"] and isinstance(filesystem, pafs.LocalFileSystem):
            # An emptied folder of a dataset the new one lacks would look like a leftover.
            with contextlib.suppress(OSError):
                os.rmdir(folder)
    return left


def _shard_files(filesystem: pafs.FileSystem, folder: str) -> list[str]:
    listing = filesystem.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    return [
        info.path
        for info in listing
        if info.type == pafs.FileType.File and SHARD_PATTERN.match(info.base_name)
    ]


def read_columns(
    manifest: Manifest, name: str, columns: list[str], limit: int | None = None
) -> pa.Table:
    """Some columns of a dataset's shards, read directly with pyarrow (first ``limit`` rows)."""
    tables, rows = [], 0
    for path in manifest.shard_paths(name):
        table = pq.read_table(path, columns=columns, filesystem=manifest.filesystem)
        tables.append(table)
        rows += table.num_rows
        if limit is not None and rows >= limit:
            break
    table = pa.concat_tables(tables)
    return table.slice(0, limit) if limit is not None else table
