"""Evaluation: the scoring passes on in-memory batches, paired label scores with known answers,
FID/KID on a small extractor, and the real CLI writing its report and logging to a real MLflow
store."""

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
from cyclegan.config import AugmentConfig, eval_size, load_size
from cyclegan.metrics import FID_INCEPTION, TORCHVISION_INCEPTION
from cyclegan.networks import ResnetGenerator
from cyclegan.transforms import (
    eval_view,
    resize_bicubic,
    resize_for_load,
    to_input,
)
from pipeline import config as C
from pipeline.eval_report import evaluate
from pipeline.evaluate import main
from pipeline.images import decode_image, decode_resized, encode_image
from pipeline.plan import check_fid_weights
from pipeline.scenes import PALETTE, render_scene, scene_index, write_scenes
from pipeline.scoring import (
    UNPAIRED_METRICS,
    ImageBatches,
    default_extractor,
    paired_pass,
    paired_scores,
    read_pairs,
    unpaired_pass,
    unpaired_scores,
)
from pipeline.shards import read_manifest
from tests.ray_fixtures import unpaired_copy
from tests.test_export import write_run
from tests.test_metrics import fid_inception_file

REPO = Path(__file__).resolve().parents[1]
SIZE, TEST = 32, 4


pytestmark = pytest.mark.usefixtures("one_thread")


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


class Shift(nn.Module):
    def __init__(self, amount: float) -> None:
        super().__init__()
        self.amount = amount

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.amount).clamp(-1, 1)


# --- the passes, on in-memory batches ----------------------------------------------------------

LABELS = torch.tensor(
    [[0, 0, 0], [128, 64, 128], [70, 130, 180], [255, 255, 255]], dtype=torch.uint8
)


def label_images(ids: torch.Tensor) -> torch.Tensor:
    """Class ids (N, H, W) drawn in LABELS colours as (N, 3, H, W) images in [-1, 1]."""
    return LABELS[ids].permute(0, 3, 1, 2).float() / 127.5 - 1.0


def test_paired_pass_identity_is_perfect_and_restores_modes():
    ids = torch.randint(0, 4, (4, 8, 8), generator=torch.Generator().manual_seed(4))
    labels = label_images(ids)
    batches = [(labels[:2], labels[:2], labels[:2]), (labels[2:], labels[2:], labels[2:])]
    G_AtoB, G_BtoA = nn.Identity(), Shift(0.02)  # noisy colours still map to their class
    G_AtoB.train()
    G_BtoA.eval()
    scores, galleries = paired_pass(G_AtoB, G_BtoA, batches, LABELS, gallery_rows=3)
    assert scores["per_pixel_acc"] == scores["per_class_acc"] == scores["class_iou"] == 1.0
    shift_l1 = ((labels + 0.02).clamp(-1, 1) - labels).abs().mean().item() / 2
    assert scores["l1_AtoB"] == 0.0 and shift_l1 > 0
    assert scores["cycle_l1_A"] == scores["cycle_l1_B"] == pytest.approx(shift_l1)
    assert set(scores) == {"per_pixel_acc", "per_class_acc", "class_iou", "l1_AtoB"} | {
        "cycle_l1_A",
        "cycle_l1_B",
    }
    assert G_AtoB.training and not G_BtoA.training
    gallery = galleries["BtoA"]
    assert gallery.columns == ["input", "output", "reconstruction", "ground truth"]
    assert gallery.grid().shape == (3 * 8, 4 * 8, 3)


def test_paired_pass_hand_computed_scores():
    """Labels painted all one class, and photos painted one colour: every score by hand."""
    ids = torch.randint(0, 3, (3, 6, 5), generator=torch.Generator().manual_seed(1))
    labels = label_images(ids)
    photos = torch.rand(3, 3, 6, 5, generator=torch.Generator().manual_seed(2)) * 2 - 1
    G_BtoA, G_AtoB = Constant(LABELS[1].tolist()), Constant([255, 255, 255])
    batches = [(labels[:2], labels[:2], photos[:2]), (labels[2:], labels[2:], photos[2:])]
    scores, _ = paired_pass(G_AtoB, G_BtoA, batches, LABELS)
    share = (ids == 1).double().mean().item()
    present = len(ids.unique())
    assert scores["per_pixel_acc"] == pytest.approx(share)
    assert scores["per_class_acc"] == pytest.approx(1 / present)
    assert scores["class_iou"] == pytest.approx(share / present)
    assert scores["l1_AtoB"] == pytest.approx(((1 - photos) / 2).mean().item())
    assert scores["cycle_l1_B"] == pytest.approx(scores["l1_AtoB"])  # white from any input
    class_1 = label_images(torch.ones_like(ids))
    assert scores["cycle_l1_A"] == pytest.approx(((class_1 - labels).abs() / 2).mean().item())
    # One direction at a time: only its scores.
    assert set(paired_pass(None, G_BtoA, batches, LABELS)[0]) == {
        "per_pixel_acc",
        "per_class_acc",
        "class_iou",
    }
    assert set(paired_pass(G_AtoB, None, batches, LABELS)[0]) == {"l1_AtoB"}
    with pytest.raises(ValueError, match="at least one generator"):
        paired_pass(None, None, batches, LABELS)


def test_unpaired_pass_identity_gives_zero_fid_and_restores_modes():
    images = torch.rand(32, 3, 16, 16, generator=torch.Generator().manual_seed(14)) * 2 - 1
    batches = list(images.split(8))
    extractor = small_extractor()
    extractor.train()
    nets = {"AtoB": nn.Identity(), "BtoA": nn.Identity()}
    scores, galleries = unpaired_pass(nets, {"A": batches, "B": batches}, extractor, 2)
    assert set(scores) == set(UNPAIRED_METRICS)
    for d in ("AtoB", "BtoA"):
        assert abs(scores[f"fid_{d}"]) < 1e-6
        assert abs(scores[f"kid_{d}"]) < 0.05 and scores[f"kid_{d}_std"] >= 0
    assert scores["cycle_l1_A"] == scores["cycle_l1_B"] == 0.0
    assert extractor.training  # mode restored
    assert galleries["AtoB"].columns == ["input", "output", "reconstruction"]
    assert galleries["AtoB"].grid().shape == (2 * 16, 3 * 16, 3)

    shifted, _ = unpaired_pass({"AtoB": Shift(0.8)}, {"A": batches, "B": batches}, extractor)
    assert set(shifted) == {"fid_AtoB", "kid_AtoB", "kid_AtoB_std"}
    assert shifted["fid_AtoB"] > 1e-3 and shifted["kid_AtoB"] > scores["kid_AtoB"]


def test_passes_report_every_image_they_finish():
    images = torch.rand(10, 3, 8, 8, generator=torch.Generator().manual_seed(15)) * 2 - 1
    batches = list(images.split(4))
    done: list[int] = []
    nets = {"AtoB": nn.Identity(), "BtoA": Shift(0.1)}
    unpaired_pass(nets, {"A": batches, "B": batches}, small_extractor(), progress=done.append)
    # Each direction: its source translated, then its target as the real set.
    assert done == [4, 4, 2] * 4
    done.clear()
    paired_pass(nn.Identity(), nn.Identity(), [(x, x, x) for x in batches], LABELS, 0, done.append)
    assert done == [4, 4, 2]


def test_unpaired_scores_decode_each_pass_and_need_two_images(unpaired):
    manifest = read_manifest(unpaired)
    rows = [(k, b) for k, _, b in read_pairs(manifest, "test", None)]
    batches = ImageBatches(rows, 16, 3)
    first, second = list(batches), list(batches)  # decoded afresh each time
    assert [x.shape for x in first] == [(3, 3, 16, 16), (1, 3, 16, 16)]
    assert all(torch.equal(x, y) for x, y in zip(first, second, strict=True))
    expected = to_input(torch.from_numpy(decode_resized(rows[0][1], rows[0][0], (16, 16)))[None])
    assert torch.equal(first[0][:1], expected)
    with pytest.raises(ValueError, match="at least 2 images of domain A"):
        unpaired_scores(
            {"AtoB": nn.Identity()}, {"A": rows[:1], "B": rows}, small_extractor(), 16, 3
        )


@pytest.mark.parametrize("preprocess", ["resize_and_crop", "scale_width_and_crop", "crop", "none"])
def test_decode_resized_matches_the_training_transforms(preprocess):
    """The one decode+resize gives exactly what the transforms give on the decoded image."""
    pixels = np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    data = encode_image(Image.fromarray(pixels), "PNG")
    cfg = AugmentConfig(load_size=40, crop_size=24, preprocess=preprocess)
    img = decode_image(data, "x.png")
    loaded = decode_resized(data, "x.png", load_size(cfg))
    np.testing.assert_array_equal(loaded, resize_for_load(img, cfg))
    np.testing.assert_array_equal(
        decode_resized(data, "x.png", eval_size(cfg)), eval_view(img, cfg)
    )


def test_decode_resized_sizes_and_nearest_label_maps(scenes):
    key, a_data, b_data = read_pairs(read_manifest(scenes), "test", 1)[0]
    photo = decode_image(b_data, key)
    np.testing.assert_array_equal(decode_resized(b_data, key), np.asarray(photo))
    np.testing.assert_array_equal(
        decode_resized(b_data, key, (20, 12)), resize_bicubic(photo, (20, 12))
    )
    assert decode_resized(b_data, key, lambda w, h: (w // 2, h)).shape == (SIZE, SIZE // 2, 3)
    labels = decode_resized(a_data, key, (21, 21), nearest=True)
    assert {tuple(c) for c in labels.reshape(-1, 3).tolist()} <= {
        tuple(c) for c in PALETTE.tolist()
    }


# --- the scores of a dataset ---------------------------------------------------------------------


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
    # Which network made the features is part of the report.
    assert result["fid_network"] == "Sequential"
    assert json.loads((tmp_path / "metrics.json").read_text())["fid_network"] == "Sequential"
    assert "fid_network: Sequential" in (tmp_path / "index.html").read_text()
    named = small_extractor()
    named.network = "a named net"
    assert (
        evaluate({"AtoB": nn.Identity()}, unpaired, size=16, extractor=named)["fid_network"]
        == "a named net"
    )


def test_progress_bar_on_stderr_only_when_asked(scenes, unpaired, capsys):
    nets = {"AtoB": nn.Identity(), "BtoA": Shift(0.1)}
    kwargs = {"size": 16, "extractor": small_extractor(), "batch_size": 3}
    # Not asked and stderr is no terminal (captured here, as in a log file): nothing at all.
    quiet = evaluate(nets, unpaired, **kwargs)
    assert evaluate(nets, unpaired, progress=False, **kwargs)["metrics"] == quiet["metrics"]
    assert capsys.readouterr().err == ""
    shown = evaluate(nets, unpaired, progress=True, **kwargs)
    err = capsys.readouterr().err
    # Two directions, each reading TEST source and TEST target images.
    assert "evaluate" in err and f"/{2 * 2 * TEST} " in err and "img" in err, err
    assert shown["metrics"] == quiet["metrics"]
    evaluate(nets, scenes, size=16, batch_size=3, progress=True)
    err = capsys.readouterr().err
    assert "evaluate" in err and f"/{TEST} " in err, err


def test_fid_without_weights_names_the_flag(unpaired, tmp_path):
    nets = {"AtoB": ResnetGenerator(3, 3, 4, 1)}
    with pytest.raises(RuntimeError, match=r"missing\.pth: no such file.*--fid-weights"):
        evaluate(nets, unpaired, fid_weights=str(tmp_path / "missing.pth"))
    torch.save(ResnetGenerator(3, 3, 4, 1).state_dict(), tmp_path / "G.pth")
    with pytest.raises(
        RuntimeError, match=r"G\.pth: not an Inception v3 state dict.*--fid-weights"
    ):
        default_extractor(str(tmp_path / "G.pth"))


def test_default_extractor_says_which_network_a_file_holds(tmp_path):
    assert default_extractor(str(fid_inception_file(tmp_path))).network == FID_INCEPTION
    torch.save(torchvision_inception().state_dict(), tmp_path / "inception_v3.pth")
    assert default_extractor(str(tmp_path / "inception_v3.pth")).network == TORCHVISION_INCEPTION


def torchvision_inception() -> nn.Module:
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    return inception_v3(weights=None, aux_logits=False, init_weights=False)


def test_check_fid_weights_reads_the_file_before_training(tmp_path):
    def check(weights: str) -> None:
        check_fid_weights(C.merge(C.tiny(), {"train": {"fid_weights": weights}}))

    check("")
    check("download")
    check(str(fid_inception_file(tmp_path)))
    with pytest.raises(ValueError, match=r"train\.fid_weights: .*none\.pth is not a file"):
        check(str(tmp_path / "none.pth"))
    torch.save(ResnetGenerator(3, 3, 4, 1).state_dict(), tmp_path / "G.pth")
    with pytest.raises(ValueError, match=r"train\.fid_weights: .*G\.pth: not an Inception v3"):
        check(str(tmp_path / "G.pth"))


def mlflow_run(tracking_uri: str, artifacts: Path) -> str:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.create_experiment("cyclegan", artifact_location=artifacts.as_uri())
    return client.create_run(experiment).info.run_id


@pytest.mark.integration
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


@pytest.mark.integration
def test_results_go_only_where_the_user_says(scenes, tmp_path):
    """A checkpoint names the tracking store it was trained with; evaluate still logs only to
    the user's (``$MLFLOW_TRACKING_URI``), never to the stored one."""
    from mlflow import MlflowClient

    home = tmp_path / "home"
    home.mkdir()
    stored = f"sqlite:///{tmp_path}/trained-with.db"
    mine = f"sqlite:///{tmp_path}/mine.db"
    stored_run = mlflow_run(stored, tmp_path / "stored-artifacts")
    write_run(home / "checkpoints", "evalrun")
    ckpt_path = home / "checkpoints" / "evalrun" / "checkpoint_000" / "checkpoint.pt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    ckpt["mlflow_run_id"] = stored_run
    ckpt["config"].setdefault("tracking", {})["uri"] = stored
    save_checkpoint(ckpt, ckpt_path)
    env = {**os.environ, "CYCLEGAN_HOME": str(home), "MLFLOW_TRACKING_URI": mine}
    res = subprocess.run(
        [sys.executable, "-m", "pipeline.evaluate", "--model", "evalrun", "--data", scenes]
        + ["--out", str(tmp_path / "report"), "--limit", "2"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    # The run is not in the user's store: the report is written, logging says where it tried.
    assert (tmp_path / "report" / "metrics.json").exists()
    assert res.returncode == 1 and "mine.db" in res.stderr, res.stderr[-2000:]
    assert not MlflowClient(stored).get_run(stored_run).data.metrics  # nothing went there
