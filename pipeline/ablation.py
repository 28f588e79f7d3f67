"""The paper's loss ablation: the same training with loss terms switched off, at equal steps.

    python -m pipeline.ablation --preset demo --max-steps 1500
    python -m pipeline.ablation --preset paper128 --data s3://bucket/cityscapes --gpu \\
        --variants gan_alone,cyclegan

Each variant is a full ``pipeline.train`` run (a child of one MLflow run for the whole
ablation), evaluated at its last step on the paired test split. The table lists
photo->labels per-pixel accuracy, per-class accuracy and class IoU (the paper's FCN-score
columns) and labels->photo L1. Identity loss is off in every variant, as in the paper's
Cityscapes experiments (``--set loss.lambda_identity=...`` puts it back in all of them).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from pipeline import config as C
from pipeline import exit_with
from pipeline.config import Config
from pipeline.train import (
    add_config_flags,
    build_config,
    config_args,
    new_run_name,
    run_dir_exists,
)

# Domain A is the label maps, B the photos: the forward cycle is A -> B -> A (lambda_A).
VARIANTS: dict[str, tuple[str, dict]] = {
    "cycle_alone": ("Cycle alone", {"lambda_gan": 0.0}),
    "gan_alone": ("GAN alone", {"lambda_A": 0.0, "lambda_B": 0.0}),
    "gan_forward": ("GAN + forward cycle", {"lambda_B": 0.0}),
    "gan_backward": ("GAN + backward cycle", {"lambda_A": 0.0}),
    "cyclegan": ("CycleGAN", {}),
}
COLUMNS = (
    ("eval/per_pixel_acc", "Per-pixel acc."),
    ("eval/per_class_acc", "Per-class acc."),
    ("eval/class_iou", "Class IOU"),
    ("eval/l1_AtoB", "labels->photo L1"),
)


def parse_variants(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        raise ValueError(
            f"--variants {text!r}: unknown {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(VARIANTS)}"
        )
    return names


def variant_config(base: Config, variant: str, name: str) -> Config:
    """``base`` with the variant's loss terms off; a run named ``NAME-VARIANT``."""
    loss = dict(VARIANTS[variant][1])
    return C.merge(base, {"loss": loss, "storage": {"name": f"{name}-{variant}", "resume": False}})


def table(rows: list[dict]) -> str:
    """The paper-style Markdown table of the rows (``variant``, ``steps`` and the columns)."""
    head = ["Loss", *(title for _, title in COLUMNS), "Steps"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for row in rows:
        cells = [VARIANTS[row["variant"]][0]]
        for key, _ in COLUMNS:
            value = row.get(key)
            cells.append("-" if value is None else f"{value:.3f}")
        cells.append(str(row.get("steps", "-")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def ablate(args: argparse.Namespace) -> dict:
    from pipeline import tracking
    from pipeline.data import check_dataset
    from pipeline.shards import read_manifest
    from pipeline.storage import join, resolve, write_bytes_atomic
    from pipeline.train import run

    variants = parse_variants(args.variants)
    base = build_config(config_args(args))
    if "loss.lambda_identity" not in " ".join(args.set):
        base = C.merge(base, {"loss": {"lambda_identity": 0.0}})
    manifest = read_manifest(base.data.resolved_uri())
    check_dataset(manifest, base.data)
    if not manifest.paired_test:
        raise ValueError(
            f"--data {base.data.resolved_uri()}: the ablation scores photo->labels on a paired "
            "test split (testA/testB of the same scenes), which this dataset lacks"
        )
    name = args.name or new_run_name(base).replace(base.preset, "ablation", 1)
    taken = [v for v in variants if run_dir_exists(base, f"{name}-{v}")]
    if taken:
        raise ValueError(f"--name {name}: runs {', '.join(f'{name}-{v}' for v in taken)} exist")
    parent = tracking.start_run(base, name, {"kind": "ablation", "ablation": name})
    print(f"[ablation] {name}: {', '.join(variants)}; MLflow parent run {parent}", flush=True)
    rows = []
    try:
        for variant in variants:
            started = time.time()
            result = run(variant_config(base, variant, name), parent_run_id=parent)
            row = {
                "variant": variant,
                "run": result.name,
                "mlflow_run_id": result.run_id,
                "steps": result.step,
                "seconds": round(time.time() - started, 1),
                **{k: result.metrics.get(k) for k, _ in COLUMNS},
            }
            rows.append(row)
            print(f"[ablation] {variant}: {json.dumps(row)}", flush=True)
    except BaseException:
        tracking.finish_run(base, parent, "FAILED")
        raise
    text = table(rows)
    out = join(base.storage.resolved_uri(), name)
    fs, path = resolve(out)
    fs.create_dir(path, recursive=True)
    write_bytes_atomic(fs, f"{path}/results.md", text.encode())
    write_bytes_atomic(fs, f"{path}/results.json", (json.dumps(rows, indent=2) + "\n").encode())
    try:
        client = tracking._client(base)
        client.log_text(parent, text, "results.md")
        client.log_dict(parent, rows, "results.json")
        for row in rows:
            for key, _ in COLUMNS:
                if row.get(key) is not None:
                    client.log_metric(parent, f"{row['variant']}/{key}", float(row[key]))
    except Exception as exc:  # the results are on storage either way
        print(f"[ablation] could not log results to MLflow: {exc}", file=sys.stderr)
    tracking.finish_run(base, parent, "FINISHED")
    print(text)
    print(f"[ablation] results: {out}/results.md")
    return {"name": name, "rows": rows, "results": f"{out}/results.md"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.ablation",
        description="Train with loss terms switched off and compare, as in the paper.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    add_config_flags(p)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated variants")
    p.add_argument("--name", help="ablation name (default ablation-DATE-TIME plus 4 hex digits)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipeline.shards import DatasetError
    from pipeline.storage import StorageError

    try:
        ablate(args)
    except (ValueError, DatasetError, StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    exit_with(main())
