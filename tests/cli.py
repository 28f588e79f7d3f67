"""Running the project's commands as users do: ``python -m MODULE ARGS`` in a new process from
the repository root, unbuffered, with its output captured."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@functools.cache
def _empty_mlflow_store() -> Path:
    """An empty MLflow SQLite store, made once per test session."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    folder = Path(tempfile.mkdtemp(prefix="mlflow-empty-"))
    atexit.register(shutil.rmtree, folder, True)
    db = folder / "mlflow.db"
    SqlAlchemyStore(f"sqlite:///{db}", (folder / "artifacts").as_uri()).engine.dispose()
    return db


def seed_mlflow_store(folder: str | Path) -> None:
    """Give ``folder`` (a command's home, or an MLflow server's store) an empty ``mlflow.db``
    unless it has one: the first open of a new SQLite store runs MLflow's schema migrations,
    seconds of CPU that every test run would pay again. (The commands' own first-run path is
    still taken by the unit tests' in-process stores and by ``make train``.)"""
    db = Path(folder) / "mlflow.db"
    if not db.exists():
        db.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_empty_mlflow_store(), db)


def run_module(
    module: str, *args: str, env: dict | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """``python -m module args`` with ``env`` on top of this process's environment."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def explain(res: subprocess.CompletedProcess) -> str:
    """A failed command's story for an assertion message: its ``error:`` and traceback lines
    wherever they are (Ray's workers may print after them), then the tails of both streams."""
    lines = (res.stdout + "\n" + res.stderr).splitlines()
    errors = [line for line in lines if line.startswith(("error:", "Traceback", "E ", "  File"))]
    return (f"exit {res.returncode}\n--- error lines:\n" + "\n".join(errors[-40:])
            + f"\n--- stdout tail:\n{res.stdout[-2000:]}\n--- stderr tail:\n{res.stderr[-3000:]}")  # fmt: skip
