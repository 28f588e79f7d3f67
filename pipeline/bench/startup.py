"""Time to first step: ``python -m pipeline.train`` run as a user runs it, phase by phase.

Each round starts the command in a new process on a private local Ray (``--address local``)
over a small built-in dataset, and reads back the start-up timeline the run logged to MLflow
(``startup/*_s``: seconds from the command's start, written by the driver and by rank 0 at the
first step), plus the time until the process exited. Meanwhile it samples the CPU time of the
command and of every process under it (Ray's own included) five times a second, to say where
the CPU went before the first step.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import re
import statistics
import subprocess
import sys
import threading
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

IDLE = "ray worker (idle)"
"""A Ray worker process before its first task or actor (it then takes that one's name)."""
DONE = re.compile(r"\[train\] done: run (\S+), step \d+, MLflow run ([0-9a-f]+)")


def _dataset(home: str, images: int, size: int) -> str:
    from pipeline.bench.train import _is_dataset
    from pipeline.scenes import write_scenes

    root = os.path.join(home, "data", f"scenes-{images}-{size}px")
    if not _is_dataset(root):
        print(f"[startup] writing {images}+{images} built-in scenes to {root}", flush=True)
        write_scenes(root, size=size, train_a=images, train_b=images, test=4, overwrite=True)
    return root


def _sample_cpu(proc: subprocess.Popen, t0: float, samples: dict[int, list]) -> None:
    """Until ``proc`` ends: per process under it, its name and (seconds since t0, CPU s)."""
    import psutil

    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        now = time.time() - t0
        with contextlib.suppress(psutil.Error):
            for p in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    times = p.cpu_times()
                    entry = samples.setdefault(p.pid, ["", []])
                    name = _process_name(p.cmdline(), p is root)
                    if name != IDLE or not entry[0]:
                        entry[0] = name  # an idle worker takes the name of what it runs
                    entry[1].append((now, times.user + times.system))
        time.sleep(0.2)


def _process_name(cmdline: list[str], is_root: bool) -> str:
    """A short name: Ray's process title (``ray::TrainController``), or what the program is."""
    line = " ".join(cmdline)
    if is_root:
        return "pipeline.train (the driver)"
    if line.startswith("ray::"):
        name = line.split()[0].removeprefix("ray::").split(".")[0]
        return IDLE if name == "IDLE" else name
    program = os.path.basename(cmdline[0]) if cmdline else ""
    if program in ("gcs_server", "raylet"):
        return "GCS" if program == "gcs_server" else program
    for marker, name in (("default_worker.py", IDLE), ("dashboard/dashboard.py", "dashboard"),
                         ("ray-dashboard-", "dashboard"), ("from multiprocessing", "dashboard"),
                         ("dashboard/agent", "agents"),
                         ("log_monitor", "log monitor"), ("autoscaler", "monitor")):  # fmt: skip
        if marker in line:
            return name
    return os.path.basename(cmdline[0]) if cmdline else IDLE  # between fork and exec


def _cpu_before(samples: dict[int, list], until: float) -> dict[str, list[float]]:
    """CPU seconds each kind of process used before ``until``: name -> [seconds, processes]."""
    out: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for name, points in samples.values():
        before = [cpu for t, cpu in points if t <= until]
        if before:
            out[name][0] += before[-1]
            out[name][1] += 1
    return dict(out)


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
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    samples: dict[int, list] = {}
    watcher = threading.Thread(target=_sample_cpu, args=(proc, t0, samples), daemon=True)
    watcher.start()
    try:
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        proc.kill()
    exit_s = time.time() - t0
    watcher.join()
    match = DONE.search(stdout)
    if proc.returncode != 0 or match is None:
        raise RuntimeError(f"pipeline.train failed ({proc.returncode}):\n{stderr[-3000:]}")
    run = MlflowClient(tracking).get_run(match.group(2))
    got = {k.removeprefix("startup/").removesuffix("_s"): v for k, v in run.data.metrics.items()
           if k.startswith("startup/")}  # fmt: skip
    missing = [name for name, _ in PHASES if name not in got]
    if missing:
        raise RuntimeError(f"run {match.group(1)} logged no startup/{missing[0]}_s")
    cpu = _cpu_before(samples, got["first_step"])
    return {"run": match.group(1), "milestones": got, "exit_s": exit_s, "cpu": cpu}


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
    names = {name for r in rounds for name in r["cpu"]}
    cpu = {n: statistics.median(r["cpu"].get(n, [0.0, 0])[0] for r in rounds) for n in names}
    count = {n: statistics.median(r["cpu"].get(n, [0.0, 0])[1] for r in rounds) for n in names}
    total = statistics.median(sum(v[0] for v in r["cpu"].values()) for r in rounds)
    first = statistics.median(r["milestones"]["first_step"] for r in rounds)
    print(f"\nCPU before the first step: {total:.1f} s in {first:.1f} s on {os.cpu_count()} cores "
          f"({total / first / (os.cpu_count() or 1):.0%} busy), by process (medians)")  # fmt: skip
    for name in sorted((n for n in names if count[n]), key=lambda n: -cpu[n]):
        print(f"{cpu[name]:>8.2f} s  {count[name]:>3g} x {name}")


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
