"""Which Ray a command joins when no address is given: the cluster ``ray start`` recorded on
this machine while it answers, never a stale record of one that was killed."""

from __future__ import annotations

import os
import socket

from pipeline.ray_cluster import recorded_cluster


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
