"""The loss ablation: each variant switches the right terms off, and the CLI trains each one as
a child run and prints the paper-style table."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pipeline import config as C
from pipeline.loss_ablation import VARIANTS, parse_variants, table, variant_config
from tests.cli import explain, seed_mlflow_store
from tests.test_train_cli import REPO, runs_of


def test_variants_switch_off_the_paper_terms():
    base = C.tiny()
    got = {v: variant_config(base, v, "abl").loss for v in VARIANTS}
    assert got["cycle_alone"].lambda_gan == 0 and got["cycle_alone"].lambda_A == 10
    assert got["gan_alone"].lambda_A == got["gan_alone"].lambda_B == 0
    assert got["gan_alone"].lambda_gan == 1
    assert got["gan_forward"].lambda_A == 10 and got["gan_forward"].lambda_B == 0
    assert got["gan_backward"].lambda_A == 0 and got["gan_backward"].lambda_B == 10
    assert got["cyclegan"] == base.loss
    assert variant_config(base, "gan_alone", "abl").storage.name == "abl-gan_alone"


def test_unknown_variant_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown gan_only; choose from cycle_alone"):
        parse_variants("cyclegan,gan_only")


def test_table_has_the_paper_columns():
    text = table([{"variant": "cyclegan", "steps": 5, "eval/per_pixel_acc": 0.5}])
    assert "| Loss | Per-pixel acc. | Per-class acc. | Class IOU |" in text
    assert "| CycleGAN | 0.500 | - | - | - | 5 |" in text


@pytest.mark.integration
def test_cli_trains_each_variant_as_a_child_run(ray_head, scenes, tmp_path):
    seed_mlflow_store(tmp_path)
    env = {**os.environ, **ray_head.env, "CYCLEGAN_HOME": str(tmp_path)}
    env.pop("MLFLOW_TRACKING_URI", None)
    res = subprocess.run(
        [sys.executable, "-m", "pipeline.ablation", "--preset", "tiny", "--data", scenes,
         "--max-steps", "4", "--variants", "gan_alone,cyclegan", "--name", "abl",
         "--set", "tracking.log_model=false"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, explain(res)
    assert "| GAN alone |" in res.stdout and "| CycleGAN |" in res.stdout
    rows = json.loads((tmp_path / "checkpoints" / "abl" / "results.json").read_text())
    assert [r["variant"] for r in rows] == ["gan_alone", "cyclegan"]
    assert all(r["steps"] == 4 and 0 <= r["eval/class_iou"] <= 1 for r in rows)
    _, runs = runs_of(tmp_path)
    parent = next(r for r in runs if r.info.run_name == "abl")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == ["abl-cyclegan", "abl-gan_alone"]
    assert all(r.data.params["loss.lambda_identity"] == "0.0" for r in children)
    gan_alone = next(r for r in children if r.info.run_name == "abl-gan_alone")
    assert gan_alone.data.params["loss.lambda_A"] == "0.0"
    assert "gan_alone/eval/class_iou" in parent.data.metrics
