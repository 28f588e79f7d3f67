"""Rendering a scene: its layout rasterised into parts, then drawn as labels and as a photo.

Rasterising turns the :class:`Layout` into a map of parts (finer than classes: glass vs car
body) and a map of instances. The label image colours each part's class from :data:`PALETTE`;
the photo paints each part with textures, lighting and camera effects. Every random choice of
the photo comes from ``rng`` (size-free) and every per-pixel one from ``pixel_rng``, in a fixed
order: reordering the draws changes every photo.
"""

from __future__ import annotations

import numpy as np

from pipeline.scenes.layout import Layout
from pipeline.scenes.palette import (
    CAR_BODY,
    CAR_GLASS,
    CAR_LIGHT,
    CAR_PLATE,
    CAR_WHEEL,
    FACADE,
    FOLIAGE,
    GRASS,
    LEGS,
    PALETTE,
    PART_CLASS,
    ROAD,
    SIDEWALK,
    SKIN,
    SKY,
    TOP,
    TRUNK,
)

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


# ---------------------------------------------------------------------------- rasterising


def _rasterise(layout: Layout, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


def _render_photo(layout: Layout, part, inst, column_building, size, rng, pixel_rng) -> np.ndarray:
    """The photo of a scene; ``rng`` draws size-free choices, ``pixel_rng`` per-pixel noise."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    u, v = c[None, :], c[:, None]
    img = np.zeros((size, size, 3), dtype=np.float32)
    sky, haze = _sky(layout, v, size, rng)
    img[:] = sky
    facade = _facades(layout, column_building, u, v, size, rng, haze)
    img = np.where((part == FACADE)[..., None], facade, img)
    for code, surface in _ground(layout, u, v, size, rng, pixel_rng):
        img = np.where((part == code)[..., None], surface, img)
    _paint_objects(img, layout, part, inst, size, u, v, haze)
    return _camera(img, u, v, size, rng, pixel_rng)


def _sky(layout: Layout, v, size, rng) -> tuple[np.ndarray, np.ndarray]:
    """(sky image, haze colour): a zenith-to-horizon gradient with soft, stretched clouds."""
    zenith = (np.array([0.25, 0.45, 0.8]) + rng.uniform(-0.08, 0.08, 3)).astype(np.float32)
    haze = (np.array([0.75, 0.84, 0.93]) + rng.uniform(-0.06, 0.06, 3)).astype(np.float32)
    t = np.clip(v / layout.horizon, 0, 1)[..., None]
    sky = zenith * (1 - t) + haze * t
    clouds = 0.65 * _value_noise(rng, size, 5, 9) + 0.35 * _value_noise(rng, size, 11, 19)
    cover = float(rng.uniform(0.35, 0.75))
    amount = (_smoothstep(cover, cover + 0.2, clouds) * (1 - 0.6 * t[..., 0]))[..., None]
    sky = sky * (1 - amount) + (0.97 - 0.25 * clouds[..., None]) * amount
    return sky, haze


def _facades(layout: Layout, column_building, u, v, size, rng, haze) -> np.ndarray:
    """Facades: per-building colour, brick courses or plaster noise, then a grid of windows."""
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
    return np.where(in_window[..., None], window, facade)


def _ground(layout: Layout, u, v, size, rng, pixel_rng) -> list[tuple[int, np.ndarray]]:
    """(part, image) to paint, in order: asphalt with perspective lane markings, paved
    sidewalks, grass verges, foliage and bark."""
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
    bark = np.array([0.35, 0.24, 0.15], np.float32)
    return [(ROAD, road), (SIDEWALK, walk_img), (GRASS, grass), (FOLIAGE, foliage), (TRUNK, bark)]


def _paint_objects(img, layout: Layout, part, inst, size, u, v, haze) -> None:
    """Cars (shaded body, glass reflecting the sky, wheels, lights, shadow) and people."""
    for index, obj in enumerate(layout.objects):
        if obj["kind"] == "car":
            _shade_car(img, part, inst, index, obj, size, u, v, haze)
        elif obj["kind"] == "person":
            here = inst == index
            for code, colour in ((SKIN, obj["skin"]), (TOP, obj["top"]), (LEGS, obj["legs"])):
                img[here & (part == code)] = colour


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


def _camera(img, u, v, size, rng, pixel_rng) -> np.ndarray:
    """The camera: light falloff, vignetting, colour jitter, soft edges, sensor noise; to uint8."""
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


# ---------------------------------------------------------------------------- public API


def _rasterised(
    index: int, size: int, seed: int
) -> tuple[Layout, np.ndarray, np.ndarray, np.ndarray]:
    """(layout, part map, instance map, building-per-column) of scene ``index``."""
    if size < 8:
        raise ValueError(f"size: must be at least 8 px, got {size}")
    if index < 0 or seed < 0:
        raise ValueError(f"index and seed must be non-negative, got index={index} seed={seed}")
    layout = Layout(np.random.default_rng([seed, index, 0]))
    return (layout, *_rasterise(layout, size))


def render_label(index: int, size: int = 128, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Scene ``index`` without its photo (the costly part): (label RGB HxWx3 uint8, class map
    HxW uint8 indexing :data:`SCENES_CLASSES`), equal to those of :func:`render_scene`."""
    _, part, _, _ = _rasterised(index, size, seed)
    class_map = PART_CLASS[part]
    return PALETTE[class_map], class_map


def render_scene(
    index: int, size: int = 128, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scene ``index`` at ``size`` px: (label RGB HxWx3 uint8, photo HxWx3 uint8, class map HxW
    uint8 indexing :data:`SCENES_CLASSES`)."""
    layout, part, inst, column_building = _rasterised(index, size, seed)
    class_map = PART_CLASS[part]
    photo = _render_photo(
        layout,
        part,
        inst,
        column_building,
        size,
        np.random.default_rng([seed, index, 1]),
        np.random.default_rng([seed, index, 2]),
    )
    return PALETTE[class_map], photo, class_map
