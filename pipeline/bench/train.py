"""Short real training runs through pipeline.train.run, read back from MLflow."""

from __future__ import annotations

import argparse
import os
import statistics
import time

from pipeline import config as C
from pipeline import overrides
from pipeline.bench.common import in_fresh_process, summarize


def _train_process(cfg_dict: dict, home: str) -> dict:
    os.environ["CYCLEGAN_HOME"] = home
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from mlflow import MlflowClient

    from pipeline.plan import resolve
    from pipeline.training import train

    plan = resolve(C.from_dict(cfg_dict))
    t0 = time.perf_counter()
    result = train(plan)
    wall = time.perf_counter() - t0
    client = MlflowClient(plan.tracking_uri)
    metrics = {}
    for key in ("throughput/images_per_s", "data/wait_fraction", "memory/peak_rss_mib"):
        history = sorted(client.get_metric_history(result.run_id, key), key=lambda m: m.step)
        metrics[key] = [(m.step, m.value) for m in history]
    return {"run_id": result.run_id, "name": result.name, "wall_s": wall, "metrics": metrics}


def _is_dataset(uri: str) -> bool:
    from pipeline.shards import DatasetError, read_manifest
    from pipeline.storage import StorageError

    try:
        read_manifest(uri)
    except (DatasetError, StorageError):
        return False
    return True


def _datasets(args: argparse.Namespace, home: str) -> dict[str, str]:
    """``{images per domain: dataset root}``: ``--data``, else the built-in scenes of each
    ``--images`` size (written under ``home`` once)."""
    from pipeline.scenes import write_scenes
    from pipeline.shards import read_manifest

    if args.data:
        return {str(read_manifest(args.data).count("trainA")): args.data}
    out = {}
    for n in [int(x) for x in args.images.split(",")]:
        root = os.path.join(home, "data", f"scenes-{n}")
        if not _is_dataset(root):
            print(f"[bench] writing {n}+{n} built-in scenes to {root}", flush=True)
            write_scenes(root, size=128, train_a=n, train_b=n, test=8, overwrite=True)
        out[str(n)] = root
    return out


def _last(series: list) -> float | None:
    return series[-1][1] if series else None


def bench_train(args: argparse.Namespace) -> dict:
    # Long on purpose: one table row per (images, workers) run, built where it is measured.
    cfg = C.preset(args.preset)
    home = args.home or os.path.join(C.home(), "bench")
    datasets = _datasets(args, home)
    max_steps = args.max_steps or {"tiny": 200, "demo": 150}.get(args.preset, 60)
    log_every = args.log_every or max(1, max_steps // 6)
    runs: list[dict] = []
    for r in range(args.repeats):
        for images, data in datasets.items():
            for n in [int(x) for x in args.workers.split(",")]:
                stamp = time.strftime("%Y%m%d-%H%M%S")
                tree = {
                    "data": {"uri": data},
                    "train": {
                        "max_steps": max_steps,
                        "log_every": log_every,
                        "sample_every": max_steps,
                        "checkpoint_every": max_steps,
                    },
                    "scaling": {"num_workers": n, "max_failures": 0},
                    "storage": {
                        "uri": os.path.join(home, "checkpoints"),
                        "name": f"bench-{args.preset}-{images}-{n}w-{stamp}-{r}",
                    },
                    "tracking": {
                        "uri": "sqlite:///" + os.path.join(home, "mlflow.db"),
                        "experiment": "bench",
                        "system_metrics": False,
                        "log_model": False,
                    },
                }
                run_cfg = C.merge(cfg, tree)
                for item in args.set:
                    run_cfg = C.merge(run_cfg, overrides.parse_override(item))
                out = in_fresh_process(_train_process, run_cfg.to_dict(), home)
                # The first interval holds Ray Data's start-up and the first batches: warm-up.
                rate = [v for _, v in out["metrics"]["throughput/images_per_s"][1:]]
                wait = [v for _, v in out["metrics"]["data/wait_fraction"][1:]]
                out.update(
                    workers=n,
                    images=int(images),
                    images_per_s=summarize(rate) if rate else None,
                    data_wait_fraction=summarize(wait) if wait else None,
                    peak_rss_mib=_last(out["metrics"]["memory/peak_rss_mib"]),
                )
                runs.append(out)
                print(
                    f"[bench] round {r + 1}: {images} images, {n} worker(s): "
                    f"{statistics.median(rate) if rate else float('nan'):.2f} images/s, data "
                    f"wait {100 * statistics.median(wait) if wait else float('nan'):.1f}%, "
                    f"rank-0 peak RSS {out['peak_rss_mib'] or float('nan'):.0f} MiB, "
                    f"wall {out['wall_s']:.0f} s",
                    flush=True,
                )
    return {
        "command": "train",
        "preset": args.preset,
        "datasets": datasets,
        "home": home,
        "max_steps": max_steps,
        "log_every": log_every,
        "runs": runs,
    }


def print_train(res: dict) -> None:
    print(
        f"\n{'images':>7}{'workers':>9}{'images/s':>10}{'data wait':>11}{'peak RSS':>10}"
        f"{'wall s':>8}   (first interval excluded)"
    )
    for out in res["runs"]:
        rate, wait, rss = out["images_per_s"], out["data_wait_fraction"], out["peak_rss_mib"]
        print(
            f"{out['images']:>7}{out['workers']:>9}"
            f"{rate['median'] if rate else float('nan'):>10.2f}"
            f"{100 * wait['median'] if wait else float('nan'):>10.1f}%"
            f"{rss or float('nan'):>7.0f} MiB{out['wall_s']:>8.0f}"
        )
