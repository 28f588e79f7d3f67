"""``prepare --overwrite`` keeps the old dataset whole until the new one is: a write that fails
half-way (a bad image with --strict, an exception, Ctrl-C) leaves the old one readable."""

from __future__ import annotations

import io
import posixpath
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import image_import, storage
from pipeline.image_import import PrepareError, prepare
from pipeline.shards import read_manifest

RNG = np.random.default_rng(11)
SHARD_BYTES = 2000  # a few images per shard, so a failed write has finished shards to remove


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def _source(root: Path, seed: int, bad_last: bool = False) -> Path:
    """trainA and trainB of 8 images each; with ``bad_last`` trainB ends (in sort order) with a
    file that does not decode, so --strict fails after trainA and most of trainB are written."""
    for name in ("trainA", "trainB"):
        (root / name).mkdir(parents=True)
        for i in range(8):
            (root / name / f"{i:03d}.png").write_bytes(_png(seed * 100 + i))
    if bad_last:
        (root / "trainB" / "zzz_bad.png").write_bytes(b"not an image")
    return root


def _files(root_uri: str) -> dict[str, int]:
    """Every file under a dataset root: relative path -> size."""
    filesystem, base = storage.resolve(root_uri)
    infos = filesystem.get_file_info(pafs.FileSelector(base, recursive=True))
    return {posixpath.relpath(i.path, base): i.size for i in infos if i.type == pafs.FileType.File}


def _rows(root_uri: str) -> dict[str, list[dict]]:
    manifest = read_manifest(root_uri)
    return {
        name: [
            row
            for path in manifest.shard_paths(name)
            for row in pq.read_table(path, filesystem=manifest.filesystem).to_pylist()
        ]
        for name in manifest.datasets
    }


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def dest(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "ds")
    return f"{request.getfixturevalue('s3_env')}/datasets/ds"


def _interrupt_after(monkeypatch, calls: int) -> None:
    """Ctrl-C while the ``calls``-th image is encoded."""
    real, seen = image_import._stored_bytes, []

    def stored_bytes(*args, **kwargs):
        seen.append(1)
        if len(seen) == calls:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(image_import, "_stored_bytes", stored_bytes)


@pytest.mark.parametrize("failure", ["bad_image_strict", "interrupt"])
def test_a_failed_overwrite_leaves_the_old_dataset_whole(tmp_path, dest, failure, monkeypatch):
    prepare(str(_source(tmp_path / "old", seed=1)), dest, shard_bytes=SHARD_BYTES)
    files, rows = _files(dest), _rows(dest)
    assert len(read_manifest(dest).shard_paths("trainA")) > 1

    new = _source(tmp_path / "new", seed=2, bad_last=failure == "bad_image_strict")
    if failure == "bad_image_strict":
        with pytest.raises(PrepareError, match=r"trainB/zzz_bad\.png"):
            prepare(str(new), dest, overwrite=True, strict=True, shard_bytes=SHARD_BYTES)
    else:
        _interrupt_after(monkeypatch, 8 + 6)  # in trainB, trainA's shards all written
        with pytest.raises(KeyboardInterrupt):
            prepare(str(new), dest, overwrite=True, shard_bytes=SHARD_BYTES)

    # Same manifest, every shard present, same rows, and nothing of the failed write left.
    assert _files(dest) == files
    assert _rows(dest) == rows


def test_an_overwrite_leaves_only_the_new_dataset(tmp_path, dest):
    prepare(str(_source(tmp_path / "old", seed=1)), dest, shard_bytes=SHARD_BYTES)
    old_shards = {p for p in _files(dest) if p.endswith(".parquet")}
    old_rows = _rows(dest)

    new = _source(tmp_path / "new", seed=2)
    prepare(str(new), dest, overwrite=True, shard_bytes=SHARD_BYTES)
    manifest = read_manifest(dest)
    listed = {rel for entry in manifest.datasets.values() for rel in entry["shards"]}
    assert set(_files(dest)) == {"manifest.json"} | listed, "no old shards, no leftovers"
    assert not listed & old_shards
    rows = _rows(dest)
    assert rows != old_rows
    assert [r["image"] for r in rows["trainB"]] == [
        (new / "trainB" / f"{i:03d}.png").read_bytes() for i in range(8)
    ]

    # Again, with one split only: the other's shards go too.
    prepare(str(new), dest, overwrite=True, shard_bytes=SHARD_BYTES, splits=["trainA"])
    manifest = read_manifest(dest)
    assert set(manifest.datasets) == {"trainA"}
    assert set(_files(dest)) == {"manifest.json", *manifest.datasets["trainA"]["shards"]}
    if not storage.is_remote(dest):
        assert sorted(p.name for p in Path(dest).iterdir()) == ["manifest.json", "trainA"]
