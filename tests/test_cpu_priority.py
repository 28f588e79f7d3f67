"""Ray's own processes yield the CPU to the training workers on a Ray a run starts itself
(``pipeline.cpu_priority``): first on a tree of plain processes named as Ray names them, then
in a real run on a private local Ray."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import cpu_priority
from tests.cli import seed_mlflow_store

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not cpu_priority.SUPPORTED, reason="Linux scheduling classes"),
]

REPO = Path(__file__).resolve().parents[1]
IDLE, NORMAL = getattr(os, "SCHED_IDLE", 5), getattr(os, "SCHED_OTHER", 0)


def _tree(with_training_worker: bool) -> subprocess.Popen:
    """A root with a pooled worker, a raylet and (optionally) a training worker that has a
    child of its own, each a `sleep` whose argv[0] is the title Ray would give it."""
    training = (
        "(exec -a ray::RayTrainWorker bash -c 'sleep 60 & wait') & " if with_training_worker else ""
    )
    script = f"{training}(exec -a ray::IDLE sleep 60) & (exec -a /opt/ray/raylet sleep 60) & wait"
    root = subprocess.Popen(["bash", "-c", script])
    # Each by its title: a subshell is "bash" until its exec.
    wanted = {"ray::IDLE", "raylet"} | ({"ray::RayTrainWorker", "sleep"} if with_training_worker
                                        else set())  # fmt: skip
    deadline = time.monotonic() + 30
    while not wanted <= set(_named(root.pid)):
        if time.monotonic() > deadline:
            _end(root)
            raise AssertionError(f"the tree never showed {wanted}: {_named(root.pid)}")
        time.sleep(0.05)
    return root


def _named(root: int) -> dict[str, list[int]]:
    named: dict[str, list[int]] = {}
    for pid in cpu_priority.descendants(root):
        named.setdefault(cpu_priority._title(pid), []).append(pid)
    return named


def _policies(pids) -> set[int]:
    """The scheduling classes of the threads of ``pids``; a thread or process that ends between
    the listing and the look (a live Ray starts and ends threads all the time) is skipped."""
    policies = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for tid in map(int, os.listdir(f"/proc/{pid}/task")):
                with contextlib.suppress(OSError):
                    policies.add(os.sched_getscheduler(tid))
    return policies


def _end(root: subprocess.Popen) -> None:
    for pid in cpu_priority.descendants(root.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
    root.kill()
    root.wait()


def test_a_sweep_idles_ray_helpers_but_not_training_workers_or_the_raylet():
    root = _tree(with_training_worker=True)
    try:
        named = _named(root.pid)
        assert cpu_priority.sweep(root.pid, workers=2) == 0  # the second one may be pooled
        assert _policies(named["ray::IDLE"]) == {NORMAL}
        assert cpu_priority.sweep(root.pid) >= 1
        assert _policies(named["ray::IDLE"]) == {IDLE}
        assert _policies(named["ray::RayTrainWorker"]) == {NORMAL}
        assert _policies(named["sleep"]) == {NORMAL}  # the training worker's own child
        assert _policies(named["raylet"]) == {NORMAL}  # it starts new workers: they inherit
        assert cpu_priority.sweep(root.pid) == 0  # nothing left to change
    finally:
        _end(root)


def test_nothing_changes_before_a_training_worker_runs():
    root = _tree(with_training_worker=False)
    try:
        named = _named(root.pid)
        assert cpu_priority.sweep(root.pid) == 0
        assert _policies(named["ray::IDLE"]) == {NORMAL}  # Ray may yet start one in it
    finally:
        _end(root)


def test_a_private_ray_yields_to_the_training_worker_during_a_run(scenes, tmp_path):
    seed_mlflow_store(tmp_path)
    env = {**os.environ, "CYCLEGAN_HOME": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    env["RAY_AUTH_MODE"] = "disabled"  # as `make train` runs (else Ray notes its token auth)
    args = ["--preset", "tiny", "--data", scenes, "--address", "local", "--max-steps", "300",
            "--set", "train.checkpoint_every=300", "--set", "train.log_every=50",
            "--set", "scaling.idle_helpers=true"]  # fmt: skip
    run = subprocess.Popen(
        [sys.executable, "-m", "pipeline.train", *args],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    seen_idle: set[str] = set()
    seen: set[str] = set()
    worker_policies: set[int] = set()
    try:
        while run.poll() is None:
            named = _named(run.pid)
            seen |= set(named)
            for title, pids in named.items():
                policies = _policies(pids)
                if title.startswith("ray::RayTrainWorker"):
                    worker_policies |= _policies(pids)
                elif title in ("gcs_server", "ray::_StatsActor", "raylet") and policies == {IDLE}:
                    seen_idle.add(title)
            time.sleep(0.3)
        out = run.stdout.read()
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, out[-3000:]
    assert seen_idle == {"gcs_server", "ray::_StatsActor"}, out
    assert "runs at idle CPU priority" not in out
    assert worker_policies == {NORMAL}
    # A private Ray ends with the run: no placement-group cleaner polling the State API
    # (through the dashboard and the GCS, idle here) every second, and no warning from Ray.
    assert "ray::PlacementGroupCleaner" not in seen, sorted(seen)
    # (The raylet's note that it started 4 times as many workers as the node has cores, on a
    # 2-core machine, comes with or without idle helpers: not counted.)
    warned = [line for line in out.splitlines() if "WARN" in line.upper()]
    assert [line for line in warned if "maximum expected startup" not in line] == [], out
    assert "SIGABRT" not in out and "Fatal Python error" not in out, out
