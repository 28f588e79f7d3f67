"""Image folders to the Parquet shards that training reads (see ``pipeline.shards``): find the
source folders, validate and (re)encode every image, write the shards and the manifest last.
"""

from __future__ import annotations

import posixpath
import sys
import time
from dataclasses import dataclass

import pyarrow.fs as pafs
from PIL import Image

from pipeline import storage
from pipeline.images import BadImage, decode, encode_image
from pipeline.progress import progress_bar
from pipeline.shards import (
    DATASET_NAMES,
    DEFAULT_SHARD_BYTES,
    ShardWriter,
    build_manifest,
    delete_files,
    remove_unlisted_shards,
    start_dataset,
    write_manifest,
)
from pipeline.storage import IMAGE_EXTENSIONS, ImageListing, list_images

REENCODE_CHOICES = ("none", "jpeg", "png", "webp")
QUALITY = 95
MIB = 1024 * 1024


class PrepareError(RuntimeError):
    """The inputs or options of a prepare run are unusable; the message says which and why."""


@dataclass(frozen=True)
class SourceDataset:
    """One domain/split to write: its dataset name and the folder URI its images come from."""

    name: str
    folder: str


def find_sources(
    src: str | None, a: str | None = None, b: str | None = None, splits: list[str] | None = None
) -> list[SourceDataset]:
    """The datasets to write: ``--a``/``--b`` as trainA/trainB, or SRC's official-layout folders."""
    if (a is None) != (b is None):
        raise PrepareError("--a and --b go together: give both domain folders")
    if a is not None:
        if src is not None:
            raise PrepareError(f"give either SRC ({src}) or --a/--b, not both")
        found = [SourceDataset("trainA", a), SourceDataset("trainB", b)]
        for dataset in found:
            _check_folder(dataset.folder, f"--{dataset.name[-1].lower()}")
    else:
        if src is None:
            raise PrepareError("no source: give SRC or --a DIR --b DIR")
        _check_folder(src, "SRC")
        filesystem, base = storage.resolve(src)
        found = [
            SourceDataset(name, storage.join(src, name))
            for name in DATASET_NAMES
            if filesystem.get_file_info(posixpath.join(base, name)).type == pafs.FileType.Directory
        ]
        if not found:
            raise PrepareError(
                f"{src}: no {', '.join(DATASET_NAMES)} folders inside; use that layout or "
                "give the two domains with --a DIR --b DIR"
            )
    if splits:
        available = [d.name for d in found]
        absent = [s for s in splits if s not in available]
        if absent:
            raise PrepareError(
                f"--splits {' '.join(absent)}: not in the source (found: {', '.join(available)})"
            )
        found = [d for d in found if d.name in splits]
    return found


def _check_folder(uri: str, what: str) -> None:
    try:
        storage.check_access(uri, write=False)
    except storage.StorageError as exc:
        if exc.kind == "missing":
            raise PrepareError(f"{what} {storage.redact(uri)} does not exist") from None
        raise
    filesystem, path = storage.resolve(uri)
    if filesystem.get_file_info(path).type != pafs.FileType.Directory:
        raise PrepareError(f"{what} {storage.redact(uri)} is not a folder")


def _stored_bytes(
    data: bytes, key: str, reencode: str, max_side: int | None
) -> tuple[bytes, int, int, str]:
    """(bytes, width, height, format) to store for one source file; BadImage if unusable."""
    decoded = decode(data, key)
    img = decoded.image
    if max_side and max(img.size) > max_side:
        scale = max_side / max(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.Resampling.LANCZOS)
        fmt = (
            reencode.upper()
            if reencode != "none"
            else ("JPEG" if decoded.format == "JPEG" else "PNG")
        )
    elif reencode != "none":
        fmt = reencode.upper()
    elif decoded.stored_as_is:
        return data, img.width, img.height, decoded.format
    else:
        fmt = "PNG"
    return encode_image(img, fmt, QUALITY), img.width, img.height, fmt


def _list_all(datasets: list[SourceDataset], strict: bool) -> dict[str, ImageListing]:
    """The images of every dataset, listed before anything is written so an empty one (or,
    with ``strict``, one with a symlink left out) fails early."""
    listings = {}
    for dataset in datasets:
        listing = listings[dataset.name] = list_images(dataset.folder)
        if strict and listing.skipped:
            key, reason = listing.skipped[0]
            raise PrepareError(
                f"{dataset.name}/{key}: {reason} (--strict stops at the first bad file; source "
                f"{storage.redact(dataset.folder)})"
            )
        if not listing.keys:
            raise PrepareError(
                f"{dataset.name}: no images in {storage.redact(dataset.folder)} "
                f"(looked for {' '.join(IMAGE_EXTENSIONS)}; found {listing.others} other files"
                f"{f', {len(listing.skipped)} symlinks left out' if listing.skipped else ''})"
            )
    return listings


def _write_dataset(
    dataset: SourceDataset,
    listing: ImageListing,
    dest: str,
    *,
    strict: bool,
    reencode: str,
    max_side: int | None,
    shard_bytes: int,
    generation: str,
    written: list[str],
    progress: bool | None,
) -> dict:
    filesystem, base = storage.resolve(dataset.folder)
    keys = listing.keys
    with (
        ShardWriter(dest, dataset.name, shard_bytes, generation) as writer,
        progress_bar(dataset.name, len(keys), progress) as bar,
    ):
        for key, reason in listing.skipped:
            writer.skip(key, reason)
        for key in keys:
            path = posixpath.join(base, key)
            try:
                with filesystem.open_input_stream(path) as stream:
                    data = stream.read()
            except Exception as exc:
                raise storage.wrap_error(storage.join(dataset.folder, key), exc, "read") from None
            try:
                stored, width, height, fmt = _stored_bytes(data, key, reencode, max_side)
            except BadImage as exc:
                if strict:
                    raise PrepareError(
                        f"{dataset.name}/{key}: {exc.reason} (--strict stops at the first bad "
                        f"file; source {storage.redact(dataset.folder)})"
                    ) from None
                writer.skip(key, exc.reason)
            else:
                writer.add(key, stored, width, height, fmt)
            bar.update()
        entry = writer.close()
        written.extend(writer.written)
    if entry["count"] == 0:
        raise PrepareError(
            f"{dataset.name}: none of the {len(keys)} images in "
            f"{storage.redact(dataset.folder)} could be used (first: "
            f"{entry['skipped'][0]['key']}: {entry['skipped'][0]['reason']})"
        )
    return entry


def prepare(
    src: str | None,
    dest: str,
    *,
    a: str | None = None,
    b: str | None = None,
    strict: bool = False,
    overwrite: bool = False,
    reencode: str = "none",
    max_side: int | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    splits: list[str] | None = None,
    progress: bool | None = None,
) -> dict:
    """Write the shards and manifest of SRC (or ``a``/``b``) under ``dest``; return a summary.

    The summary: ``{"dest", "manifest", "datasets": {name: {"count", "bytes", "skipped",
    "shards"}}, "skipped": [{"dataset", "key", "reason"}], "images", "bytes", "seconds"}``.
    Raises :class:`PrepareError`, :class:`pipeline.storage.StorageError` or
    :class:`pipeline.shards.DatasetError`; no manifest is written then. With ``overwrite`` the
    old dataset stays whole and readable until the new one is: see ``pipeline.shards``.
    ``progress``: a bar per dataset on stderr (None: only when stderr is a terminal).
    """
    # Long on purpose: the checks that must all pass before anything is written, then the write, in order.
    if reencode not in REENCODE_CHOICES:
        raise PrepareError(f"--reencode {reencode!r} is not one of {', '.join(REENCODE_CHOICES)}")
    if max_side is not None and max_side < 1:
        raise PrepareError(f"--max-side must be at least 1, got {max_side}")
    if shard_bytes < 1:
        raise PrepareError(f"--shard-size-mb must be positive, got {shard_bytes / MIB}")
    start = time.monotonic()
    datasets = find_sources(src, a, b, splits)
    listings = _list_all(datasets, strict)
    generation = start_dataset(dest, overwrite)
    entries: dict[str, dict] = {}
    written: list[str] = []
    dest_fs, _ = storage.resolve(dest)
    try:
        for dataset in datasets:
            entries[dataset.name] = _write_dataset(
                dataset,
                listings[dataset.name],
                dest,
                strict=strict,
                reencode=reencode,
                max_side=max_side,
                shard_bytes=shard_bytes,
                generation=generation,
                written=written,
                progress=progress,
            )
        source = src if src is not None else f"--a {a} --b {b}"
        manifest = build_manifest(storage.redact(source), entries)
        # The switch: until this replaces it, the old manifest (and its shards) is the dataset.
        manifest_uri = write_manifest(dest, manifest)
    except BaseException:
        # Without a manifest the shards are unreachable; remove them rather than leave debris.
        delete_files(dest_fs, written)
        raise
    for uri in remove_unlisted_shards(dest, manifest):
        print(f"warning: old shards left in place: {storage.redact(uri)}", file=sys.stderr)
    skipped = [
        {"dataset": name, **item} for name, entry in entries.items() for item in entry["skipped"]
    ]
    return {
        "dest": dest,
        "manifest": manifest_uri,
        "datasets": {
            name: {
                "count": e["count"],
                "bytes": e["bytes"],
                "skipped": len(e["skipped"]),
                "shards": len(e["shards"]),
            }
            for name, e in entries.items()
        },
        "skipped": skipped,
        "images": sum(e["count"] for e in entries.values()),
        "bytes": sum(e["bytes"] for e in entries.values()),
        "seconds": round(time.monotonic() - start, 3),
    }
