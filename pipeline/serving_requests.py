"""Serving's requests, checked and decoded on their own (a bad one gets a 4xx naming what is
wrong and never reaches the generator), then translated in size groups: one forward pass each."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from cyclegan.transforms import resize_bicubic, to_input, to_uint8
from pipeline.images import ENCODE_FORMATS, BadImage, decode, encode_image
from pipeline.models import DIRECTIONS
from pipeline.translation import scaled_size

OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP"}
CONTENT_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
QUERY_PARAMS = ("size", "format")


class RequestError(Exception):
    """A request that cannot be served; ``status`` is its HTTP status (4xx)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class Prepared:
    """A checked translate request, ready for the generator."""

    direction: str
    pixels: np.ndarray
    """HxWx3 uint8, resized as asked."""
    format: str
    """Pillow format of the answer (PNG, JPEG, WEBP)."""


def bad_image_status(exc: BadImage) -> int:
    """413 for an image over the limits (a decompression bomb among them), 415 for bytes that
    are no image, 400 for a truncated or corrupt one."""
    if "exceed" in exc.reason or "decompression bomb" in exc.reason:
        return 413
    if exc.reason.startswith("not an image"):
        return 415
    return 400


def parse_options(query: Mapping[str, str], max_pixels: int) -> tuple[int | None, str | None]:
    """(size, Pillow format) of a translate request's query; RequestError if unusable."""
    unknown = sorted(set(query) - set(QUERY_PARAMS))
    if unknown:
        raise RequestError(
            400, f"unknown query parameter(s) {', '.join(unknown)}: use {', '.join(QUERY_PARAMS)}"
        )
    size = None
    if "size" in query:
        try:
            size = int(query["size"])
        except ValueError:
            raise RequestError(400, f"size={query['size']!r}: not a whole number") from None
        if size < 4 or size * size > max_pixels:
            raise RequestError(400, f"size={size}: must be from 4 to {int(max_pixels**0.5)}")
    fmt = None
    if "format" in query:
        fmt = OUTPUT_FORMATS.get(query["format"].lower())
        if fmt is None:
            raise RequestError(400, f"format={query['format']!r}: use one of png, jpeg, webp")
    return size, fmt


def check_direction(direction: str, served: tuple[str, ...]) -> str:
    if direction not in DIRECTIONS:
        raise RequestError(404, f"unknown direction {direction!r}: use {' or '.join(served)}")
    if direction not in served:
        raise RequestError(404, f"this model serves {' and '.join(served)} only, not {direction}")
    return direction


def prepare(
    direction: str,
    body: bytes,
    query: Mapping[str, str],
    served: tuple[str, ...],
    max_pixels: int,
) -> Prepared:
    """Check and decode one translate request as ``translate`` reads an image (safe decode,
    shorter side scaled to ``size``); RequestError with a 4xx status if it is unusable."""
    check_direction(direction, served)
    size, fmt = parse_options(query, max_pixels)
    if not body:
        raise RequestError(400, "empty body: send the image file's bytes as the request body")
    try:
        decoded = decode(body, "the request body", max_pixels)
    except BadImage as exc:
        raise RequestError(bad_image_status(exc), f"the request body: {exc.reason}") from None
    img = decoded.image
    target = scaled_size(*img.size, size)
    if target[0] * target[1] > max_pixels:
        raise RequestError(
            413, f"size={size} makes {target[0]}x{target[1]}, over the limit of {max_pixels} pixels"
        )
    pixels = np.asarray(img, dtype=np.uint8) if target == img.size else resize_bicubic(img, target)
    return Prepared(direction, pixels, fmt or _same_format(decoded.format))


def _same_format(fmt: str) -> str:
    return fmt if fmt in ENCODE_FORMATS else "PNG"


def group_by_size(items: list[Prepared]) -> dict[tuple[str, int, int], list[int]]:
    """Indices of ``items`` by (direction, height, width): each group is one forward pass."""
    groups: dict[tuple[str, int, int], list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault((item.direction, *item.pixels.shape[:2]), []).append(i)
    return groups


@torch.no_grad()
def translate_prepared(
    nets: Mapping[str, torch.nn.Module], items: list[Prepared], device: torch.device
) -> list[np.ndarray]:
    """The generator's output (HxWx3 uint8) for each item: one forward per size group."""
    out: list[np.ndarray] = [np.empty(0)] * len(items)
    for (direction, _, _), indices in group_by_size(items).items():
        batch = torch.from_numpy(np.stack([items[i].pixels for i in indices])).to(device)
        fake = to_uint8(nets[direction](to_input(batch))).numpy()
        for i, pixels in zip(indices, fake, strict=True):
            out[i] = pixels
    return out


def encode(pixels: np.ndarray, fmt: str) -> bytes:
    """An output image as translate writes it."""
    return encode_image(Image.fromarray(pixels), fmt)
