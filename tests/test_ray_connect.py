"""Which Ray a command joins when no address is given: the cluster ``ray start`` recorded on
this machine while it answers, never a stale record of one that was killed."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile

import pytest

from pipeline.ray_cluster import recorded_cluster
from tests.ray_fixtures import RAY_ENV


def _record(tmp_path, monkeypatch, address: str) -> None:
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text(address + "\n")
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))


def test_a_recorded_cluster_that_answers_is_joined(tmp_path, monkeypatch):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        address = f"127.0.0.1:{server.getsockname()[1]}"
        _record(tmp_path, monkeypatch, address)
        assert recorded_cluster() == address


def test_a_stale_record_is_ignored(tmp_path, monkeypatch):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, never listening: connections are refused
        _record(tmp_path, monkeypatch, f"127.0.0.1:{port}")
        assert recorded_cluster() is None


def test_no_record_or_a_garbled_one_means_none(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    assert recorded_cluster() is None
    _record(tmp_path, monkeypatch, "not an address")
    assert recorded_cluster() is None


def test_controller_settings_are_put_back_after_a_run(monkeypatch):
    from pipeline.ray_cluster import train_controller_env

    monkeypatch.delenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", raising=False)
    monkeypatch.delenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", raising=False)
    restore = train_controller_env(started_here=True)
    assert os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    assert float(os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"]) < 2
    restore()  # a later run joining a cluster must get the preemption watcher again
    assert "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in os.environ
    assert "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S" not in os.environ

    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "7")  # the user's own value
    train_controller_env(started_here=False)()
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "7"


PRIVATE_RAY = """
import json, sys, urllib.request
import psutil, ray
from pipeline import ray_cluster
from pipeline.flags import build_config
from pipeline.train import build_parser

cfg = build_config(build_parser().parse_args(sys.argv[1:]))
ray_cluster.connect(cfg, address="local")
url = ray_cluster.dashboard_url()
processes = [" ".join(p.cmdline()) for p in psutil.Process().children(recursive=True)]
status = urllib.request.urlopen(url + "/api/version", timeout=30).status if url else None
ray.shutdown()
print(json.dumps({"url": url, "status": status,
                  "frontend": any("dashboard/dashboard.py" in c and "--disable-frontend" not in c
                                  for c in processes)}))
"""


def _private_ray(*flags: str) -> dict:
    # Its own short temp folder (Ray's socket paths are limited in length), so the session's
    # head keeps its own.
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    env = {**os.environ, **RAY_ENV, "RAY_TMPDIR": temp}
    env.pop("RAY_ADDRESS", None)
    try:
        res = subprocess.run([sys.executable, "-c", PRIVATE_RAY, *flags], env=env,
                             capture_output=True, text=True, timeout=180)  # fmt: skip
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.splitlines()[-1])


@pytest.mark.integration
def test_a_private_ray_starts_the_dashboard_only_when_asked():
    # Off by default: on 2 cores Ray's dashboard (a dozen processes) delays the first step.
    # Without it Ray still runs its dashboard process, with no web frontend and one module.
    quiet = _private_ray()
    assert quiet == {"url": "", "status": None, "frontend": False}
    shown = _private_ray("--dashboard")
    assert shown["frontend"] and shown["status"] == 200, shown
    assert shown["url"].startswith("http://127.0.0.1:"), shown
