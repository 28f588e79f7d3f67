"""Where everything in a scene is: the layout sampled from a seeded Generator.

Positions are in scene units (u right, v down, both 0..1), so the same layout renders at any
size. The draw order from ``rng`` is part of the dataset's definition: reordering the draws
changes every scene of every seed.
"""

from __future__ import annotations

import numpy as np

from pipeline.scenes.palette import CAR_COLOURS, PLASTER_COLOURS, SKIN_TONES, TROUSER_COLOURS


class Layout:
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
