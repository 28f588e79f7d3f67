"""The commands' parsers: ``--help`` without the heavy libraries, and the flags' spellings.

Each command builds its parser from light modules only and imports torch, Ray, MLflow and
pyarrow in the functions that run the command, so ``python -m pipeline.<verb> --help`` answers
at once. The unit test re-imports the ``pipeline`` package in this process with those libraries
hidden and refused, then restores every module as it was.
"""

from __future__ import annotations

import importlib
import importlib.abc
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.import_guard import refused_imports

VERBS = (
    "train",
    "tune",
    "ablation",
    "translate",
    "evaluate",
    "export",
    "prepare",
    "synth",
    "serve",
)
HEAVY = ("torch", "ray", "mlflow", "pyarrow")
FRESH = ("pipeline", "cyclegan")
ROOT = Path(__file__).resolve().parents[1]
HELP_SECONDS = 3.0
"""Generous on purpose: measured well under a second; CI machines are slow and loaded."""


def without_heavy_modules():
    """``HEAVY`` refused; ``pipeline`` and ``cyclegan`` imported afresh, so their module-level
    code runs again."""
    return refused_imports(HEAVY, fresh=lambda name: name.partition(".")[0] in FRESH)


def test_the_guard_refuses_a_heavy_import():
    import pipeline.config

    with without_heavy_modules() as asked, pytest.raises(ImportError, match="refused"):
        importlib.import_module("pipeline.models")
    assert asked and asked[0].partition(".")[0] in HEAVY
    # Afterwards the modules are the ones the rest of the suite imported.
    assert importlib.import_module("pipeline.config") is pipeline.config
    assert "torch" in sys.modules


@pytest.mark.parametrize("verb", VERBS)
def test_help_imports_no_heavy_library(verb, capsys):
    with without_heavy_modules() as asked:
        try:
            command = importlib.import_module(f"pipeline.{verb}")
            with pytest.raises(SystemExit) as exit_info:
                command.main(["--help"])
        except ImportError as exc:
            pytest.fail(f"pipeline.{verb} --help imports {asked}: {exc}")
    assert asked == [], f"pipeline.{verb} --help tried to import {asked}"
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m pipeline.{verb}"), out[:200]


def test_names_spelled_for_the_help_match_the_library():
    from pipeline import config, flags, image_import, prepare, shards

    assert tuple(config.PRESETS) == flags.PRESET_NAMES
    assert prepare.SPLITS == shards.DATASET_NAMES
    assert prepare.REENCODE == image_import.REENCODE_CHOICES
    assert prepare.SHARD_MB * prepare.MIB == shards.DEFAULT_SHARD_BYTES
    assert prepare.MIB == image_import.MIB


def test_dataroot_is_the_data_flag(tmp_path):
    from pipeline import evaluate, flags, train

    parser = train.build_parser()
    args = parser.parse_args(["--dataroot", str(tmp_path)])
    assert args.data == str(tmp_path)
    assert flags.build_config(args).data.uri == str(tmp_path)
    # The later of the two spellings wins, as for any repeated flag.
    assert parser.parse_args(["--data", "a", "--dataroot", "b"]).data == "b"
    assert "--dataroot" in parser.format_help()
    eval_args = evaluate.build_parser().parse_args(["--model", "m", "--dataroot", "d"])
    assert eval_args.data == "d"


@pytest.mark.integration
@pytest.mark.parametrize("verb", VERBS)
def test_help_answers_within_seconds(verb):
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", f"pipeline.{verb}", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    seconds = time.perf_counter() - started
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: python -m pipeline.{verb}")
    print(f"pipeline.{verb} --help: {seconds:.2f} s")
    assert seconds < HELP_SECONDS, f"pipeline.{verb} --help took {seconds:.2f} s"
