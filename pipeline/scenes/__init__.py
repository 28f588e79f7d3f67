"""The built-in dataset: procedural street scenes, label maps (A) and rendered photos (B).

A scene has sky on top with clouds, a skyline of buildings of varied heights and facades, a
road with perspective and lane markings, sidewalks, grass verges, trees, cars on the road and
people on the sidewalks. Domain A draws the scene's classes in the flat colours of
:data:`SCENES_CLASSES` (a labels-to-photo task, like Cityscapes); domain B renders it as a
photo: brick and plaster facades with window grids, foliage noise, asphalt, a sky gradient,
lighting gradients, per-image colour jitter, soft edges and sensor noise.

Scene ``i`` of a split is :func:`scene_index` ``(split, i)``; its layout and its photo each
draw from a numpy Generator seeded with ``(seed, scene, stream)``, so any subset is
reproducible on its own and a scene looks the same (up to resampling) at any size.

Modules: ``palette`` (classes and colours), ``layout`` (where things are), ``render`` (labels
and photos), ``dataset`` (shards and manifest). ``python -m pipeline.synth`` is the command.
"""

from pipeline.scenes.dataset import SPLITS, scene_index, write_scenes
from pipeline.scenes.palette import PALETTE, SCENES_CLASSES
from pipeline.scenes.render import render_label, render_scene

__all__ = [
    "PALETTE",
    "SCENES_CLASSES",
    "SPLITS",
    "render_label",
    "render_scene",
    "scene_index",
    "write_scenes",
]
