"""The evaluation report: scores of a dataset split (:func:`evaluate`), written as
``metrics.json``, ``gallery_<direction>.png`` and ``index.html``, printed as a table, and logged
to an MLflow run as ``eval/<name>`` metrics and ``eval/`` artifacts."""

from __future__ import annotations

import html
import json
import os
import time

import numpy as np
import torch
from PIL import Image
from torch import nn

from pipeline.progress import progress_bar
from pipeline.scenes import PALETTE
from pipeline.scoring import (
    default_extractor,
    pair_batches,
    paired_pass,
    read_pairs,
    read_split,
    unpaired_scores,
)
from pipeline.shards import read_manifest

GALLERY_ROWS = 4


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
    progress: bool | None = None,
) -> dict:
    """Score ``generators`` (``{"AtoB": G_A, "BtoA": G_B}``, either may be missing) on the
    ``split`` of ``data_uri``; paired scores where the manifest says ``paired_test`` and the
    split is test, FID/KID otherwise (``extractor`` maps [-1, 1] images to (N, D) features;
    default: the Inception network of ``fid_weights``, see ``default_extractor``). With
    ``out_dir``, writes metrics.json, the galleries and index.html. ``progress``: a bar over the
    images of the passes on stderr (None: only when stderr is a terminal).

    Returns the metrics.json content: ``mode``, ``metrics``, ``images``, ``size``, ``split``,
    ``data``, for FID/KID ``fid_network`` (the extractor's ``network``, else its class name),
    and whatever ``description`` adds (model, step, ...).
    """
    # Long on purpose: mostly the signature and its documentation; the body is four named steps.
    if not generators:
        raise ValueError("generators: none given")
    if split not in ("test", "train"):
        raise ValueError(f"--split: {split!r} is not test or train")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit: must be >= 1, got {limit}")
    manifest = read_manifest(data_uri)
    start = time.monotonic()
    facts = {}
    if split == "test" and manifest.paired_test:
        mode = "paired"
        pairs = read_pairs(manifest, split, limit)
        with progress_bar("evaluate", len(pairs), progress) as bar:
            metrics, galleries = paired_pass(
                generators.get("AtoB"),
                generators.get("BtoA"),
                pair_batches(pairs, size, batch_size),
                torch.as_tensor(PALETTE),
                gallery_rows,
                bar.update,
            )
        counts = {"A": len(pairs), "B": len(pairs)}
    else:
        mode = "unpaired"
        rows = {d: read_split(manifest, f"{split}{d}", limit) for d in ("A", "B")}
        extractor = extractor if extractor is not None else default_extractor(fid_weights)
        facts["fid_network"] = getattr(extractor, "network", type(extractor).__name__)
        counts = {d: len(r) for d, r in rows.items()}
        # Each direction reads both domains: its source to translate, its target as the real set.
        with progress_bar(
            "evaluate", len(generators) * (counts["A"] + counts["B"]), progress
        ) as bar:
            metrics, galleries = unpaired_scores(
                generators, rows, extractor, size, batch_size, gallery_rows, bar.update
            )
    result = {
        **(description or {}),
        "data": data_uri,
        "split": split,
        "mode": mode,
        "size": size,
        "images": counts,
        **facts,
        "seconds": round(time.monotonic() - start, 3),
        "metrics": metrics,
    }
    if out_dir:
        grids = {d: (g.grid(), g.columns) for d, g in galleries.items() if g.images}
        write_report(result, grids, out_dir)
    return result


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
    """index.html: the facts of the run, the metrics table and each direction's gallery."""
    esc = html.escape
    rows = "\n".join(
        f"<tr><td>{esc(k)}</td><td>{v:.4f}</td></tr>" for k, v in result["metrics"].items()
    )
    facts = ", ".join(
        f"{k}: {esc(str(result[k]))}"
        for k in ("model", "step", "data", "split", "mode", "size", "fid_network")
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
    """The metrics as a two-column text table, for the terminal."""
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
