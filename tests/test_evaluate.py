"""Evaluation: paired label scores with known answers, FID/KID on a small extractor, and the
real CLI writing its report and logging to a real MLflow store."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from cyclegan.checkpoint import save_checkpoint
from cyclegan.networks import ResnetGenerator
from cyclegan.transforms import to_input
from pipeline.evaluate import evaluate, main, paired_scores, read_pairs
from pipeline.images import decode_image
from pipeline.shards import read_manifest
from pipeline.synth import PALETTE, render_scene, scene_index, write_scenes
from tests.ray_fixtures import unpaired_copy
from tests.test_export import write_run

REPO = Path(__file__).resolve().parents[1]
SIZE, TEST = 32, 4


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("eval") / "scenes"
    write_scenes(str(root), size=SIZE, train_a=2, train_b=2, test=TEST, seed=0)
    return str(root)


@pytest.fixture(scope="module")
def unpaired(scenes, tmp_path_factory) -> str:
    """The same images, with a manifest that does not promise paired test images."""
    return unpaired_copy(scenes, tmp_path_factory.mktemp("eval") / "unpaired")


def as_input(key: str, data: bytes) -> torch.Tensor:
    return to_input(torch.from_numpy(np.array(decode_image(data, key)))[None])[0]


class Lookup(nn.Module):
    """A perfect generator: the stored output of every input it knows, exactly."""

    def __init__(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the module a device
        self.pairs = pairs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = []
        for image in x:
            found = [target for source, target in self.pairs if torch.equal(source, image)]
            assert found, "an input the lookup does not know"
            out.append(found[0])
        return torch.stack(out)


class Constant(nn.Module):
    """Paints every pixel one colour (0..255 RGB)."""

    def __init__(self, colour) -> None:
        super().__init__()
        self.colour = nn.Parameter(torch.tensor(colour, dtype=torch.float32) / 127.5 - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.colour.view(1, 3, 1, 1).expand(x.shape[0], 3, *x.shape[2:])


def small_extractor() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.AdaptiveAvgPool2d(2), nn.Flatten())


def test_a_perfect_generator_scores_perfectly(scenes):
    pairs = read_pairs(read_manifest(scenes), "test", None)
    labels = [as_input(k, a) for k, a, _ in pairs]
    photos = [as_input(k, b) for k, _, b in pairs]
    G_AtoB = Lookup(list(zip(labels, photos, strict=True)))
    G_BtoA = Lookup(list(zip(photos, labels, strict=True)))
    G_AtoB.eval()
    G_BtoA.train()
    scores = paired_scores(G_AtoB, G_BtoA, scenes, crop_size=None, batch_size=3)
    assert scores["per_pixel_acc"] == 1.0
    assert scores["per_class_acc"] == 1.0
    assert scores["class_iou"] == 1.0
    assert scores["l1_AtoB"] == 0.0
    assert scores["cycle_l1_A"] == scores["cycle_l1_B"] == 0.0
    assert G_BtoA.training and not G_AtoB.training  # modes restored


def test_label_scores_match_the_scene_class_maps(scenes):
    """A generator that paints everything sky is right exactly on the sky pixels."""
    scores = paired_scores(None, Constant(PALETTE[0].tolist()), scenes, crop_size=None)
    class_maps = np.stack([render_scene(scene_index("test", i), SIZE, 0)[2] for i in range(TEST)])
    sky = (class_maps == 0).mean()
    assert scores["per_pixel_acc"] == pytest.approx(sky)
    present = len(np.unique(class_maps))
    assert scores["per_class_acc"] == pytest.approx(1 / present)
    assert scores["class_iou"] == pytest.approx(sky / present)
    assert set(scores) == {"per_pixel_acc", "per_class_acc", "class_iou"}


def test_random_generators_score_in_range(scenes):
    torch.manual_seed(0)
    G_AtoB, G_BtoA = ResnetGenerator(3, 3, 4, 1), ResnetGenerator(3, 3, 4, 1)
    scores = paired_scores(G_AtoB, G_BtoA, scenes, crop_size=20, limit=3)
    assert set(scores) == {
        "per_pixel_acc",
        "per_class_acc",
        "class_iou",
        "l1_AtoB",
        "cycle_l1_A",
        "cycle_l1_B",
    }
    assert all(0.0 <= v <= 1.0 for v in scores.values()), scores
    assert scores["l1_AtoB"] > 0


def test_unpaired_data_gets_fid_and_kid(unpaired, tmp_path):
    torch.manual_seed(0)
    nets = {"AtoB": ResnetGenerator(3, 3, 4, 1), "BtoA": ResnetGenerator(3, 3, 4, 1)}
    result = evaluate(
        nets, unpaired, size=16, extractor=small_extractor(), out_dir=str(tmp_path), batch_size=3
    )
    m = result["metrics"]
    assert result["mode"] == "unpaired" and result["images"] == {"A": TEST, "B": TEST}
    for d in ("AtoB", "BtoA"):
        assert math.isfinite(m[f"fid_{d}"]) and m[f"fid_{d}"] > 0
        assert math.isfinite(m[f"kid_{d}"]) and m[f"kid_{d}_std"] >= 0
    assert 0 < m["cycle_l1_A"] <= 1 and 0 < m["cycle_l1_B"] <= 1
    # One generator: its own direction only, and no reconstruction.
    same = evaluate({"AtoB": nn.Identity()}, unpaired, size=16, extractor=small_extractor())
    assert "fid_BtoA" not in same["metrics"] and "cycle_l1_A" not in same["metrics"]
    gallery = Image.open(tmp_path / "gallery_AtoB.png")
    assert gallery.size == (3 * 16, TEST * 16)  # input | output | reconstruction


def test_fid_without_weights_names_the_flag(unpaired, tmp_path):
    nets = {"AtoB": ResnetGenerator(3, 3, 4, 1)}
    with pytest.raises(RuntimeError, match="--fid-weights"):
        evaluate(nets, unpaired, fid_weights=str(tmp_path / "missing.pth"))


def mlflow_run(tracking_uri: str, artifacts: Path) -> str:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.create_experiment("cyclegan", artifact_location=artifacts.as_uri())
    return client.create_run(experiment).info.run_id


def test_cli_writes_the_report_and_logs_to_the_run(scenes, tmp_path):
    from mlflow import MlflowClient

    home = tmp_path / "home"
    tracking = f"sqlite:///{home}/mlflow.db"
    home.mkdir()
    run_id = mlflow_run(tracking, home / "artifacts")
    write_run(home / "checkpoints", "evalrun")
    # The checkpoint belongs to this MLflow run.
    ckpt_path = home / "checkpoints" / "evalrun" / "checkpoint_000" / "checkpoint.pt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    ckpt["mlflow_run_id"] = run_id
    save_checkpoint(ckpt, ckpt_path)
    out = tmp_path / "report"
    env = {**os.environ, "CYCLEGAN_HOME": str(home)}
    env.pop("MLFLOW_TRACKING_URI", None)
    res = subprocess.run(
        [sys.executable, "-m", "pipeline.evaluate", "--model", "evalrun", "--data", scenes]
        + ["--out", str(out), "--limit", "3"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert "per_pixel_acc" in res.stdout and f"MLflow run {run_id}" in res.stdout
    report = json.loads((out / "metrics.json").read_text())
    assert report["mode"] == "paired" and report["images"] == {"A": 3, "B": 3}
    assert report["step"] == 3 and report["size"] == 32  # the tiny preset's crop
    assert set(report["metrics"]) >= {"per_pixel_acc", "class_iou", "l1_AtoB", "cycle_l1_A"}
    # 3 rows of input | output | reconstruction | ground truth at 32 px.
    for d in ("AtoB", "BtoA"):
        assert Image.open(out / f"gallery_{d}.png").size == (4 * 32, 3 * 32)
    page = (out / "index.html").read_text()
    assert 'src="gallery_AtoB.png"' in page and 'src="gallery_BtoA.png"' in page

    client = MlflowClient(tracking_uri=tracking)
    logged = client.get_run(run_id).data.metrics
    assert logged["eval/per_pixel_acc"] == pytest.approx(report["metrics"]["per_pixel_acc"])
    assert {m.step for m in client.get_metric_history(run_id, "eval/l1_AtoB")} == {3}
    artifacts = {a.path for a in client.list_artifacts(run_id, "eval")}
    assert {"eval/metrics.json", "eval/index.html", "eval/gallery_AtoB.png"} <= artifacts


def test_cli_official_file_one_direction_to_a_chosen_run(scenes, tmp_path, monkeypatch, capsys):
    from mlflow import MlflowClient

    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    run_id = mlflow_run(tracking, tmp_path / "artifacts")
    pth = tmp_path / "labels_net_G.pth"
    torch.save(ResnetGenerator(3, 3, 4, 2).state_dict(), pth)
    out = tmp_path / "report"
    argv = ["--model", str(pth), "--direction", "BtoA", "--data", scenes, "--out", str(out)]
    assert main(argv + ["--mlflow-run", run_id, "--size", "0"]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert set(report["metrics"]) == {"per_pixel_acc", "per_class_acc", "class_iou"}
    assert report["size"] is None and report["kind"] == "official"
    assert not (out / "gallery_AtoB.png").exists()
    # photo | labels | ground truth: no reconstruction with a single generator.
    assert Image.open(out / "gallery_BtoA.png").size == (3 * SIZE, TEST * SIZE)
    metrics = MlflowClient(tracking_uri=tracking).get_run(run_id).data.metrics
    assert set(metrics) == {"eval/per_pixel_acc", "eval/per_class_acc", "eval/class_iou"}

    assert main(argv + ["--mlflow-run", "0" * 32]) == 1
    assert "logging to MLflow run" in capsys.readouterr().err
    assert main(["--model", str(tmp_path / "nothing.pth"), "--data", scenes]) == 2
    assert "nothing.pth: no such file" in capsys.readouterr().err
