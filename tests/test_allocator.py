"""The training worker's malloc setting: the memory a step frees stays with the process."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

# A 16 MiB buffer (a step's largest are a few MiB at 64 px, tens at 256 px) is written, then
# freed, as at the end of a step. What of it went back to the kernel the next step would
# fault in again, page by page, zero-filled. Nothing but the allocator module is imported,
# so glibc's thresholds are its own start values here (its mmap threshold starts at 128 KiB
# and rises only as mmap'd buffers are freed): the default gives the buffer back.
FREE = """
import ctypes, os, sys
from pipeline.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
size = 16 << 20
buffer = libc.malloc(size)
ctypes.memset(buffer, 1, size)
before = resident()
libc.free(buffer)
print((before - resident()) / 2**20)
"""


def mib_given_back(mode: str) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    res = subprocess.run([sys.executable, "-c", FREE, mode], capture_output=True, text=True,
                         env=env, timeout=60)  # fmt: skip
    assert res.returncode == 0, res.stderr
    return float(res.stdout.split()[-1])


@pytest.mark.integration
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc setting")
def test_a_freed_buffer_stays_resident_for_the_next_step():
    assert mib_given_back("default") > 15  # unmapped at once
    assert mib_given_back("keep") < 1  # from the heap, and the heap is not trimmed
