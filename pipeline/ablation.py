"""The paper's loss ablation: the same training with loss terms switched off, at equal steps.

    python -m pipeline.ablation --preset demo --max-steps 1500
    python -m pipeline.ablation --preset paper128 --data s3://bucket/cityscapes --gpu \\
        --variants gan_alone,cyclegan

Each variant is a full ``pipeline.train`` run (a child of one MLflow run for the whole
ablation), evaluated at its last step on the paired test split. Identity loss is off in every
variant, as in the paper's Cityscapes experiments (``--set loss.lambda_identity=...`` puts it
back in all of them).
"""

from __future__ import annotations

import argparse

from pipeline import exit_with
from pipeline.flags import add_config_flags, build_config, for_runs_of, run_command

VARIANT_NAMES = "cycle_alone,gan_alone,gan_forward,gan_backward,cyclegan"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.ablation",
        description="Train with loss terms switched off and compare, as in the paper.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    add_config_flags(p)
    p.add_argument("--variants", default=VARIANT_NAMES, help="comma-separated variants")
    p.add_argument("--name", help="ablation name (default ablation-DATE-TIME plus 4 hex digits)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        from pipeline import config as C
        from pipeline import console, runs
        from pipeline.loss_ablation import ablate, parse_variants

        console.quiet_ray(args.verbose)
        variants = parse_variants(args.variants)
        base = build_config(for_runs_of(args))
        if "loss.lambda_identity" not in " ".join(args.set):
            base = C.merge(base, {"loss": {"lambda_identity": 0.0}})
        result = ablate(base, args.name or runs.new_run_name("ablation"), variants)
        print(result["table"])
        print(f"[ablation] results: {result['results']}")
        return 0

    return run_command(body, "the ablation")


if __name__ == "__main__":
    exit_with(main())
