"""Dataset preparation: the shard format, bad inputs, and the real CLI's errors (local and S3)."""

from __future__ import annotations

import io
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from pipeline import storage
from pipeline.image_import import prepare
from pipeline.images import BadImage, decode, decode_image
from pipeline.shards import SCHEMA, DatasetError, read_manifest
from tests.cli import run_module
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(7)
CLI_SECRET = "Cli-Secret-9f8e7d6c5b"


def _rgb(h: int = 20, w: int = 24) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels but holds almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def _build_sources(root: Path) -> dict[str, np.ndarray | None]:
    """Write trainA (every kind of good and bad file) and trainB; return trainA's good keys ->
    expected RGB pixels (None for lossy files, checked against their own decode)."""
    a, b = root / "trainA", root / "trainB"
    (a / "nested").mkdir(parents=True)
    b.mkdir(parents=True)
    expected: dict[str, np.ndarray | None] = {}

    def put(key: str, data: bytes, pixels: np.ndarray | None) -> None:
        (a / key).write_bytes(data)
        expected[key] = pixels

    rgb = _rgb()
    put("a_rgb.png", _save(Image.fromarray(rgb), "PNG"), rgb)
    put("b_photo.jpg", _save(Image.fromarray(_rgb()), "JPEG", quality=90), None)
    gray = RNG.integers(0, 256, (16, 16), dtype=np.uint8)
    put("c_gray.png", _save(Image.fromarray(gray), "PNG"), np.repeat(gray[..., None], 3, 2))
    deep = RNG.integers(0, 65536, (12, 10), dtype=np.uint16)
    deep_rgb = np.rint(deep / 257.0).astype(np.uint8)
    put("d_16bit.png", _save(Image.fromarray(deep), "PNG"), np.repeat(deep_rgb[..., None], 3, 2))
    cmyk = Image.fromarray(RNG.integers(0, 256, (8, 8, 4), dtype=np.uint8), "CMYK")
    put("e_cmyk.jpg", _save(cmyk, "JPEG", quality=95), None)
    rgba = RNG.integers(0, 256, (10, 10, 4), dtype=np.uint8)
    alpha = rgba[..., 3:].astype(np.float64) / 255
    on_white = np.rint(rgba[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)
    put("f_rgba.png", _save(Image.fromarray(rgba, "RGBA"), "PNG"), on_white)
    tiny = np.array([[[10, 200, 30]]], dtype=np.uint8)
    put("g_tiny.png", _save(Image.fromarray(tiny), "PNG"), tiny)
    rotated = Image.fromarray(_rgb(12, 30))
    exif = rotated.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    put("h_rotated.jpg", _save(rotated, "JPEG", quality=95, exif=exif.tobytes()), None)
    upper = _rgb(9, 9)
    put("nested/i_upper.PNG", _save(Image.fromarray(upper), "PNG"), upper)
    palette = Image.fromarray(_rgb(8, 8)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    put("k_palette.png", _save(palette, "PNG"), np.asarray(palette.convert("RGB")))
    bmp = _rgb(7, 5)
    put("l_image.bmp", _save(Image.fromarray(bmp), "BMP"), bmp)
    tif = _rgb(6, 6)
    put("m_image.tif", _save(Image.fromarray(tif), "TIFF"), tif)
    webp = _rgb(8, 8)
    put("n_image.webp", _save(Image.fromarray(webp), "WEBP", lossless=True), webp)
    # The bad ones, and a file that is not an image at all by its name.
    (a / "bad_bomb.png").write_bytes(_png_header_only(12_000, 12_000))
    (a / "bad_text.png").write_text("this is not an image\n")
    good_jpeg = _save(Image.fromarray(_rgb(64, 64)), "JPEG")
    (a / "bad_truncated.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 3])
    (a / "notes.txt").write_text("ignored")
    for i in range(3):
        (b / f"{i:02d}.jpg").write_bytes(_save(Image.fromarray(_rgb()), "JPEG"))
    return expected


BAD = {
    "bad_bomb.png": "decompression bomb",
    "bad_text.png": "not an image",
    "bad_truncated.jpg": "truncated",
}
STORED_AS_IS = {
    "a_rgb.png",
    "b_photo.jpg",
    "c_gray.png",
    "nested/i_upper.PNG",
    "l_image.bmp",
    "n_image.webp",
    "g_tiny.png",
}


@pytest.fixture
def src_expected(tmp_path) -> tuple[Path, dict[str, np.ndarray | None]]:
    root = tmp_path / "src"
    return root, _build_sources(root)


@pytest.fixture
def src(src_expected) -> Path:
    return src_expected[0]


def _rows(manifest, name: str) -> list[dict]:
    rows = []
    for path in manifest.shard_paths(name):
        table = pq.read_table(path, filesystem=manifest.filesystem)
        assert table.schema.equals(SCHEMA, check_metadata=False)
        rows.extend(table.to_pylist())
    return rows


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return run_module("pipeline.prepare", *args, timeout=timeout)


def test_prepare_local_keeps_good_images_and_lists_bad_ones(src_expected, tmp_path):
    src, expected = src_expected
    summary = prepare(str(src), str(tmp_path / "ds"))
    assert {(s["dataset"], s["key"]) for s in summary["skipped"]} == {("trainA", k) for k in BAD}
    for item in summary["skipped"]:
        assert BAD[item["key"]] in item["reason"]

    manifest = read_manifest(str(tmp_path / "ds"))
    assert set(manifest.datasets) == {"trainA", "trainB"} and manifest.paired_test is False
    assert manifest.count("trainA") == len(expected) and manifest.count("trainB") == 3
    assert {s["key"] for s in manifest.skipped("trainA")} == set(BAD)
    rows = _rows(manifest, "trainA")
    assert [r["key"] for r in rows] == sorted(expected)
    assert manifest.datasets["trainA"]["bytes"] == sum(len(r["image"]) for r in rows)

    originals = {k: (src / "trainA" / k).read_bytes() for k in expected}
    for row in rows:
        key, stored = row["key"], row["image"]
        plain = Image.open(io.BytesIO(stored))
        # Stored bytes decode straight to the right pixels: RGB or gray, no rotation needed.
        assert plain.mode in ("RGB", "L"), key
        assert (row["width"], row["height"]) == plain.size
        if key in STORED_AS_IS:
            assert stored == originals[key], key
        else:
            assert row["format"] == "PNG" and stored != originals[key], key
        pixels = np.asarray(decode_image(stored, key))
        if expected[key] is not None:
            np.testing.assert_array_equal(pixels, expected[key], err_msg=key)
        else:
            original = ImageOps.exif_transpose(Image.open(io.BytesIO(originals[key])))
            np.testing.assert_array_equal(pixels, np.asarray(original.convert("RGB")), err_msg=key)
    by_key = {r["key"]: r for r in rows}
    assert (by_key["h_rotated.jpg"]["width"], by_key["h_rotated.jpg"]["height"]) == (12, 30)
    assert by_key["g_tiny.png"]["width"] == 1 and by_key["b_photo.jpg"]["format"] == "JPEG"


def test_decode_rejects_empty_and_oversized_images():
    with pytest.raises(BadImage, match="empty file"):
        decode(b"", "x.png")
    with pytest.raises(BadImage, match="decompression bomb"):
        decode(_png_header_only(100, 100), "small-limit.png", max_pixels=5_000)
    with pytest.raises(BadImage, match="exceed"):
        decode(_png_header_only(40_000, 10), "wide.png")
    with pytest.raises(BadImage, match="decompression bomb"):
        decode(_png_header_only(30_000, 30_000), "huge.png")


def test_shards_roll_at_the_target_size(tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(12):
        (folder / f"{i:03d}.png").write_bytes(_save(Image.fromarray(_rgb(16, 16)), "PNG"))
    summary = prepare(None, str(tmp_path / "ds"), a=str(folder), b=str(folder), shard_bytes=3000)
    manifest = read_manifest(str(tmp_path / "ds"))
    shards = manifest.datasets["trainA"]["shards"]
    assert len(shards) > 3 and summary["datasets"]["trainA"]["shards"] == len(shards)
    assert shards == [f"trainA/part-{i:05d}.parquet" for i in range(len(shards))]
    assert [r["key"] for r in _rows(manifest, "trainA")] == [f"{i:03d}.png" for i in range(12)]


def test_reencode_and_max_side(src, tmp_path):
    prepare(str(src), str(tmp_path / "ds"), reencode="jpeg", max_side=8, splits=["trainA"])
    manifest = read_manifest(str(tmp_path / "ds"))
    assert set(manifest.datasets) == {"trainA"}
    for row in _rows(manifest, "trainA"):
        assert row["format"] == "JPEG" and max(row["width"], row["height"]) <= 8, row["key"]
        assert Image.open(io.BytesIO(row["image"])).format == "JPEG"


def test_read_manifest_errors_name_the_root_and_what_is_missing(src, tmp_path):
    with pytest.raises(DatasetError, match=r"manifest\.json not found") as no_manifest:
        read_manifest(str(tmp_path / "nothing"))
    assert str(tmp_path / "nothing") in str(no_manifest.value)
    root = tmp_path / "ds"
    prepare(str(src), str(root))
    with pytest.raises(DatasetError, match=r"no dataset 'testA'.*trainA, trainB"):
        read_manifest(str(root)).count("testA")
    (root / "trainB" / "part-00000.parquet").unlink()
    with pytest.raises(DatasetError, match=r"trainB/part-00000\.parquet") as missing:
        read_manifest(str(root))
    assert str(root) in str(missing.value)


@pytest.mark.integration
def test_cli_to_s3_round_trip_without_leaking_the_secret(src, s3_env, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CLI_SECRET)  # moto accepts any key
    dest = f"{s3_env}/datasets/h2z"
    result = run_cli(str(src), dest, "--shard-size-mb", "0.001")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert CLI_SECRET not in output
    assert "skipped trainA/bad_text.png" in result.stdout and "total:" in result.stdout
    manifest = read_manifest(dest)
    assert isinstance(manifest.filesystem, type(storage.resolve(dest)[0]))
    assert manifest.count("trainA") == 13 and len(manifest.shard_paths("trainA")) > 1
    rows = _rows(manifest, "trainA")
    assert [r["key"] for r in rows] == sorted(r["key"] for r in rows)
    by_key = {r["key"]: r for r in rows}
    assert by_key["a_rgb.png"]["image"] == (src / "trainA" / "a_rgb.png").read_bytes()

    # A failing run (the dataset exists) must not leak the secret either.
    again = run_cli(str(src), dest)
    assert again.returncode != 0 and "--overwrite" in again.stderr
    assert CLI_SECRET not in again.stdout + again.stderr


@pytest.mark.integration
def test_cli_strict_fails_on_the_first_bad_file(src, tmp_path):
    dest = tmp_path / "ds"
    result = run_cli(str(src), str(dest), "--strict")
    assert result.returncode != 0
    assert "trainA/bad_bomb.png" in result.stderr and "--strict" in result.stderr
    assert not (dest / "manifest.json").exists()
    assert not list(dest.rglob("*.parquet")), "shards of a failed run are removed"


def _expect_cli_error(args: list[str], message: str, manifest: Path | None = None) -> None:
    result = run_cli(*args)
    assert result.returncode != 0, result.stdout
    assert result.stderr.startswith("error:") and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    if manifest is not None:
        assert not manifest.exists()


@pytest.mark.integration
def test_cli_errors_local(src, tmp_path):
    _expect_cli_error(
        [str(tmp_path / "missing"), str(tmp_path / "d1")],
        "does not exist",
        tmp_path / "d1" / "manifest.json",
    )

    empty = tmp_path / "empty_src"
    (empty / "trainA").mkdir(parents=True)
    (empty / "trainB").mkdir()
    (empty / "trainA" / "x.png").write_bytes(_save(Image.fromarray(_rgb()), "PNG"))
    (empty / "trainB" / "readme.txt").write_text("no images here")
    _expect_cli_error(
        [str(empty), str(tmp_path / "d2")], "trainB: no images", tmp_path / "d2" / "manifest.json"
    )

    only_bad = tmp_path / "bad_src"
    (only_bad / "trainA").mkdir(parents=True)
    (only_bad / "trainA" / "x.png").write_text("not an image")
    _expect_cli_error(
        [str(only_bad), str(tmp_path / "d3")],
        "none of the 1 images",
        tmp_path / "d3" / "manifest.json",
    )

    regular = tmp_path / "regular_file"
    regular.write_text("x")
    _expect_cli_error([str(src), str(regular / "ds")], "not a directory")

    _expect_cli_error([str(tmp_path / "d4"), "--a", str(src / "trainA")], "--a and --b go together")


@pytest.mark.integration
def test_cli_refuses_existing_dest_unless_overwrite(src, tmp_path):
    dest = tmp_path / "ds"
    prepare(str(src), str(dest), splits=["trainA"])
    before = (dest / "manifest.json").read_bytes()
    _expect_cli_error([str(src), str(dest)], "already holds a dataset")
    assert (dest / "manifest.json").read_bytes() == before
    result = run_cli(str(src), str(dest), "--overwrite", "--splits", "trainB")
    assert result.returncode == 0, result.stderr
    manifest = read_manifest(str(dest))
    assert set(manifest.datasets) == {"trainB"} and not list((dest / "trainA").glob("*.parquet"))


@pytest.mark.integration
def test_cli_errors_s3(src, s3_env, monkeypatch):
    _expect_cli_error([str(src), "s3://no-such-bucket-anywhere/ds"], "bucket does not exist")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")
    _expect_cli_error([str(src), f"{s3_env}/ds"], "cannot be reached")


def test_progress_bars_off_a_terminal_only_when_asked(src, tmp_path, capsys):
    prepare(str(src), str(tmp_path / "quiet"))
    assert capsys.readouterr().err == ""
    summary = prepare(str(src), str(tmp_path / "shown"), progress=True)
    err = capsys.readouterr().err
    for name in summary["datasets"]:
        assert f"{name}: 100%" in err, err
