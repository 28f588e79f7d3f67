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
manifest that names missing shards. Exit status: 0 on success, 2 on a bad input (the error
names it), 1 on any other failure.
"""

from __future__ import annotations

import argparse

from pipeline import exit_with
from pipeline.flags import add_progress_flag, run_command

MIB = 1024 * 1024
# The library's names and defaults, spelled here so that --help imports no pyarrow (the modules
# that own them do); tests/test_help.py keeps them equal to pipeline.shards' and image_import's.
SPLITS = ("trainA", "trainB", "testA", "testB")
REENCODE = ("none", "jpeg", "png", "webp")
SHARD_MB = 64


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
        choices=REENCODE,
        default="none",
        help="store every image in this format (default: keep originals)",
    )
    parser.add_argument("--max-side", type=int, metavar="N", help="shrink longer sides to N px")
    parser.add_argument(
        "--shard-size-mb",
        type=float,
        default=SHARD_MB,
        metavar="N",
        help=f"target shard size in MiB (default {SHARD_MB})",
    )
    parser.add_argument(
        "--splits",
        nargs="+",
        choices=SPLITS,
        metavar="NAME",
        help=f"only these datasets ({' '.join(SPLITS)})",
    )
    add_progress_flag(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    def body() -> None:
        # Imported after parsing, so that --help loads nothing heavy (tests/test_help.py).
        from pipeline import storage
        from pipeline.image_import import prepare

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
            progress=args.progress,
        )
        print(storage.redact(format_summary(summary)))

    return run_command(body, "prepare")


if __name__ == "__main__":
    exit_with(main())
