"""The built-in dataset: procedural street scenes, label maps (A) and rendered photos (B).

Usage::

    python -m pipeline.synth scenes runs/data/scenes                      # 1000/1000/100 at 128 px
    python -m pipeline.synth scenes /tmp/tiny --size 64 --train-a 50 --train-b 50 --test 10
    python -m pipeline.synth scenes s3://bucket/scenes --seed 1 --overwrite

A scene has sky on top with clouds, a skyline of buildings of varied heights and facades, a
road with perspective and lane markings, sidewalks, grass verges, trees, cars on the road and
people on the sidewalks. Domain A draws the scene's classes in the flat colours of
:data:`SCENES_CLASSES` (a labels-to-photo task, like Cityscapes); domain B renders it as a
photo: brick and plaster facades with window grids, foliage noise, asphalt, a sky gradient,
lighting gradients, per-image colour jitter, soft edges and sensor noise.

trainA and trainB come from different scenes (unpaired, as CycleGAN expects); testA/testB show
the same scenes under the same keys (``000042.png``), so the manifest says ``paired_test``.
Both domains are stored as PNG: lossless, and the same key names a scene in both domains.

Scene ``i`` of a split is :func:`scene_index` ``(split, i)``; its layout and its photo each
draw from a numpy Generator seeded with ``(seed, scene, stream)``, so any subset is
reproducible on its own and a scene looks the same (up to resampling) at any size.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

import numpy as np
from PIL import Image

from pipeline import exit_with, storage
from pipeline.images import encode_image
from pipeline.prepare import Progress
from pipeline.shards import (
    DEFAULT_SHARD_BYTES,
    DatasetError,
    ShardWriter,
    build_manifest,
    clear_root,
    delete_files,
    write_manifest,
)

# Cityscapes' colours for the same classes: familiar, and at least 80 apart in RGB.
SCENES_CLASSES: list[tuple[str, tuple[int, int, int]]] = [
    ("sky", (70, 130, 180)),
    ("building", (70, 70, 70)),
    ("road", (128, 64, 128)),
    ("sidewalk", (244, 35, 232)),
    ("vegetation", (107, 142, 35)),
    ("car", (0, 0, 142)),
    ("person", (220, 20, 60)),
]
PALETTE = np.array([colour for _, colour in SCENES_CLASSES], dtype=np.uint8)
SPLITS = ("trainA", "trainB", "test")

# Colours of the photo domain (linear 0..1 RGB), before per-instance and per-image jitter.
PLASTER_COLOURS = [[0.85, 0.8, 0.68], [0.7, 0.7, 0.72], [0.82, 0.7, 0.55], [0.75, 0.8, 0.78]]
CAR_COLOURS = [[0.7, 0.08, 0.08], [0.1, 0.2, 0.55], [0.9, 0.9, 0.9], [0.6, 0.62, 0.65],
               [0.08, 0.08, 0.09], [0.1, 0.35, 0.2], [0.85, 0.7, 0.1]]  # fmt: skip
SKIN_TONES = [[0.95, 0.8, 0.68], [0.8, 0.6, 0.45], [0.45, 0.3, 0.2]]
TROUSER_COLOURS = [[0.12, 0.15, 0.3], [0.1, 0.1, 0.1], [0.6, 0.55, 0.4]]

# Parts are finer than classes (the photo needs glass vs body); each maps to one class.
SKY, FACADE, ROAD, SIDEWALK, GRASS, FOLIAGE, TRUNK = range(7)
CAR_BODY, CAR_GLASS, CAR_WHEEL, CAR_LIGHT, CAR_PLATE, SKIN, TOP, LEGS = range(7, 15)
PART_CLASS = np.array([0, 1, 2, 3, 4, 4, 4, 5, 5, 5, 5, 5, 6, 6, 6], dtype=np.uint8)


def scene_index(split: str, i: int) -> int:
    """The scene shown as image ``i`` of ``split`` (trainA, trainB or test); splits never share."""
    return 3 * i + SPLITS.index(split)


# ---------------------------------------------------------------------------- helpers


def _hash01(*ints: np.ndarray) -> np.ndarray:
    """A per-cell pseudo-random value in [0, 1) from integer coordinates (exact on any CPU)."""
    h = np.uint32(2166136261)
    for value in ints:
        h = (h ^ np.asarray(value).astype(np.int64).astype(np.uint32)) * np.uint32(16777619)
        h ^= h >> np.uint32(13)
    h = h * np.uint32(0x5BD1E995)
    h ^= h >> np.uint32(15)
    return (h >> np.uint32(8)).astype(np.float32) / np.float32(1 << 24)


def _smoothstep(a: float, b: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - a) / (b - a), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _value_noise(rng: np.random.Generator, size: int, cells_y: int, cells_x: int) -> np.ndarray:
    """Smooth noise in [0, 1] over the image, with a lattice fixed in scene units (size-free)."""
    lattice = rng.random((cells_y + 1, cells_x + 1), dtype=np.float32)
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    ys, xs = c * cells_y, c * cells_x
    y0 = np.minimum(ys.astype(np.int64), cells_y - 1)
    x0 = np.minimum(xs.astype(np.int64), cells_x - 1)
    fy = _smoothstep(0.0, 1.0, ys - y0)[:, None]
    fx = _smoothstep(0.0, 1.0, xs - x0)[None, :]
    rows = lattice[:, x0] * (1 - fx) + lattice[:, x0 + 1] * fx
    return rows[y0] * (1 - fy) + rows[y0 + 1] * fy


def _blur(img: np.ndarray, passes: int) -> np.ndarray:
    """A separable [1, 2, 1] / 4 blur, ``passes`` times, edges replicated."""
    for _ in range(passes):
        p = np.pad(img, ((1, 1), (0, 0), (0, 0)), mode="edge")
        img = (p[:-2] + 2 * p[1:-1] + p[2:]) * 0.25
        p = np.pad(img, ((0, 0), (1, 1), (0, 0)), mode="edge")
        img = (p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]) * 0.25
    return img


def _box(size: int, u0: float, u1: float, v0: float, v1: float) -> tuple[slice, slice] | None:
    """Pixel slices (rows, cols) covering the scene rectangle, or None if it is off-image."""
    c0, c1 = max(0, int(np.floor(u0 * size))), min(size, int(np.ceil(u1 * size)) + 1)
    r0, r1 = max(0, int(np.floor(v0 * size))), min(size, int(np.ceil(v1 * size)) + 1)
    if c0 >= c1 or r0 >= r1:
        return None
    return slice(r0, r1), slice(c0, c1)


# ---------------------------------------------------------------------------- layout


class _Layout:
    """Where everything is, in scene units (u right, v down, both 0..1), sampled from ``rng``."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.horizon = float(rng.uniform(0.40, 0.56))
        self.vp_u = float(rng.uniform(0.35, 0.65))
        self.bottom_u = float(rng.uniform(0.3, 0.7))
        self.road_top = float(rng.uniform(0.01, 0.03))
        self.road_bottom = float(rng.uniform(0.35, 0.6))
        self.walk_top = float(rng.uniform(0.25, 0.6))
        self.walk_bottom = float(rng.uniform(0.1, 0.35))
        self._sample_buildings(rng)
        self.objects = self._sample_trees(rng) + self._sample_cars(rng) + self._sample_people(rng)
        self.objects.sort(key=lambda obj: obj["v_base"])
        self.leaf_noise_cells = int(rng.integers(10, 16))
        self.leaf_seed = int(rng.integers(0, 2**31))

    def depth(self, v: np.ndarray | float) -> np.ndarray | float:
        """0 at the horizon, 1 at the bottom edge (linear in screen space, as perspective is)."""
        return np.clip((v - self.horizon) / (1.0 - self.horizon), 0.0, 1.0)

    def road(self, v: np.ndarray | float) -> tuple:
        """(centre, half width, sidewalk width) of the road at row(s) ``v``."""
        t = self.depth(v)
        centre = self.vp_u + (self.bottom_u - self.vp_u) * t
        half = self.road_top + (self.road_bottom - self.road_top) * t
        walk = self.walk_top + (self.walk_bottom - self.walk_top) * t
        return centre, half, walk

    def _sample_buildings(self, rng: np.random.Generator) -> None:
        lefts, rights, tops, styles, colours, windows = [], [], [], [], [], []
        u = -float(rng.uniform(0.0, 0.1))
        while u < 1.0:
            if rng.random() < 0.12:
                u += float(rng.uniform(0.03, 0.1))
                continue
            width = float(rng.uniform(0.07, 0.26))
            height = self.horizon * (0.25 + 0.85 * float(rng.beta(2.0, 2.0)))
            style = int(rng.choice(3, p=[0.4, 0.4, 0.2]))  # brick, plaster, glass
            if style == 0:
                base = np.array([0.55, 0.27, 0.2]) + rng.uniform(-0.08, 0.08, 3)
            elif style == 1:
                base = rng.choice(PLASTER_COLOURS) + rng.uniform(-0.06, 0.06, 3)
            else:
                base = np.array([0.35, 0.45, 0.55]) + rng.uniform(-0.06, 0.06, 3)
            glass = style == 2
            windows.append(
                [
                    rng.uniform(0.025, 0.05),  # column spacing
                    rng.uniform(0.035, 0.06),  # row spacing
                    rng.uniform(0.75, 0.9) if glass else rng.uniform(0.4, 0.65),  # width share
                    rng.uniform(0.7, 0.85) if glass else rng.uniform(0.45, 0.7),  # height share
                    rng.uniform(0.012, 0.02),  # brick course height
                ]
            )
            lefts.append(u)
            rights.append(u + width)
            tops.append(self.horizon - height)
            styles.append(style)
            colours.append(np.clip(base, 0, 1))
            u += width
        self.b_left = np.array(lefts, dtype=np.float32)
        self.b_right = np.array(rights, dtype=np.float32)
        self.b_top = np.array(tops, dtype=np.float32)
        self.b_style = np.array(styles, dtype=np.int64)
        self.b_colour = np.array(colours, dtype=np.float32).reshape(-1, 3)
        self.b_windows = np.array(windows, dtype=np.float32).reshape(-1, 5)

    def _ground_u(self, rng: np.random.Generator, v: float, spread: tuple) -> float:
        """A horizontal position on a sidewalk/verge at row ``v``, left or right of the road."""
        centre, half, walk = self.road(v)
        side = 1 if rng.random() < 0.5 else -1
        return centre + side * (half + walk * float(rng.uniform(*spread)))

    def _sample_trees(self, rng: np.random.Generator) -> list[dict]:
        trees = []
        for _ in range(int(rng.integers(0, 6))):
            v_base = self.horizon + float(rng.uniform(0.01, 0.3)) * (1 - self.horizon)
            t = float(self.depth(v_base))
            scale = 0.08 + 0.55 * t
            trees.append(
                {
                    "kind": "tree",
                    "v_base": v_base,
                    "u": self._ground_u(rng, v_base, (0.3, 1.4)),
                    "trunk_h": scale * float(rng.uniform(0.35, 0.6)),
                    "trunk_w": scale * float(rng.uniform(0.05, 0.09)),
                    "rx": scale * float(rng.uniform(0.25, 0.4)),
                    "ry": scale * float(rng.uniform(0.3, 0.45)),
                }
            )
        return trees

    def _sample_cars(self, rng: np.random.Generator) -> list[dict]:
        cars = []
        for _ in range(int(rng.integers(0, 5))):
            v_base = self.horizon + float(rng.uniform(0.08, 1.1)) * (1 - self.horizon)
            centre, half, _ = self.road(v_base)
            width = half * float(rng.uniform(0.55, 0.8))
            lane = 1 if rng.random() < 0.5 else -1
            cars.append(
                {
                    "kind": "car",
                    "v_base": v_base,
                    "u": centre + lane * half * float(rng.uniform(0.35, 0.55)),
                    "w": width,
                    "h": width * float(rng.uniform(0.7, 0.85)),
                    "colour": rng.choice(CAR_COLOURS) + rng.uniform(-0.05, 0.05, 3),
                }
            )
        return cars

    def _sample_people(self, rng: np.random.Generator) -> list[dict]:
        people = []
        for _ in range(int(rng.integers(0, 4))):
            v_base = self.horizon + float(rng.uniform(0.05, 0.95)) * (1 - self.horizon)
            _, half, _ = self.road(v_base)
            people.append(
                {
                    "kind": "person",
                    "v_base": v_base,
                    "u": self._ground_u(rng, v_base, (0.1, 0.9)),
                    "h": half * float(rng.uniform(0.55, 0.8)),
                    "skin": rng.choice(SKIN_TONES),
                    "top": rng.uniform(0.05, 0.95, 3),
                    "legs": rng.choice(TROUSER_COLOURS),
                }
            )
        return people


# ---------------------------------------------------------------------------- rasterising


def _rasterise(layout: _Layout, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(part map, instance map, building-per-column) at ``size`` x ``size`` pixels."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    u, v = c[None, :], c[:, None]
    part = np.full((size, size), SKY, dtype=np.uint8)
    inst = np.full((size, size), -1, dtype=np.int16)

    column_building = np.full(size, -1, dtype=np.int64)
    for b in range(len(layout.b_left)):
        column_building[(c >= layout.b_left[b]) & (c < layout.b_right[b])] = b
    tops = np.where(column_building >= 0, layout.b_top[np.maximum(column_building, 0)], 2.0)
    facade = (v >= tops[None, :]) & (v < layout.horizon + 0.5 / size)
    part[facade] = FACADE
    inst[facade] = np.broadcast_to(column_building[None, :], (size, size))[facade]

    centre, half, walk = layout.road(v)
    dist = np.abs(u - centre)
    ground = np.broadcast_to(v >= layout.horizon, (size, size))
    part[ground] = GRASS
    part[ground & (dist < half + walk)] = SIDEWALK
    part[ground & (dist < half)] = ROAD

    leaf = _value_noise(
        np.random.default_rng(layout.leaf_seed),
        size,
        layout.leaf_noise_cells,
        layout.leaf_noise_cells,
    )
    for index, obj in enumerate(layout.objects):
        if obj["kind"] == "tree":
            _draw_tree(part, obj, size, u, v, leaf)
        elif obj["kind"] == "car":
            _draw_car(part, inst, index, obj, size, u, v)
        else:
            _draw_person(part, inst, index, obj, size, u, v)
    return part, inst, column_building


def _draw_tree(part, obj, size, u, v, leaf) -> None:
    cu, vb, rx, ry = obj["u"], obj["v_base"], obj["rx"], obj["ry"]
    cv = vb - obj["trunk_h"] - ry * 0.6
    box = _box(size, cu - obj["trunk_w"], cu + obj["trunk_w"], cv, vb)
    if box:
        rows, cols = box
        trunk = np.abs(u[:, cols] - cu) < obj["trunk_w"] / 2
        trunk = trunk & (v[rows] <= vb)
        part[rows, cols][trunk] = TRUNK
    box = _box(size, cu - rx * 1.3, cu + rx * 1.3, cv - ry * 1.3, cv + ry * 1.3)
    if box:
        rows, cols = box
        r2 = ((u[:, cols] - cu) / rx) ** 2 + ((v[rows] - cv) / ry) ** 2
        canopy = r2 < 0.75 + 0.6 * leaf[rows, cols]
        part[rows, cols][canopy] = FOLIAGE


def _draw_car(part, inst, index, obj, size, u, v) -> None:
    cu, vb, w, h = obj["u"], obj["v_base"], obj["w"], obj["h"]
    box = _box(size, cu - w / 2, cu + w / 2, vb - h, vb)
    if not box:
        return
    rows, cols = box
    du, dv = np.abs(u[:, cols] - cu), vb - v[rows]  # dv: height above the ground contact
    rel = dv / h
    cabin_half = w * (0.47 - 0.11 * np.clip((rel - 0.6) / 0.4, 0, 1))
    body = (rel >= 0.1) & (rel < 0.6) & (du < w / 2)
    cabin = (rel >= 0.6) & (rel <= 1.0) & (du < cabin_half)
    glass = cabin & (du < cabin_half - 0.06 * w) & (rel < 0.92) & (rel > 0.66)
    wheels = (rel >= 0) & (rel < 0.2) & (np.abs(du - 0.36 * w) < 0.1 * w)
    lights = (rel > 0.4) & (rel < 0.52) & (du > 0.33 * w) & (du < 0.46 * w)
    plate = (rel > 0.2) & (rel < 0.32) & (du < 0.12 * w)
    p, i = part[rows, cols], inst[rows, cols]
    for mask, code in (
        (body | cabin, CAR_BODY),
        (glass, CAR_GLASS),
        (wheels, CAR_WHEEL),
        (lights, CAR_LIGHT),
        (plate, CAR_PLATE),
    ):
        p[mask] = code
    i[body | cabin | wheels] = index


def _draw_person(part, inst, index, obj, size, u, v) -> None:
    cu, vb, h = obj["u"], obj["v_base"], obj["h"]
    box = _box(size, cu - 0.2 * h, cu + 0.2 * h, vb - h, vb)
    if not box:
        return
    rows, cols = box
    du, dv = u[:, cols] - cu, (vb - v[rows]) / h
    head = (du / h) ** 2 + (dv - 0.9) ** 2 < 0.085**2
    torso = (dv >= 0.45) & (dv < 0.82) & (np.abs(du) < 0.14 * h)
    legs = (dv >= 0) & (dv < 0.45) & (np.abs(np.abs(du) - 0.055 * h) < 0.045 * h)
    p, i = part[rows, cols], inst[rows, cols]
    p[legs], p[torso], p[head] = LEGS, TOP, SKIN
    i[legs | torso | head] = index


# ---------------------------------------------------------------------------- photo


def _render_photo(layout: _Layout, part, inst, column_building, size, rng, pixel_rng) -> np.ndarray:
    """The photo of a scene; ``rng`` draws size-free choices, ``pixel_rng`` per-pixel noise."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    u, v = c[None, :], c[:, None]
    img = np.zeros((size, size, 3), dtype=np.float32)

    # Sky: a zenith-to-horizon gradient with soft, horizontally stretched clouds.
    zenith = (np.array([0.25, 0.45, 0.8]) + rng.uniform(-0.08, 0.08, 3)).astype(np.float32)
    haze = (np.array([0.75, 0.84, 0.93]) + rng.uniform(-0.06, 0.06, 3)).astype(np.float32)
    t = np.clip(v / layout.horizon, 0, 1)[..., None]
    sky = zenith * (1 - t) + haze * t
    clouds = 0.65 * _value_noise(rng, size, 5, 9) + 0.35 * _value_noise(rng, size, 11, 19)
    cover = float(rng.uniform(0.35, 0.75))
    amount = (_smoothstep(cover, cover + 0.2, clouds) * (1 - 0.6 * t[..., 0]))[..., None]
    sky = sky * (1 - amount) + (0.97 - 0.25 * clouds[..., None]) * amount
    img[:] = sky

    # Facades: per-building colour, brick courses or plaster noise, then a grid of windows.
    b = np.maximum(column_building, 0)
    left, right, top = layout.b_left[b][None, :], layout.b_right[b][None, :], layout.b_top[b][None]
    spacing_u, spacing_v, share_u, share_v, course = (
        layout.b_windows[b, k][None] for k in range(5)
    )
    style = layout.b_style[b][None, :]
    facade = layout.b_colour[b][None, :, :] * np.ones((size, 1, 1), dtype=np.float32)
    row = np.floor(v / course).astype(np.int64)
    brick_u = u / (course * 2.2) + 0.5 * (row & 1)
    mortar = (v / course - row < 0.18) | (brick_u - np.floor(brick_u) < 0.08)
    brick_shade = 0.85 + 0.3 * _hash01(row, np.floor(brick_u), b[None, :])
    plaster = 0.9 + 0.2 * _value_noise(rng, size, 24, 24)
    shade = np.where(style == 0, np.where(mortar, 1.25, brick_shade), plaster)
    facade = facade * shade[..., None]
    wu, wv = (u - left) / spacing_u, (v - top - 0.02) / spacing_v
    fu, fv = wu - np.floor(wu), wv - np.floor(wv)
    in_window = (
        (np.abs(fu - 0.5) < share_u / 2)
        & (np.abs(fv - 0.5) < share_v / 2)
        & (wv >= 0)
        & (u - left > spacing_u * 0.3)
        & (right - u > spacing_u * 0.3)
        & (v < layout.horizon - 0.03)
    )
    lit = _hash01(np.floor(wu), np.floor(wv), b[None, :]) < 0.12
    glass_colour = np.array([0.16, 0.2, 0.26], dtype=np.float32) + 0.35 * (1 - fv[..., None]) * haze
    window = np.where(lit[..., None], np.array([0.95, 0.82, 0.45], dtype=np.float32), glass_colour)
    facade = np.where(in_window[..., None], window, facade)
    img = np.where((part == FACADE)[..., None], facade, img)

    # Ground: asphalt with perspective lane markings, paved sidewalks, grass verges.
    centre, half, walk = layout.road(v)
    dist = np.abs(u - centre)
    depth = 1.0 / np.maximum(v - layout.horizon, 0.5 / size)
    fine = pixel_rng.normal(0.0, 1.0, (size, size)).astype(np.float32)
    asphalt = float(rng.uniform(0.28, 0.42)) * (0.85 + 0.3 * _value_noise(rng, size, 16, 16))
    road = np.repeat((asphalt + 0.02 * fine)[..., None], 3, axis=2)
    line_w = 0.002 + 0.012 * layout.depth(v)
    dash = (depth * 0.3 + float(rng.random())) % 1.0 < 0.45
    marking = ((dist < line_w) & dash) | (np.abs(dist - half * 0.92) < line_w * 0.8)
    road = np.where(marking[..., None], np.float32(0.85), road)
    paving = (np.array([0.62, 0.6, 0.56]) + rng.uniform(-0.06, 0.06, 3)).astype(np.float32)
    along = (dist - half) * depth * 1.5
    joints = ((depth * 0.6) % 1.0 < 0.08) | (along - np.floor(along) < 0.08)
    walk_img = paving * np.where(joints, 0.82, 1.0)[..., None] * (0.96 + 0.04 * fine[..., None])
    walk_img = np.where((np.abs(dist - half) < line_w * 1.5)[..., None], 0.85, walk_img)
    green = (np.array([0.3, 0.5, 0.18]) + rng.uniform(-0.05, 0.05, 3)).astype(np.float32)
    grass_noise = _value_noise(rng, size, 40, 40)
    grass = green * (0.7 + 0.4 * grass_noise[..., None] + 0.05 * fine[..., None])
    foliage = (
        green
        * 0.7
        * (0.55 + 0.5 * _value_noise(rng, size, 48, 48)[..., None] + 0.08 * fine[..., None])
    )
    img = np.where((part == ROAD)[..., None], road, img)
    img = np.where((part == SIDEWALK)[..., None], walk_img, img)
    img = np.where((part == GRASS)[..., None], grass, img)
    img = np.where((part == FOLIAGE)[..., None], foliage, img)
    img = np.where((part == TRUNK)[..., None], np.array([0.35, 0.24, 0.15], np.float32), img)

    # Objects: cars (shaded body, glass reflecting the sky, wheels, lights), people, shadows.
    for index, obj in enumerate(layout.objects):
        if obj["kind"] == "car":
            _shade_car(img, part, inst, index, obj, size, u, v, haze)
        elif obj["kind"] == "person":
            here = inst == index
            for code, colour in ((SKIN, obj["skin"]), (TOP, obj["top"]), (LEGS, obj["legs"])):
                img[here & (part == code)] = colour

    # Camera: light falloff, vignetting, colour jitter, soft edges, sensor noise.
    light = 1 + float(rng.uniform(-0.25, 0.25)) * (u - 0.5) + 0.15 * (0.5 - v)
    vignette = 1 - float(rng.uniform(0.1, 0.35)) * ((u - 0.5) ** 2 + (v - 0.5) ** 2) * 2
    img = img * (light * vignette)[..., None]
    img = img * rng.uniform(0.9, 1.1, 3).astype(np.float32) * np.float32(rng.uniform(0.85, 1.15))
    gray = img.mean(axis=2, keepdims=True)
    img = gray + (img - gray) * np.float32(rng.uniform(0.75, 1.25))
    img = 0.5 + (img - 0.5) * np.float32(rng.uniform(0.85, 1.2))
    img = _blur(img, max(1, round(size / 256)))
    sigma = float(rng.uniform(0.008, 0.025))
    noise = pixel_rng.normal(0, sigma, (size, size, 1)) + pixel_rng.normal(
        0, sigma * 0.5, (size, size, 3)
    )
    img = img + noise.astype(np.float32)
    return np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)


def _shade_car(img, part, inst, index, obj, size, u, v, haze) -> None:
    w, h, vb = obj["w"], obj["h"], obj["v_base"]
    box = _box(size, obj["u"] - w * 0.7, obj["u"] + w * 0.7, vb - h, vb + 0.08 * h)
    if not box:
        return
    rows, cols = box
    sub, p, here = img[rows, cols], part[rows, cols], inst[rows, cols] == index
    # A soft shadow on the road under the car, drawn first so the car covers its own part.
    r2 = ((u[:, cols] - obj["u"]) / (0.6 * w)) ** 2 + ((v[rows] - vb) / (0.1 * h)) ** 2
    shadow = np.where(p == ROAD, 1 - 0.5 * _smoothstep(0.3, 1.0, 1.0 / np.maximum(r2, 1e-6)), 1)
    sub *= shadow[..., None]
    rel = np.clip((vb - v[rows]) / h, 0, 1)
    body = np.asarray(obj["colour"], np.float32) * (0.7 + 0.45 * rel[..., None])
    glass = 0.12 + 0.4 * (rel[..., None] - 0.6) * haze
    parts = (
        (CAR_BODY, body),
        (CAR_GLASS, glass),
        (CAR_WHEEL, 0.06),
        (CAR_LIGHT, [0.85, 0.1, 0.1]),
        (CAR_PLATE, [0.92, 0.92, 0.86]),
    )
    for code, colour in parts:
        mask = here & (p == code)
        sub[mask] = np.broadcast_to(np.asarray(colour, np.float32), sub.shape)[mask]


# ---------------------------------------------------------------------------- public API


def _render(index: int, size: int, seed: int, photo: bool) -> tuple:
    if size < 8:
        raise ValueError(f"size: must be at least 8 px, got {size}")
    if index < 0 or seed < 0:
        raise ValueError(f"index and seed must be non-negative, got index={index} seed={seed}")
    layout = _Layout(np.random.default_rng([seed, index, 0]))
    part, inst, column_building = _rasterise(layout, size)
    class_map = PART_CLASS[part]
    if not photo:
        return PALETTE[class_map], None, class_map
    rendered = _render_photo(
        layout,
        part,
        inst,
        column_building,
        size,
        np.random.default_rng([seed, index, 1]),
        np.random.default_rng([seed, index, 2]),
    )
    return PALETTE[class_map], rendered, class_map


def render_scene(
    index: int, size: int = 128, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scene ``index`` at ``size`` px: (label RGB HxWx3 uint8, photo HxWx3 uint8, class map HxW
    uint8 indexing :data:`SCENES_CLASSES`)."""
    return _render(index, size, seed, photo=True)


def write_scenes(
    dest: str,
    size: int = 128,
    train_a: int = 1000,
    train_b: int = 1000,
    test: int = 100,
    seed: int = 0,
    overwrite: bool = False,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> dict:
    """Render the scenes dataset to ``dest`` (shards + manifest); return a summary with timing.

    ``images_per_min`` counts rendering and PNG encoding only (one core), not storage.
    """
    if train_a < 1 or train_b < 1 or test < 0:
        raise ValueError(
            f"need train_a, train_b >= 1 and test >= 0; got {train_a}, {train_b}, {test}"
        )
    if size < 8:
        raise ValueError(f"size: must be at least 8 px, got {size}")
    start = time.monotonic()
    clear_root(dest, overwrite)
    # (split whose scenes are drawn, count, {dataset: 0 for the label, 1 for the photo})
    plan = [("trainA", train_a, {"trainA": 0}), ("trainB", train_b, {"trainB": 1})]
    if test:
        plan.append(("test", test, {"testA": 0, "testB": 1}))
    entries, written = {}, []
    dest_fs, _ = storage.resolve(dest)
    render_s = 0.0
    try:
        for split, count, targets in plan:
            progress = Progress("/".join(targets), count)
            # Each writer closes on success and deletes its own shards on an exception.
            with contextlib.ExitStack() as stack:
                writers = {
                    name: stack.enter_context(ShardWriter(dest, name, shard_bytes=shard_bytes))
                    for name in targets
                }
                for i in range(count):
                    t0 = time.perf_counter()
                    images = _render(scene_index(split, i), size, seed, photo=1 in targets.values())
                    encoded = {
                        name: encode_image(Image.fromarray(images[which]), "PNG")
                        for name, which in targets.items()
                    }
                    render_s += time.perf_counter() - t0
                    for name, data in encoded.items():
                        writers[name].add(f"{i:06d}.png", data, size, size, "PNG")
                    progress.update(i + 1)
                for name, writer in writers.items():
                    entries[name] = writer.close()
                    written.extend(writer.written)
        source = f"synth:scenes size={size} seed={seed}"
        manifest_uri = write_manifest(dest, build_manifest(source, entries, paired_test=bool(test)))
    except BaseException:
        # Without a manifest the shards of finished datasets are unreachable; remove them.
        delete_files(dest_fs, written)
        raise
    images = sum(e["count"] for e in entries.values())
    return {
        "manifest": manifest_uri,
        "datasets": {name: e["count"] for name, e in entries.items()},
        "images": images,
        "bytes": sum(e["bytes"] for e in entries.values()),
        "seconds": round(time.monotonic() - start, 3),
        "images_per_min": round(images / max(render_s, 1e-9) * 60),
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.synth", description="Write a built-in procedural dataset."
    )
    parser.add_argument(
        "dataset", choices=["scenes"], help="which dataset (scenes: labels->photos)"
    )
    parser.add_argument("dest", metavar="DEST", help="dataset root to create (path or URI)")
    parser.add_argument("--size", type=int, default=128, help="image side in px (default 128)")
    parser.add_argument("--train-a", type=int, default=1000, help="trainA images (default 1000)")
    parser.add_argument("--train-b", type=int, default=1000, help="trainB images (default 1000)")
    parser.add_argument("--test", type=int, default=100, help="paired test images (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset at DEST")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        summary = write_scenes(
            args.dest, args.size, args.train_a, args.train_b, args.test, args.seed, args.overwrite
        )
    except (ValueError, DatasetError, storage.StorageError) as exc:
        print(f"error: {storage.redact(str(exc))}", file=sys.stderr)
        return 1
    counts = ", ".join(f"{name} {count}" for name, count in summary["datasets"].items())
    print(storage.redact(f"wrote {summary['manifest']}: {counts}"))
    print(
        f"{summary['images']} images, {summary['bytes'] / 2**20:.1f} MiB in "
        f"{summary['seconds']:.1f} s; rendering + PNG encoding: "
        f"{summary['images_per_min']} images/min on one core"
    )
    return 0


if __name__ == "__main__":
    exit_with(main())
