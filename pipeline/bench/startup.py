"""Time to first step: ``python -m pipeline.train`` run as a user runs it, phase by phase.

Each round starts the command in a new process on a private local Ray (``--address local``)
over a small built-in dataset, and reads back the start-up timeline the run logged to MLflow
(``startup/*_s``: seconds from the command's start, written by the driver and by rank 0 at the
first step), plus the time until the process exited.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time

PHASES = (
    ("resolved", "Python, imports, config, dataset manifest"),
    ("ray", "Ray started (or joined)"),
    ("mlflow", "MLflow run opened, header printed"),
    ("fit", "datasets and trainer built"),
    ("worker", "Train controller, worker group, worker imports"),
    ("ready", "nets built, checkpoint restored, samples loaded"),
    ("first_batch", "Ray Data started, first batch"),
    ("first_step", "first train step"),
)
"""The milestones in the order they are reached, with what happens before each."""

DONE = re.compile(r"\[train\] done: run (\S+), step \d+, MLflow run ([0-9a-f]+)")


def _dataset(home: str, images: int, size: int) -> str:
    from pipeline.bench.train import _is_dataset
    from pipeline.scenes import write_scenes

    root = os.path.join(home, "data", f"scenes-{images}-{size}px")
    if not _is_dataset(root):
        print(f"[startup] writing {images}+{images} built-in scenes to {root}", flush=True)
        write_scenes(root, size=size, train_a=images, train_b=images, test=4, overwrite=True)
    return root


def one_round(home: str, data: str, preset: str, max_steps: int) -> dict:
    """One ``pipeline.train`` process: its milestones and its exit, in seconds."""
    from mlflow import MlflowClient

    tracking = "sqlite:///" + os.path.join(home, "mlflow.db")
    cmd = [
        sys.executable, "-m", "pipeline.train", "--preset", preset, "--data", data,
        "--max-steps", str(max_steps), "--address", "local", "--set", "tracking.experiment=bench-startup",
        "--set", f"tracking.uri={tracking}", "--set", "tracking.log_model=false",
        "--set", f"storage.uri={os.path.join(home, 'checkpoints')}",
    ]  # fmt: skip
    env = {**os.environ, "CYCLEGAN_HOME": home, "PYTHONUNBUFFERED": "1"}
    env.setdefault("RAY_AUTH_MODE", "disabled")
    t0 = time.time()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    exit_s = time.time() - t0
    match = DONE.search(res.stdout)
    if res.returncode != 0 or match is None:
        raise RuntimeError(f"pipeline.train failed ({res.returncode}):\n{res.stderr[-3000:]}")
    run = MlflowClient(tracking).get_run(match.group(2))
    got = {k.removeprefix("startup/").removesuffix("_s"): v for k, v in run.data.metrics.items()
           if k.startswith("startup/")}  # fmt: skip
    missing = [name for name, _ in PHASES if name not in got]
    if missing:
        raise RuntimeError(f"run {match.group(1)} logged no startup/{missing[0]}_s")
    return {"run": match.group(1), "milestones": got, "exit_s": exit_s}


def bench_startup(args: argparse.Namespace) -> dict:
    from pipeline import config as C

    home = args.home or os.path.join(C.home(), "bench")
    data = args.data or _dataset(home, args.images, args.size)
    rounds = []
    for r in range(args.repeats):
        out = one_round(home, data, args.preset, args.max_steps)
        rounds.append(out)
        print(
            f"[startup] round {r + 1}: first step at {out['milestones']['first_step']:.1f} s, "
            f"exit at {out['exit_s']:.1f} s",
            flush=True,
        )
    return {
        "command": "startup",
        "preset": args.preset,
        "data": data,
        "max_steps": args.max_steps,
        "rounds": rounds,
    }


def print_startup(res: dict) -> None:
    rounds = res["rounds"]
    print(f"\n{'milestone':<12}{'at s':>8}{'phase s':>9}   what the phase does (medians, {len(rounds)} rounds)")  # fmt: skip
    previous = 0.0
    for name, what in PHASES:
        at = statistics.median(r["milestones"][name] for r in rounds)
        print(f"{name:<12}{at:>8.2f}{at - previous:>9.2f}   {what}")
        previous = at
    end = statistics.median(r["exit_s"] for r in rounds)
    print(f"{'exit':<12}{end:>8.2f}{end - previous:>9.2f}   "
          f"the other {res['max_steps'] - 1} steps, final evaluation, shutdown")  # fmt: skip


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("startup", help="time to first step of pipeline.train, phase by phase")
    p.add_argument("--preset", default="tiny", help="the preset to start (default tiny)")
    p.add_argument("--max-steps", type=int, default=4, help="steps per run (default 4)")
    p.add_argument("--repeats", type=int, default=3, help="runs, one after another (default 3)")
    p.add_argument("--data", help="dataset root (default: built-in scenes, --images, --size)")
    p.add_argument("--images", type=int, default=64, help="built-in scenes per domain (64)")
    p.add_argument("--size", type=int, default=40, help="their side in px (default 40)")
    p.add_argument("--home", help="runs, MLflow store (default $CYCLEGAN_HOME/bench)")
    return p
