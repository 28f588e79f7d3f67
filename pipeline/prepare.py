"""Turn image folders into the Parquet shards that training reads (see ``pipeline.shards``).

Usage::

    python -m pipeline.prepare SRC DEST                  # SRC holds trainA/ trainB/ testA/ testB/
    python -m pipeline.prepare DEST --a horses/ --b zebras/   # two folders become trainA, trainB
    python -m pipeline.prepare ~/data/horse2zebra s3://bucket/horse2zebra --overwrite
    python -m pipeline.prepare SRC DEST --max-side 512 --reencode jpeg --splits trainA trainB

Folders are read recursively; ``.jpg .jpeg .png .webp .bmp .tif .tiff`` files (any case) are
images, in sorted order of their path inside the domain folder, which becomes their key.
Every image is decoded once to validate it. The original bytes are stored when they decode
straight to the right RGB pixels (RGB or gray JPEG/PNG/WEBP/BMP without EXIF rotation); other
images (TIFF, 16-bit, CMYK, transparency, palette, rotated) are stored as lossless PNG.
``--max-side`` shrinks larger images (stored as JPEG quality 95 if the source was JPEG, else
PNG); ``--reencode`` stores every image in one format (JPEG/WEBP at quality 95).

Unusable files are skipped and listed in the manifest and the summary; ``--strict`` stops at the
first one. Shards are written first and the manifest last, so an interrupted run never leaves a
manifest that names missing shards. Exit status: 0 on success, 1 on any error.
"""

from __future__ import annotations

import argparse
import posixpath
import sys
import time
import traceback
from dataclasses import dataclass

import pyarrow.fs as pafs
from PIL import Image

from pipeline import exit_with, storage
from pipeline.images import BadImage, decode, encode_image
from pipeline.shards import (
    DATASET_NAMES,
    DEFAULT_SHARD_BYTES,
    DatasetError,
    ShardWriter,
    build_manifest,
    clear_root,
    delete_files,
    write_manifest,
)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
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


def list_images(folder: str) -> tuple[list[str], int]:
    """Image keys under ``folder`` (sorted relative POSIX paths), and how many other files."""
    filesystem, base = storage.resolve(folder)
    try:
        infos = filesystem.get_file_info(pafs.FileSelector(base, recursive=True))
    except Exception as exc:
        raise storage.wrap_error(folder, exc, "list images") from None
    keys, others = [], 0
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        rel = posixpath.relpath(info.path.replace("\\", "/"), base.replace("\\", "/"))
        if rel.lower().endswith(IMAGE_EXTENSIONS):
            keys.append(rel)
        else:
            others += 1
    return sorted(keys), others


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


class Progress:
    """Progress on stderr: one redrawn line on a terminal, a line per quarter in logs."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total = label, total
        self.tty = sys.stderr.isatty()
        self.start = self.last = time.monotonic()
        self.next_fraction = 0.25

    def update(self, done: int) -> None:
        now = time.monotonic()
        if self.tty and (now - self.last > 0.2 or done == self.total):
            self.last = now
            rate = done / max(now - self.start, 1e-9)
            sys.stderr.write(f"\r{self.label}: {done}/{self.total} images ({rate:.0f}/s)")
            if done == self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()
        elif not self.tty and self.total >= 100 and done / self.total >= self.next_fraction:
            sys.stderr.write(f"{self.label}: {done}/{self.total} images\n")
            self.next_fraction += 0.25


def _list_all(datasets: list[SourceDataset]) -> dict[str, list[str]]:
    """Image keys of every dataset, listed before anything is written so an empty one fails early."""
    keys = {}
    for dataset in datasets:
        keys[dataset.name], others = list_images(dataset.folder)
        if not keys[dataset.name]:
            raise PrepareError(
                f"{dataset.name}: no images in {storage.redact(dataset.folder)} "
                f"(looked for {' '.join(IMAGE_EXTENSIONS)}; found {others} other files)"
            )
    return keys


def _write_dataset(
    dataset: SourceDataset,
    keys: list[str],
    dest: str,
    *,
    strict: bool,
    reencode: str,
    max_side: int | None,
    shard_bytes: int,
    written: list[str],
) -> dict:
    filesystem, base = storage.resolve(dataset.folder)
    progress = Progress(dataset.name, len(keys))
    with ShardWriter(dest, dataset.name, shard_bytes=shard_bytes) as writer:
        for done, key in enumerate(keys, 1):
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
            progress.update(done)
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
) -> dict:
    """Write the shards and manifest of SRC (or ``a``/``b``) under ``dest``; return a summary.

    The summary: ``{"dest", "manifest", "datasets": {name: {"count", "bytes", "skipped",
    "shards"}}, "skipped": [{"dataset", "key", "reason"}], "images", "bytes", "seconds"}``.
    Raises :class:`PrepareError`, :class:`pipeline.storage.StorageError` or
    :class:`pipeline.shards.DatasetError`; no manifest is written then.
    """
    if reencode not in REENCODE_CHOICES:
        raise PrepareError(f"--reencode {reencode!r} is not one of {', '.join(REENCODE_CHOICES)}")
    if max_side is not None and max_side < 1:
        raise PrepareError(f"--max-side must be at least 1, got {max_side}")
    if shard_bytes < 1:
        raise PrepareError(f"--shard-size-mb must be positive, got {shard_bytes / MIB}")
    start = time.monotonic()
    datasets = find_sources(src, a, b, splits)
    keys = _list_all(datasets)
    clear_root(dest, overwrite)
    entries: dict[str, dict] = {}
    written: list[str] = []
    dest_fs, _ = storage.resolve(dest)
    try:
        for dataset in datasets:
            entries[dataset.name] = _write_dataset(
                dataset,
                keys[dataset.name],
                dest,
                strict=strict,
                reencode=reencode,
                max_side=max_side,
                shard_bytes=shard_bytes,
                written=written,
            )
        source = src if src is not None else f"--a {a} --b {b}"
        manifest_uri = write_manifest(dest, build_manifest(storage.redact(source), entries))
    except BaseException:
        # Without a manifest the shards are unreachable; remove them rather than leave debris.
        delete_files(dest_fs, written)
        raise
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


def format_summary(summary: dict, max_listed: int = 20) -> str:
    """A human-readable summary of :func:`prepare`'s result."""
    lines = [f"wrote {summary['manifest']}"]
    lines.append(f"{'dataset':<8} {'images':>8} {'skipped':>8} {'shards':>7} {'MiB':>10}")
    for name, d in summary["datasets"].items():
        lines.append(
            f"{name:<8} {d['count']:>8} {d['skipped']:>8} {d['shards']:>7} "
            f"{d['bytes'] / MIB:>10.2f}"
        )
    lines.append(
        f"total: {summary['images']} images, {len(summary['skipped'])} skipped, "
        f"{summary['bytes'] / MIB:.2f} MiB in {summary['seconds']:.1f} s"
    )
    for item in summary["skipped"][:max_listed]:
        lines.append(f"  skipped {item['dataset']}/{item['key']}: {item['reason']}")
    if len(summary["skipped"]) > max_listed:
        lines.append(f"  ... and {len(summary['skipped']) - max_listed} more (see the manifest)")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.prepare",
        description="Write image folders as Parquet shards plus a manifest (local or s3:// gs://).",
    )
    parser.add_argument("src", nargs="?", metavar="SRC", help="folder with trainA/ trainB/ ...")
    parser.add_argument("dest", metavar="DEST", help="dataset root to create (path or URI)")
    parser.add_argument("--a", metavar="DIR", help="domain A folder (becomes trainA)")
    parser.add_argument("--b", metavar="DIR", help="domain B folder (becomes trainB)")
    parser.add_argument("--strict", action="store_true", help="fail on the first bad image")
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset at DEST")
    parser.add_argument(
        "--reencode",
        choices=REENCODE_CHOICES,
        default="none",
        help="store every image in this format (default: keep originals)",
    )
    parser.add_argument("--max-side", type=int, metavar="N", help="shrink longer sides to N px")
    parser.add_argument(
        "--shard-size-mb",
        type=float,
        default=DEFAULT_SHARD_BYTES / MIB,
        metavar="N",
        help="target shard size in MiB (default 64)",
    )
    parser.add_argument(
        "--splits",
        nargs="+",
        choices=DATASET_NAMES,
        metavar="NAME",
        help=f"only these datasets ({' '.join(DATASET_NAMES)})",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        summary = prepare(
            args.src,
            args.dest,
            a=args.a,
            b=args.b,
            strict=args.strict,
            overwrite=args.overwrite,
            reencode=args.reencode,
            max_side=args.max_side,
            shard_bytes=int(args.shard_size_mb * MIB),
            splits=args.splits,
        )
    except (PrepareError, DatasetError, storage.StorageError) as exc:
        print(f"error: {storage.redact(str(exc))}", file=sys.stderr)
        return 1
    except Exception:
        print(storage.redact(traceback.format_exc()), file=sys.stderr)
        return 1
    print(storage.redact(format_summary(summary)))
    return 0


if __name__ == "__main__":
    exit_with(main())
