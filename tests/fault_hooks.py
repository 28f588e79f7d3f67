"""Fault injection for the test suite, loaded by training workers only when a test names this
file in ``CYCLEGAN_FAULT_HOOKS``.

- ``CYCLEGAN_FAULT_STEP``/``_RANK``/``_MARKER``: that rank dies hard (``os._exit``) once, at that
  step (the marker file says it already happened).
- ``CYCLEGAN_FAULT_NAN_STEP``: the inputs of that step become NaN.
"""

import os
from pathlib import Path


def before_step(step: int, rank: int, real_A):
    if os.environ.get("CYCLEGAN_FAULT_NAN_STEP") == str(step):
        real_A = real_A * float("nan")
    at = os.environ.get("CYCLEGAN_FAULT_STEP")
    if at is None or step != int(at) or rank != int(os.environ.get("CYCLEGAN_FAULT_RANK", "0")):
        return real_A
    marker = os.environ.get("CYCLEGAN_FAULT_MARKER")
    if marker and os.path.exists(marker):
        return real_A
    if marker:
        Path(marker).touch()
    os._exit(1)
