"""Scores of trained generators on a dataset's test images, shared by ``pipeline.evaluate`` and
the training worker's periodic evaluation.

Paired data (the built-in scenes): photo->labels (B->A) as ``per_pixel_acc``,
``per_class_acc`` and ``class_iou`` after mapping each output pixel to the nearest palette
colour, and labels->photo (A->B) as ``l1_AtoB``. Unpaired data: ``fid_*``/``kid_*`` of each
direction (torchmetrics' FID and KID) on the features of an extractor (by default the FID
Inception network of ``--fid-weights``, see :func:`default_extractor`). With both generators,
``cycle_l1_A``/``cycle_l1_B`` measure A->B->A and B->A->B. The passes take batches of NCHW
[-1, 1] tensors, so they can be driven from memory as well as from a dataset's shards; each
pass calls an optional ``progress`` with the number of images of every batch it finishes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from cyclegan.metrics import (
    FID_WEIGHTS_URL,
    ConfusionMatrix,
    colors_to_classes,
    extract_features,
    fid_from_features,
    kid_from_features,
    l1_distance,
    label_scores,
    load_inception,
)
from cyclegan.train_step import unwrap
from cyclegan.transforms import image_grid, to_input
from pipeline.images import decode_resized
from pipeline.scenes import PALETTE
from pipeline.shards import Manifest, read_columns, read_manifest

KID_SUBSETS = 100
Progress = Callable[[int], object]
COLUMNS = ("input", "output", "reconstruction", "ground truth")
PAIRED_METRICS = ("per_pixel_acc", "per_class_acc", "class_iou", "l1_AtoB", "cycle_l1_A",
                  "cycle_l1_B")  # fmt: skip
UNPAIRED_METRICS = tuple(f"{kind}_{d}" for d in ("AtoB", "BtoA") for kind in ("fid", "kid")) + (
    "kid_AtoB_std",
    "kid_BtoA_std",
    "cycle_l1_A",
    "cycle_l1_B",
)


# reading test images


def read_split(manifest: Manifest, name: str, limit: int | None) -> list[tuple[str, bytes]]:
    """(key, encoded bytes) of the first ``limit`` images of dataset ``name`` (all: None)."""
    if name not in manifest.datasets:
        raise ValueError(
            f"dataset {manifest.root}: no {name} (has {', '.join(sorted(manifest.datasets))})"
        )
    table = read_columns(manifest, name, ["key", "image"], limit)
    rows = list(zip(table["key"].to_pylist(), table["image"].to_pylist(), strict=True))
    if not rows:
        raise ValueError(f"dataset {manifest.root}: {name} has no images")
    return rows


def read_pairs(manifest: Manifest, split: str, limit: int | None) -> list[tuple[str, bytes, bytes]]:
    """(key, A bytes, B bytes) of the images that ``{split}A`` and ``{split}B`` share by key."""
    a = read_split(manifest, f"{split}A", limit)
    b = dict(read_split(manifest, f"{split}B", limit))
    if limit is not None and len(b) == limit and any(k not in b for k, _ in a):
        b = dict(read_split(manifest, f"{split}B", None))  # the two are stored in other orders
    pairs = [(key, data, b[key]) for key, data in a if key in b]
    if not pairs:
        raise ValueError(
            f"dataset {manifest.root}: paired_test is set but {split}A and {split}B share no key"
        )
    return pairs


def _stack(arrays: list[np.ndarray]) -> torch.Tensor:
    return to_input(torch.from_numpy(np.stack(arrays)))


def image_batches(
    rows: list[tuple[str, bytes]], size: int | None, batch_size: int
) -> Iterator[torch.Tensor]:
    """NCHW [-1, 1] batches (bicubic resize to size x size; None keeps each image's size, and a
    batch then ends where the size changes)."""
    target = (size, size) if size else None
    pending: list[np.ndarray] = []
    for key, data in rows:
        arr = decode_resized(data, key, target)
        if pending and (len(pending) == batch_size or pending[0].shape != arr.shape):
            yield _stack(pending)
            pending = []
        pending.append(arr)
    if pending:
        yield _stack(pending)


class ImageBatches:
    """:func:`image_batches` of ``rows`` as an iterable that decodes afresh on every pass (a
    domain is read once as a source and once as a target, never held in memory whole)."""

    def __init__(self, rows: list[tuple[str, bytes]], size: int | None, batch_size: int) -> None:
        self.rows, self.size, self.batch_size = rows, size, batch_size

    def __iter__(self) -> Iterator[torch.Tensor]:
        return image_batches(self.rows, self.size, self.batch_size)


def pair_batches(
    pairs: list[tuple[str, bytes, bytes]], size: int | None, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(A as input, A as ground truth, B) batches of paired images.

    The input is resized bicubic, as in training; the ground-truth label map nearest-neighbour,
    so that it holds only class colours. Without ``size`` both take the size of the B image.
    """
    pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for key, a_data, b_data in pairs:
        b = decode_resized(b_data, key, (size, size) if size else None)
        target = (b.shape[1], b.shape[0])
        row = (
            decode_resized(a_data, key, target),
            decode_resized(a_data, key, target, nearest=True),
            b,
        )
        if pending and (len(pending) == batch_size or pending[0][2].shape != b.shape):
            yield tuple(_stack(list(col)) for col in zip(*pending, strict=True))
            pending = []
        pending.append(row)
    if pending:
        yield tuple(_stack(list(col)) for col in zip(*pending, strict=True))


# the passes


@contextlib.contextmanager
def _eval_mode(*nets: nn.Module | None):
    """Eval mode for a block; each net's previous mode is restored after (training calls this)."""
    nets = tuple(n for n in nets if n is not None)
    modes = [n.training for n in nets]
    for n in nets:
        n.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for n, mode in zip(nets, modes, strict=True):
            n.train(mode)


def _device(*nets: nn.Module | None) -> torch.device:
    for net in nets:
        if net is not None:
            for p in net.parameters():
                return p.device
    return torch.device("cpu")


class _Mean:
    """A running mean of l1_distance over batches, weighted by their pixels."""

    def __init__(self) -> None:
        self.total, self.count = 0.0, 0

    def add(self, fake: torch.Tensor, real: torch.Tensor) -> None:
        self.total += l1_distance(fake, real) * real.numel()
        self.count += real.numel()

    def value(self) -> float:
        return self.total / self.count


class Gallery:
    """The first few rows of a direction: input | output | reconstruction | ground truth."""

    def __init__(self, rows: int) -> None:
        self.rows, self.images, self.columns = rows, [], []

    def add(self, *columns: torch.Tensor | None) -> None:
        # Unpaired rows have no ground truth: three columns, the first three names.
        pairs = zip(COLUMNS, columns, strict=False)
        self.columns = [name for name, c in pairs if c is not None]
        present = [c.detach().float().cpu() for c in columns if c is not None]
        for i in range(len(present[0])):
            if len(self.images) < self.rows:
                self.images.append(torch.stack([c[i] for c in present]))

    def grid(self) -> np.ndarray | None:
        return image_grid(self.images) if self.images else None


def paired_pass(
    G_AtoB: nn.Module | None,
    G_BtoA: nn.Module | None,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    palette: torch.Tensor,
    gallery_rows: int = 0,
    progress: Progress | None = None,
) -> tuple[dict[str, float], dict[str, Gallery]]:
    """Paired scores (see :func:`paired_scores`) of ``batches`` of (A as input, A as ground
    truth, B), with the galleries of both directions; ``palette`` is (K, 3) in 0..255."""
    G_AtoB = unwrap(G_AtoB) if G_AtoB is not None else None
    G_BtoA = unwrap(G_BtoA) if G_BtoA is not None else None
    if G_AtoB is None and G_BtoA is None:
        raise ValueError("paired scores need at least one generator")
    device = _device(G_AtoB, G_BtoA)
    confusion = ConfusionMatrix(len(palette))
    l1_ab, cyc_a, cyc_b = _Mean(), _Mean(), _Mean()
    galleries = {"AtoB": Gallery(gallery_rows), "BtoA": Gallery(gallery_rows)}
    with _eval_mode(G_AtoB, G_BtoA):
        for a_in, a_true, b in batches:
            a_in, a_true, b = a_in.to(device), a_true.to(device), b.to(device)
            if G_BtoA is not None:
                fake_a = G_BtoA(b).float()
                confusion.update(
                    colors_to_classes(fake_a, palette), colors_to_classes(a_true, palette)
                )
                rec_b = G_AtoB(fake_a).float() if G_AtoB is not None else None
                if rec_b is not None:
                    cyc_b.add(rec_b, b)
                galleries["BtoA"].add(b, fake_a, rec_b, a_true)
            if G_AtoB is not None:
                fake_b = G_AtoB(a_in).float()
                l1_ab.add(fake_b, b)
                rec_a = G_BtoA(fake_b).float() if G_BtoA is not None else None
                if rec_a is not None:
                    cyc_a.add(rec_a, a_in)
                galleries["AtoB"].add(a_in, fake_b, rec_a, b)
            if progress is not None:
                progress(len(b))
    scores: dict[str, float] = {}
    if G_BtoA is not None:
        scores.update(label_scores(confusion))
    if G_AtoB is not None:
        scores["l1_AtoB"] = l1_ab.value()
    if G_AtoB is not None and G_BtoA is not None:
        scores["cycle_l1_A"], scores["cycle_l1_B"] = cyc_a.value(), cyc_b.value()
    return scores, galleries


def unpaired_pass(
    generators: dict[str, nn.Module],
    images: dict[str, Iterable[torch.Tensor]],
    extractor: nn.Module,
    gallery_rows: int = 0,
    progress: Progress | None = None,
) -> tuple[dict[str, float], dict[str, Gallery]]:
    """FID and KID of each generator's translations of its source domain against the real
    images of the target domain, plus cycle L1 where the other generator is given.

    ``generators``: ``{"AtoB": G, "BtoA": G}`` (either may be missing); ``images``:
    ``{"A": batches, "B": batches}``, each iterable more than once (a list, ``ImageBatches``).
    Each direction reads its source and its target domain once.
    """
    generators = {d: unwrap(g) for d, g in generators.items()}
    device = _device(*generators.values())
    extractor = extractor.to(device)
    scores: dict[str, float] = {}
    galleries = {}
    with _eval_mode(*generators.values(), extractor):
        for d, G in generators.items():
            source, target = ("A", "B") if d == "AtoB" else ("B", "A")
            G_back = generators.get("BtoA" if d == "AtoB" else "AtoB")
            gallery, cycle, chunks = Gallery(gallery_rows), _Mean(), []
            for x in images[source]:
                x = x.to(device)
                fake = G(x).float()
                chunks.append(extractor(fake).float().cpu())
                rec = G_back(fake).float() if G_back is not None else None
                if rec is not None:
                    cycle.add(rec, x)
                gallery.add(x, fake, rec)
                if progress is not None:
                    progress(len(x))
            fake_features = torch.cat(chunks)
            real_features = extract_features(extractor, images[target], device, None, progress)
            n = min(len(fake_features), len(real_features))
            kid, kid_std = kid_from_features(
                fake_features, real_features, subsets=KID_SUBSETS, subset_size=min(1000, n)
            )
            scores[f"fid_{d}"] = fid_from_features(fake_features, real_features)
            scores[f"kid_{d}"], scores[f"kid_{d}_std"] = kid, kid_std
            if G_back is not None:
                scores[f"cycle_l1_{source}"] = cycle.value()
            galleries[d] = gallery
    return scores, galleries


# the scores of a dataset


def paired_scores(
    G_AtoB: nn.Module | None,
    G_BtoA: nn.Module | None,
    data_uri: str,
    crop_size: int | None,
    limit: int | None = None,
    batch_size: int = 8,
) -> dict[str, float]:
    """Scores of a paired test split (the built-in scenes): ``per_pixel_acc``, ``per_class_acc``
    and ``class_iou`` of ``G_BtoA`` (photo->labels), ``l1_AtoB`` of ``G_AtoB`` (labels->photo),
    and ``cycle_l1_A``/``cycle_l1_B`` when both are given (either may be None).

    Images are resized to ``crop_size`` (None: stored size) and moved to the generators' device;
    the nets may be DDP-wrapped and are returned to their previous train/eval mode.
    """
    pairs = read_pairs(read_manifest(data_uri), "test", limit)
    batches = pair_batches(pairs, crop_size, batch_size)
    return paired_pass(G_AtoB, G_BtoA, batches, torch.as_tensor(PALETTE))[0]


def unpaired_scores(
    generators: dict[str, nn.Module],
    rows: dict[str, list[tuple[str, bytes]]],
    extractor: nn.Module,
    size: int | None,
    batch_size: int,
    gallery_rows: int = 0,
    progress: Progress | None = None,
) -> tuple[dict[str, float], dict[str, Gallery]]:
    """:func:`unpaired_pass` on encoded images (``rows``: ``{"A": [...], "B": [...]}``),
    resized to ``size`` x ``size`` (None: as stored)."""
    for domain, domain_rows in rows.items():
        if len(domain_rows) < 2:
            raise ValueError(f"FID/KID need at least 2 images of domain {domain}, got 1")
    images = {d: ImageBatches(r, size, batch_size) for d, r in rows.items()}
    return unpaired_pass(generators, images, extractor, gallery_rows, progress)


def unpaired_eval_scores(
    G_AtoB: nn.Module,
    G_BtoA: nn.Module,
    data_uri: str,
    size: int | None,
    limit: int | None,
    extractor: nn.Module,
    batch_size: int = 8,
) -> dict[str, float]:
    """FID/KID of both directions (and cycle L1) on the first ``limit`` images of each domain
    of the test split, or of the training split where there is no test split."""
    manifest = read_manifest(data_uri)
    split = "test" if {"testA", "testB"} <= set(manifest.datasets) else "train"
    rows = {d: read_split(manifest, f"{split}{d}", limit) for d in ("A", "B")}
    generators = {"AtoB": G_AtoB, "BtoA": G_BtoA}
    return unpaired_scores(generators, rows, extractor, size, batch_size)[0]


def default_extractor(fid_weights: str | None) -> nn.Module:
    """The Inception network of FID/KID (``.network`` says which) from the state dict file
    ``fid_weights``: the FID network's ``pt_inception-2015-12-05-*.pth`` (scores comparable
    with published ones) or a torchvision ``inception_v3`` state dict. Without a file, the FID
    network's weights are downloaded once into torch hub's cache. Raises ``RuntimeError``
    naming the file (or the download) and ``--fid-weights``."""
    try:
        return load_inception(fid_weights)
    except Exception as exc:
        where = "" if fid_weights else f" (downloading {FID_WEIGHTS_URL} failed)"
        raise RuntimeError(
            f"FID/KID need Inception v3 weights{where}: {exc}; pass --fid-weights PATH "
            "(train.fid_weights in training): pt_inception-2015-12-05-6726825d.pth for scores "
            "comparable with published ones, or a torchvision inception_v3 state dict"
        ) from None
