"""What every benchmark shares: the environment record, statistics, CPU accounting and
running a measurement in a fresh process."""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import json
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]

# bf16 dense tensor-core peaks (TFLOP/s, no sparsity: half the datasheets' sparse figures), from
# NVIDIA's datasheets; the first name found in the device name wins, so specific names come
# first (GH200 holds an H100/H200-class GPU: 989). A10G is AWS's A10 variant and has no figure
# of its own: the A10 one is an upper bound for it.
GPU_BF16_PEAK_TFLOPS = (
    ("H200 NVL", 835.0),
    ("H200", 989.0),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 125.0),
    ("A10", 125.0),
)

# environment and statistics


def environment(preset: str) -> dict:
    """What the numbers were measured on."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        cpuinfo = []
    model = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if "model name" in ln), "")
    flags = set(next((ln.split(":", 1)[1].split() for ln in cpuinfo if ln.startswith("flags")), []))
    versions = {}
    for pkg in ("torch", "torchvision", "ray", "mlflow", "pyarrow", "pillow", "numpy"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "cpu_model": model or platform.processor(),
        "cpu_flags": {f: f in flags for f in ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f")},
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "versions": versions,
        "preset": preset,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain")),
        "loadavg_at_start": os.getloadavg(),
    }


def save_result(result: dict, env: dict, json_path: str | None, tag: str) -> None:
    """Attach the environment (with the load average at the end: how busy the machine was
    around the measurements) and write ``result`` to ``json_path`` when one is given."""
    result["env"] = {**env, "loadavg_at_end": os.getloadavg()}
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
        print(f"[{tag}] wrote {json_path}")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5, cwd=REPO)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def summarize(values: list[float]) -> dict:
    """Median, min, max and quartiles of ``values`` (kept too, in measurement order)."""
    xs = sorted(values)
    q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else xs * 3
    return {
        "median": statistics.median(xs),
        "min": xs[0],
        "max": xs[-1],
        "q1": q1,
        "q3": q3,
        "n": len(xs),
        "samples": list(values),
    }


def gpu_peak_tflops(name: str | None) -> float | None:
    for key, tflops in GPU_BF16_PEAK_TFLOPS:
        if name and key.lower() in name.lower():
            return tflops
    return None


def status_kib(field: str) -> int:
    """A ``VmRSS``/``VmHWM`` line of /proc/self/status in KiB (0 where there is none)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def cpu_busy_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        tick = os.sysconf("SC_CLK_TCK")
        return (sum(fields) - fields[3] - fields[4]) / tick, sum(fields) / tick
    return 0.0, 0.0


def release_free_memory() -> None:
    # Idle variant processes wait while the others run; handing freed heap back to the OS keeps
    # their resident memory (and the pressure on the others) at what they actually hold.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _call_and_send(conn, fn, args) -> None:
    try:
        conn.send(("ok", fn(*args)))
    except BaseException:
        conn.send(("error", traceback.format_exc()))


def in_fresh_process(fn, *args):
    """``fn(*args)`` in a new (spawned, non-daemon: it may start its own workers) process."""
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    process = ctx.Process(target=_call_and_send, args=(child, fn, args))
    process.start()
    child.close()
    try:
        status, value = conn.recv()
    except EOFError:
        process.join()
        status, value = "error", f"the process exited with code {process.exitcode}"
    # The result is in; a child stuck tearing down (a Ray of its own) is not waited for long.
    process.join(60)
    if process.is_alive():
        process.kill()
        process.join()
    if status == "error":
        raise RuntimeError(f"{fn.__name__} failed:\n{value}")
    return value
