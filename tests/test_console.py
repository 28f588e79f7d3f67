"""What a run prints: the header (config as changes from its preset, where things go, the
MLflow link in the training layout) and the closing summary."""

from __future__ import annotations

from pipeline import config as C
from pipeline import overrides
from pipeline.console import config_diff, header, mlflow_link, summary
from pipeline.plan import RunPlan
from pipeline.training import TrainResult


def _plan(cfg: C.Config) -> RunPlan:
    cfg = C.merge(cfg, {"data": {"uri": "/data/scenes"}, "storage": {"uri": "s3://b/runs",
                        "name": "r1"}, "tracking": {"uri": "http://u:secret@127.0.0.1:5000"}})  # fmt: skip
    return RunPlan(cfg, {"A": 24, "B": 16}, True, 2, "", run_id="abc")


def test_config_diff_lists_only_what_differs_from_the_preset_masked():
    cfg = C.merge(C.tiny(), overrides.parse_override("scaling.num_workers=2"))
    cfg = C.merge(cfg, {"tracking": {"uri": "http://u:secret@127.0.0.1:5000"}})
    diff = config_diff(cfg)
    assert "scaling.num_workers=2" in diff
    assert not any(line.startswith("model.") for line in diff)
    assert not any("secret" in line for line in diff)
    assert config_diff(C.tiny()) == []


def test_the_mlflow_link_opens_the_training_layout():
    link = mlflow_link("http://u:pw@127.0.0.1:5000/", "3", "abc")
    assert link == (
        "http://u:***@127.0.0.1:5000/#/experiments/3/runs/abc?workflowType=machine_learning"
    )
    local = mlflow_link("sqlite:////home/u/runs/mlflow.db", "1", "abc")
    assert "make ui" in local and "#/experiments/1/runs/abc?workflowType=machine_learning" in local


def test_header_names_the_run_data_checkpoints_link_and_changes():
    plan = _plan(C.merge(C.tiny(), overrides.parse_override("loss.lambda_cyc=5")))
    text = header(plan, "7", use_gpu=False)
    for part in ("run r1 (preset tiny)", "24 A / 16 B", "s3://b/runs/r1",
                 "#/experiments/7/runs/abc", "loss.lambda_A=5", "2 threads"):  # fmt: skip
        assert part in text, (part, text)
    assert "secret" not in text
    assert len(text.splitlines()) < 20


def test_summary_gives_losses_scores_and_where_the_model_is():
    result = TrainResult("r1", "abc", "s3://b/runs/r1/checkpoint_x", 40,
                         {"loss/G_A": 0.5, "eval/class_iou": 0.25, "lr": 1e-4})  # fmt: skip
    text = summary(result)
    assert "done: run r1, step 40," in text
    assert "G_A 0.500" in text and "class_iou 0.250" in text and "lr" not in text
    assert "s3://b/runs/r1/checkpoint_x" in text


def test_quieting_ray_loggers_never_lowers_a_stricter_level(monkeypatch):
    """A training worker quiets Ray's loggers to warnings; Ray Data's, already at ERROR there
    (RAY_DATA_LOG_LEVEL), must stay at ERROR or its "Progress bars disabled" warning shows."""
    import logging

    from pipeline import console

    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    levels = {name: logging.getLogger(name).level for name in ("", "ray.data", "ray.train")}
    try:
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        logging.getLogger("ray.train").setLevel(logging.INFO)
        console.quiet_ray_loggers(root=True)
        assert logging.getLogger("ray.data").level == logging.ERROR
        assert logging.getLogger("ray.train").level == logging.WARNING
        assert logging.getLogger().getEffectiveLevel() >= logging.WARNING
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
