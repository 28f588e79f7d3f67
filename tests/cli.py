"""Running the project's commands as users do: ``python -m MODULE ARGS`` in a new process from
the repository root, unbuffered, with its output captured."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


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
