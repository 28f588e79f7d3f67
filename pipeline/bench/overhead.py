"""Ray's share of a small machine: a real ``pipeline.train`` run against the bare train step.

For each setting the bare step runs before and after, in a process of its own with the threads and the
precision a training worker of that run gets, on random inputs of the run's crop; then the same
settings train for real (Ray Data reading and augmenting the built-in scenes, Ray Train, MLflow),
and the run's images/s (first logged interval left out: start-up) is divided by the bare step's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from pipeline.bench.common import in_fresh_process, summarize

SETTINGS = {
    # name: (preset, changes to it, side of the built-in scenes in px, images per domain, steps)
    "32px": ("demo", {"data": {"load_size": 36, "crop_size": 32}}, 32, 2000, 800),
    "demo": ("demo", {}, 128, 1000, 400),
    "paper128": ("paper128", {}, 128, 500, 48),
}
"""The issue's three: the demo nets at 32 px on 2000 images a domain (where thousands of tiny ops
make every stolen core show), the demo preset, and paper128."""


def _config(name: str, data: str, home: str, steps: int, idle_helpers: bool):
    from pipeline import config as C

    preset, changes, _, _, _ = SETTINGS[name]
    cfg = C.merge(C.preset(preset), changes)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return C.merge(cfg, {
        "data": {"uri": data},
        "train": {"max_steps": steps, "log_every": max(1, steps // 8), "sample_every": steps,
                  "checkpoint_every": steps},
        "scaling": {"num_workers": 1, "max_failures": 0, "idle_helpers": idle_helpers},
        "storage": {"uri": os.path.join(home, "checkpoints"), "name": f"overhead-{name}-{stamp}"},
        "tracking": {"uri": "sqlite:///" + os.path.join(home, "mlflow.db"),
                     "experiment": "bench-overhead", "system_metrics": False, "log_model": False},
    })  # fmt: skip


def _bare_step(cfg_dict: dict, threads: int, steps: int, warmup: int) -> dict:
    """The train step alone in this (fresh) process, as the run's worker would run it."""
    import torch

    from pipeline import config as C
    from pipeline.allocator import keep_freed_memory
    from pipeline.bench.step import VARIANTS, StepRunner
    from pipeline.worker import autocast_dtype

    torch.set_num_threads(threads)
    keep_freed_memory()
    cfg = C.from_dict(cfg_dict)
    bf16 = autocast_dtype(cfg, torch.device("cpu")) is not None
    runner = StepRunner(cfg, cfg.data.batch_size, VARIANTS["bf16" if bf16 else "fp32"], "cpu", 0)
    runner.run(warmup)
    rates = []
    per_round = max(1, steps // 5)
    for _ in range(5):
        wall, _ = runner.run(per_round)
        rates.append(per_round * cfg.data.batch_size / wall)
    return {"images_per_s": summarize(rates), "precision": "bf16" if bf16 else "fp32"}


def _measure(name: str, cfg, images: int, idle_helpers: bool, home: str) -> dict:
    """The bare step before and after one real run of ``cfg``, and the run's images/s."""
    from pipeline.bench.train import _train_process
    from pipeline.plan import resolve

    threads = resolve(cfg).threads_per_worker
    # The bare step before and after the run: a shared machine's speed drifts.
    bare_steps = min(40, cfg.train.max_steps)
    before = in_fresh_process(_bare_step, cfg.to_dict(), threads, bare_steps, 3)
    run = in_fresh_process(_train_process, cfg.to_dict(), home)
    after = in_fresh_process(_bare_step, cfg.to_dict(), threads, bare_steps, 3)
    samples = before["images_per_s"]["samples"] + after["images_per_s"]["samples"]
    bare = {"images_per_s": summarize(samples), "precision": before["precision"]}
    rate = [v for _, v in run["metrics"]["throughput/images_per_s"][1:]]
    wait = [v for _, v in run["metrics"]["data/wait_fraction"][1:]]
    row = {
        "setting": name,
        "idle_helpers": idle_helpers,
        "crop_size": cfg.data.crop_size,
        "images_per_domain": images,
        "steps": cfg.train.max_steps,
        "threads": threads,
        "precision": bare["precision"],
        "bare_images_per_s": bare["images_per_s"],
        "run_images_per_s": summarize(rate) if rate else None,
        "data_wait_fraction": summarize(wait) if wait else None,
        "run_wall_s": run["wall_s"],
    }
    bare_median = bare["images_per_s"]["median"]
    row["ratio"] = statistics.median(rate) / bare_median if rate else None
    print(f"[bench] {name} (idle helpers {'on' if idle_helpers else 'off'}): bare step "
          f"{bare_median:.2f} images/s, run {statistics.median(rate) if rate else float('nan'):.2f}, "
          f"ratio {row['ratio'] or float('nan'):.2f}", flush=True)  # fmt: skip
    return row


def bench_overhead(args: argparse.Namespace) -> dict:
    from pipeline import config as C
    from pipeline.bench.train import _is_dataset
    from pipeline.scenes import write_scenes

    home = args.home or os.path.join(C.home(), "bench")
    rows = []
    for name in args.settings.split(","):
        if name not in SETTINGS:
            raise ValueError(f"--settings: {name!r}; choose from {', '.join(SETTINGS)}")
        _, _, side, images, steps = SETTINGS[name]
        data = os.path.join(home, "data", f"scenes-{images}-{side}px")
        if not _is_dataset(data):
            print(f"[bench] writing {images}+{images} built-in scenes of {side} px", flush=True)
            write_scenes(data, size=side, train_a=images, train_b=images, test=8, overwrite=True)
        modes = {"on": (True,), "off": (False,), "both": (False, True)}[args.idle_helpers]
        for idle_helpers in modes:
            cfg = _config(name, data, home, args.steps or steps, idle_helpers)
            rows.append(_measure(name, cfg, images, idle_helpers, home))
    return {"command": "overhead", "home": home, "rows": rows}


def print_overhead(res: dict) -> None:
    print(f"\n{'setting':<10}{'idle':>5}{'crop':>5}{'images':>8}{'prec':>6}{'threads':>8}"
          f"{'bare img/s':>11}{'run img/s':>10}{'ratio':>7}{'wait':>7}")  # fmt: skip
    for r in res["rows"]:
        run = r["run_images_per_s"]["median"] if r["run_images_per_s"] else float("nan")
        wait = 100 * r["data_wait_fraction"]["median"] if r["data_wait_fraction"] else float("nan")
        idle = "on" if r.get("idle_helpers") else "off"
        print(f"{r['setting']:<10}{idle:>5}{r['crop_size']:>5}{r['images_per_domain']:>8}"
              f"{r['precision']:>6}{r['threads']:>8}{r['bare_images_per_s']['median']:>11.2f}"
              f"{run:>10.2f}{r['ratio'] or float('nan'):>7.2f}{wait:>6.1f}%")  # fmt: skip
    print("idle: scaling.idle_helpers (Ray's own processes at idle CPU priority); "
          "ratio: the run's images/s (median of its logged intervals, the first left out) over "
          "the bare step's (median of 5 rounds before the run and 5 after); 1 worker, batch 1")  # fmt: skip


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("overhead", help="a real run's images/s against the bare train step")
    p.add_argument("--settings", default=",".join(SETTINGS),
                   help=f"comma-separated, of {', '.join(SETTINGS)} (default all)")  # fmt: skip
    p.add_argument("--steps", type=int, help="steps of each run (default per setting)")
    p.add_argument("--idle-helpers", choices=("on", "off", "both"), default="off",
                   help="Ray's own processes at idle CPU priority (scaling.idle_helpers); both: "
                   "a run without, then one with, side by side")  # fmt: skip
    p.add_argument("--home", help="runs, MLflow store (default $CYCLEGAN_HOME/bench)")
    return p
