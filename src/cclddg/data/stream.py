"""One pass over a source: records read, checked and preprocessed in worker processes, split across ranks.

How the work is split, for `world_size` processes with `workers` DataLoader workers each:

- a map source (finite, random access) is cut into chunks of consecutive positions (of its order: the
  index order, or a seeded permutation with `shuffle`); chunk c belongs to rank c % world_size, and a
  rank's chunks go round-robin to its workers. The DataLoader returns worker results round-robin too,
  so each rank sees its examples in order whatever the number of workers.
- a stream source (tar shards) gives each (rank, worker) every n-th shard; with fewer shards than
  (rank, worker) pairs, every pair reads all shards and keeps every n-th record instead. `shuffle`
  passes each worker's records through a seeded shuffle buffer.

Either way the ranks see disjoint parts whose union is the whole source. Bad examples come back as
`Skip`s, so the main process can count them all (`SkipLog`) however many workers found them.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cclddg.data.images import batch_to_unit
from cclddg.data.preprocess import (
    CROPS,
    DEFAULT_MAX_PIXELS,
    BadExample,
    SkipLog,
    prepare,
)
from cclddg.data.records import MapSource, Record, StreamSource
from cclddg.errors import UserError

CHUNK = 16  # examples a worker prepares per message to the main process
PROBE = 1000  # a source whose first PROBE examples are all bad is refused at once


@dataclass
class Example:
    """A good example: (3, S, S) uint8 image, caption, optional labels, and its position in this rank's pass."""

    image: Tensor  # (a numpy array on its way from a worker)
    caption: str
    labels: np.ndarray | None = None
    position: int = -1


@dataclass
class Skip:
    key: str
    kind: str
    detail: str = ""
    position: int = -1


@dataclass
class Failure:
    """A source error met in a worker (e.g. an unreachable first shard), raised again in the main process."""

    message: str


@dataclass
class Batch:
    images: Tensor  # (B, 3, S, S) float32 in [-1, 1]
    captions: list[str]
    labels: Tensor | None
    positions: list[int]


def is_map_source(source) -> bool:
    return isinstance(source, MapSource)


def _shuffle_buffer(records: Iterable[Record], size: int, rng: random.Random) -> Iterator[Record]:
    """Approximate shuffling of a stream in O(size) memory: emit a random element of a full buffer."""
    buffer: list[Record] = []
    for record in records:
        if len(buffer) < size:
            buffer.append(record)
            continue
        k = rng.randrange(size)
        buffer[k], record = record, buffer[k]
        yield record
    rng.shuffle(buffer)
    yield from buffer


class ExampleStream(IterableDataset):
    """One epoch of `source` for one rank, as chunks of `Example`/`Skip` (use `iter_examples` to consume it)."""

    def __init__(self, source: MapSource | StreamSource, size: int, *, crop: str = "center", flip: bool = False,
                 shuffle: bool = False, shuffle_buffer: int = 1000, seed: int = 0, epoch: int = 0, start: int = 0,
                 rank: int = 0, world_size: int = 1, max_pixels: int = DEFAULT_MAX_PIXELS, chunk: int = CHUNK) -> None:
        if crop not in CROPS:
            raise UserError(f"--crop must be one of {', '.join(CROPS)}, got {crop!r}")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is not in 0..{world_size - 1}")
        if size < 1 or chunk < 1 or shuffle_buffer < 1 or start < 0:
            raise UserError("size, chunk and shuffle_buffer must be >= 1 and start >= 0")
        self.source, self.size, self.crop, self.flip = source, size, crop, flip
        self.shuffle, self.shuffle_buffer, self.seed, self.epoch = shuffle, shuffle_buffer, seed, epoch
        self.start, self.rank, self.world_size, self.max_pixels, self.chunk = start, rank, world_size, max_pixels, chunk

    def _prepare(self, record: Record, rng: random.Random) -> Example | Skip:
        try:
            image, caption = prepare(record, self.size, self.crop, self.flip, rng, self.max_pixels)
        except BadExample as bad:
            return Skip(record.key, bad.kind, bad.detail)
        # numpy crosses from a worker as one pickled buffer; a torch tensor would get its own shared-memory
        # segment each (~0.2 ms per image: it halved the throughput of 2 workers)
        return Example(image.numpy(), caption, record.labels)

    def _records(self, worker: int, workers: int) -> Iterator[list[Record]]:
        """This (rank, worker)'s records, a chunk at a time."""
        source, rank, world = self.source, self.rank, self.world_size
        if is_map_source(source):
            n = len(source)
            order = np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle else np.arange(n)
            order = order[self.start:]
            for local, c in enumerate(range(rank, -(-len(order) // self.chunk), world)):
                if local % workers == worker:
                    yield [source.record(int(i)) for i in order[c * self.chunk:(c + 1) * self.chunk]]
            return
        parts, part = world * workers, rank * workers + worker
        shards = list(source.shards)
        if len(shards) >= parts:
            records: Iterable[Record] = source.records(shards[part::parts])
        else:
            records = (r for k, r in enumerate(source.records(shards)) if k % parts == part)
        if self.shuffle:
            records = _shuffle_buffer(records, self.shuffle_buffer, random.Random(f"{self.seed}/{self.epoch}/{part}"))
        chunk: list[Record] = []
        for record in records:
            chunk.append(record)
            if len(chunk) == self.chunk:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    def __iter__(self) -> Iterator[list[Example | Skip | Failure]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{worker}/augment")
        try:
            for records in self._records(worker, workers):
                yield [self._prepare(r, rng) for r in records]
        except UserError as exc:  # sent as data: a worker's exception would reach the user as a traceback
            yield [Failure(str(exc))]


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers decode images; the main process keeps the cores for the models


def iter_examples(source: MapSource | StreamSource, size: int, *, workers: int = 0, skips: SkipLog | None = None,
                  limit: int | None = None, start: int = 0, **stream_options) -> Iterator[Example]:
    """Good examples of one pass over `source` (at most `limit`), from position `start` on; bad ones are
    counted in `skips`. A source whose first PROBE examples are all bad, or that has no good one at all,
    is refused with one line."""
    skips = skips if skips is not None else SkipLog()
    is_map = is_map_source(source)
    stream = ExampleStream(source, size, start=start if is_map else 0, **stream_options)
    if workers < 0:
        raise UserError(f"--workers must be >= 0, got {workers}")
    loader = DataLoader(stream, batch_size=None, num_workers=workers, worker_init_fn=_worker_init if workers else None,
                        prefetch_factor=4 if workers else None)
    to_drop = 0 if is_map else start  # a stream cannot seek: re-read and drop what an earlier run took
    position, good, seen = start, 0, 0
    if limit is not None and limit < 1:
        return
    for chunk in loader:
        for item in chunk:
            if isinstance(item, Failure):
                raise UserError(item.message)
            if to_drop:
                to_drop -= 1
                continue
            item.position, position, seen = position, position + 1, seen + 1
            if isinstance(item, Skip):
                skips.add(item.key, item.kind, item.detail)
                if good == 0 and seen >= PROBE and start == 0:
                    raise UserError(f"no usable image in the first {seen} examples of {source.describe()}: "
                                    f"{skips.summary()}")
                continue
            good += 1
            skips.good += 1
            item.image = torch.from_numpy(item.image)
            yield item
            if limit is not None and good >= limit:
                return
    if good == 0 and start == 0:  # (a resumed pass may find only bad examples left)
        raise UserError(f"no usable image in {source.describe()}: {skips.summary() or 'it is empty'}")


def collate(examples: list[Example]) -> Batch:
    images = batch_to_unit(torch.stack([e.image for e in examples]))
    labels = None
    if all(e.labels is not None for e in examples):
        labels = torch.from_numpy(np.stack([np.asarray(e.labels, dtype=np.float32) for e in examples]))
    return Batch(images, [e.caption for e in examples], labels, [e.position for e in examples])


def iter_batches(source: MapSource | StreamSource, size: int, batch_size: int, **options) -> Iterator[Batch]:
    """`iter_examples` grouped into batches of `batch_size` (the last one may be smaller)."""
    if batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {batch_size}")
    pending: list[Example] = []
    for example in iter_examples(source, size, **options):
        pending.append(example)
        if len(pending) == batch_size:
            yield collate(pending)
            pending = []
    if pending:
        yield collate(pending)
