"""Download an official CycleGAN dataset by name and write it as Parquet shards.

Usage::

    python -m pipeline.download horse2zebra data/horse2zebra
    python -m pipeline.download monet2photo s3://bucket/monet2photo --sha256 HEX
    python -m pipeline.download horse2zebra data/h2z --overwrite        # replace the dataset there
    python -m pipeline.download mini data/mini --url http://127.0.0.1:8000/datasets   # a mirror

NAME is one of the official repository's datasets (apple2orange, summer2winter_yosemite,
horse2zebra, monet2photo, cezanne2photo, ukiyoe2photo, vangogh2photo, maps, cityscapes, facades,
iphone2dslr_flower, ae_photos, mini, mini_pix2pix, mini_colorization, grumpifycat), fetched from
``https://efrosgans.eecs.berkeley.edu/cyclegan/datasets/NAME.zip`` (``--url`` replaces the part
before ``/NAME.zip``). That server does not serve cityscapes (its license): the command says
where to get it. Only zips with trainA/trainB/testA/testB folders can be imported. The zip goes to ``DEST/.download-NAME/`` and nowhere else; its SHA-256 is
printed, and checked when ``--sha256`` gives one. Its members are checked before any is
extracted (paths that leave the folder, links, size and compression limits), then the trainA,
trainB, testA and testB folders are imported as ``python -m pipeline.prepare`` would, and the
work folder is removed. On any error DEST is left as it was. Exit status: 0 on success, 2 on
a bad input (the error names it), 1 on any other failure.
"""

from __future__ import annotations

import argparse

from pipeline import exit_with
from pipeline.flags import add_progress_flag, run_command

MIB = 1024 * 1024


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.download",
        description="Download an official CycleGAN dataset and write it as Parquet shards.",
    )
    parser.add_argument("name", metavar="NAME", help="official dataset name, e.g. horse2zebra")
    parser.add_argument("dest", metavar="DEST", help="dataset root to create (path or URI)")
    parser.add_argument("--sha256", metavar="HEX", help="refuse the zip unless it has this hash")
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset at DEST")
    parser.add_argument(
        "--url",
        metavar="BASE",
        help="download BASE/NAME.zip instead of the official server's (a mirror)",
    )
    add_progress_flag(parser)
    return parser


def format_summary(summary: dict) -> str:
    """The datasets written, their counts, and the archive's URL and SHA-256."""
    lines = [f"wrote {summary['manifest']}"]
    for name, d in summary["datasets"].items():
        lines.append(
            f"{name:<8} {d['count']:>8} images {d['skipped']:>6} skipped "
            f"{d['bytes'] / MIB:>10.2f} MiB"
        )
    lines.append(f"sha256 {summary['sha256']}  {summary['url']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    def body() -> None:
        from pipeline import storage
        from pipeline.datasets import OFFICIAL_BASE_URL, download_official

        summary = download_official(
            args.name,
            args.dest,
            base_url=args.url or OFFICIAL_BASE_URL,
            sha256=args.sha256,
            overwrite=args.overwrite,
            progress=args.progress,
        )
        print(storage.redact(format_summary(summary)))

    return run_command(body, "download")


if __name__ == "__main__":
    exit_with(main())
