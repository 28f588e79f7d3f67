"""The scenes' classes and colours: the label palette (domain A), the photo colours (domain B),
and the finer drawing parts, each of which belongs to one class."""

from __future__ import annotations

import numpy as np

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
