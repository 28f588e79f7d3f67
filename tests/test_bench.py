"""The benchmark CLI on the tiny preset (no Ray): the step benchmark end to end, and the FLOP
count it reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import config as C
from pipeline.bench import train_step_flops

REPO = Path(__file__).resolve().parents[1]


def cpu_flags() -> set[str]:
    """This machine's CPU flags, from the kernel."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.integration
def test_step_cli_writes_json_with_positive_numbers(tmp_path):
    out = tmp_path / "step.json"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.bench",
            "step",
            "--preset",
            "tiny",
            "--variants",
            "fp32,bf16",
            "--warmup",
            "1",
            "--repeats",
            "1",
            "--steps-per-repeat",
            "2",
            "--threads",
            "1",
            "--device",
            "cpu",
            "--json",
            str(out),
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "fp32" in res.stdout and "GFLOP" in res.stdout
    result = json.loads(out.read_text())
    assert result["command"] == "step" and result["preset"] == "tiny"
    assert result["crop_size"] == 32 and result["batch_size"] == 1
    assert result["flops_per_step"] > 0
    assert set(result["variants"]) == {"fp32", "bf16"}
    for name, v in result["variants"].items():
        assert v["ok"], v.get("error")
        for key in ("ms_per_step", "images_per_s", "speedup_vs_fp32", "others_cpu_share"):
            assert v[key]["n"] == 1, (name, key)
        assert v["ms_per_step"]["median"] > 0
        assert v["images_per_s"]["median"] > 0
        assert v["speedup_vs_fp32"]["median"] > 0
        assert v["achieved_gflop_per_s"] > 0
        assert v["peak_rss_mib"] >= v["base_rss_mib"] > 0
    assert result["variants"]["fp32"]["speedup_vs_fp32"]["median"] == 1.0
    env = result["env"]
    for key in ("cpu_model", "cpu_flags", "cpu_count", "versions", "git_commit", "gpu"):
        assert key in env
    assert env["versions"]["torch"] and env["preset"] == "tiny"
    # The flags the bf16 choice depends on, each as this machine has it (not merely named).
    assert {"amx_bf16", "avx512_bf16"} <= set(env["cpu_flags"])
    assert env["cpu_flags"] == {flag: flag in cpu_flags() for flag in env["cpu_flags"]}


@pytest.mark.integration
def test_unknown_variant_is_refused():
    res = subprocess.run(
        [sys.executable, "-m", "pipeline.bench", "step", "--preset", "tiny", "--variants", "fp64"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2
    assert "fp64" in res.stderr and "bf16_channels_last" in res.stderr


def test_flops_are_positive_and_scale_with_batch():
    cfg = C.preset("tiny")
    one, two = train_step_flops(cfg, 1), train_step_flops(cfg, 2)
    assert one > 0
    assert 1.9 < two / one < 2.1
