"""Hostile input: mutated and random bytes never crash or hang the decoders, and nothing
undecodable is ever accepted, from ``decode`` through the Ray Data UDF to ``prepare``.

Bounded and reproducible: every property runs a fixed number of derandomized examples, and each
decode runs in a daemon thread under a wall-clock limit, so a hang fails the test instead of
stalling CI (Pillow's decoders release the GIL, so the waiting thread still wakes up).
"""

from __future__ import annotations

import io
import json
import random
import re
import struct
import subprocess
import sys
import threading
import warnings
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from cyclegan.config import AugmentConfig
from cyclegan.transforms import resize_for_load
from pipeline.image_import import prepare
from pipeline.images import MAX_PIXELS, MAX_SIDE, BadImage, decode, decode_image, encode_image
from pipeline.reading import decode_resize_batch
from pipeline.shards import read_manifest

REPO = Path(__file__).resolve().parents[1]
# Generous: a fuzzed header may declare a picture near MAX_PIXELS that really gets allocated.
HANG_LIMIT_S = 15.0
FUZZ = settings(
    max_examples=600,
    deadline=None,  # HANG_LIMIT_S is the per-example limit; a wall-clock deadline is flaky
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# Corrupt files make Pillow warn (bad EXIF, short tags); those are expected here.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:PIL")


def _save(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _valid_images() -> dict[str, bytes]:
    """Small valid files of every format and the unusual modes that decode handles."""
    pixels = np.random.default_rng(3).integers(0, 256, (9, 13, 3), dtype=np.uint8)
    rgb = Image.fromarray(pixels)
    rgba = rgb.copy()
    rgba.putalpha(Image.fromarray(pixels[..., 0]))
    deep = Image.fromarray(pixels[..., 1].astype(np.uint16) * 257)
    rotated = rgb.copy()
    exif = rotated.getexif()
    exif[0x0112] = 6
    return {
        "png": _save(rgb, "PNG"),
        "png-rgba": _save(rgba, "PNG"),
        "png-16bit": _save(deep, "PNG"),
        "png-palette": _save(rgb.convert("P"), "PNG"),
        "jpeg": _save(rgb, "JPEG", quality=80),
        "jpeg-progressive": _save(rgb, "JPEG", progressive=True),
        "jpeg-cmyk": _save(rgb.convert("CMYK"), "JPEG"),
        "jpeg-rotated": _save(rotated, "JPEG", exif=exif.tobytes()),
        "webp": _save(rgb, "WEBP"),
        "webp-lossless": _save(rgba, "WEBP", lossless=True),
        "bmp": _save(rgb, "BMP"),
        "bmp-gray": _save(rgb.convert("L"), "BMP"),
        "gif": _save(rgb, "GIF"),
        "tiff": _save(rgb, "TIFF"),
        "tiff-deflate": _save(rgb, "TIFF", compression="tiff_deflate"),
        "tiff-float": _save(Image.fromarray(pixels[..., 2].astype(np.float32)), "TIFF"),
    }


VALID = _valid_images()
VALID_NAMES = sorted(VALID)
# Values that break length and dimension fields: zero, huge, sign bit, one past 16 bits.
FIELD_VALUES = (b"\x00\x00\x00\x00", b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff", b"\x00\x01\x00\x00")


@st.composite
def mutated_images(draw) -> tuple[str, bytes]:
    """(name, bytes): a valid file after 1-4 byte flips, truncations, insertions, field
    overwrites, repeated slices or a header spliced in from another format."""
    name = draw(st.sampled_from(VALID_NAMES))
    data = bytearray(VALID[name])
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(("flip", "truncate", "insert", "field", "repeat", "splice")))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[at] ^= draw(st.integers(1, 255))
        elif op == "truncate":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "field":
            data[at : at + 4] = draw(st.sampled_from(FIELD_VALUES))
        elif op == "repeat":
            data[at:at] = data[draw(st.integers(0, len(data) - 1)) :][: draw(st.integers(1, 64))]
        else:
            other = VALID[draw(st.sampled_from(VALID_NAMES))]
            cut = draw(st.integers(1, min(64, len(other))))
            data[:cut] = other[:cut]
    return name, bytes(data)


MAGICS = (
    b"",
    b"\x89PNG\r\n\x1a\n",
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
    b"\xff\xd8\xff",
    b"GIF89a",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
    b"RIFF\x00\x00\x00\x00WEBPVP8 ",
    b"P6\n3 2\n255\n",
)
random_bytes = st.one_of(
    st.binary(max_size=512),
    st.tuples(st.sampled_from(MAGICS), st.binary(max_size=512)).map(b"".join),
)


def _within(limit_s: float, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` run in a daemon thread; fails the test when it has not returned
    in ``limit_s`` seconds."""
    outcome: dict = {}

    def target() -> None:
        try:
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # handed to the caller below
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(limit_s)
    if thread.is_alive():
        pytest.fail(f"{fn.__name__} still running after {limit_s} s: it hangs")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _decode_or_none(data: bytes, key: str):
    """The decoded image, or None for BadImage; any other exception propagates (a failure)."""
    try:
        return _within(HANG_LIMIT_S, decode, data, key)
    except BadImage as exc:
        assert exc.key == key and exc.reason, exc
        return None


def _check_sane(img: Image.Image, key: str) -> None:
    assert img.mode == "RGB" and img.getbands() == ("R", "G", "B"), (key, img.mode)
    assert 0 < img.width <= MAX_SIDE and 0 < img.height <= MAX_SIDE, (key, img.size)
    assert img.width * img.height <= MAX_PIXELS, (key, img.size)
    array = np.asarray(img)
    assert array.dtype == np.uint8 and array.shape == (img.height, img.width, 3), key


# 1. Mutated valid images.


@FUZZ
@given(mutated_images())
def test_mutated_images_decode_to_rgb_or_raise_bad_image(case):
    name, data = case
    decoded = _decode_or_none(data, name)
    event("refused" if decoded is None else "decoded")  # shown by --hypothesis-show-statistics
    if decoded is None:
        return
    _check_sane(decoded.image, name)
    again = decode_image(encode_image(decoded.image, "PNG"), f"{name} re-encoded")
    np.testing.assert_array_equal(np.asarray(again), np.asarray(decoded.image), err_msg=name)
    if decoded.stored_as_is:
        # prepare stores these bytes unchanged, so a plain decode must give the same pixels.
        plain = Image.open(io.BytesIO(data)).convert("RGB")
        np.testing.assert_array_equal(np.asarray(plain), np.asarray(decoded.image), err_msg=name)


def test_every_valid_seed_decodes():
    # The mutations start from files that really are images, or the test above proves little.
    for name, data in VALID.items():
        _check_sane(decode_image(data, name), name)


def test_float_image_with_nan_decodes_without_warning():
    values = np.array([[np.nan, np.inf, -np.inf, 300.0, 7.4, -3.0]], dtype=np.float32)
    data = _save(Image.fromarray(values, "F"), "TIFF")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        img = decode_image(data, "nan.tif")
    assert np.asarray(img)[0, :, 0].tolist() == [0, 255, 0, 255, 7, 0]


# 2. Random bytes.


@settings(FUZZ, max_examples=400)
@given(random_bytes)
def test_random_bytes_are_accepted_only_when_pillow_decodes_them(data):
    decoded = _decode_or_none(data, "random.bin")
    if decoded is None:
        return
    with Image.open(io.BytesIO(data)) as plain:
        plain.load()
    _check_sane(decoded.image, "random.bin")


# 3. Absurd dimensions.


def _png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def _bmp(width: int, height: int) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    offset = 14 + len(info)
    return b"BM" + struct.pack("<IHHI", offset + 64, 0, 0, offset) + info + b"\x00" * 64


def _gif(width: int, height: int) -> bytes:
    screen = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
    descriptor = b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0)
    return screen + descriptor + b"\x02\x02\x44\x01\x00\x3b"


def _tiff(width: int, height: int) -> bytes:
    entries = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1)]
    entries += [(273, 4, 8 + 2 + 12 * 8 + 4), (278, 4, height), (279, 4, 16)]
    ifd = struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        ifd += struct.pack("<HHII", tag, kind, 1, value)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\0\0\0\0" + b"\x00" * 16


def _jpeg(width: int, height: int) -> bytes:
    data = bytearray(VALID["jpeg"])
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


ABSURD = [
    ("png", 100_000, 100_000),
    ("png", 0, 5),
    ("png", 5, 0),
    ("png", 1, 10**9),
    ("png", 2**31 - 1, 2**31 - 1),
    ("png", 40_000, 1),
    ("png", 12_000, 12_000),  # over MAX_PIXELS, under Pillow's own refusal at twice that
    ("bmp", 100_000, 100_000),
    ("bmp", 0, 5),
    ("bmp", 1, 10**9),
    ("bmp", 100_000, -100_000),
    ("bmp", 12_000, 12_000),
    ("gif", 65_535, 65_535),
    ("gif", 0, 5),
    ("gif", 1, 65_535),
    ("gif", 12_000, 12_000),
    ("tiff", 100_000, 100_000),
    ("tiff", 1, 10**9),
    ("jpeg", 65_535, 65_535),
]
MAKERS = {"png": _png, "bmp": _bmp, "gif": _gif, "tiff": _tiff, "jpeg": _jpeg}
# Decodes every case in a fresh interpreter, where the peak RSS starts small, so a case that
# allocated its pixels would show up as growth of the peak.
MEASURE = """
import json, resource, sys, time
from pipeline.images import BadImage, decode
out = {}
for name, hex_data in json.load(sys.stdin).items():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    try:
        decode(bytes.fromhex(hex_data), name)
        reason = None
    except BadImage as exc:
        reason = exc.reason
    seconds = time.perf_counter() - start
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    out[name] = {"reason": reason, "seconds": seconds, "rss_growth_mb": grown / 1024}
print(json.dumps(out))
"""


def _case_name(fmt: str, width: int, height: int) -> str:
    return f"{fmt}-{width}x{height}"


@pytest.fixture(scope="module")
def absurd_results() -> dict[str, dict]:
    cases = {_case_name(*case): MAKERS[case[0]](*case[1:]).hex() for case in ABSURD}
    run = subprocess.run(
        [sys.executable, "-c", MEASURE],
        input=json.dumps(cases),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.integration
@pytest.mark.parametrize(("fmt", "width", "height"), ABSURD, ids=[_case_name(*c) for c in ABSURD])
def test_absurd_dimensions_are_refused_quickly_without_allocating(
    absurd_results, fmt, width, height
):
    result = absurd_results[_case_name(fmt, width, height)]
    reason = result["reason"]
    assert reason is not None, f"accepted an image declaring {width}x{height}"
    assert re.search(r"decompression bomb|dimensions|empty image", reason), reason
    declared = (f"{width}x{abs(height)}", str(width * abs(height)))
    assert any(text in reason for text in declared), reason
    assert result["seconds"] < 1.0, result
    assert result["rss_growth_mb"] < 200, result


# 4. The Ray Data UDF (called as a plain function; no Ray).

LOAD_CFG = AugmentConfig(load_size=24, crop_size=16)


def _good_image(index: int) -> bytes:
    """A small valid image; sizes and formats vary with ``index``."""
    rng = np.random.default_rng(index)
    pixels = rng.integers(0, 256, (5 + index % 7, 6 + index % 5, 3), dtype=np.uint8)
    fmt = ("PNG", "JPEG", "WEBP", "BMP", "TIFF")[index % 5]
    return _save(Image.fromarray(pixels), fmt)


batch_rows = st.lists(
    st.one_of(
        st.integers(0, 50).map(lambda i: ("good", _good_image(i))),
        mutated_images().map(lambda case: ("fuzzed", case[1])),
        random_bytes.map(lambda data: ("random", data)),
    ),
    max_size=12,
)


@settings(FUZZ, max_examples=60)
@given(batch_rows)
def test_decode_resize_batch_keeps_exactly_the_decodable_rows(rows):
    keys = [f"{i:02d}-{kind}" for i, (kind, _) in enumerate(rows)]
    batch = {"key": np.array(keys, dtype=object), "image": np.empty(len(rows), dtype=object)}
    batch["image"][:] = [data for _, data in rows]
    expected = {}
    for key, (_, data) in zip(keys, rows, strict=True):
        decoded = _decode_or_none(data, key)
        if decoded is not None:
            expected[key] = np.asarray(resize_for_load(decoded.image, LOAD_CFG))
    for key, (kind, _) in zip(keys, rows, strict=True):
        assert kind != "good" or key in expected, key

    out = _within(HANG_LIMIT_S * max(1, len(rows)), decode_resize_batch, batch, LOAD_CFG)

    assert list(out["key"]) == list(expected), "kept rows differ from the decodable ones"
    assert len(out["image"]) == len(expected)
    size = LOAD_CFG.load_size
    if expected:
        assert out["image"].dtype == np.uint8 and out["image"].shape == (
            len(expected),
            size,
            size,
            3,
        )
    for key, image in zip(out["key"], out["image"], strict=True):
        np.testing.assert_array_equal(image, expected[key], err_msg=key)


# 5. prepare() end to end (no Ray).


def _fuzzed_files(count: int, seed: int) -> dict[str, bytes]:
    """``count`` mutated files named with an image extension, from a fixed seed."""
    rng = random.Random(seed)
    files = {}
    for i in range(count):
        name = rng.choice(VALID_NAMES)
        data = bytearray(VALID[name])
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(data)) if data else 0
            op = rng.choice(("flip", "truncate", "insert", "field"))
            if op == "flip" and data:
                data[at] ^= rng.randrange(1, 256)
            elif op == "truncate":
                del data[at:]
            elif op == "insert":
                data[at:at] = rng.randbytes(rng.randint(1, 16))
            else:
                data[at : at + 4] = rng.choice(FIELD_VALUES)
        extension = rng.choice((".png", ".jpg", ".webp", ".bmp", ".tif", ".JPEG"))
        files[f"fuzz/{i:03d}-{name}{extension}"] = bytes(data)
    files["fuzz/empty.png"] = b""
    files["fuzz/text.jpg"] = b"not an image at all\n"
    files["fuzz/bomb.png"] = _png(100_000, 100_000)
    files["fuzz/zero.bmp"] = _bmp(0, 5)
    return files


def test_prepare_skips_every_bad_file_with_a_reason(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    files = {
        f"good/{i:02d}.{('png', 'jpg', 'webp', 'bmp', 'tif')[i % 5]}": _good_image(i)
        for i in range(10)
    }
    files.update(_fuzzed_files(40, seed=11))
    for key, data in files.items():
        (a / key).parent.mkdir(parents=True, exist_ok=True)
        (a / key).write_bytes(data)
    b.mkdir()
    for i in range(3):
        (b / f"{i}.png").write_bytes(_good_image(i))
    decodable = {key for key, data in files.items() if _decode_or_none(data, key) is not None}
    assert {key for key in files if key.startswith("good/")} <= decodable
    fuzzed = {key for key in files if key.startswith("fuzz/")}
    # Both outcomes occur: the run skips broken files and stores damaged but readable ones.
    assert fuzzed & decodable and fuzzed - decodable

    summary = _within(120, prepare, None, str(tmp_path / "ds"), a=str(a), b=str(b))

    skipped = {item["key"]: item["reason"] for item in summary["skipped"]}
    assert set(skipped) == set(files) - decodable
    assert all(reason for reason in skipped.values()), skipped
    assert {item["dataset"] for item in summary["skipped"]} == {"trainA"}
    manifest = read_manifest(str(tmp_path / "ds"))
    assert {s["key"]: s["reason"] for s in manifest.skipped("trainA")} == skipped
    assert manifest.skipped("trainB") == []
    assert manifest.count("trainA") == len(decodable) and manifest.count("trainB") == 3
    rows = []
    for path in manifest.shard_paths("trainA"):
        rows.extend(pq.read_table(path, filesystem=manifest.filesystem).to_pylist())
    assert [row["key"] for row in rows] == sorted(decodable)
    for row in rows:
        img = decode_image(row["image"], row["key"])
        _check_sane(img, row["key"])
        assert img.size == (row["width"], row["height"]), row["key"]
