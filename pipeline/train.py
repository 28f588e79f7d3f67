"""Train a CycleGAN on Ray Train, tracked in MLflow.

    make train                                   # demo preset on the built-in scenes
    python -m pipeline.train --preset demo
    python -m pipeline.train --preset paper --data s3://bucket/horse2zebra \\
        --storage s3://bucket/runs --num-workers 8 --gpu
    python -m pipeline.train --resume NAME       # continue a stopped run
    python -m pipeline.train --preset demo --set loss.lambda_A=5 --set train.precision=fp32
    ray job submit --working-dir . -- python -m pipeline.train --preset demo
"""

from __future__ import annotations

import argparse

from pipeline import exit_with
from pipeline.flags import add_config_flags, run_command


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.train",
        description="Train CycleGAN with Ray Train; track it in MLflow.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    add_config_flags(p)
    p.add_argument("--name", help="name of a new run (default: PRESET-DATE-TIME plus 4 hex digits)")
    p.add_argument(
        "--resume", metavar="NAME", help="continue the run NAME from its latest checkpoint"
    )
    p.add_argument(
        "--register", metavar="MODEL", help="register the generators as MODEL-AtoB/-BtoA"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        from pipeline import console
        from pipeline.api import train_from_args

        print(console.summary(train_from_args(args)), flush=True)
        return 0

    return run_command(body, "training")


if __name__ == "__main__":
    exit_with(main())
