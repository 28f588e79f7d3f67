"""Writing the scenes dataset: splits, shards and the manifest.

trainA and trainB come from different scenes (unpaired, as CycleGAN expects); testA/testB show
the same scenes under the same keys (``000042.png``), so the manifest says ``paired_test``.
Both domains are stored as PNG: lossless, and the same key names a scene in both domains.
"""

from __future__ import annotations

import contextlib
import time

from PIL import Image

from pipeline import storage
from pipeline.images import encode_image
from pipeline.progress import progress_bar
from pipeline.scenes.render import render_label, render_scene
from pipeline.shards import (
    DEFAULT_SHARD_BYTES,
    ShardWriter,
    build_manifest,
    delete_files,
    remove_unlisted_shards,
    start_dataset,
    write_manifest,
)

SPLITS = ("trainA", "trainB", "test")


def scene_index(split: str, i: int) -> int:
    """The scene shown as image ``i`` of ``split`` (trainA, trainB or test); splits never share."""
    return 3 * i + SPLITS.index(split)


def write_scenes(
    dest: str,
    size: int = 128,
    train_a: int = 1000,
    train_b: int = 1000,
    test: int = 100,
    seed: int = 0,
    overwrite: bool = False,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool | None = None,
) -> dict:
    """Render the scenes dataset to ``dest`` (shards + manifest); return a summary with timing.

    ``images_per_min`` counts rendering and PNG encoding only (one core), not storage.
    ``progress``: a bar per split on stderr (None: only when stderr is a terminal).
    """
    if train_a < 1 or train_b < 1 or test < 0:
        raise ValueError(
            f"need train_a, train_b >= 1 and test >= 0; got {train_a}, {train_b}, {test}"
        )
    if size < 8:
        raise ValueError(f"size: must be at least 8 px, got {size}")
    start = time.monotonic()
    # The old dataset (if any) stays readable until the new manifest replaces it.
    generation = start_dataset(dest, overwrite)
    # (split whose scenes are drawn, count, {dataset: "label" or "photo"})
    plan = [("trainA", train_a, {"trainA": "label"}), ("trainB", train_b, {"trainB": "photo"})]
    if test:
        plan.append(("test", test, {"testA": "label", "testB": "photo"}))
    entries, written = {}, []
    dest_fs, _ = storage.resolve(dest)
    render_s = 0.0
    try:
        for split, count, targets in plan:
            split_entries, split_written, seconds = _write_split(
                dest, split, count, targets, size, seed, shard_bytes, generation, progress
            )
            entries.update(split_entries)
            written.extend(split_written)
            render_s += seconds
        source = f"synth:scenes size={size} seed={seed}"
        manifest = build_manifest(source, entries, paired_test=bool(test))
        manifest_uri = write_manifest(dest, manifest)
    except BaseException:
        # Without a manifest the shards of finished datasets are unreachable; remove them.
        delete_files(dest_fs, written)
        raise
    for uri in remove_unlisted_shards(dest, manifest):
        print(f"[synth] warning: could not delete the replaced shard {uri}", flush=True)
    images = sum(e["count"] for e in entries.values())
    return {
        "manifest": manifest_uri,
        "datasets": {name: e["count"] for name, e in entries.items()},
        "images": images,
        "bytes": sum(e["bytes"] for e in entries.values()),
        "seconds": round(time.monotonic() - start, 3),
        "images_per_min": round(images / max(render_s, 1e-9) * 60),
    }


def _write_split(
    dest: str,
    split: str,
    count: int,
    targets: dict[str, str],
    size: int,
    seed: int,
    shard_bytes: int,
    generation: str = "",
    progress: bool | None = None,
) -> tuple[dict[str, dict], list[str], float]:
    """Write the ``count`` scenes of ``split`` to each dataset of ``targets`` (its label or its
    photo): (manifest entry per dataset, shard paths written, seconds spent rendering and
    encoding). On an exception the shards of this split are deleted before it propagates."""
    entries, written, render_s = {}, [], 0.0
    # Each writer closes on success and deletes its own shards on an exception.
    with contextlib.ExitStack() as stack:
        writers = {
            name: stack.enter_context(ShardWriter(dest, name, shard_bytes, generation))
            for name in targets
        }
        bar = stack.enter_context(progress_bar("/".join(targets), count, progress))
        for i in range(count):
            t0 = time.perf_counter()
            index = scene_index(split, i)
            if "photo" in targets.values():
                label, photo, _ = render_scene(index, size, seed)
            else:
                label, _ = render_label(index, size, seed)
                photo = None
            images = {"label": label, "photo": photo}
            encoded = {
                name: encode_image(Image.fromarray(images[which]), "PNG")
                for name, which in targets.items()
            }
            render_s += time.perf_counter() - t0
            for name, data in encoded.items():
                writers[name].add(f"{i:06d}.png", data, size, size, "PNG")
            bar.update()
        for name, writer in writers.items():
            entries[name] = writer.close()
            written.extend(writer.written)
    return entries, written, render_s
