"""The GPU check: the CUDA path of the whole system proved by one command on a GPU machine.

    make gpu-check
    python -m pipeline.bench gpu --json gpu-check.json
    python -m pipeline.bench gpu --phases step --min-fraction-of-peak 0   # numbers only

Four phases, in order, each a real command in its own process (output echoed and kept):

    tests      pytest -m gpu: the CUDA tier of the test suite (tests/test_gpu.py)
    train      python -m pipeline.train --preset tiny --gpu (bf16, channels_last) through Ray
               Train, on a small built-in scenes dataset; the MLflow run must be FINISHED
    translate  python -m pipeline.translate with one GPU actor on that run's generator
    step       python -m pipeline.bench step --preset paper --device cuda over GPU_VARIANTS:
               TFLOP/s and the fraction of the GPU's dense bf16 peak per variant; the best must
               reach --min-fraction-of-peak

Everything the runs write goes to a private CYCLEGAN_HOME in a temporary folder (kept when a
phase fails, removed otherwise); the report (every number, each phase's pass/fail) goes to
``--json`` after every phase, so a check cut short still leaves what it measured. Without a CUDA
GPU the check exits 2 before it imports Ray or starts anything.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

from pipeline.bench.common import REPO, environment

PHASES = ("tests", "train", "translate", "step")
PHASE_LIMIT_S = {"tests": 240.0, "train": 180.0, "translate": 120.0, "step": 420.0}
"""Upper bounds per phase, so a hang ends (estimated need: about 1, 1, 0.5 and 4 minutes)."""
RUN_NAME = "gpu-check"
SCENES = {"size": 48, "train_a": 24, "train_b": 16, "test": 4}
"""The training data: the built-in scenes, small (tiny crops 32 px of images loaded at 36)."""
TRAIN_STEPS = 12
TRAIN_METRICS = ("loss/G_A", "loss/G_B", "loss/D_A", "loss/D_B", "throughput/images_per_s")
TAIL_LINES = 60


class CheckFailed(Exception):
    """A phase could not go on; its message says what was wrong."""


def run_gpu_check(args: argparse.Namespace) -> int:
    """The whole check; 0 when every phase passed, 1 when one failed, 2 for a usage error or a
    machine without CUDA."""
    if not torch.cuda.is_available():
        print(
            "error: the GPU check needs a CUDA GPU, and this machine has none that torch can "
            f"use (torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}); run "
            "it on a machine with an NVIDIA GPU and its driver",
            file=sys.stderr,
        )
        return 2
    try:
        phases = parse_phases(args.phases)
        if not 0 <= args.min_fraction_of_peak <= 1:
            raise ValueError(
                f"--min-fraction-of-peak: must be in [0, 1], got {args.min_fraction_of_peak}"
            )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from pipeline.config import home

    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.json or os.path.join(home(), "bench", f"gpu-check-{stamp}.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    private = Path(tempfile.mkdtemp(prefix="cyclegan-gpu-check-"))
    started = time.monotonic()
    report = {
        "command": "gpu",
        "ok": None,
        "gpu": torch.cuda.get_device_name(0),
        "gpu_count": torch.cuda.device_count(),
        "torch_cuda": torch.version.cuda,
        "phases_requested": list(phases),
        "min_fraction_of_peak": args.min_fraction_of_peak,
        "home": str(private),
        "phases": {name: {"status": "not run"} for name in phases},
        "env": environment("tiny, paper"),
    }
    print(f"[gpu] {report['gpu']}: phases {', '.join(phases)}; private home {private}")
    write_report(report, out)
    check = Check(private, args.min_fraction_of_peak)
    for name in phases:
        left = args.timeout_s - (time.monotonic() - started)
        t0 = time.monotonic()
        check.last_run = {}
        if left < 10:
            result = fail(f"not started: {args.timeout_s:g} s of --timeout-s were used up")
        else:
            print(f"\n[gpu] phase {name} (at most {min(PHASE_LIMIT_S[name], left):.0f} s)")
            try:
                result = getattr(check, name)(min(PHASE_LIMIT_S[name], left))
            except CheckFailed as exc:
                result = fail(str(exc))
            result.update(check.last_run)
        result["seconds"] = round(time.monotonic() - t0, 1)
        report["phases"][name] = result
        print(f"[gpu] phase {name}: {result['status'].upper()} in {result['seconds']:.0f} s")
        write_report(report, out)
    report["ok"] = all(p["status"] == "pass" for p in report["phases"].values())
    report["seconds"] = round(time.monotonic() - started, 1)
    report["env"]["loadavg_at_end"] = os.getloadavg()
    report["home_kept"] = not report["ok"]
    if report["ok"]:
        shutil.rmtree(private, ignore_errors=True)
    write_report(report, out)
    print_report(report)
    print(f"[gpu] wrote {out}" + ("" if report["ok"] else f"; the runs' files are in {private}"))
    return 0 if report["ok"] else 1


def parse_phases(text: str) -> tuple[str, ...]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in PHASES]
    if unknown or not names:
        raise ValueError(f"--phases: {unknown or 'none'}; choose from {', '.join(PHASES)}")
    if "translate" in names and "train" not in names:
        raise ValueError("--phases: translate translates with the train phase's model: add train")
    return tuple(n for n in PHASES if n in names)


def fail(*problems: str) -> dict:
    return {"status": "fail", "problems": list(problems)}


def judged(result: dict, problems: list[str]) -> dict:
    """``result`` with its status: pass when no problem was found."""
    return {"status": "fail" if problems else "pass", "problems": problems, **result}


def write_report(report: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)


# the phases


class Check:
    """The phases, each a method taking its time limit and returning its result dict; they share
    the private home (the train phase's run is what the translate phase loads)."""

    def __init__(self, home: Path, min_fraction: float):
        self.home, self.min_fraction = home, min_fraction
        self.data = home / "data" / "scenes"
        self.logs = home / "logs"
        self.logs.mkdir(parents=True)
        self.last_run: dict = {}
        """Exit status, log path and (on failure) the output's tail of the phase's last command."""
        self.env = {**os.environ, "CYCLEGAN_HOME": str(home), "PYTHONUNBUFFERED": "1"}
        # A check of its own: its local Ray and its MLflow store, never a configured one.
        for key in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
            self.env.pop(key, None)
        for key, value in {
            "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0",
            "MLFLOW_DISABLE_TELEMETRY": "true",
        }.items():
            self.env.setdefault(key, value)

    def tests(self, limit_s: float) -> dict:
        junit = self.home / "gpu-tests.xml"
        cmd = ["-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}"]
        code, _ = self.run("tests", [*cmd, "tests"], limit_s)
        outcomes = junit_outcomes(junit) if junit.is_file() else {}
        counts = collections.Counter(o["outcome"] for o in outcomes.values())
        problems = [] if code == 0 else [f"pytest {ended(code)}"]
        if not counts["passed"]:
            problems.append("no test marked gpu passed")
        bad = [t for t, o in outcomes.items() if o["outcome"] in ("failed", "error")]
        problems += [f"{t}: {outcomes[t]['outcome']}" for t in bad]
        return judged({"counts": dict(counts), "tests": outcomes}, problems)

    def train(self, limit_s: float) -> dict:
        deadline = time.monotonic() + limit_s
        synth = [
            "-m", "pipeline.synth", "scenes", str(self.data), "--size", str(SCENES["size"]),
            "--train-a", str(SCENES["train_a"]), "--train-b", str(SCENES["train_b"]),
            "--test", str(SCENES["test"]),
        ]  # fmt: skip
        code, _ = self.run("synth", synth, min(120.0, limit_s))
        if code != 0:
            raise CheckFailed(f"pipeline.synth {ended(code)}: no dataset to train on")
        train = [
            "-m", "pipeline.train", "--preset", "tiny", "--gpu", "--data", str(self.data),
            "--name", RUN_NAME, "--max-steps", str(TRAIN_STEPS),
            "--set", "train.precision=bf16", "--set", "train.channels_last=true",
        ]  # fmt: skip
        code, output = self.run("train", train, deadline - time.monotonic())
        problems = [] if code == 0 else [f"pipeline.train {ended(code)}"]
        if "device cuda" not in output:
            problems.append("no training worker said it ran on 'device cuda'")
        result = mlflow_run(self.home)
        problems += result.pop("problems")
        return judged(result, problems)

    def translate(self, limit_s: float) -> dict:
        output_dir = self.home / "translated"
        if not (self.home / "checkpoints" / RUN_NAME).is_dir():
            raise CheckFailed(f"not started: the train phase left no run {RUN_NAME} to load")
        cmd = [
            "-m", "pipeline.translate", "--model", RUN_NAME, "--direction", "AtoB",
            "--input", str(self.data), "--output", str(output_dir),
            "--num-actors", "1", "--num-gpus-per-actor", "1",
        ]  # fmt: skip
        code, output = self.run("translate", cmd, limit_s)
        files = (
            sorted(p for p in output_dir.rglob("*") if p.is_file()) if output_dir.is_dir() else []
        )
        problems = [] if code == 0 else [f"pipeline.translate {ended(code)}"]
        if "1 GPU each" not in output:
            problems.append("the translation did not report a GPU actor ('1 GPU each')")
        if len(files) != SCENES["test"]:
            problems.append(f"{len(files)} images written, expected testA's {SCENES['test']}")
        speed = re.search(r"\(([\d.]+) images/s", output)
        result = {"images_written": len(files), "images_per_s": float(speed[1]) if speed else None}
        return judged(result, problems)

    def step(self, limit_s: float) -> dict:
        from pipeline.bench.step import GPU_VARIANTS

        path = self.home / "step.json"
        cmd = [
            "-m", "pipeline.bench", "step", "--preset", "paper", "--device", "cuda",
            "--variants", ",".join(GPU_VARIANTS), "--json", str(path),
        ]  # fmt: skip
        code, _ = self.run("step", cmd, limit_s)
        if code != 0 or not path.is_file():
            raise CheckFailed(f"the step benchmark {ended(code)} and wrote no result")
        return judge_step(json.loads(path.read_text()), self.min_fraction)

    def run(self, label: str, args: list[str], limit_s: float) -> tuple[int | None, str]:
        """``python ARGS`` in the repository, its output echoed and written to logs/LABEL.log;
        returns (exit status, None when it ran past ``limit_s`` and was stopped; the output)."""
        log = self.logs / f"{label}.log"
        code, output = run_logged([sys.executable, *args], self.env, log, limit_s)
        self.last_run = {"exit_status": code, "log": str(log)}
        if code != 0:
            self.last_run["output_tail"] = output.splitlines()[-TAIL_LINES:]
        return code, output


def ended(code: int | None) -> str:
    return "was stopped at its time limit" if code is None else f"exited with {code}"


def run_logged(cmd: list[str], env: dict, log: Path, limit_s: float) -> tuple[int | None, str]:
    """Run ``cmd`` in its own process group with a time limit; (exit status or None, output)."""
    timed_out = threading.Event()
    lines: list[str] = []
    with open(log, "w") as sink:
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
        )

        def expire() -> None:
            timed_out.set()
            stop_group(proc)

        timer = threading.Timer(max(limit_s, 1.0), expire)
        timer.start()
        try:
            for line in proc.stdout:
                sys.stdout.write("  | " + line)
                sys.stdout.flush()
                sink.write(line)
                lines.append(line)
            code = proc.wait()
        except BaseException:
            stop_group(proc)  # Ctrl-C here: the command's group does not get the terminal's
            raise
        finally:
            timer.cancel()
    if timed_out.is_set():
        lines.append(f"[gpu] stopped after {limit_s:.0f} s\n")
        return None, "".join(lines)
    return code, "".join(lines)


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the command's process group (the commands clean up: their local Ray stops),
    then SIGKILL to what is left after 20 s."""
    for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


# reading what the commands wrote


def junit_outcomes(path: Path) -> dict[str, dict]:
    """``{test id: {"outcome": passed|failed|error|skipped, "seconds", "message"?}}`` from the
    JUnit XML pytest writes."""
    outcomes = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        test = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome, message = "passed", None
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                outcome = "failed" if tag == "failure" else tag
                message = found.get("message") or ""
                break
        outcomes[test] = {"outcome": outcome, "seconds": float(case.get("time", 0))}
        if message is not None:
            outcomes[test]["message"] = message[:500]
    return outcomes


def mlflow_run(home: Path) -> dict:
    """The one MLflow run in ``home``'s store: its status, device and last metrics."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{home}/mlflow.db")
    experiment = client.get_experiment_by_name("cyclegan")
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    if len(runs) != 1:
        return {"problems": [f"the MLflow store holds {len(runs)} runs, expected 1"]}
    run = runs[0]
    problems = []
    if run.info.status != "FINISHED":
        problems.append(f"MLflow run {run.info.run_id} is {run.info.status}, not FINISHED")
    params = run.data.params
    if params.get("scaling.use_gpu") != "True":
        problems.append(f"param scaling.use_gpu is {params.get('scaling.use_gpu')!r}, not True")
    metrics = {}
    for key in TRAIN_METRICS:
        history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
        if not history or not all(math.isfinite(m.value) for m in history):
            problems.append(f"metric {key}: {len(history)} values, not all finite")
            continue
        metrics[key] = {"last": history[-1].value, "last_step": history[-1].step}
    return {
        "problems": problems,
        "mlflow_run_id": run.info.run_id,
        "mlflow_status": run.info.status,
        "precision": params.get("train.precision"),
        "channels_last": params.get("train.channels_last"),
        "metrics": metrics,
    }


def judge_step(result: dict, min_fraction: float) -> dict:
    """The step benchmark's result with a verdict: every variant ran, and the best one reached
    ``min_fraction`` of the dense bf16 peak (not judged when the GPU's peak is not known)."""
    problems = [
        f"variant {name} failed: {v['error'].strip().splitlines()[-1]}"
        for name, v in result["variants"].items()
        if not v["ok"]
    ]
    ran = {name: v for name, v in result["variants"].items() if v["ok"]}
    summary = {
        name: {
            "batch_size": v["batch_size"],
            "ms_per_step": v["ms_per_step"]["median"],
            "images_per_s": v["images_per_s"]["median"],
            "tflop_per_s": v["achieved_tflop_per_s"],
            "fraction_of_peak": v["fraction_of_peak"],
            "speedup_vs_fp32": (v.get("speedup_vs_fp32") or {}).get("median"),
        }
        for name, v in ran.items()
    }
    best = max(summary, key=lambda n: summary[n]["tflop_per_s"], default=None)
    peak = result["gpu_bf16_peak_tflops"]
    target = {"min_fraction_of_peak": min_fraction, "peak_tflops": peak, "best_variant": best}
    if best is not None:
        target["best_tflop_per_s"] = summary[best]["tflop_per_s"]
        target["best_fraction_of_peak"] = summary[best]["fraction_of_peak"]
    if peak is None:
        target["met"] = None
        target["note"] = f"no dense bf16 peak is known for {result.get('gpu')!r}: not judged"
    elif best is None:
        target["met"] = False
        problems.append("no variant ran")
    else:
        target["met"] = summary[best]["fraction_of_peak"] >= min_fraction
        if not target["met"]:
            problems.append(
                f"best variant {best}: {summary[best]['tflop_per_s']:.1f} TFLOP/s = "
                f"{100 * summary[best]['fraction_of_peak']:.1f}% of the {peak:g} TFLOP/s dense "
                f"bf16 peak, under the {100 * min_fraction:.0f}% asked"
            )
    return judged({"variants": summary, "target": target, "result": result}, problems)


def print_report(report: dict) -> None:
    print(f"\n[gpu] {report['gpu']}, {report['seconds']:.0f} s in all")
    for name, phase in report["phases"].items():
        print(f"  {name:<10}{phase['status'].upper():<9}{phase.get('seconds', 0):>5.0f} s")
        for problem in phase.get("problems", []):
            print(f"      - {problem}")
    step = report["phases"].get("step", {})
    if "variants" in step:
        print(f"\n  {'step variant':<26}{'batch':>6}{'img/s':>9}{'TFLOP/s':>10}{'of peak':>9}")
        for name, v in step["variants"].items():
            share = f"{100 * v['fraction_of_peak']:.1f}%" if v["fraction_of_peak"] else "-"
            print(
                f"  {name:<26}{v['batch_size']:>6}{v['images_per_s']:>9.1f}"
                f"{v['tflop_per_s']:>10.2f}{share:>9}"
            )
        target = step["target"]
        if target["peak_tflops"]:
            print(
                f"  of peak: of the {target['peak_tflops']:g} TFLOP/s dense bf16 peak; target "
                f"{100 * target['min_fraction_of_peak']:.0f}% for the best variant"
            )
        else:
            print(f"  {target['note']}")
    print(f"\n[gpu] {'PASS' if report['ok'] else 'FAIL'}")
