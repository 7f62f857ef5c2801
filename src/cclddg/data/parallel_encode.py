"""Encoding across processes: `cclddg encode` under `accelerate launch` or `torchrun` (one process per GPU, or
several on a CPU), for a source the size of CC12M.

Each rank encodes its own part of the source into `OUT/part-R-of-W/`, a cache of its own written exactly as a
one-process encode writes one (shard by shard, resumable after a kill), with the latent scale rank 0 measured on
the whole source's first images (as one process would). When every part is done, rank 0 writes `OUT/cache.json`
listing every part's shards, their skipped examples summed: the result reads as one cache.

The parts: a map source (a folder, shapes) is cut into W contiguous blocks of its positions, the first `--n` of
them when given (so `--n` counts positions here, and bad files among them are skipped and counted); a stream
source (webdataset tar shards) gives rank r every W-th tar shard, and each rank encodes its share of `--n` good
examples. Resuming needs the same number of processes (it is part of the cache's key).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from cclddg.data import latent_cache as lc
from cclddg.data.preprocess import SkipLog
from cclddg.data.records import Record
from cclddg.data.stream import is_map_source
from cclddg.encoders.base import Embedder
from cclddg.errors import UserError
from cclddg.latents.base import LatentSpace


@dataclass
class MapPart:
    """Positions [start, stop) of a map source, as a map source."""

    source: Any
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start

    def record(self, index: int) -> Record:
        return self.source.record(self.start + index)

    def describe(self) -> str:
        return f"{self.source.describe()} [{self.start}:{self.stop}]"


@dataclass
class StreamPart:
    """Some of a stream source's tar shards, as a stream source."""

    source: Any
    shards: Sequence[str]

    def records(self, shards: Sequence[str]) -> Iterator[Record]:
        return self.source.records(shards)

    def describe(self) -> str:
        return f"{self.source.describe()} ({len(self.shards)} of its shards)"


def part_of(source, count: int | None, rank: int, world: int) -> tuple[Any, int | None]:
    """(rank's part of `source`, the good examples it encodes: None for all of the part)."""
    if is_map_source(source):
        total = len(source) if count is None else min(count, len(source))
        if total < world:
            raise UserError(f"{total} examples for {world} processes: encode at least one per process")
        return MapPart(source, rank * total // world, (rank + 1) * total // world), None
    shards = list(source.shards)
    if len(shards) < world:
        raise UserError(f"{source.describe()} has {len(shards)} shards for {world} processes: each process reads "
                        f"whole shards, so run at most {len(shards)}")
    share = None if count is None else count // world + (rank < count % world)
    return StreamPart(source, shards[rank::world]), share


def part_folder(out: Path, rank: int, world: int) -> Path:
    return out / f"part-{rank}-of-{world}"


def encode_in_parts(source, data_spec: str, seed: int, count: int | None, img_size: int, space: LatentSpace,
                    embedder: Embedder | None, out: Path, *, rank: int, world: int, barrier: Callable[[], None],
                    flip: bool = False, shard_size: int = 5000, batch_size: int = 256, scale: float | None = None,
                    progress: bool = True, workers: int = 0, crop: str = "center") -> Path:
    """`latent_cache.encode_dataset` over `world` processes, this one being `rank` (module docstring); every rank
    calls it, `barrier()` waits for all. Returns `out`, complete, on every rank."""
    out = Path(out)
    key = {**lc.cache_key(data_spec, seed, count, img_size, space, embedder, flip, shard_size, crop), "ranks": world}
    fingerprint = source.fingerprint() if callable(getattr(source, "fingerprint", None)) else None
    if rank == 0:
        state = lc.prepare_folder(out, key, scale, fingerprint)
        if state == {}:  # a new cache: the scale of the whole source's first images, as one process measures it
            found = float(scale) if scale is not None else lc.measure_scale_of(source, img_size, space, batch_size,
                                                                                 workers, crop)
            out.mkdir(parents=True, exist_ok=True)
            lc.write_progress(out, key, found, fingerprint)
    barrier()
    if (out / lc.META_FILE).is_file():
        return out
    cache_scale = float(lc.read_progress(out)["scale"])
    part, share = part_of(source, count, rank, world)
    lc.encode_dataset(part, f"{data_spec} (part {rank + 1} of {world})", seed, share, img_size, space, embedder,
                      part_folder(out, rank, world), flip=flip, shard_size=shard_size, batch_size=batch_size,
                      scale=cache_scale, progress=progress, workers=workers, crop=crop)
    barrier()
    if rank == 0:
        merge_parts(out, key, cache_scale, world, fingerprint)
    barrier()
    return out


def merge_parts(out: Path, key: dict, scale: float, world: int, fingerprint: dict | None) -> Path:
    """Write `out`'s cache.json from its finished parts' (their shards in rank order, skipped examples summed)."""
    shards, has_labels, skips = [], [], SkipLog(warn=False)
    for rank in range(world):
        folder = part_folder(out, rank, world)
        meta = lc.read_cache_meta(folder)
        shards += [{**s, "name": f"{folder.name}/{s['name']}"} for s in meta["shards"]]
        has_labels.append(bool(meta["has_labels"]))
        skips.merge(meta["skipped"])
    return lc.write_meta(out, key, scale, shards, all(has_labels), skips, fingerprint)
