"""Search CycleGAN hyperparameters with Ray Tune; every trial is a real training run.

    python -m pipeline.tune --preset demo --num-samples 8
    python -m pipeline.tune --preset demo --space loss.lambda_cyc=loguniform:1:30 \\
        --space loss.pool_size=choice:0,10,50,100 --space optim.lr=loguniform:5e-5:5e-4
    python -m pipeline.tune --preset paper128 --data s3://bucket/cityscapes --num-workers 2 --gpu
    python -m pipeline.tune --resume SWEEP          # continue an interrupted sweep
    python -m pipeline.train --config runs/tune/SWEEP/best_config.yaml   # train the winner

Each trial runs the same pipeline as ``pipeline.train`` (same data path, step, checkpoints,
MLflow logging, as a child run of the sweep's MLflow run) and reports the evaluation on the
paired test split (``eval/class_iou`` of photo->labels by default). ASHA stops weak trials early.
"""

from __future__ import annotations

import argparse
import time

from pipeline import exit_with
from pipeline.flags import add_config_flags, run_command

DEFAULT_SPACE_HELP = "loss.lambda_cyc=loguniform:1:30 loss.pool_size=choice:0,10,50,100"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.tune",
        description="Hyperparameter search over training runs with Ray Tune.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    add_config_flags(p)
    p.add_argument("--space", action="append", default=[], metavar="KEY=KIND:ARGS",
                   help=f"a searched field (repeatable; default: {DEFAULT_SPACE_HELP})")  # fmt: skip
    p.add_argument("--num-samples", type=int, default=4, help="trials (per grid point)")
    p.add_argument("--scheduler", choices=("asha", "pbt", "fifo"), default="asha",
                   help="asha stops weak trials early; pbt copies strong trials into weak ones "
                   "and perturbs lr/loss weights (one process per trial)")  # fmt: skip
    p.add_argument("--perturbation-interval", type=int, default=2,
                   help="PBT: reports (checkpoints) between exploit/explore steps")  # fmt: skip
    p.add_argument("--synch", action="store_true",
                   help="PBT: trials wait for each other at every perturbation point, so the "
                   "copies do not depend on which trial runs faster")  # fmt: skip
    p.add_argument("--grace-period", type=int, default=2, help="ASHA: reports before a stop")
    p.add_argument("--metric", default="eval/class_iou", help="reported metric to optimise")
    p.add_argument("--mode", choices=("max", "min"), default="max")
    p.add_argument("--max-concurrent", type=int, default=2, help="trials running at once")
    p.add_argument("--name", help="sweep name (default tune-DATE-TIME plus 4 hex digits)")
    p.add_argument("--resume", metavar="SWEEP", help="continue an interrupted sweep")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        from pipeline.api import tune_from_args
        from pipeline.search import SweepSettings

        if args.synch and args.scheduler != "pbt":
            raise ValueError("--synch is a setting of --scheduler pbt")
        started = time.time()
        settings = SweepSettings(
            space=tuple(args.space),
            metric=args.metric,
            mode=args.mode,
            scheduler=args.scheduler,
            num_samples=args.num_samples,
            max_concurrent=args.max_concurrent,
            grace_period=args.grace_period,
            perturbation_interval=args.perturbation_interval,
            synch=args.synch,
        )
        summary = tune_from_args(args, settings)
        print(summary["table"])
        print(f"[tune] best {summary['metric']} = {summary['best_value']:.4f} "
              f"with {summary['best_params']}")  # fmt: skip
        print(f"[tune] best config: {summary['best_config']}")
        print(f"[tune] best trial's checkpoints: {summary['best_run']}")
        print(f"[tune] {summary['trials']} trials in {time.time() - started:.0f}s")
        return 0

    return run_command(body, "the sweep")


if __name__ == "__main__":
    exit_with(main())
