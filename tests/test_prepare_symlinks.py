"""Symlinks in a local source folder: prepare never reads outside the folder through one, never
follows a symlinked folder (a loop would list its images again and again), and lists what it
left out."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.image_import import PrepareError, prepare
from pipeline.shards import read_manifest
from pipeline.storage import list_images
from pipeline.translation import list_inputs


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((6, 6, 3), value, dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def tree(tmp_path) -> Path:
    """src/trainA with two images, a symlink to each of them from inside, symlinks out of the
    folder (relative, absolute, to a folder) and a folder loop; src/trainB with one image."""
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "s.png").write_bytes(_png(1))
    (tmp_path / "outside.png").write_bytes(_png(2))
    a = tmp_path / "src" / "trainA"
    (a / "sub").mkdir(parents=True)
    (a / "a.png").write_bytes(_png(3))
    (a / "sub" / "b.png").write_bytes(_png(4))
    os.symlink("a.png", a / "inside.png")
    os.symlink("../../outside.png", a / "up.png")
    os.symlink(tmp_path / "secret" / "s.png", a / "absolute.png")
    os.symlink(tmp_path / "secret", a / "secret_dir")
    os.symlink("..", a / "sub" / "loop")
    (tmp_path / "src" / "trainB").mkdir()
    (tmp_path / "src" / "trainB" / "c.png").write_bytes(_png(5))
    return tmp_path


LEFT_OUT = {"up.png", "absolute.png", "secret_dir", "sub/loop"}


def test_list_images_stays_inside_the_folder(tree):
    listing = list_images(str(tree / "src" / "trainA"))
    assert listing.keys == ["a.png", "inside.png", "sub/b.png"]
    assert {key for key, _ in listing.skipped} == LEFT_OUT
    reasons = dict(listing.skipped)
    assert "outside" in reasons["up.png"] and "outside" in reasons["absolute.png"]
    assert "symlinked folder" in reasons["sub/loop"]


def test_prepare_skips_and_lists_symlinks_out_of_the_folder_and_folder_loops(tree):
    summary = prepare(str(tree / "src"), str(tree / "ds"))
    assert summary["datasets"]["trainA"]["count"] == 3
    assert {(s["dataset"], s["key"]) for s in summary["skipped"]} == {
        ("trainA", key) for key in LEFT_OUT
    }
    manifest = read_manifest(str(tree / "ds"))
    assert sorted(_column(manifest, "key")) == ["a.png", "inside.png", "sub/b.png"]
    assert {s["key"] for s in manifest.skipped("trainA")} == LEFT_OUT
    stored = set(_column(manifest, "image"))
    assert _png(1) not in stored and _png(2) not in stored


def _column(manifest, name: str) -> list:
    return [
        value
        for path in manifest.shard_paths("trainA")
        for value in pq.read_table(path)[name].to_pylist()
    ]


def test_strict_refuses_a_symlink_out_of_the_folder(tree):
    with pytest.raises(PrepareError, match=r"trainA/absolute.png: a symlink to .* outside"):
        prepare(str(tree / "src"), str(tree / "ds"), strict=True)
    assert not (tree / "ds").exists()


def test_translation_inputs_leave_out_symlinks_out_of_the_folder(tree):
    inputs = list_inputs(str(tree / "src" / "trainA"), "AtoB", None)
    assert inputs.keys == ["a.png", "inside.png", "sub/b.png"]
    assert {s["key"] for s in inputs.skipped} == LEFT_OUT
