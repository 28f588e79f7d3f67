"""Session fixtures for integration tests: one real local Ray head (with the job server) shared
by every test, and a small built-in scenes dataset. Only one Ray cluster may run per host."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

VENV_BIN = Path(sys.executable).parent
RAY_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    # Ray Train's controller polls its workers every 2 s by default, so a finished run waits up
    # to that long before fit() returns, twice over; a short poll saves ~2.5 s per test run.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayHead:
    def __init__(self, address: str, dashboard: str, env: dict[str, str], temp: str = ""):
        self.address, self.dashboard, self.env = address, dashboard, env
        self.temp = temp
        """Ray's temp folder of this head (its session folders: logs, runtime envs, spills)."""


@pytest.fixture(scope="session")
def ray_head():
    """A `ray start --head` cluster with 4 logical CPUs and the dashboard (job server)."""
    os.environ.update(RAY_ENV)
    port, dash = free_port(), free_port()
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    from pipeline.ray_cluster import IDLE_WORKER_KEEP_MS, WORKER_NICENESS
    from tests.conftest import S3_KEY, S3_REGION, S3_SECRET

    env = {
        **os.environ,
        **RAY_ENV,
        "RAY_idle_worker_killing_time_threshold_ms": str(IDLE_WORKER_KEEP_MS),
        "RAY_worker_niceness": str(WORKER_NICENESS),
        # The node's own credentials for the local S3 server (which takes any): commands
        # never hand theirs to Ray.
        "AWS_ACCESS_KEY_ID": S3_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET,
        "AWS_REGION": S3_REGION,
    }
    cmd = [
        str(VENV_BIN / "ray"),
        "start",
        "--head",
        f"--port={port}",
        "--num-cpus=4",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        f"--temp-dir={temp}",
        "--disable-usage-stats",
        # Explicit free ports: a default port still held by anything leaves the job agent down.
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--ray-client-server-port={free_port()}",
    ]
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=120)
    address = f"127.0.0.1:{port}"
    try:
        yield RayHead(
            address, f"http://127.0.0.1:{dash}", {**RAY_ENV, "RAY_ADDRESS": address}, temp
        )
    finally:
        stop_cluster(temp, port)
        shutil.rmtree(temp, ignore_errors=True)


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) from /proc."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        out[int(entry.name)] = (ppid, cmdline)
    return out


def stop_cluster(temp: str, gcs_port: int | None = None) -> None:
    """Stop only the cluster started with ``temp``: the processes naming it, those naming its
    GCS port (the Ray client server, which names neither the folder nor a parent still
    running) and all their descendants (agents and workers rename themselves, e.g.
    ``ray::DashboardAgent``)."""
    procs = _processes()
    names_gcs = re.compile(rf"--address=\S+:{gcs_port}(\s|$)") if gcs_port else None
    doomed = {pid for pid, (_, cmd) in procs.items()
              if temp in cmd or (names_gcs is not None and names_gcs.search(cmd))}  # fmt: skip
    grew = True
    while grew:
        children = {pid for pid, (ppid, _) in procs.items() if ppid in doomed} - doomed
        grew = bool(children)
        doomed |= children
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in doomed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in doomed):
            time.sleep(0.2)


@pytest.fixture(scope="session")
def ray_client(ray_head):
    """This test process connected to the shared head."""
    import ray

    if not ray.is_initialized():
        # Train workers import the loop functions defined in test modules.
        repo = str(Path(__file__).resolve().parents[1])
        ray.init(
            address=ray_head.address,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": repo, **RAY_ENV}},
        )
    yield ray_head
    ray.shutdown()


@pytest.fixture(scope="session")
def scenes(tmp_path_factory) -> str:
    """A tiny built-in scenes dataset: 48 px, 24 trainA, 16 trainB, 4 paired test images."""
    from pipeline.scenes import write_scenes

    root = tmp_path_factory.mktemp("scenes") / "data"
    write_scenes(str(root), size=48, train_a=24, train_b=16, test=4, seed=0)
    return str(root)


def unpaired_copy(src: str, root: Path) -> str:
    """A copy of the dataset ``src`` at ``root`` whose manifest does not promise paired test
    images (the same pictures, scored as unpaired data)."""
    import json

    shutil.copytree(src, root)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["paired_test"] = False
    (root / "manifest.json").write_text(json.dumps(manifest))
    return str(root)


@pytest.fixture(scope="session")
def unpaired_scenes(scenes, tmp_path_factory) -> str:
    """``scenes`` without the paired-test promise."""
    return unpaired_copy(scenes, tmp_path_factory.mktemp("unpaired") / "data")


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory) -> str:
    """A randomly initialised torchvision inception_v3 state dict: a real FID network file
    (the pretrained one needs a download)."""
    import torch
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("inception") / "inception_v3.pth"
    net = inception_v3(weights=None, aux_logits=False, init_weights=False)
    torch.save(net.state_dict(), path)
    return str(path)
