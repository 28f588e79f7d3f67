"""Evaluate trained generators on a dataset's test split; log the scores to the model's MLflow run.

    python -m pipeline.evaluate --model NAME                        # a run under $CYCLEGAN_HOME
    python -m pipeline.evaluate --model runs/checkpoints/NAME --data runs/data/scenes --limit 50
    python -m pipeline.evaluate --model runs:/RUN_ID --data s3://bucket/horse2zebra \\
        --fid-weights inception_v3.pth --out eval/h2z
    python -m pipeline.evaluate --model latest_net_G_A.pth --direction AtoB --data DATA \\
        --mlflow-run RUN_ID

Where the manifest says ``paired_test`` (the built-in scenes: testA holds the label maps of the
photos in testB under the same keys), the scores are those of the Cityscapes evaluation:
photo->labels (B->A) as ``per_pixel_acc``, ``per_class_acc`` and ``class_iou`` after mapping
each output pixel to the nearest class colour, and labels->photo (A->B) as ``l1_AtoB``, the mean
absolute error against the real photo in [0, 1] units. Otherwise ``fid_AtoB``/``kid_AtoB`` (and
``_BtoA``) compare translated test images with the real ones of the other domain, on Inception
features (``--fid-weights``, else a one-time download of the standard FID weights). With both generators, ``cycle_l1_A`` and
``cycle_l1_B`` measure how well A->B->A and B->A->B reconstruct their input.

Images are resized to the model's training crop size (``--size`` to choose, 0 for the stored
size). Outputs: ``metrics.json``, ``gallery_AtoB.png``/``gallery_BtoA.png`` (columns: input,
output, reconstruction, ground truth where present) and ``index.html`` in ``--out``; the
metrics go to MLflow as ``eval/NAME`` at the checkpoint's step, the files as artifacts under
``eval/``, in the run the model came from (or ``--mlflow-run``).
"""

from __future__ import annotations

import argparse
import os
import sys

from pipeline import exit_with
from pipeline.flags import add_model_flags


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.evaluate",
        description="Score trained CycleGAN generators on a test split and log to MLflow.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    add_model_flags(p)
    p.add_argument("--data", "--dataroot", help="dataset root (default: the model's training data)")
    p.add_argument("--split", default="test", choices=("test", "train"), help="default test")
    p.add_argument("--out", help="folder for the report (default $CYCLEGAN_HOME/eval/NAME-TIME)")
    p.add_argument(
        "--fid-weights",
        metavar="PATH",
        help="Inception weights for FID/KID: the standard FID network's "
        "pt_inception-2015-12-05-*.pth (published-comparable scores) or a torchvision "
        "inception_v3 state dict",
    )
    p.add_argument("--limit", type=int, help="evaluate the first N images of each domain")
    p.add_argument("--size", type=int, help="resize images to N x N (default: training crop)")
    p.add_argument(
        "--direction",
        choices=("AtoB", "BtoA"),
        help="evaluate one direction only (for a .pth file: the way it translates; default AtoB)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    p.add_argument("--mlflow-run", metavar="RUN_ID", help="log to this run instead")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Imported after parsing, so that --help loads nothing heavy (tests/test_help.py).
    from pipeline.api import evaluate_from_args
    from pipeline.eval_report import format_table, log_to_mlflow
    from pipeline.models import ModelSourceError
    from pipeline.shards import DatasetError
    from pipeline.storage import StorageError, redact

    try:
        result, info, out = evaluate_from_args(args)
    except (ModelSourceError, ValueError, DatasetError, StorageError, RuntimeError) as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return 2
    print(format_table(result["metrics"]))
    print(
        f"[evaluate] {result['images']['A']} A / {result['images']['B']} B images"
        + (f", features of {result['fid_network']}" if result.get("fid_network") else "")
        + " in "
        f"{result['seconds']:.1f} s; report: {os.path.join(out, 'index.html')}",
        flush=True,
    )
    run_id = result["mlflow_run_id"]
    if not run_id:
        print("[evaluate] no MLflow run to log to (pass --mlflow-run RUN_ID)", flush=True)
        return 0
    # Where results go is the user's choice alone ($MLFLOW_TRACKING_URI or the home's store),
    # never a URI stored in the checkpoint.
    from pipeline.config import default_tracking_uri

    tracking_uri = default_tracking_uri()
    try:
        log_to_mlflow(result, out, run_id, tracking_uri, info.get("step") or 0)
    except Exception as exc:
        print(
            f"error: logging to MLflow run {run_id} at {redact(tracking_uri)} failed: "
            f"{redact(str(exc))}",
            file=sys.stderr,
        )
        return 1
    print(f"[evaluate] logged eval/* to MLflow run {run_id} at {redact(tracking_uri)}", flush=True)
    return 0


if __name__ == "__main__":
    exit_with(main())
