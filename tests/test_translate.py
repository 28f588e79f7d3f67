"""Batch translation: the UDF and the input checks on their own, then Ray Data end to end on the
shared Ray head (tests marked integration)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cyclegan.transforms import to_input, to_uint8
from pipeline.models import load_generator
from pipeline.translation import Translator, list_inputs, output_key, scaled_size, translate
from tests.test_export import write_run

REPO = Path(__file__).resolve().parents[1]
# name -> (width, height, format): odd and non-square sizes, a subfolder, three formats.
IMAGES = {
    "a.png": (32, 32, "PNG"),
    "sub/b.jpg": (45, 30, "JPEG"),
    "c.png": (23, 17, "PNG"),
    "sub/deeper/d.webp": (20, 36, "WEBP"),
}


def write_images(folder: Path, images: dict = IMAGES) -> None:
    rng = np.random.default_rng(0)
    for key, (w, h, fmt) in images.items():
        path = folder / key
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path, fmt)


@pytest.fixture
def run_dir(tmp_path) -> Path:
    write_run(tmp_path / "checkpoints", "RUN")
    return tmp_path / "checkpoints" / "RUN"


def eager(run_dir: Path, direction: str, path: Path) -> np.ndarray:
    net, _, _ = load_generator(run_dir, direction)
    x = to_input(torch.from_numpy(np.array(Image.open(path).convert("RGB")))[None])
    with torch.no_grad():
        return to_uint8(net(x))[0].numpy()


# without a cluster


def test_output_keys_and_sizes():
    assert output_key("a/b.jpg", "same") == ("a/b.jpg", "JPEG")
    assert output_key("a/b.JPEG", "same") == ("a/b.JPEG", "JPEG")
    assert output_key("x.tif", "same") == ("x.png", "PNG")
    assert output_key("x.jpg", "png") == ("x.png", "PNG")
    assert output_key("x.png", "webp") == ("x.webp", "WEBP")
    assert scaled_size(45, 30, None) == (45, 30)
    assert scaled_size(45, 30, 60) == (90, 60)
    assert scaled_size(20, 36, 10) == (10, 18)


def test_translator_writes_each_image_at_its_size(run_dir, tmp_path, monkeypatch):
    """The UDF itself, with the object store replaced by the payload it would hold."""
    import ray

    monkeypatch.setattr(ray, "get", lambda ref: ref)
    folder, out = tmp_path / "in", tmp_path / "out"
    write_images(folder)
    net, cfg, _ = load_generator(run_dir, "AtoB")
    payload = {"arch": dataclasses.asdict(cfg), "state": net.state_dict(), "source": "test"}
    udf = Translator([payload], str(out), str(folder), None, "same", 1)
    keys = list(IMAGES) + ["broken.png"]
    batch = {
        "path": np.array([str(folder / k) for k in keys], dtype=object),
        "bytes": np.array([(folder / k).read_bytes() for k in IMAGES] + [b"junk"], dtype=object),
    }
    result = udf(batch)
    assert sorted(result["output"][result["error"] == ""]) == sorted(IMAGES)
    assert list(result["error"][result["key"] == "broken.png"]) != [""]
    for key, (w, h, fmt) in IMAGES.items():
        with Image.open(out / key) as img:
            assert img.size == (w, h) and img.format == fmt, key
    got = np.array(Image.open(out / "c.png"))
    assert np.abs(got.astype(int) - eager(run_dir, "AtoB", folder / "c.png")).max() <= 1

    resized = Translator([payload], str(tmp_path / "small"), str(folder), 8, "png", 1)
    resized({"key": np.array(["q.jpg"], dtype=object), "image": batch["bytes"][1:2]})
    assert Image.open(tmp_path / "small" / "q.png").size == (12, 8)  # 45x30, shorter side 8


def test_inputs_are_checked_before_any_work(run_dir, tmp_path, scenes_32):
    with pytest.raises(ValueError, match="nope: no such file or folder"):
        translate(str(run_dir), "AtoB", str(tmp_path / "nope"), str(tmp_path / "out"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not an image file"):
        list_inputs(str(tmp_path / "notes.txt"), "AtoB", None)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.md").write_text("hello")
    with pytest.raises(ValueError, match="no images .* found 1 other files"):
        list_inputs(str(tmp_path / "docs"), "AtoB", None)
    with pytest.raises(ValueError, match="--split trainC: not a dataset"):
        list_inputs(scenes_32, "AtoB", "trainC")
    shards = list_inputs(scenes_32, "BtoA", None)
    assert shards.kind == "shards" and shards.keys == ["000000.png", "000001.png"]
    folder = tmp_path / "in"
    write_images(folder)
    files = list_inputs(str(folder), "AtoB", None)
    assert files.kind == "files" and files.keys == sorted(IMAGES)
    single = list_inputs(str(folder / "sub" / "b.jpg"), "AtoB", None)
    assert single.keys == ["b.jpg"] and single.base == str(folder / "sub")


@pytest.fixture(scope="module")
def scenes_32(tmp_path_factory) -> str:
    from pipeline.scenes import write_scenes

    root = tmp_path_factory.mktemp("translate") / "scenes"
    write_scenes(str(root), size=32, train_a=1, train_b=1, test=2, seed=0)
    return str(root)


# on the shared Ray head


@pytest.mark.integration
def test_translate_a_folder_of_any_sizes(ray_client, run_dir, tmp_path):
    folder, out = tmp_path / "in", tmp_path / "out"
    write_images(folder)
    (folder / "broken.png").write_bytes(b"not an image")
    result = translate(str(run_dir), "AtoB", str(folder), str(out), batch_size=3)
    assert result["keys"] == sorted(IMAGES)
    assert result["images"] == len(IMAGES) and result["images_per_s"] > 0
    assert [f["key"] for f in result["failed"]] == ["broken.png"]
    for key, (w, h, fmt) in IMAGES.items():
        with Image.open(out / key) as img:
            assert img.size == (w, h) and img.format == fmt, key
    got = np.array(Image.open(out / "c.png"))
    assert np.abs(got.astype(int) - eager(run_dir, "AtoB", folder / "c.png")).max() <= 1
    with pytest.raises(ValueError, match="not empty; pass --overwrite"):
        translate(str(run_dir), "AtoB", str(folder), str(out))
    again = translate(str(run_dir), "AtoB", str(folder / "a.png"), str(out), overwrite=True)
    assert again["keys"] == ["a.png"]


@pytest.mark.integration
def test_actors_wait_for_cpus_a_finished_job_is_still_giving_back(ray_client):
    """Ray Data kills a finished dataset's actors without waiting: a translation right after
    another saw their CPUs as taken and refused to start."""
    import threading
    import time

    import ray

    from pipeline.translation import plan_actors

    total = ray.cluster_resources()["CPU"]
    deadline = time.monotonic() + 60  # until the actors of the tests before are gone too
    while ray.available_resources().get("CPU", 0) < total and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == total >= 2

    @ray.remote(num_cpus=total - 1)  # what is left (1 CPU) cannot hold an actor and a read
    class Holder:
        def ready(self) -> bool:
            return True

    holder = Holder.remote()
    ray.get(holder.ready.remote())
    threading.Timer(1.0, ray.kill, args=(holder,)).start()
    assert plan_actors(1, None) == (1, 0.0, float(int(total - 1)))
    started = time.monotonic()
    with pytest.raises(ValueError, match="--num-actors 99: 99 x 1 CPUs plus reading"):
        plan_actors(99, None)  # beyond the whole cluster: refused at once
    assert time.monotonic() - started < 5


@pytest.mark.integration
def test_translate_from_shards(ray_client, run_dir, scenes, tmp_path):
    out = tmp_path / "fake_A"
    result = translate(str(run_dir), "BtoA", scenes, str(out), load_size=32, fmt="png")
    keys = [f"{i:06d}.png" for i in range(4)]  # the scenes fixture's 4 testB images
    assert result["keys"] == keys and not result["failed"]
    for key in keys:
        assert Image.open(out / key).size == (32, 32)
    result = translate(str(run_dir), "AtoB", scenes, str(tmp_path / "train"), split="trainA")
    assert result["images"] == 24 and Image.open(tmp_path / "train" / "000000.png").size == (48, 48)


@pytest.mark.integration
def test_translate_cli(ray_client, run_dir, tmp_path):
    folder, out = tmp_path / "in", tmp_path / "out"
    write_images(folder, {"only.jpg": (33, 21, "JPEG")})
    env = {**os.environ, **ray_client.env}
    cli = [sys.executable, "-m", "pipeline.translate", "--model", str(run_dir)]
    res = subprocess.run(
        cli + ["--direction", "AtoB", "--input", str(folder), "--output", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "[translate] 1 images" in res.stdout and "images/s" in res.stdout
    with Image.open(out / "only.jpg") as img:
        assert img.size == (33, 21)
    res = subprocess.run(
        cli + ["--direction", "AtoB", "--input", str(tmp_path / "missing"), "--output", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2 and "missing: no such file or folder" in res.stderr
