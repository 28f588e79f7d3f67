"""Write a built-in procedural dataset (see :mod:`pipeline.scenes`).

Usage::

    python -m pipeline.synth scenes runs/data/scenes                      # 1000/1000/100 at 128 px
    python -m pipeline.synth scenes /tmp/tiny --size 64 --train-a 50 --train-b 50 --test 10
    python -m pipeline.synth scenes s3://bucket/scenes --seed 1 --overwrite

``scenes`` writes street-scene label maps as trainA/testA and their rendered photos as
trainB/testB (trainA and trainB show different scenes; the test split is paired), as PNG in
Parquet shards with a manifest. The same seed gives the same bytes. Exit status: 0 on success, 2 on
a bad input (the error names it), 1 on any other failure.
"""

from __future__ import annotations

import argparse

from pipeline import exit_with
from pipeline.flags import add_progress_flag, run_command


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.synth", description="Write a built-in procedural dataset."
    )
    parser.add_argument(
        "dataset", choices=["scenes"], help="which dataset (scenes: labels->photos)"
    )
    parser.add_argument("dest", metavar="DEST", help="dataset root to create (path or URI)")
    parser.add_argument("--size", type=int, default=128, help="image side in px (default 128)")
    parser.add_argument("--train-a", type=int, default=1000, help="trainA images (default 1000)")
    parser.add_argument("--train-b", type=int, default=1000, help="trainB images (default 1000)")
    parser.add_argument("--test", type=int, default=100, help="paired test images (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset at DEST")
    add_progress_flag(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    def body() -> None:
        # Imported after parsing, so that --help loads nothing heavy (tests/test_help.py).
        from pipeline import storage
        from pipeline.scenes import write_scenes

        summary = write_scenes(
            args.dest,
            args.size,
            args.train_a,
            args.train_b,
            args.test,
            args.seed,
            args.overwrite,
            progress=args.progress,
        )
        counts = ", ".join(f"{name} {count}" for name, count in summary["datasets"].items())
        print(storage.redact(f"wrote {summary['manifest']}: {counts}"))
        print(
            f"{summary['images']} images, {summary['bytes'] / 2**20:.1f} MiB in "
            f"{summary['seconds']:.1f} s; rendering + PNG encoding: "
            f"{summary['images_per_min']} images/min on one core"
        )

    return run_command(body, "synth")


if __name__ == "__main__":
    exit_with(main())
