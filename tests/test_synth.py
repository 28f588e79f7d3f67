"""The built-in scenes dataset: classes, layout, determinism, pairing, the CLI and its speed."""

from __future__ import annotations

import io
import itertools
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.images import encode_image
from pipeline.scenes import PALETTE, SCENES_CLASSES, render_scene, scene_index, write_scenes
from pipeline.shards import read_manifest

REPO = Path(__file__).resolve().parents[1]
CLASS = {name: i for i, (name, _) in enumerate(SCENES_CLASSES)}


def _images(root: Path, name: str) -> dict[str, bytes]:
    manifest = read_manifest(str(root))
    rows = itertools.chain.from_iterable(
        pq.read_table(p, filesystem=manifest.filesystem).to_pylist()
        for p in manifest.shard_paths(name)
    )
    return {row["key"]: row["image"] for row in rows}


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_classes_are_many_and_well_separated():
    assert len(SCENES_CLASSES) >= 6
    assert len({name for name, _ in SCENES_CLASSES}) == len(SCENES_CLASSES)
    colours = np.array([c for _, c in SCENES_CLASSES], dtype=np.float64)
    distances = [np.linalg.norm(a - b) for a, b in itertools.combinations(colours, 2)]
    assert min(distances) > 60


def test_scenes_are_laid_out_like_streets():
    seen = set()
    for index in range(24):
        label, photo, class_map = render_scene(index, 64, seed=0)
        assert label.shape == photo.shape == (64, 64, 3) and class_map.shape == (64, 64)
        assert label.dtype == photo.dtype == class_map.dtype == np.uint8
        np.testing.assert_array_equal(label, PALETTE[class_map])
        seen |= set(np.unique(class_map).tolist())
        top, bottom = class_map[0], class_map[-1]
        assert np.isin(top, [CLASS["sky"], CLASS["building"], CLASS["vegetation"]]).all()
        ground = [CLASS[n] for n in ("road", "sidewalk", "vegetation", "car", "person")]
        assert np.isin(bottom, ground).all()
        assert (class_map == CLASS["road"]).any()
        assert photo.std() > 20, "photos are textured, not flat"
    assert seen == set(range(len(SCENES_CLASSES))), "every class appears somewhere"


def test_render_is_deterministic_per_seed_and_any_size():
    a = render_scene(5, 48, seed=1)
    b = render_scene(5, 48, seed=1)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[1], render_scene(5, 48, seed=2)[1])
    assert not np.array_equal(a[1], render_scene(6, 48, seed=1)[1])
    big = render_scene(5, 200, seed=1)[2]
    assert big.shape == (200, 200)
    # The same scene at another size has the same layout, up to resampling.
    small = np.asarray(Image.fromarray(big).resize((48, 48), Image.Resampling.NEAREST))
    assert (small == a[2]).mean() > 0.9
    with pytest.raises(ValueError, match="size"):
        render_scene(0, 4)


def test_train_is_unpaired_and_test_is_paired(tmp_path):
    summary = write_scenes(str(tmp_path / "ds"), size=32, train_a=5, train_b=4, test=3, seed=3)
    assert summary["datasets"] == {"trainA": 5, "trainB": 4, "testA": 3, "testB": 3}
    manifest = read_manifest(str(tmp_path / "ds"))
    assert manifest.paired_test is True and "synth:scenes" in manifest.source
    test_a, test_b = _images(tmp_path / "ds", "testA"), _images(tmp_path / "ds", "testB")
    assert list(test_a) == list(test_b) == ["000000.png", "000001.png", "000002.png"]
    for i, key in enumerate(test_a):
        label, photo, _ = render_scene(scene_index("test", i), 32, seed=3)
        np.testing.assert_array_equal(_pixels(test_a[key]), label)
        np.testing.assert_array_equal(_pixels(test_b[key]), photo)
    train_a, train_b = _images(tmp_path / "ds", "trainA"), _images(tmp_path / "ds", "trainB")
    for i, key in enumerate(train_b):
        label_a = render_scene(scene_index("trainA", i), 32, seed=3)[0]
        label_b, photo_b, _ = render_scene(scene_index("trainB", i), 32, seed=3)
        np.testing.assert_array_equal(_pixels(train_a[key]), label_a)
        np.testing.assert_array_equal(_pixels(train_b[key]), photo_b)
        assert not np.array_equal(label_a, label_b), "trainA and trainB show different scenes"


def test_same_seed_gives_identical_bytes(tmp_path):
    args = {"size": 32, "train_a": 3, "train_b": 3, "test": 2}
    for name, seed in (("one", 0), ("two", 0), ("other", 1)):
        write_scenes(str(tmp_path / name), seed=seed, **args)
    for dataset in ("trainA", "trainB", "testA", "testB"):
        one = _images(tmp_path / "one", dataset)
        assert one == _images(tmp_path / "two", dataset)
        assert one != _images(tmp_path / "other", dataset)


@pytest.mark.integration
def test_cli_writes_and_refuses_to_overwrite(tmp_path):
    command = [sys.executable, "-m", "pipeline.synth", "scenes", str(tmp_path / "ds"), "--size",
               "32", "--train-a", "4", "--train-b", "3", "--test", "0"]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "images/min" in result.stdout
    manifest = read_manifest(str(tmp_path / "ds"))
    assert set(manifest.datasets) == {"trainA", "trainB"} and manifest.paired_test is False
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode != 0 and "--overwrite" in again.stderr


@pytest.mark.integration
def test_throughput_of_render_and_encode():
    n = 60
    start = time.perf_counter()
    for i in range(n):
        label, photo, _ = render_scene(i, 128, seed=0)
        encode_image(Image.fromarray(label), "PNG")
        encode_image(Image.fromarray(photo), "PNG")
    per_min = 2 * n / (time.perf_counter() - start) * 60
    print(f"\nscenes at 128 px, label + photo rendered and PNG-encoded: {per_min:.0f} images/min")
    assert per_min > 1000


SMALL = ["--size", "16", "--train-a", "3", "--train-b", "2", "--test", "1"]


def test_progress_bars_off_a_terminal_only_when_asked(tmp_path, capsys):
    from pipeline.synth import main

    assert main(["scenes", str(tmp_path / "quiet"), *SMALL]) == 0
    assert capsys.readouterr().err == ""
    assert main(["scenes", str(tmp_path / "shown"), *SMALL, "--progress"]) == 0
    err = capsys.readouterr().err
    for label, count in (("trainA", 3), ("trainB", 2), ("testA/testB", 1)):
        assert f"{label}: 100%" in err and f"{count}/{count}" in err, err


def test_progress_bars_on_a_terminal_by_default(tmp_path, monkeypatch):
    import fcntl
    import os
    import select
    import struct
    import termios

    from pipeline.synth import main

    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))  # 80 columns
    with os.fdopen(slave, "w") as terminal:
        monkeypatch.setattr(sys, "stderr", terminal)
        assert main(["scenes", str(tmp_path / "ds"), *SMALL]) == 0
        assert main(["scenes", str(tmp_path / "off"), *SMALL, "--no-progress"]) == 0
        terminal.flush()
        shown = b""
        while select.select([master], [], [], 0.5)[0]:
            shown += os.read(master, 65536)
    os.close(master)
    text = shown.decode()
    # Each split once, from the first run only: --no-progress drew nothing.
    assert text.count("trainA: 100%") == 1 and "testA/testB: 100%" in text, text
