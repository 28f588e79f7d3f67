"""Fault injection for the test suite, loaded by training workers only when a test names this
file in ``CYCLEGAN_FAULT_HOOKS``.

- ``CYCLEGAN_FAULT_NAN_STEP``: the inputs of that step become NaN.
"""

import os


def before_step(step: int, rank: int, real_A):
    if os.environ.get("CYCLEGAN_FAULT_NAN_STEP") == str(step):
        real_A = real_A * float("nan")
    return real_A
