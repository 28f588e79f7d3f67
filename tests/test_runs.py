"""Run folders: the run-info file that ties a run to its MLflow run is never left half-written."""

from __future__ import annotations

import json

import pytest

from pipeline import runs


def test_a_failed_rewrite_keeps_the_run_info(tmp_path):
    storage = str(tmp_path)
    runs.write_info(storage, "r1", {"mlflow_run_id": "abc", "config": {"preset": "tiny"}})
    before = (tmp_path / "r1" / runs.RUN_INFO).read_bytes()
    with pytest.raises(TypeError):
        runs.write_info(storage, "r1", {"mlflow_run_id": object()})  # cannot be serialised
    assert (tmp_path / "r1" / runs.RUN_INFO).read_bytes() == before
    assert runs.read_info(storage, "r1")["mlflow_run_id"] == "abc"
    assert [p.name for p in (tmp_path / "r1").iterdir()] == [runs.RUN_INFO]  # no temp file


def test_a_missing_run_is_named_with_the_runs_there(tmp_path):
    runs.write_info(str(tmp_path), "present", {"mlflow_run_id": "x"})
    with pytest.raises(ValueError, match="no run called 'absent'.*runs there: present"):
        runs.read_info(str(tmp_path), "absent")
    assert json.loads((tmp_path / "present" / runs.RUN_INFO).read_text())["mlflow_run_id"] == "x"
