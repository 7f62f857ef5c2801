"""Examples/s of each data source through the one preprocessing path, in-process vs DataLoader workers.

What it measures
----------------
One full pass of ``cclddg.data.stream.iter_examples`` over each source -- read, decode, EXIF
orientation, RGB, shorter side to ``--size``, centre crop -> a (3, S, S) uint8 tensor, the path
training and ``cclddg encode`` use -- with 0 (in the main process), 1 and 2 worker processes
(``--workers``). The sources are all built in a temporary folder first (not timed), so it runs offline:

- ``folder``  N photo-like JPEGs (512x384: smooth colour gradients, blotches and noise, quality 90,
              an EXIF block with orientation 1; ~40 KB each) with .txt captions;
- ``hf``      the same JPEG bytes and captions in a ``datasets.Dataset`` (Image feature + text
              column) written with ``save_to_disk``, read as ``hf:DIR``;
- ``wds``     the same in 4 tar shards written with ``webdataset.TarWriter`` (jpg + txt), read as
              ``wds:DIR/{0..3}.tar``;
- ``emoji``   the first N emoji that the system's Noto Color Emoji font draws, rendered per example
              (skipped, with a message, when the font is missing);
- ``shapes``  ``shapes:SIZE``, N procedural examples.

Method: ``--repeats`` rounds (default 2); each round times one full pass of every (source, workers)
pair in turn, so a drift in machine load hits them all alike, and the BEST pass of each pair is
reported (the first round warms the page cache, imports and fonts). Worker start-up stays in every
pass, as in training, where each pass starts its own workers; the time to the first example is
printed per pass to show its share. The ratio is examples/s over examples/s with workers=0 of the
same source, in the same run.

How to run
----------
    OMP_NUM_THREADS=1 python benchmarks/data_sources.py                  # ~40 s on 2 cores
    python benchmarks/data_sources.py --sources folder,wds --workers 0,2 --n 300
    python benchmarks/data_sources.py --size 128 --threads 2
    python benchmarks/data_sources.py --tiny      # 4 examples of each source at 16 px, workers 0,1: what CI runs
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cclddg.data.preprocess import SkipLog
from cclddg.data.sources import open_source
from cclddg.data.stream import iter_examples
from cclddg.errors import UserError

SOURCES = ("folder", "hf", "wds", "emoji", "shapes")
WORDS = ("a", "photo", "of", "the", "red", "blue", "sunset", "over", "hills", "misty", "lake", "city", "at", "night")
SHARDS = 4
DEFAULTS = {"full": dict(n=1000, size=64, workers="0,1,2", repeats=2),
            "tiny": dict(n=4, size=16, workers="0,1", repeats=1)}


def photo_jpeg(rng: np.random.Generator, width: int = 512, height: int = 384) -> bytes:
    """A photo-like JPEG: bicubic colour gradients, bilinear blotches and sensor-like noise (~40 KB)."""
    base = Image.fromarray(rng.integers(0, 256, (4, 3, 3), dtype=np.uint8))
    base = base.resize((width, height), Image.Resampling.BICUBIC)
    blotches = Image.fromarray(rng.integers(88, 169, (24, 32, 3), dtype=np.uint8))
    blotches = blotches.resize((width, height), Image.Resampling.BILINEAR)
    pixels = (np.asarray(base, np.float32) + np.asarray(blotches, np.float32) - 128
              + rng.standard_normal((height, width, 3), dtype=np.float32) * 4)
    exif = Image.Exif()
    exif[0x0112] = 1  # orientation: upright, as cameras write it
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90, exif=exif)
    return out.getvalue()


class FirstN:
    """The first `n` records of a map source."""

    def __init__(self, source, n: int) -> None:
        self.source, self.n = source, min(n, len(source))

    def __len__(self) -> int:
        return self.n

    def record(self, index: int):
        return self.source.record(index)

    def describe(self) -> str:
        return f"the first {self.n} of {self.source.describe()}"


def build_sources(root: Path, names: list[str], n: int, size: int) -> dict:
    """name -> an opened source, for each name that can be built here (a missing font is reported)."""
    sources: dict = {}
    if {"folder", "hf", "wds"} & set(names):
        rng = np.random.default_rng(0)
        start = time.perf_counter()
        jpegs = [photo_jpeg(rng) for _ in range(n)]
        captions = [" ".join(rng.choice(WORDS, size=6)) for _ in range(n)]
        print(f"made {n} JPEGs of 512x384 in {time.perf_counter() - start:.0f} s: "
              f"{np.mean([len(j) for j in jpegs]) / 1e3:.0f} KB on average")
    if "folder" in names:
        folder = root / "folder"
        folder.mkdir()
        for k, (jpeg, caption) in enumerate(zip(jpegs, captions)):
            (folder / f"{k:05d}.jpg").write_bytes(jpeg)
            (folder / f"{k:05d}.txt").write_text(caption, encoding="utf-8")
        sources["folder"] = open_source(f"folder:{folder}", size)
    if "hf" in names:
        import datasets

        datasets.disable_progress_bars()
        features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
        table = datasets.Dataset.from_dict(
            {"image": [{"bytes": j, "path": f"{k:05d}.jpg"} for k, j in enumerate(jpegs)], "text": captions},
            features=features)
        table.save_to_disk(str(root / "hf"))
        sources["hf"] = open_source(f"hf:{root / 'hf'}", size)
    if "wds" in names:
        import webdataset

        (root / "wds").mkdir()
        per_shard = -(-n // SHARDS)
        for shard in range(SHARDS):
            with webdataset.TarWriter(str(root / "wds" / f"{shard}.tar")) as sink:
                for k in range(shard * per_shard, min(n, (shard + 1) * per_shard)):
                    sink.write({"__key__": f"{k:05d}", "jpg": jpegs[k], "txt": captions[k]})
        sources["wds"] = open_source(f"wds:{root / 'wds'}/{{0..{SHARDS - 1}}}.tar", size)
    if "emoji" in names:
        try:
            start = time.perf_counter()
            sources["emoji"] = FirstN(open_source("emoji", size), n)
            print(f"listed the emoji of the font in {time.perf_counter() - start:.1f} s")
        except UserError as exc:
            print(f"emoji: skipped ({exc})")
    if "shapes" in names:
        sources["shapes"] = open_source(f"shapes:{size}", size, length=n)
    return sources


def one_pass(source, size: int, workers: int) -> tuple[int, float, float]:
    """(good examples, seconds, seconds to the first example) of one full pass; a skipped example or a
    wrong tensor stops the benchmark."""
    skips = SkipLog()
    count, first = 0, 0.0
    start = time.perf_counter()
    for example in iter_examples(source, size, workers=workers, skips=skips):
        if count == 0:
            first = time.perf_counter() - start
            if tuple(example.image.shape) != (3, size, size) or example.image.dtype != torch.uint8:
                raise SystemExit(f"{source.describe()}: got a {example.image.dtype} {tuple(example.image.shape)} image")
        count += 1
    elapsed = time.perf_counter() - start
    if skips.skipped:
        raise SystemExit(f"{source.describe()}: {skips.summary()}")
    return count, elapsed, first


def markdown(rates: dict, workers: list[int], counts: dict) -> str:
    head = "| source | examples | " + " | ".join(f"workers={w}" for w in workers) + " |"
    lines = [head, "|" + "---|" * (len(workers) + 2)]
    for name, by_workers in rates.items():
        cells = [f"{by_workers[w]:,.0f}/s" + (f" ({by_workers[w] / by_workers[0]:.2f}x)" if 0 in by_workers and w
                                              else "") for w in workers]
        lines.append(f"| {name} | {counts[name]:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="4 examples at 16 px, workers 0,1, one round (what CI runs)")
    p.add_argument("--n", type=int, default=None, help="examples per source (default 1000; tiny 4)")
    p.add_argument("--size", type=int, default=None, help="output image size (default 64; tiny 16)")
    p.add_argument("--sources", default=",".join(SOURCES), help=f"comma-separated subset of {','.join(SOURCES)}")
    p.add_argument("--workers", default=None, help="comma-separated worker counts (default 0,1,2; tiny 0,1)")
    p.add_argument("--repeats", type=int, default=None,
                   help="rounds; the best pass of each is kept (default 2; tiny 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the main process (default 1)")
    args = p.parse_args()
    for k, v in DEFAULTS["tiny" if args.tiny else "full"].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    names = [s.strip() for s in args.sources.split(",") if s.strip()]
    unknown = sorted(set(names) - set(SOURCES))
    if unknown or not names:
        p.error(f"--sources: unknown {', '.join(unknown) or '(none given)'}; choose from {','.join(SOURCES)}")
    workers = [int(w) for w in args.workers.split(",")]
    torch.set_num_threads(args.threads)
    print(f"{os.cpu_count()} CPUs, {args.threads} torch thread(s) in the main process, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, N={args.n}, size {args.size}, "
          f"workers {workers}, best of {args.repeats} rounds")
    with tempfile.TemporaryDirectory() as tmp:
        sources = build_sources(Path(tmp), names, args.n, args.size)
        best: dict[str, dict[int, float]] = {name: {} for name in sources}
        counts: dict[str, int] = {}
        for round_ in range(args.repeats):
            print(f"round {round_ + 1}/{args.repeats}")
            for name, source in sources.items():
                for w in workers:
                    count, seconds, first = one_pass(source, args.size, w)
                    counts[name] = count
                    best[name][w] = max(best[name].get(w, 0.0), count / seconds)
                    ratio = f"  {best[name][w] / best[name][0]:.2f}x vs workers=0" if w and 0 in best[name] else ""
                    print(f"  {name:7s} workers={w}  {count / seconds:6,.0f} examples/s ({seconds:5.2f} s, "
                          f"first after {first * 1e3:3.0f} ms; best {best[name][w]:,.0f}/s){ratio}")
    print()
    print(f"examples/s, one full pass, best of {args.repeats}; (ratio) vs workers=0 of the same source; "
          f"{os.cpu_count()} CPUs, {args.threads} main-process thread(s), {args.size}x{args.size} uint8 out")
    print()
    print(markdown(best, workers, counts))


if __name__ == "__main__":
    main()
