"""Image decoding and validation, shared by dataset preparation and the training readers, and
the row labels of the training sample grids.

Every image becomes 8-bit RGB with its EXIF orientation applied:

- grayscale, bilevel and palette images are expanded to RGB;
- images with transparency (RGBA, LA, palette with a transparent colour) are composited on
  white, because fully transparent pixels often hold arbitrary colours that would otherwise
  show up as black or noisy borders;
- CMYK is converted with Pillow's conversion (Adobe's inverted CMYK JPEGs included);
- 16-bit and 32-bit integer images are scaled to 8 bits (``value / 257``), float images are
  clipped to 0..255.

Files that are truncated, not images, empty, absurdly large or decompression bombs raise
:class:`BadImage`, which names the key and the reason.
"""

from __future__ import annotations

import io
import struct
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

# Pillow's own default limit; it only warns at 1x and raises at 2x, we refuse at 1x.
MAX_PIXELS = 89_478_485
MAX_SIDE = 32_768
# Formats whose stored bytes the reader decodes as they are; others are re-encoded to PNG.
READER_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")
# Modes that decode straight to the right pixels (RGB, or gray that the reader expands).
PLAIN_MODES = ("RGB", "L")
ENCODE_FORMATS = ("JPEG", "PNG", "WEBP")
EXIF_ORIENTATION = 0x0112


ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")
"""Pillow formats accepted as images (those prepare reads, plus GIF)."""


class BadImage(ValueError):
    """An image that cannot be used; ``key`` names it, ``reason`` says why."""

    def __init__(self, key: str, reason: str) -> None:
        self.key = key
        self.reason = reason
        super().__init__(f"{key}: {reason}")


@dataclass(frozen=True)
class DecodedImage:
    """An image decoded to 8-bit RGB, with what is needed to decide how to store it."""

    image: Image.Image
    """The pixels: mode RGB, orientation applied."""
    format: str
    """The container format as Pillow names it (JPEG, PNG, WEBP, BMP, TIFF, ...)."""
    stored_as_is: bool
    """Whether the original bytes decode straight to ``image`` (a reader format, RGB or gray
    8-bit, no transparency, no EXIF rotation), so they can be stored unchanged."""


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(img, dtype=np.float64)
        if mode == "I" and values.max(initial=0) <= 255:
            scaled = values
        else:
            scaled = np.clip(values, 0, 65535) / 257.0
        gray = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if mode == "F":
        # NaN has no 8-bit value (casting it is undefined and warns); it becomes black.
        values = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0)
        gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode in ("LA", "La", "PA", "RGBa") or (mode == "L" and "transparency" in img.info):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img).convert("RGB")
    return img.convert("RGB")


def _is_16_bit_png(data: bytes, fmt: str) -> bool:
    # IHDR's bit-depth byte; Pillow hides 16-bit RGB by decoding it to 8-bit RGB.
    return fmt == "PNG" and len(data) > 24 and data[24] == 16


def _declared_size(data: bytes) -> tuple[int, int] | None:
    """Width and height a PNG, GIF or BMP header declares, else None. Pillow refuses a 0-pixel
    side as an unidentified file; this lets the reason say what is actually wrong."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        return struct.unpack("<HH", data[6:10])
    if data[:2] == b"BM" and len(data) >= 26:
        if struct.unpack("<I", data[14:18])[0] == 12:  # OS/2 header: 16-bit sides
            return struct.unpack("<HH", data[18:22])
        width, height = struct.unpack("<ii", data[18:26])
        return width, abs(height)  # a negative height means rows stored top-down
    return None


def decode(data: bytes, key: str, max_pixels: int = MAX_PIXELS) -> DecodedImage:
    """Decode and validate ``data``; raise :class:`BadImage` naming ``key`` if it is unusable."""
    if not data:
        raise BadImage(key, "empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # Only raster formats we list: never hand a file to an external interpreter
            # (EPS goes to Ghostscript) whatever its name says.
            img = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
        width, height = img.size
        if width <= 0 or height <= 0:
            raise BadImage(key, f"empty image ({width}x{height})")
        if width > MAX_SIDE or height > MAX_SIDE:
            raise BadImage(key, f"dimensions {width}x{height} exceed {MAX_SIDE} px per side")
        if width * height > max_pixels:
            raise BadImage(
                key,
                f"{width}x{height} = {width * height} pixels exceeds the limit of {max_pixels} "
                "(possible decompression bomb)",
            )
        fmt = img.format or "UNKNOWN"
        img.load()
        orientation = img.getexif().get(EXIF_ORIENTATION, 1)
        plain = (
            fmt in READER_FORMATS
            and img.mode in PLAIN_MODES
            and "transparency" not in img.info
            and orientation in (0, 1)
            and not _is_16_bit_png(data, fmt)
        )
        img = ImageOps.exif_transpose(img)
        rgb = _to_rgb(img)
    except BadImage:
        raise
    except Image.DecompressionBombError as exc:
        raise BadImage(key, f"possible decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        size = _declared_size(data)
        if size is not None and 0 in size:
            raise BadImage(key, f"empty image ({size[0]}x{size[1]})") from None
        raise BadImage(key, "not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise BadImage(key, f"truncated or corrupt: {exc}") from None
    return DecodedImage(image=rgb, format=fmt, stored_as_is=plain)


def decode_image(data: bytes, key: str, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The 8-bit RGB image in ``data``, orientation applied; :class:`BadImage` if unusable."""
    return decode(data, key, max_pixels).image


Size = tuple[int, int] | Callable[[int, int], tuple[int, int] | None] | None
"""A target size for :func:`decode_resized`: ``(width, height)``; a function of the decoded
image's ``(width, height)`` that returns it (or None), for sizes that depend on the image; or
None for the stored size."""


def decode_resized(
    data: bytes, key: str, size: Size = None, *, nearest: bool = False
) -> np.ndarray:
    """The image in ``data`` as HxWx3 uint8, resized to ``size``: antialiased bicubic as in
    training (:func:`cyclegan.transforms.resize_bicubic`), or nearest-neighbour so that a label
    map keeps only its class colours. :class:`BadImage` (naming ``key``) if unusable."""
    img = decode_image(data, key)
    target = size(*img.size) if callable(size) else size
    if target is None or tuple(target) == img.size:
        return np.asarray(img, dtype=np.uint8)
    if nearest:
        return np.asarray(img.resize(tuple(target), Image.NEAREST), dtype=np.uint8)
    # Imported here: `cyclegan` loads torch (~1 s), which prepare's decode-only workers skip.
    from cyclegan.transforms import resize_bicubic

    return resize_bicubic(img, tuple(target))


def encode_image(img: Image.Image, fmt: str, quality: int = 95) -> bytes:
    """``img`` encoded as JPEG, PNG or WEBP; ``quality`` applies to JPEG and WEBP."""
    fmt = fmt.upper()
    if fmt == "JPG":
        fmt = "JPEG"
    if fmt not in ENCODE_FORMATS:
        raise ValueError(f"format: {fmt!r} is not one of {', '.join(ENCODE_FORMATS)}")
    if img.mode not in ("RGB", "L"):
        img = _to_rgb(img)
    buffer = io.BytesIO()
    if fmt == "JPEG":
        img.save(buffer, "JPEG", quality=quality, subsampling=0 if quality >= 90 else 2)
    elif fmt == "WEBP":
        img.save(buffer, "WEBP", quality=quality, method=4)
    else:
        # Level 3 is about twice as fast as the default 6 for a few percent more bytes.
        img.save(buffer, "PNG", compress_level=3)
    return buffer.getvalue()


LABEL_PAD = 4
"""Pixels of margin on each side of a row label."""


def label_rows(grid: np.ndarray, labels: Sequence[str]) -> np.ndarray:
    """``grid`` (H x W x 3 uint8, ``len(labels)`` rows of equal height, top to bottom) with a
    white left margin naming each row in black, in Pillow's default font. The grid's own pixels
    are kept as they are, right of the margin."""
    if grid.ndim != 3 or grid.shape[2] != 3 or grid.dtype != np.uint8:
        raise ValueError(f"label_rows: grid must be H x W x 3 uint8, got {grid.shape} {grid.dtype}")
    height = grid.shape[0]
    if not labels or height % len(labels):
        raise ValueError(f"label_rows: {height} px do not split into {len(labels)} equal rows")
    font = ImageFont.load_default()
    boxes = [font.getbbox(text) for text in labels]
    width = max(box[2] for box in boxes) + 2 * LABEL_PAD
    row_height = height // len(labels)
    rows = []
    for text, (_, top, _, bottom) in zip(labels, boxes, strict=True):
        # Each label is drawn on its own row's strip, so one too tall for its row is cut off
        # rather than drawn over the next.
        strip = Image.new("RGB", (width, row_height), "white")
        y = (row_height - (bottom - top)) // 2 - top
        ImageDraw.Draw(strip).text((LABEL_PAD, y), text, fill="black", font=font)
        rows.append(np.asarray(strip))
    return np.concatenate([np.concatenate(rows, axis=0), grid], axis=1)
