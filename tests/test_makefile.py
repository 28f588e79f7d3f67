"""What the Makefile's targets install on a fresh machine: `make train` the package alone,
`make test` the test tools too (dry runs against a venv that does not exist yet)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration


def _dry_run(target: str, tmp_path: Path) -> str:
    res = subprocess.run(
        ["make", "-n", target, f"VENV={tmp_path / 'venv'}", f"CYCLEGAN_HOME={tmp_path}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_train_installs_the_package_without_the_test_tools(tmp_path):
    out = _dry_run("train", tmp_path)
    assert "-m venv" in out and "pip install -c constraints.txt -e ." in out
    assert "[test]" not in out
    assert "pipeline.train --preset demo" in out


def test_test_installs_the_test_tools(tmp_path):
    out = _dry_run("test", tmp_path)
    assert "-e '.[test]'" in out and "pytest" in out
