"""Batch translation with Ray Data: inputs (image files or dataset shards) to translated
images under an output folder, by a pool of actors that each hold the generator once.

The generator is loaded once on the driver and shipped to the actors through the object store,
so actors need no access to the checkpoint store or MLflow; each actor writes its outputs itself
(on a cluster of several machines, write to object storage).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import posixpath
import time
from dataclasses import dataclass
from functools import partial

import numpy as np
import pyarrow.fs as pafs
import torch
from PIL import Image

from cyclegan.config import ModelConfig
from cyclegan.transforms import to_input, to_uint8
from pipeline import storage
from pipeline.images import BadImage, decode_resized, encode_image
from pipeline.shards import check_key
from pipeline.storage import IMAGE_EXTENSIONS, list_images

log = logging.getLogger(__name__)

OUTPUT_FORMATS = ("same", "png", "jpeg", "webp")
SAME_FORMAT = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
EXTENSION = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp"}


@dataclass
class Inputs:
    """What to read: Parquet shards of a dataset, or image files under ``base``."""

    kind: str
    """``shards`` or ``files``."""
    filesystem: pafs.FileSystem
    paths: list[str]
    keys: list[str]
    base: str
    """Folder the file keys are relative to (files only)."""
    skipped: list[dict] = dataclasses.field(default_factory=list)
    """``{"key", "reason"}`` of each symlink of a local folder left out (see list_images)."""


def output_key(key: str, fmt: str) -> tuple[str, str]:
    """(output key, Pillow format) of input ``key`` for ``--format``."""
    stem, ext = posixpath.splitext(key)
    if fmt == "same":
        pil = SAME_FORMAT.get(ext.lower())
        return (key, pil) if pil else (stem + ".png", "PNG")
    pil = fmt.upper()
    return (key if EXTENSION[pil] == ext.lower() else stem + EXTENSION[pil]), pil


def _check_input_key(key: str) -> None:
    """An input's key becomes a path under the output: one that would leave it (``../x``,
    ``/x``) is that row's error, as an unreadable image is."""
    try:
        check_key(key)
    except ValueError as exc:
        raise BadImage(key, str(exc)) from None


def scaled_size(width: int, height: int, load_size: int | None) -> tuple[int, int]:
    """The size after ``--load-size`` (shorter side to load_size, aspect kept)."""
    if not load_size:
        return width, height
    scale = load_size / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def list_inputs(input_uri: str, direction: str, split: str | None) -> Inputs:
    """Resolve ``--input`` to shards or image files; raises naming the input when unusable."""
    from pipeline.shards import DATASET_NAMES, MANIFEST_NAME, read_columns, read_manifest

    fs, path = storage.resolve(input_uri)
    try:
        kind = fs.get_file_info(path).type
    except Exception as exc:
        raise storage.wrap_error(input_uri, exc, "stat input") from None
    shown = storage.redact(input_uri)
    if kind == pafs.FileType.NotFound:
        raise ValueError(f"--input {shown}: no such file or folder")
    if kind == pafs.FileType.File:
        if not path.lower().endswith(IMAGE_EXTENSIONS):
            raise ValueError(f"--input {shown}: not an image file ({' '.join(IMAGE_EXTENSIONS)})")
        return Inputs("files", fs, [path], [posixpath.basename(path)], posixpath.dirname(path))
    if fs.get_file_info(posixpath.join(path, MANIFEST_NAME)).type == pafs.FileType.File:
        manifest = read_manifest(input_uri)
        name = split or ("testA" if direction == "AtoB" else "testB")
        if name not in DATASET_NAMES or name not in manifest.datasets:
            raise ValueError(
                f"--split {name}: not a dataset of {shown} (it has: "
                f"{', '.join(manifest.datasets) or 'none'})"
            )
        keys = read_columns(manifest, name, ["key"])["key"].to_pylist()
        if not keys:
            raise ValueError(f"--input {shown}: {name} has no images")
        return Inputs("shards", fs, manifest.shard_paths(name), keys, path)
    if split:
        raise ValueError(f"--split {split}: {shown} is a folder of images, not a dataset root")
    listing = list_images(input_uri)
    if not listing.keys:
        raise ValueError(
            f"--input {shown}: no images (looked for {' '.join(IMAGE_EXTENSIONS)}; "
            f"found {listing.others} other files)"
        )
    paths = [posixpath.join(path, k) for k in listing.keys]
    skipped = [{"key": key, "reason": reason} for key, reason in listing.skipped]
    return Inputs("files", fs, paths, listing.keys, path, skipped)


def check_output(output_uri: str, input_uri: str, overwrite: bool) -> None:
    fs, path = storage.resolve(output_uri)
    _, in_path = storage.resolve(input_uri)
    if path.rstrip("/") == in_path.rstrip("/"):
        raise ValueError(f"--output {storage.redact(output_uri)}: the same place as --input")
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        raise ValueError(f"--output {storage.redact(output_uri)}: is a file; expected a folder")
    not_empty = info.type == pafs.FileType.Directory and fs.get_file_info(
        pafs.FileSelector(path, recursive=False)
    )
    if not_empty and not overwrite:
        raise ValueError(
            f"--output {storage.redact(output_uri)}: not empty; pass --overwrite to "
            "replace files of the same keys"
        )
    storage.check_access(output_uri, write=True)


class Translator:
    """The Ray Data UDF: one generator per actor; decodes, translates and writes a batch."""

    def __init__(
        self,
        weights: list,
        out_uri: str,
        base: str,
        load_size: int | None,
        fmt: str,
        threads: int,
    ) -> None:
        import ray

        from pipeline.models import build_from_state

        payload = ray.get(weights[0])
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, min(threads, os.cpu_count() or 1)))
        cfg = ModelConfig(**payload["arch"])
        self.net = build_from_state(payload["state"], cfg, payload["source"]).to(self.device)
        self.fs, self.out_base = storage.resolve(out_uri)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        self.base, self.load_size, self.fmt = base, load_size, fmt

    def _rows(self, batch: dict) -> list[tuple[str, bytes]]:
        if "key" in batch:
            return [(str(k), bytes(d)) for k, d in zip(batch["key"], batch["image"], strict=True)]
        rows = []
        for path, data in zip(batch["path"], batch["bytes"], strict=True):
            key = posixpath.relpath(str(path), self.base)
            if key.startswith("../"):
                raise ValueError(f"input {path} is not under {self.base}")
            rows.append((key, bytes(data)))
        return rows

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        rows = self._rows(batch)
        out = {"key": [], "output": [], "width": [], "height": [], "error": []}
        by_size: dict[tuple[int, int], list[tuple[str, np.ndarray]]] = {}
        for key, data in rows:
            try:
                _check_input_key(key)
                pixels = decode_resized(data, key, partial(scaled_size, load_size=self.load_size))
            except BadImage as exc:
                log.warning("skipping %s: %s", key, exc.reason)
                for name, value in (("key", key), ("output", ""), ("error", exc.reason)):
                    out[name].append(value)
                out["width"].append(0)
                out["height"].append(0)
                continue
            by_size.setdefault((pixels.shape[1], pixels.shape[0]), []).append((key, pixels))
        # Images of one size share a forward pass; others go one size group at a time.
        for (width, height), group in by_size.items():
            x = to_input(torch.from_numpy(np.stack([a for _, a in group])).to(self.device))
            fake = to_uint8(self.net(x)).numpy()
            for (key, _), pixels in zip(group, fake, strict=True):
                out_key, pil = output_key(key, self.fmt)
                data = encode_image(Image.fromarray(pixels), pil)
                path = posixpath.join(self.out_base, out_key)
                if self.local:
                    self.fs.create_dir(posixpath.dirname(path), recursive=True)
                try:
                    storage.write_bytes_atomic(self.fs, path, data)
                except Exception as exc:
                    raise storage.wrap_error(path, exc, "write output") from None
                for name, value in (
                    ("key", key),
                    ("output", out_key),
                    ("width", width),
                    ("height", height),
                    ("error", ""),
                ):
                    out[name].append(value)
        return {
            "key": np.array(out["key"], dtype=object),
            "output": np.array(out["output"], dtype=object),
            "width": np.array(out["width"], dtype=np.int32),
            "height": np.array(out["height"], dtype=np.int32),
            "error": np.array(out["error"], dtype=object),
        }


def plan_actors(
    num_actors: int | None, num_gpus_per_actor: float | None, wait_s: float = 15.0
) -> tuple[int, float, float]:
    """(actors, GPUs per actor, CPUs per actor). With GPUs in the cluster: one actor per GPU,
    half a CPU each. Without: one actor, holding all CPUs but one (left for reading). Counted
    from what is free now: a serve replica or another job may hold some. A plan that fits the
    cluster but not what is free waits up to `wait_s` for it to free up: Ray Data kills a
    finished dataset's actors without waiting, so their CPUs read as taken for a moment after."""
    import ray

    try:
        return _plan_actors(ray.available_resources(), num_actors, num_gpus_per_actor)
    except ValueError as busy:
        _plan_actors(ray.cluster_resources(), num_actors, num_gpus_per_actor)  # never fits: raise
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            time.sleep(0.1)
            try:
                return _plan_actors(ray.available_resources(), num_actors, num_gpus_per_actor)
            except ValueError:
                continue
        raise ValueError(f"{busy} free now (waited {wait_s:g} s)") from None


def _plan_actors(
    resources: dict, num_actors: int | None, num_gpus_per_actor: float | None
) -> tuple[int, float, float]:
    gpus, cpus = resources.get("GPU", 0), resources.get("CPU", 0)
    per = num_gpus_per_actor if num_gpus_per_actor is not None else (1.0 if gpus else 0.0)
    if per < 0:
        raise ValueError(f"--num-gpus-per-actor: must be >= 0, got {per:g}")
    if per > 0 and gpus < per:
        raise ValueError(f"--num-gpus-per-actor {per:g}: the cluster has {gpus:g} GPUs")
    if num_actors is None:
        num_actors = max(1, int(gpus // per)) if per else 1
    if num_actors < 1:
        raise ValueError(f"--num-actors: must be >= 1, got {num_actors}")
    if per * num_actors > gpus:
        raise ValueError(f"--num-actors {num_actors} x {per:g} GPUs: the cluster has {gpus:g} GPUs")
    cpus_each = 0.5 if per else float(max(1, int((cpus - 1) // num_actors)))
    # Reads need CPU too (0.25 each); actors that take every CPU would stall them forever.
    if num_actors * cpus_each + 0.25 > cpus:
        raise ValueError(
            f"--num-actors {num_actors}: {num_actors} x {cpus_each:g} CPUs plus reading need "
            f"more than the cluster's {cpus:g} CPUs"
        )
    return num_actors, per, cpus_each


def translate(
    source: str,
    direction: str,
    input_uri: str,
    output_uri: str,
    *,
    split: str | None = None,
    batch_size: int = 8,
    load_size: int | None = None,
    num_actors: int | None = None,
    num_gpus_per_actor: float | None = None,
    fmt: str = "same",
    overwrite: bool = False,
    storage_uri: str | None = None,
    arch: ModelConfig | None = None,
    trust_pickle: bool = False,
) -> dict:
    """Translate every input image and write it under ``output_uri``; Ray must be connected.

    Returns ``{"keys": [output keys], "images": n, "failed": [{"key", "reason"}], "seconds",
    "images_per_s", "actors", "gpus_per_actor", "sizes": {output key: (width, height)}}``.
    """
    # Long on purpose: checks first (cheap, before any actor starts), then the one Ray Data pipeline.
    import ray

    from pipeline.models import load_generator

    if batch_size < 1:
        raise ValueError(f"--batch-size: must be >= 1, got {batch_size}")
    if load_size is not None and load_size < 4:
        raise ValueError(f"--load-size: must be >= 4, got {load_size}")
    if fmt not in OUTPUT_FORMATS:
        raise ValueError(f"--format: {fmt!r} is not one of {', '.join(OUTPUT_FORMATS)}")
    net, cfg, _ = load_generator(
        source, direction, storage=storage_uri, arch=arch, trust_pickle=trust_pickle
    )
    inputs = list_inputs(input_uri, direction, split)
    outputs = [output_key(k, fmt)[0] for k in inputs.keys]
    if len(set(outputs)) != len(outputs):
        seen, dupes = set(), []
        for key, out in zip(inputs.keys, outputs, strict=True):
            if out in seen:
                dupes.append(key)
            seen.add(out)
        raise ValueError(
            f"--format {fmt}: inputs would overwrite each other's output ({', '.join(dupes[:5])})"
        )
    check_output(output_uri, input_uri, overwrite)
    if not ray.is_initialized():
        # ray.put would quietly start a local Ray of its own; connect first on purpose.
        raise RuntimeError("translate() needs a Ray connection: call ray_cluster.connect() first")
    actors, gpus, cpus = plan_actors(num_actors, num_gpus_per_actor)
    payload = {
        "arch": dataclasses.asdict(cfg),
        "state": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "source": str(source),
    }
    weights = ray.put(payload)
    if inputs.kind == "shards":
        ds = ray.data.read_parquet(
            inputs.paths, filesystem=inputs.filesystem, num_cpus=0.25
        ).select_columns(["key", "image"])
    else:
        ds = ray.data.read_binary_files(
            inputs.paths, filesystem=inputs.filesystem, include_paths=True, num_cpus=0.25
        )
    ds = ds.map_batches(
        Translator,
        fn_constructor_kwargs={
            "weights": [weights],  # in a list, so that the actor fetches it itself
            "out_uri": output_uri,
            # Ray Data reports each file's path as the filesystem normalises it.
            "base": inputs.filesystem.normalize_path(inputs.base),
            "load_size": load_size,
            "fmt": fmt,
            # A lone CPU actor also uses the CPU it leaves for reading: reads are short and
            # run ahead, so that CPU is idle most of the time (the actor caps this at its
            # node's cores).
            "threads": max(1, int(cpus)) + (1 if actors == 1 and not gpus else 0),
        },
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=gpus or None,
        num_cpus=cpus,
    )
    start = time.monotonic()
    rows = ds.take_all()
    seconds = time.monotonic() - start
    done = [r for r in rows if not r["error"]]
    return {
        "keys": sorted(str(r["output"]) for r in done),
        "images": len(done),
        "failed": inputs.skipped
        + [{"key": str(r["key"]), "reason": str(r["error"])} for r in rows if r["error"]],
        "seconds": round(seconds, 3),
        "images_per_s": len(done) / max(seconds, 1e-9),
        "actors": actors,
        "gpus_per_actor": gpus,
        "sizes": {str(r["output"]): (int(r["width"]), int(r["height"])) for r in done},
    }
