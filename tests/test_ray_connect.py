"""Which Ray a command joins when no address is given: the cluster ``ray start`` recorded on
this machine while it answers, never a stale record of one that was killed."""

from __future__ import annotations

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
