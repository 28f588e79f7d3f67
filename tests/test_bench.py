"""The benchmark CLI on the tiny preset (no Ray): the step benchmark end to end, the FLOP count
it reports, and the GPU check's refusal without CUDA and its verdicts."""

from __future__ import annotations

import importlib
import importlib.abc
import json
import sys
import tempfile
from pathlib import Path

import pytest

from pipeline import config as C
from pipeline.bench import train_step_flops
from pipeline.bench.common import gpu_peak_tflops
from tests.cli import run_module
from tests.import_guard import refused_imports

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
    res = run_module(
        "pipeline.bench", "step", "--preset", "tiny", "--variants", "fp32,bf16", "--warmup",
        "1", "--repeats", "1", "--steps-per-repeat", "2", "--threads", "1", "--device", "cpu",
        "--json", str(out), timeout=120,
    )  # fmt: skip
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
    res = run_module("pipeline.bench", "step", "--preset", "tiny", "--variants", "fp64", timeout=60)
    assert res.returncode == 2
    assert "fp64" in res.stderr and "bf16_channels_last" in res.stderr


def test_the_readmes_bench_commands_parse_and_name_real_variants():
    import shlex

    from pipeline.bench.cli import build_parser
    from pipeline.bench.step import VARIANTS

    lines = (REPO / "README.md").read_text().splitlines()
    commands = [shlex.split(line.split("  #")[0])[3:] for line in lines
                if line.startswith("python -m pipeline.bench ")]  # fmt: skip
    assert len(commands) >= 7
    for argv in commands:
        args = build_parser().parse_args(argv)  # an unknown flag exits: the test fails
        if args.command == "step" and args.variants:
            assert set(args.variants.split(",")) <= set(VARIANTS), argv


def test_flops_are_positive_and_scale_with_batch():
    cfg = C.preset("tiny")
    one, two = train_step_flops(cfg, 1), train_step_flops(cfg, 2)
    assert one > 0
    assert 1.9 < two / one < 2.1


# The GPU check (python -m pipeline.bench gpu): its refusal without CUDA, and its verdicts


def without_ray():
    """Ray refused; the bench command's own modules imported afresh, so their top-level
    imports run again."""
    return refused_imports(("ray",), fresh=lambda name: name.startswith("pipeline.bench"))


def test_gpu_check_without_cuda_stops_at_once_without_ray(tmp_path, monkeypatch, capsys):
    # Starting anything (a process, Ray) fails this unit test (tests/conftest.py); a temporary
    # folder made for the runs would land in tmp_path/tmp.
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    report = tmp_path / "gpu.json"
    with without_ray() as refused:
        cli = importlib.import_module("pipeline.bench.cli")
        code = cli.main(["gpu", "--json", str(report)])
        loaded = sorted(n for n in sys.modules if n.partition(".")[0] == "ray")
    assert code != 0
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and err.startswith("error:")
    assert refused == [] and loaded == []
    assert not report.exists() and not any((tmp_path / "tmp").iterdir())


def test_gpu_peaks_come_from_the_device_name():
    peaks = {
        "NVIDIA H200": 989.0,
        "NVIDIA H200 NVL": 835.0,
        "NVIDIA GH200 480GB": 989.0,
        "NVIDIA H100 80GB HBM3": 989.0,
        "NVIDIA H100 PCIe": 756.0,
        "NVIDIA H100 NVL": 835.0,
        "NVIDIA A100-SXM4-80GB": 312.0,
        "NVIDIA L40S": 362.0,
        "NVIDIA A10G": 125.0,
        "Tesla T4": None,
        None: None,
    }
    assert {name: gpu_peak_tflops(name) for name in peaks} == peaks


def step_result(fractions: dict[str, float | None], peak: float | None = 989.0) -> dict:
    """A ``bench step`` result of variants at these fractions of ``peak`` (None: failed)."""
    variants = {}
    for name, fraction in fractions.items():
        if fraction is None:
            variants[name] = {"ok": False, "error": "Traceback ...\ntorch.OutOfMemoryError: CUDA"}
            continue
        tflops = fraction * (peak or 989.0)
        variants[name] = {
            "ok": True,
            "batch_size": 16,
            "ms_per_step": {"median": 1.0},
            "images_per_s": {"median": 2.0},
            "achieved_tflop_per_s": tflops,
            "fraction_of_peak": fraction if peak else None,
            "speedup_vs_fp32": {"median": 3.0},
        }
    return {"gpu": "NVIDIA H200", "gpu_bf16_peak_tflops": peak, "variants": variants}


def test_gpu_check_judges_the_step_against_the_share_of_peak():
    from pipeline.bench.gpu import judge_step

    met = judge_step(step_result({"fp32": 0.05, "fast": 0.45}), 0.40)
    assert met["status"] == "pass" and met["problems"] == []
    assert met["target"]["best_variant"] == "fast" and met["target"]["met"] is True
    assert met["variants"]["fast"]["tflop_per_s"] == pytest.approx(0.45 * 989)

    missed = judge_step(step_result({"fp32": 0.05, "fast": 0.31}), 0.40)
    assert missed["status"] == "fail" and missed["target"]["met"] is False
    assert "fast" in missed["problems"][0] and "31.0%" in missed["problems"][0]
    assert judge_step(step_result({"fp32": 0.05, "fast": 0.31}), 0.0)["status"] == "pass"

    crashed = judge_step(step_result({"fp32": 0.05, "fast": 0.45, "big": None}), 0.40)
    assert crashed["status"] == "fail"
    assert crashed["problems"] == ["variant big failed: torch.OutOfMemoryError: CUDA"]

    unknown = judge_step(step_result({"fp32": 0.05}, peak=None), 0.40)
    assert unknown["status"] == "pass" and unknown["target"]["met"] is None
    assert "not judged" in unknown["target"]["note"]


def test_gpu_check_phases_are_checked_before_anything_runs():
    from pipeline.bench.gpu import parse_phases

    assert parse_phases("step,tests") == ("tests", "step")
    assert parse_phases("tests,train,translate,step") == ("tests", "train", "translate", "step")
    with pytest.raises(ValueError, match="translate"):
        parse_phases("translate")
    with pytest.raises(ValueError, match="choose from tests, train, translate, step"):
        parse_phases("tests,gpu")


def test_startup_names_each_process_and_counts_cpu_before_the_first_step():
    from pipeline.bench.startup import IDLE, _cpu_before, _process_name

    venv = "/v/lib/python3.11/site-packages/ray"
    raylet = [f"{venv}/core/src/ray/raylet/raylet", "--python_worker_command=python",
              f"{venv}/_private/workers/default_worker.py"]  # fmt: skip
    idle = ["python", f"{venv}/_private/workers/default_worker.py", "--raylet-name=/t/raylet", "x"]
    assert _process_name(raylet, False) == "raylet"
    assert _process_name([f"{venv}/core/src/ray/gcs/gcs_server", "--x"], False) == "GCS"
    assert _process_name(idle, False) == IDLE
    assert _process_name(["ray::TrainController.run", ""], False) == "TrainController"
    assert _process_name(["ray::IDLE"], False) == IDLE
    assert _process_name(["python", "-m", "pipeline.train"], True).startswith("pipeline.train")
    # CPU counted up to the first step only; a process started after it is not counted.
    samples = {1: ["raylet", [(0.5, 0.1), (2.0, 0.4), (9.0, 3.0)]],
               2: ["MapBatches", [(1.0, 0.2), (2.5, 1.0)]],
               3: ["MapBatches", [(1.5, 0.3)]],
               4: ["_StatsActor", [(5.0, 0.5)]]}  # fmt: skip
    assert _cpu_before(samples, until=3.0) == {"raylet": [0.4, 1], "MapBatches": [1.3, 2]}
