"""Small image files for the tests: random pixels in a format, and a decompression bomb."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def image_bytes(width: int, height: int, fmt: str = "PNG", seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def bomb_png() -> bytes:
    """A small file that decodes to 4100 x 4100 pixels, over Pillow's and our limit."""
    buffer = io.BytesIO()
    Image.new("1", (4100, 4100)).save(buffer, "PNG")
    return buffer.getvalue()
