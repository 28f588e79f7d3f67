"""The training worker's malloc setting: a step's freed buffers stay with the process."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

STEPS = """
import resource, statistics, sys, torch
from pipeline import config as C
from pipeline.bench.step import VARIANTS, StepRunner
from pipeline.worker import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
torch.set_num_threads(1)
runner = StepRunner(C.preset("demo"), 1, VARIANTS["fp32"], "cpu", 0)
runner.run(3)
faults = []
for _ in range(9):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    runner.run(1)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(faults, statistics.median(faults))
"""


def page_faults_per_step(mode: str) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    res = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True,
                         env=env, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr
    return float(res.stdout.split()[-1])


@pytest.mark.integration
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc setting")
def test_a_steps_freed_buffers_are_reused_without_page_faults():
    # The demo step (64 px) allocates and frees buffers of up to a few MiB. By default glibc
    # hands some back to the kernel and the next step faults their pages in again (hundreds
    # of faults a step); kept, the steps after the first few fault none. The median step: now
    # and then a kept step still takes new pages (the heap grows while the image pools fill).
    default, kept = page_faults_per_step("default"), page_faults_per_step("keep")
    assert default > 100
    assert kept < 10
