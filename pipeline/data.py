"""Iterating the domain datasets of :mod:`pipeline.reading` in lockstep inside a Train worker.

Division of work: Ray Data tasks (on any CPU of the cluster) decode and resize; the training
worker does only the cheap, seeded part (random crop + flip per image, uint8 -> float), so the
randomness depends on (seed, domain, pass, rank) alone and a resumed run sees the same batches.
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from cyclegan.config import AugmentConfig, eval_size
from cyclegan.transforms import crop_params, random_crop_flip
from pipeline.images import BadImage, decode_resized
from pipeline.reading import DOMAINS, train_name
from pipeline.shards import read_columns, read_manifest

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """How many rows each rank sees per pass and how many steps an epoch has."""

    rows_per_rank: dict[str, int]
    steps_per_epoch: int
    batch_size: int

    @classmethod
    def make(cls, counts: dict[str, int], world_size: int, batch_size: int) -> Plan:
        # streaming_split(equal=True) gives every rank floor(N / world) rows of a domain.
        rows = {d: max(1, n // world_size) for d, n in counts.items()}
        return cls(rows, math.ceil(max(rows.values()) / batch_size), batch_size)


class DomainStream:
    """An endless stream of augmented batches of one domain on one rank.

    Passes over the shard follow each other; rows of a batch may span two passes. Pass ``p`` is
    shuffled with a seed of (seed, domain, p, rank) and its crops/flips drawn from the same seed,
    so starting at any step reproduces the batches from there on (``start_row``).

    A background thread reads ahead into a bounded queue and starts the next pass as soon as the
    current one is read, so the start-up of a pass overlaps the training steps on the previous
    one instead of stalling them. An error in the thread is raised by ``next_batch``.
    """

    READ_AHEAD = 8  # chunks of up to 16 rows held between the reader thread and the trainer

    def __init__(
        self,
        shard,
        domain: str,
        rows_per_pass: int,
        cfg: AugmentConfig,
        seed: int,
        rank: int,
        shuffle_buffer: int,
        start_row: int = 0,
        read_timeout_s: float = 0.0,
    ):
        self.shard, self.domain, self.n, self.cfg = shard, domain, rows_per_pass, cfg
        self.read_timeout_s = read_timeout_s
        self.seed, self.rank, self.shuffle_buffer = seed, rank, shuffle_buffer
        self.pass_index, self.offset = divmod(start_row, rows_per_pass)
        self._pending: list[tuple[list[str], torch.Tensor]] = []
        self._queue: queue.Queue = queue.Queue(maxsize=self.READ_AHEAD)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._read, name=f"read-{domain}-rank{rank}", daemon=True
        )
        self._thread.start()

    def _read(self) -> None:
        """Reader thread: chunks of every pass from ``pass_index`` on, into the queue."""
        pass_index, skip = self.pass_index, self.offset
        try:
            while not self._stop.is_set():
                chunks = self._pass_chunks(pass_index, skip)
                rows = 0
                with contextlib.closing(chunks):  # stops Ray Data's iteration when told to
                    for chunk in chunks:
                        rows += len(chunk[0])
                        if not self._put(chunk):
                            return
                if rows == 0 and skip == 0:
                    # Passes with nothing in them would follow each other forever.
                    raise ValueError(
                        f"data: a whole pass of domain {self.domain} gave rank {self.rank} no "
                        "readable image (every row failed to decode, or the rank got no rows)"
                    )
                pass_index, skip = pass_index + 1, 0
        except BaseException as exc:  # handed to the trainer, raised there
            self._put(_ReadFailure(exc))

    def _get(self):
        try:
            return self._queue.get(timeout=self.read_timeout_s or None)
        except queue.Empty:
            raise TimeoutError(
                f"data: no image of domain {self.domain} reached rank {self.rank} for "
                f"{self.read_timeout_s:g} s (data.read_timeout_s); the Ray Data tasks that "
                "decode it may be unable to start (see `ray status`) or the storage may hang"
            ) from None

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _pass_chunks(self, pass_index: int, skip: int) -> Iterator[tuple[list[str], torch.Tensor]]:
        key = (self.seed, DOMAINS.index(self.domain), pass_index, self.rank)
        batches = iter(
            self.shard.iter_batches(batch_size=16, batch_format="numpy", prefetch_batches=2)
        )
        with _closed_after(batches):
            crops = self._cropped(batches, crop_params(self.n, key))
            yield from self._chunks(self._shuffled(crops, np.random.default_rng([*key, 1])), skip)

    def _cropped(self, batches, params: np.ndarray) -> Iterator[tuple[str, torch.Tensor]]:
        """(key, HxWx3 uint8 crop) of the first ``n`` rows of a pass (a rank never gets more in
        the equal split); row ``i`` is cropped and flipped as ``params[i]`` says. Each batch is
        cropped as it arrives, so Ray's blocks are let go of at once."""
        i = 0
        for batch in batches:
            keys, images = batch["key"], batch["image"]
            take = min(len(keys), self.n - i)
            if self.cfg.preprocess == "none":  # sizes may differ: one crop at a time
                crops = [
                    random_crop_flip([images[j]], params[i + j : i + j + 1], self.cfg)[0]
                    for j in range(take)
                ]
            else:
                crops = random_crop_flip(list(images[:take]), params[i : i + take], self.cfg)
            yield from zip([str(k) for k in keys[:take]], crops, strict=True)
            i += take
            if i >= self.n:
                return

    def _shuffled(self, rows, rng: np.random.Generator) -> Iterator:
        """``rows`` through a shuffle buffer of ``shuffle_buffer`` rows: each row out is drawn at
        random from the buffer."""
        buffer: list = []
        for row in rows:
            buffer.append(row)
            if len(buffer) >= max(1, self.shuffle_buffer):
                yield self._draw(buffer, rng)
        while buffer:
            yield self._draw(buffer, rng)

    @staticmethod
    def _draw(buffer: list, rng: np.random.Generator):
        j = int(rng.integers(len(buffer)))
        buffer[j], buffer[-1] = buffer[-1], buffer[j]
        return buffer.pop()

    def _chunks(self, rows, skip: int, chunk: int = 16):
        """Chunks of up to ``chunk`` shuffled rows from row ``skip`` of the pass on (rows before
        it were consumed before a resume): one NHWC tensor each, or with ``preprocess=none``
        (sizes may differ) a list of 1-row tensors."""
        keys: list[str] = []
        crops: list[torch.Tensor] = []
        for i, (key, crop) in enumerate(rows):
            if i < skip:
                continue
            keys.append(key)
            crops.append(crop)
            if len(crops) == chunk:
                yield keys, self._stack(crops)
                keys, crops = [], []
        if crops:
            yield keys, self._stack(crops)

    def _stack(self, crops: list[torch.Tensor]):
        if self.cfg.preprocess == "none":
            return [c[None] for c in crops]
        return torch.stack(crops)

    def next_batch(self, batch_size: int) -> tuple[list[str], torch.Tensor]:
        """The keys and the NHWC uint8 pixels of the next ``batch_size`` rows."""
        keys: list[str] = []
        parts: list[torch.Tensor] = []
        need = batch_size
        while need:
            if not self._pending:
                item = self._get()
                if isinstance(item, _ReadFailure):
                    self._put(item)  # every later call fails the same way
                    raise item.exc
                self._pending.append(item)
            chunk_keys, rows = self._pending.pop()  # a tensor or a list of 1-row tensors
            take = min(need, len(rows))
            piece = rows[:take]
            if isinstance(piece, list):
                parts.extend(piece)
            else:
                parts.append(piece)
            keys.extend(chunk_keys[:take])
            if take < len(rows):
                self._pending.append((chunk_keys[take:], rows[take:]))
            need -= take
        if len(parts) == 1:
            return keys, parts[0]
        if len({p.shape[1:] for p in parts}) > 1:
            raise ValueError(
                "data.preprocess: images of different sizes in one batch; "
                "use a cropping preprocess or data.batch_size=1"
            )
        return keys, torch.cat(parts)

    def close(self, timeout: float = 30.0) -> None:
        """Stop the reader thread and wait for it (it ends after the batch it is reading)."""
        self._stop.set()
        self._thread.join(timeout)


@contextlib.contextmanager
def _closed_after(iterator):
    """Close ``iterator`` (a generator: Ray Data then stops the execution) when done."""
    try:
        yield iterator
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()


@dataclass
class _ReadFailure:
    exc: BaseException


class LockstepBatch(NamedTuple):
    """One step's images of both domains (NHWC uint8) and their keys."""

    A: torch.Tensor
    B: torch.Tensor
    keys_A: list[str]
    keys_B: list[str]


class UnpairedBatches:
    """Lockstep (A, B) uint8 NHWC batches on one rank: ``steps_per_epoch`` per epoch, the
    same on every rank, the smaller domain cycling. Starts at ``start_step`` (resume)."""

    def __init__(
        self,
        shards: dict,
        counts: dict[str, int],
        cfg,  # a pipeline.config.DataConfig
        world_size: int,
        rank: int,
        seed: int,
        start_step: int = 0,
    ):
        self.plan = Plan.make(counts, world_size, cfg.batch_size)
        start_row = start_step * cfg.batch_size
        self.streams = {
            d: DomainStream(
                shards[d],
                d,
                self.plan.rows_per_rank[d],
                cfg,
                seed,
                rank,
                cfg.shuffle_buffer,
                start_row,
                cfg.read_timeout_s,
            )
            for d in DOMAINS
        }

    def next(self) -> LockstepBatch:
        b = self.plan.batch_size
        keys_A, A = self.streams["A"].next_batch(b)
        keys_B, B = self.streams["B"].next_batch(b)
        return LockstepBatch(A, B, keys_A, keys_B)

    def close(self) -> None:
        for stream in self.streams.values():
            stream.close()


def load_samples(data_uri: str, cfg: AugmentConfig, count: int) -> dict[str, torch.Tensor]:
    """The first ``count`` held-out images of each domain (testA/testB, else trainA/trainB),
    as NHWC uint8 at the training resolution: the fixed inputs of the sample grids."""
    manifest = read_manifest(data_uri)
    out = {}
    for domain in DOMAINS:
        name = f"test{domain}" if f"test{domain}" in manifest.datasets else train_name(domain)
        table = read_columns(manifest, name, ["key", "image"], limit=count * 4)
        images = []
        for key, data in zip(table["key"].to_pylist(), table["image"].to_pylist(), strict=True):
            try:
                images.append(decode_resized(data, key, eval_size(cfg)))
            except BadImage:
                continue
            if len(images) == count:
                break
        if not images:
            raise ValueError(f"dataset {data_uri}: no readable images in {name} for samples")
        out[domain] = torch.from_numpy(np.stack(images))
    return out
