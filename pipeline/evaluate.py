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
features (``--fid-weights`` or torchvision's download). With both generators, ``cycle_l1_A`` and
``cycle_l1_B`` measure how well A->B->A and B->A->B reconstruct their input.

Images are resized to the model's training crop size (``--size`` to choose, 0 for the stored
size). Outputs: ``metrics.json``, ``gallery_AtoB.png``/``gallery_BtoA.png`` (columns: input,
output, reconstruction, ground truth where present) and ``index.html`` in ``--out``; the
metrics go to MLflow as ``eval/NAME`` at the checkpoint's step, the files as artifacts under
``eval/``, in the run the model came from (or ``--mlflow-run``).
"""

from __future__ import annotations

import argparse
import contextlib
import html
import json
import os
import re
import sys
import time
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image
from torch import nn

from cyclegan.metrics import (
    ConfusionMatrix,
    InceptionFeatures,
    colors_to_classes,
    extract_features,
    fid_from_features,
    kid_from_features,
    l1_distance,
    label_scores,
)
from cyclegan.train_step import unwrap
from cyclegan.transforms import image_grid, resize_bicubic, to_input
from pipeline import config as C
from pipeline import exit_with
from pipeline.data import read_columns
from pipeline.images import decode_image
from pipeline.shards import Manifest, read_manifest
from pipeline.synth import PALETTE

GALLERY_ROWS = 4
KID_SUBSETS = 100
COLUMNS = ("input", "output", "reconstruction", "ground truth")


# reading test images


def read_split(manifest: Manifest, name: str, limit: int | None) -> list[tuple[str, bytes]]:
    """(key, encoded bytes) of the first ``limit`` images of dataset ``name`` (all: None)."""
    if name not in manifest.datasets:
        raise ValueError(
            f"dataset {manifest.root}: no {name} (has {', '.join(sorted(manifest.datasets))})"
        )
    table = read_columns(manifest, name, ["key", "image"], limit)
    rows = list(zip(table["key"].to_pylist(), table["image"].to_pylist(), strict=True))
    if not rows:
        raise ValueError(f"dataset {manifest.root}: {name} has no images")
    return rows


def read_pairs(manifest: Manifest, split: str, limit: int | None) -> list[tuple[str, bytes, bytes]]:
    """(key, A bytes, B bytes) of the images that ``{split}A`` and ``{split}B`` share by key."""
    a = read_split(manifest, f"{split}A", limit)
    b = dict(read_split(manifest, f"{split}B", limit))
    if limit is not None and len(b) == limit and any(k not in b for k, _ in a):
        b = dict(read_split(manifest, f"{split}B", None))  # the two are stored in other orders
    pairs = [(key, data, b[key]) for key, data in a if key in b]
    if not pairs:
        raise ValueError(
            f"dataset {manifest.root}: paired_test is set but {split}A and {split}B share no key"
        )
    return pairs


def _decode(
    key: str, data: bytes, size: tuple[int, int] | None, nearest: bool = False
) -> np.ndarray:
    """The image as HxWx3 uint8, resized to ``size`` (bicubic as in training, or nearest)."""
    img = decode_image(data, key)
    if size is None or img.size == size:
        return np.asarray(img, dtype=np.uint8)
    if nearest:
        return np.asarray(img.resize(size, Image.NEAREST), dtype=np.uint8)
    return resize_bicubic(img, size)


def _stack(arrays: list[np.ndarray]) -> torch.Tensor:
    return to_input(torch.from_numpy(np.stack(arrays)))


def image_batches(
    rows: list[tuple[str, bytes]], size: int | None, batch_size: int
) -> Iterator[torch.Tensor]:
    """NCHW [-1, 1] batches (bicubic resize to size x size; None keeps each image's size, and a
    batch then ends where the size changes)."""
    target = (size, size) if size else None
    pending: list[np.ndarray] = []
    for key, data in rows:
        arr = _decode(key, data, target)
        if pending and (len(pending) == batch_size or pending[0].shape != arr.shape):
            yield _stack(pending)
            pending = []
        pending.append(arr)
    if pending:
        yield _stack(pending)


def pair_batches(
    pairs: list[tuple[str, bytes, bytes]], size: int | None, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(A as input, A as ground truth, B) batches of paired images.

    The input is resized bicubic, as in training; the ground-truth label map nearest-neighbour,
    so that it holds only class colours. Without ``size`` both take the size of the B image.
    """
    pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for key, a_data, b_data in pairs:
        b = _decode(key, b_data, (size, size) if size else None)
        target = (b.shape[1], b.shape[0])
        row = (
            _decode(key, a_data, target),
            _decode(key, a_data, target, nearest=True),
            b,
        )
        if pending and (len(pending) == batch_size or pending[0][2].shape != b.shape):
            yield tuple(_stack(list(col)) for col in zip(*pending, strict=True))
            pending = []
        pending.append(row)
    if pending:
        yield tuple(_stack(list(col)) for col in zip(*pending, strict=True))


# scores


@contextlib.contextmanager
def _eval_mode(*nets: nn.Module | None):
    """Eval mode for a block; each net's previous mode is restored after (training calls this)."""
    nets = tuple(n for n in nets if n is not None)
    modes = [n.training for n in nets]
    for n in nets:
        n.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for n, mode in zip(nets, modes, strict=True):
            n.train(mode)


def _device(*nets: nn.Module | None) -> torch.device:
    for net in nets:
        if net is not None:
            for p in net.parameters():
                return p.device
    return torch.device("cpu")


class _Mean:
    """A running mean of l1_distance over batches, weighted by their pixels."""

    def __init__(self) -> None:
        self.total, self.count = 0.0, 0

    def add(self, fake: torch.Tensor, real: torch.Tensor) -> None:
        self.total += l1_distance(fake, real) * real.numel()
        self.count += real.numel()

    def value(self) -> float:
        return self.total / self.count


class _Gallery:
    """The first few rows of a direction: input | output | reconstruction | ground truth."""

    def __init__(self, rows: int) -> None:
        self.rows, self.images, self.columns = rows, [], []

    def add(self, *columns: torch.Tensor | None) -> None:
        # Unpaired rows have no ground truth: three columns, the first three names.
        pairs = zip(COLUMNS, columns, strict=False)
        self.columns = [name for name, c in pairs if c is not None]
        present = [c.detach().float().cpu() for c in columns if c is not None]
        for i in range(len(present[0])):
            if len(self.images) < self.rows:
                self.images.append(torch.stack([c[i] for c in present]))

    def grid(self) -> np.ndarray | None:
        return image_grid(self.images) if self.images else None


def _paired_pass(G_AtoB, G_BtoA, pairs, size, batch_size, gallery_rows):
    G_AtoB = unwrap(G_AtoB) if G_AtoB is not None else None
    G_BtoA = unwrap(G_BtoA) if G_BtoA is not None else None
    if G_AtoB is None and G_BtoA is None:
        raise ValueError("paired scores need at least one generator")
    device = _device(G_AtoB, G_BtoA)
    palette = torch.as_tensor(PALETTE)
    confusion = ConfusionMatrix(len(palette))
    l1_ab, cyc_a, cyc_b = _Mean(), _Mean(), _Mean()
    galleries = {"AtoB": _Gallery(gallery_rows), "BtoA": _Gallery(gallery_rows)}
    with _eval_mode(G_AtoB, G_BtoA):
        for a_in, a_true, b in pair_batches(pairs, size, batch_size):
            a_in, a_true, b = a_in.to(device), a_true.to(device), b.to(device)
            if G_BtoA is not None:
                fake_a = G_BtoA(b).float()
                confusion.update(
                    colors_to_classes(fake_a, palette), colors_to_classes(a_true, palette)
                )
                rec_b = G_AtoB(fake_a).float() if G_AtoB is not None else None
                if rec_b is not None:
                    cyc_b.add(rec_b, b)
                galleries["BtoA"].add(b, fake_a, rec_b, a_true)
            if G_AtoB is not None:
                fake_b = G_AtoB(a_in).float()
                l1_ab.add(fake_b, b)
                rec_a = G_BtoA(fake_b).float() if G_BtoA is not None else None
                if rec_a is not None:
                    cyc_a.add(rec_a, a_in)
                galleries["AtoB"].add(a_in, fake_b, rec_a, b)
    scores: dict[str, float] = {}
    if G_BtoA is not None:
        scores.update(label_scores(confusion))
    if G_AtoB is not None:
        scores["l1_AtoB"] = l1_ab.value()
    if G_AtoB is not None and G_BtoA is not None:
        scores["cycle_l1_A"], scores["cycle_l1_B"] = cyc_a.value(), cyc_b.value()
    return scores, galleries


def paired_scores(
    G_AtoB: nn.Module | None,
    G_BtoA: nn.Module | None,
    data_uri: str,
    crop_size: int | None,
    limit: int | None = None,
    batch_size: int = 8,
) -> dict[str, float]:
    """Scores of a paired test split (the built-in scenes): ``per_pixel_acc``, ``per_class_acc``
    and ``class_iou`` of ``G_BtoA`` (photo->labels), ``l1_AtoB`` of ``G_AtoB`` (labels->photo),
    and ``cycle_l1_A``/``cycle_l1_B`` when both are given (either may be None).

    Images are resized to ``crop_size`` (None: stored size) and moved to the generators' device;
    the nets may be DDP-wrapped and are returned to their previous train/eval mode.
    """
    pairs = read_pairs(read_manifest(data_uri), "test", limit)
    return _paired_pass(G_AtoB, G_BtoA, pairs, crop_size, batch_size, 0)[0]


def unpaired_scores(
    generators: dict[str, nn.Module],
    rows: dict[str, list[tuple[str, bytes]]],
    extractor: nn.Module,
    size: int | None,
    batch_size: int,
    gallery_rows: int = 0,
) -> tuple[dict[str, float], dict[str, _Gallery]]:
    """FID and KID of each generator's translations of its source domain against the real
    images of the target domain (``rows``: ``{"A": [...], "B": [...]}``), plus cycle L1."""
    generators = {d: unwrap(g) for d, g in generators.items()}
    device = _device(*generators.values())
    extractor = extractor.to(device)
    for domain, domain_rows in rows.items():
        if len(domain_rows) < 2:
            raise ValueError(f"FID/KID need at least 2 images of domain {domain}, got 1")
    scores: dict[str, float] = {}
    galleries = {}
    with _eval_mode(*generators.values(), extractor):
        for d, G in generators.items():
            source, target = ("A", "B") if d == "AtoB" else ("B", "A")
            G_back = generators.get("BtoA" if d == "AtoB" else "AtoB")
            gallery, cycle, chunks = _Gallery(gallery_rows), _Mean(), []
            for x in image_batches(rows[source], size, batch_size):
                x = x.to(device)
                fake = G(x).float()
                chunks.append(extractor(fake).float().cpu())
                rec = G_back(fake).float() if G_back is not None else None
                if rec is not None:
                    cycle.add(rec, x)
                gallery.add(x, fake, rec)
            fake_features = torch.cat(chunks)
            real_features = extract_features(
                extractor, image_batches(rows[target], size, batch_size), device
            )
            n = min(len(fake_features), len(real_features))
            kid, kid_std = kid_from_features(
                fake_features, real_features, subsets=KID_SUBSETS, subset_size=min(1000, n)
            )
            scores[f"fid_{d}"] = fid_from_features(fake_features, real_features)
            scores[f"kid_{d}"], scores[f"kid_{d}_std"] = kid, kid_std
            if G_back is not None:
                scores[f"cycle_l1_{source}"] = cycle.value()
            galleries[d] = gallery
    return scores, galleries


PAIRED_METRICS = ("per_pixel_acc", "per_class_acc", "class_iou", "l1_AtoB", "cycle_l1_A",
                  "cycle_l1_B")  # fmt: skip
UNPAIRED_METRICS = tuple(f"{kind}_{d}" for d in ("AtoB", "BtoA") for kind in ("fid", "kid")) + (
    "kid_AtoB_std",
    "kid_BtoA_std",
    "cycle_l1_A",
    "cycle_l1_B",
)


def unpaired_eval_scores(
    G_AtoB: nn.Module,
    G_BtoA: nn.Module,
    data_uri: str,
    size: int | None,
    limit: int | None,
    extractor: nn.Module,
    batch_size: int = 8,
) -> dict[str, float]:
    """FID/KID of both directions (and cycle L1) on the first ``limit`` images of each domain
    of the test split, or of the training split where there is no test split."""
    manifest = read_manifest(data_uri)
    split = "test" if {"testA", "testB"} <= set(manifest.datasets) else "train"
    rows = {d: read_split(manifest, f"{split}{d}", limit) for d in ("A", "B")}
    generators = {"AtoB": G_AtoB, "BtoA": G_BtoA}
    return unpaired_scores(generators, rows, extractor, size, batch_size)[0]


def default_extractor(fid_weights: str | None) -> nn.Module:
    """Inception features from ``fid_weights``, else torchvision's download (clear error)."""
    try:
        return InceptionFeatures(weights_path=fid_weights)
    except Exception as exc:
        where = fid_weights or "torchvision's download of Inception_V3_Weights.DEFAULT"
        raise RuntimeError(
            f"FID/KID need Inception v3 weights and {where} could not be loaded ({exc}); "
            "pass --fid-weights PATH, a torchvision inception_v3 state dict"
        ) from None


def evaluate(
    generators: dict[str, nn.Module],
    data_uri: str,
    *,
    split: str = "test",
    size: int | None = None,
    extractor: nn.Module | None = None,
    fid_weights: str | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    out_dir: str | None = None,
    gallery_rows: int = GALLERY_ROWS,
    description: dict | None = None,
) -> dict:
    """Score ``generators`` (``{"AtoB": G_A, "BtoA": G_B}``, either may be missing) on the
    ``split`` of ``data_uri``; paired scores where the manifest says ``paired_test`` and the
    split is test, FID/KID otherwise (``extractor`` maps [-1, 1] images to (N, D) features;
    default Inception v3). With ``out_dir``, writes metrics.json, the galleries and index.html.

    Returns the metrics.json content: ``mode``, ``metrics``, ``images``, ``size``, ``split``,
    ``data`` and whatever ``description`` adds (model, step, ...).
    """
    if not generators:
        raise ValueError("generators: none given")
    if split not in ("test", "train"):
        raise ValueError(f"--split: {split!r} is not test or train")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit: must be >= 1, got {limit}")
    manifest = read_manifest(data_uri)
    start = time.monotonic()
    if split == "test" and manifest.paired_test:
        mode = "paired"
        pairs = read_pairs(manifest, split, limit)
        metrics, galleries = _paired_pass(
            generators.get("AtoB"),
            generators.get("BtoA"),
            pairs,
            size,
            batch_size,
            gallery_rows,
        )
        counts = {"A": len(pairs), "B": len(pairs)}
    else:
        mode = "unpaired"
        rows = {d: read_split(manifest, f"{split}{d}", limit) for d in ("A", "B")}
        extractor = extractor if extractor is not None else default_extractor(fid_weights)
        metrics, galleries = unpaired_scores(
            generators, rows, extractor, size, batch_size, gallery_rows
        )
        counts = {d: len(r) for d, r in rows.items()}
    result = {
        **(description or {}),
        "data": data_uri,
        "split": split,
        "mode": mode,
        "size": size,
        "images": counts,
        "seconds": round(time.monotonic() - start, 3),
        "metrics": metrics,
    }
    if out_dir:
        grids = {d: (g.grid(), g.columns) for d, g in galleries.items() if g.images}
        write_report(result, grids, out_dir)
    return result


# outputs


def write_report(
    result: dict, grids: dict[str, tuple[np.ndarray, list[str]]], out_dir: str
) -> list[str]:
    """metrics.json, gallery_<direction>.png and index.html in ``out_dir``; returns the paths.

    ``grids``: direction -> (HxWx3 uint8 gallery, names of its columns).
    """
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    images = []
    for direction, (grid, columns) in grids.items():
        name = f"gallery_{direction}.png"
        Image.fromarray(grid).save(os.path.join(out_dir, name))
        images.append((direction, name, columns))
        paths.append(os.path.join(out_dir, name))
    result = {**result, "galleries": {d: {"file": n, "columns": c} for d, n, c in images}}
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(result, f, indent=2)
    paths.append(os.path.join(out_dir, "metrics.json"))
    with open(os.path.join(out_dir, "index.html"), "w") as f:
        f.write(render_html(result, images))
    paths.append(os.path.join(out_dir, "index.html"))
    return paths


def render_html(result: dict, images: list[tuple[str, str, list[str]]]) -> str:
    esc = html.escape
    rows = "\n".join(
        f"<tr><td>{esc(k)}</td><td>{v:.4f}</td></tr>" for k, v in result["metrics"].items()
    )
    facts = ", ".join(
        f"{k}: {esc(str(result[k]))}"
        for k in ("model", "step", "data", "split", "mode", "size")
        if result.get(k) is not None
    )
    sections = "\n".join(
        f"<h2>{esc(d.replace('to', ' to '))}</h2><p>Columns: {esc(' | '.join(columns))}</p>"
        f'<img src="{esc(name)}" alt="{esc(d)} gallery">'
        for d, name, columns in images
    )
    return (
        "<!doctype html>\n<html><head><meta charset='utf-8'><title>CycleGAN evaluation</title>"
        "<style>body{font-family:sans-serif;margin:2em}td{padding:2px 12px}"
        "img{image-rendering:pixelated;max-width:100%}</style></head><body>\n"
        f"<h1>CycleGAN evaluation</h1><p>{facts}</p>\n<table>{rows}</table>\n{sections}\n"
        "</body></html>\n"
    )


def format_table(metrics: dict[str, float]) -> str:
    width = max((len(k) for k in metrics), default=6)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  {'-' * 10}"]
    lines += [f"{k:<{width}}  {v:.4f}" for k, v in metrics.items()]
    return "\n".join(lines)


def log_to_mlflow(
    result: dict, out_dir: str | None, run_id: str, tracking_uri: str, step: int
) -> None:
    """``eval/<name>`` metrics at ``step`` and the report files under ``eval/`` of ``run_id``."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(tracking_uri=tracking_uri)
    client.get_run(run_id)  # a clear MlflowException when the run does not exist
    now = int(time.time() * 1000)
    metrics = [Metric(f"eval/{k}", float(v), now, step) for k, v in result["metrics"].items()]
    client.log_batch(run_id, metrics=metrics, synchronous=True)
    if out_dir:
        client.log_artifacts(run_id, out_dir, artifact_path="eval")


# CLI


def build_parser() -> argparse.ArgumentParser:
    from pipeline.models import add_model_flags

    p = argparse.ArgumentParser(
        prog="python -m pipeline.evaluate",
        description="Score trained CycleGAN generators on a test split and log to MLflow.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    add_model_flags(p)
    p.add_argument("--data", help="dataset root (default: the model's training data)")
    p.add_argument("--split", default="test", choices=("test", "train"), help="default test")
    p.add_argument("--out", help="folder for the report (default $CYCLEGAN_HOME/eval/NAME-TIME)")
    p.add_argument("--fid-weights", metavar="PATH", help="torchvision inception_v3 state dict")
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


def report_name(info: dict) -> str:
    """A short folder name for a model: run name and step, MLflow run id, or file stem."""
    if info["kind"] == "mlflow":
        name = f"mlflow-{(info.get('mlflow_run_id') or 'model')[:12]}"
    else:
        parts = [p for p in re.split(r"[/\\]", str(info["path"])) if p]
        if info["kind"] == "checkpoint" and len(parts) >= 3:
            run = parts[-3] if parts[-2].startswith("checkpoint_") else parts[-2]
            name = f"{run}-step{info.get('step') or 0}"
        else:
            name = os.path.splitext(parts[-1])[0] if parts else "model"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _tracking_uri(info: dict) -> str:
    uri = ((info.get("config") or {}).get("tracking") or {}).get("uri") or ""
    return C.TrackingConfig(uri=uri).resolved_uri()


def _default_data(info: dict) -> str:
    uri = ((info.get("config") or {}).get("data") or {}).get("uri") or ""
    return C.DataConfig(uri=uri).resolved_uri()


def main(argv: list[str] | None = None) -> int:
    from pipeline.models import ModelSourceError, arch_from_flags, load_generators
    from pipeline.shards import DatasetError
    from pipeline.storage import StorageError, redact

    args = build_parser().parse_args(argv)
    try:
        arch = arch_from_flags(args.ngf, args.n_blocks, args.norm)
        directions = [args.direction] if args.direction else ["AtoB", "BtoA"]
        nets, _, info = load_generators(args.model, directions, storage=args.storage, arch=arch)
        if args.size is not None and args.size < 0:
            raise ValueError(f"--size: must be >= 0, got {args.size}")
        size = (args.size or None) if args.size is not None else info.get("crop_size")
        data_uri = args.data or _default_data(info)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        nets = {d: n.to(device) for d, n in nets.items()}
        step = info.get("step") or 0
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = args.out or os.path.join(C.home(), "eval", f"{report_name(info)}-{stamp}")
        print(
            f"[evaluate] {', '.join(nets)} of {args.model} ({info['kind']}, step {step}) on "
            f"{redact(data_uri)} {args.split}, size {size or 'as stored'}, device {device}",
            flush=True,
        )
        result = evaluate(
            nets,
            data_uri,
            split=args.split,
            size=size,
            fid_weights=args.fid_weights,
            limit=args.limit,
            batch_size=args.batch_size,
            out_dir=out,
            description={
                "model": args.model,
                "kind": info["kind"],
                "step": info.get("step"),
                "mlflow_run_id": args.mlflow_run or info.get("mlflow_run_id"),
            },
        )
    except (ModelSourceError, ValueError, DatasetError, StorageError, RuntimeError) as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return 2
    print(format_table(result["metrics"]))
    print(
        f"[evaluate] {result['images']['A']} A / {result['images']['B']} B images in "
        f"{result['seconds']:.1f} s; report: {os.path.join(out, 'index.html')}",
        flush=True,
    )
    run_id = result["mlflow_run_id"]
    if not run_id:
        print("[evaluate] no MLflow run to log to (pass --mlflow-run RUN_ID)", flush=True)
        return 0
    tracking_uri = _tracking_uri(info)
    try:
        log_to_mlflow(result, out, run_id, tracking_uri, step)
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
