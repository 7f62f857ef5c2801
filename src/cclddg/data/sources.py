"""Data specs on the command line (`--data` / the seed's `--dataset`) to sources.

    shapes[:SIZE][:holdout=COLOR-SHAPE,...]
                             the built-in procedural shapes (data/shapes.py); SIZE sets the image size; a holdout
                             leaves (colour, shape) pairs out of every image (composition tests)
    emoji[:FONT]             every emoji a colour font draws (Noto Color Emoji by default), named
    folder:PATH              image files under PATH, captions from .txt files or metadata.jsonl/.csv
    hf:NAME_OR_PATH[:SPLIT]  a Hugging Face dataset (a local folder, a save_to_disk copy, or a hub name)
    wds:PATTERN              webdataset tar shards, local or URLs, with brace ranges
    celebA[:PATH] imagewoof[:PATH] cc12m    the seed's datasets (hub/URL, or a local copy)

A folder that holds a `cache.json` is a latent cache (`cclddg encode`), not a source.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cclddg.errors import UserError

KINDS = ("shapes", "emoji", "folder", "hf", "wds")
ALIASES = ("celeba", "imagewoof", "cc12m")
SOURCES_HELP = ("shapes[:SIZE][:holdout=COLOR-SHAPE,...], emoji[:FONT], folder:PATH, hf:NAME_OR_PATH[:SPLIT], "
                "wds:PATTERN, celebA[:PATH], imagewoof[:PATH], cc12m")  # the one list of sources (parse_data_spec)
SPEC_HELP = f"{SOURCES_HELP}, or a latent cache folder"
SPLIT_SEED = 0  # the fixed shuffle that splits a real source into held-out and training examples
DEFAULT_WORKERS = min(2, os.cpu_count() or 1)


@dataclass(frozen=True)
class DataSpec:
    kind: str  # one of KINDS
    arg: str = ""  # path, hub name, pattern or font
    split: str | None = None
    size: int | None = None  # shapes:SIZE
    alias: str | None = None  # celeba / imagewoof: their captions
    holdout: frozenset = frozenset()  # shapes:holdout=red-triangle,...: (colour, shape) pairs no image shows

    @property
    def procedural(self) -> bool:
        """Rendered on demand with any length (shapes), rather than read from storage."""
        return self.kind == "shapes"


def parse_data_spec(spec: str) -> DataSpec:
    """Parse a --data spec (see the module docstring); a malformed one is refused with examples."""
    head, sep, arg = spec.partition(":")
    name = head.lower()
    if name == "shapes":
        return _shapes_spec(spec, arg if sep else "")
    if name == "emoji":
        return DataSpec("emoji", arg)
    if name in ("folder", "wds") or name == "hf":
        if not arg:
            raise UserError(f"--data {spec!r} needs a value after ':', e.g. {name}:"
                            + {"folder": "photos/", "wds": "shards/{00000..00099}.tar", "hf": "DIR_OR_NAME"}[name])
        if name == "hf":
            rest, _, split = arg.rpartition(":")
            if rest and split and "/" not in split and "\\" not in split:
                return DataSpec("hf", rest, split=split)
        return DataSpec(name, arg)
    if name in ("celeba", "imagewoof"):
        from cclddg.data.hf import ALIASES as HUB

        return DataSpec("hf", arg or HUB[name], alias=name)
    if name == "cc12m":
        from cclddg.data.webdataset import CC12M_PATTERN

        return DataSpec("wds", arg or CC12M_PATTERN, alias="cc12m")
    hint = ""
    if Path(spec).expanduser().is_dir():
        hint = f"; {spec} is a folder without a latent cache's cache.json: for a folder of images use folder:{spec}"
    raise UserError(f"unknown data source {spec!r}{hint} (sources: {SPEC_HELP})")


def _shapes_spec(spec: str, options: str) -> DataSpec:
    """`shapes`, `shapes:64`, `shapes:64:holdout=red-triangle,blue-circle` or `shapes:holdout=...`."""
    from cclddg.data.shapes import parse_holdout

    size, holdout = None, frozenset()
    for part in options.split(":") if options else []:
        if part.startswith("holdout="):
            holdout = parse_holdout(part[len("holdout="):])
            continue
        try:
            size = int(part)
        except ValueError:
            raise UserError(f"--data {spec!r}: after 'shapes:' give the image size (an integer) and/or "
                            "holdout=COLOR-SHAPE,..., e.g. shapes:64 or shapes:64:holdout=red-triangle") from None
        if size < 8:
            raise UserError(f"image size {size} is too small for shapes; use 8 or more")
    return DataSpec("shapes", size=size, holdout=holdout)


def with_font(spec: str, font: str | None) -> str:
    """Apply a --font flag to an emoji spec (`emoji` -> `emoji:FONT`); a font for another source is an error."""
    if not font:
        return spec
    if parse_data_spec(spec).kind != "emoji":
        raise UserError(f"--font is for the emoji source, not --data {spec}")
    return f"emoji:{font}"


class ShapesSource:
    """The procedural shapes as a map source of `length` examples (their labels included)."""

    def __init__(self, size: int, length: int, seed: int = 0, holdout: frozenset = frozenset()) -> None:
        from cclddg.data.shapes import ShapesDataset

        self.data = ShapesDataset(size=size, length=length, seed=seed, holdout=holdout)

    def __len__(self) -> int:
        return int(self.data.length)

    def describe(self) -> str:
        from cclddg.data.shapes import format_holdout

        held = f", holding out {format_holdout(self.data.holdout)}" if self.data.holdout else ""
        return f"shapes ({len(self):,} examples, seed {self.data.seed}{held})"

    def record(self, index: int):
        from cclddg.data.records import Record
        from cclddg.data.shapes import attrs_to_label

        sample = self.data.sample(index)
        return Record(f"shapes {index}", sample.image, sample.caption, labels=attrs_to_label(sample.named_attrs))


def open_source(spec: str | DataSpec, img_size: int = 64, *, seed: int = 0, length: int | None = None):
    """The source behind a spec: a map source (len, record) or a stream source (shards, records).

    `length` and `seed` only matter for the procedural shapes (default length 20,000)."""
    spec = parse_data_spec(spec) if isinstance(spec, str) else spec
    if spec.kind == "shapes":
        return ShapesSource(spec.size or img_size, length or 20000, seed, spec.holdout)
    if spec.kind == "emoji":
        from cclddg.data.emoji import EmojiSource

        return EmojiSource(font=spec.arg or None, size=img_size)
    if spec.kind == "folder":
        from cclddg.data.folder import FolderSource

        return FolderSource(spec.arg)
    if spec.kind == "hf":
        from cclddg.data.hf import HFSource

        return HFSource(spec.arg, spec.split, alias=spec.alias)
    from cclddg.data.webdataset import WebDatasetSource

    return WebDatasetSource(spec.arg)


def open_dataset(spec: str, img_size: int, seed: int = 0, length: int | None = None):
    """The procedural shapes dataset behind a `shapes[:SIZE]` spec (fast batches, true attributes)."""
    from cclddg.data.shapes import ShapesDataset

    parsed = parse_data_spec(spec)
    if not parsed.procedural:
        raise UserError(f"this needs the shapes data (its true attributes), not --data {spec}")
    return ShapesDataset(size=parsed.size or img_size, length=length, seed=seed, holdout=parsed.holdout)


def load_uint8(spec: str, img_size: int, seed: int, n: int, *, offset: int = 0, workers: int = DEFAULT_WORKERS,
               progress: bool = False):
    """Examples [offset, offset + n) of a source, read once: (uint8 images (k, 3, S, S), captions).

    Small trainers keep their whole training set in memory like this (a quarter of the float32 size).
    Shapes are rendered with `seed`. A real source is read in one fixed shuffled order (SPLIT_SEED: a
    permutation of a finite source, a shuffle buffer over shards), so offset 0.. can be a held-out part
    and the training part follow it; k < n when the source has fewer good examples."""
    import torch
    from tqdm.auto import tqdm

    from cclddg.data.preprocess import SkipLog
    from cclddg.data.stream import iter_examples

    parsed = parse_data_spec(spec)
    if parsed.procedural:
        source = ShapesSource(parsed.size or img_size, offset + n, seed, parsed.holdout)
        options = dict(start=offset)
    else:
        source = open_source(parsed, img_size)
        options = dict(shuffle=True, seed=SPLIT_SEED, shuffle_buffer=10_000, limit=offset + n)
    skips = SkipLog()
    images, captions = [], []
    bar = tqdm(total=n, desc=f"reading {spec}", unit="img", disable=not progress)
    for k, example in enumerate(iter_examples(source, img_size, workers=workers, skips=skips, **options)):
        if k >= offset or parsed.procedural:
            images.append(example.image)
            captions.append(example.caption)
            bar.update()
        if len(images) >= n:
            break
    bar.close()
    if skips.skipped:
        print(skips.summary())
    if not images:
        raise UserError(f"--data {spec} has no examples past the first {offset} (held out); it has too few images")
    return torch.stack(images), captions


def load_training_set(spec: str, img_size: int, seed: int, n: int, held_out: int, *, workers: int = DEFAULT_WORKERS,
                      progress: bool = False):
    """A small trainer's training set, disjoint from `load_held_out`'s: shapes rendered with `seed`; a real
    source's examples after the first `held_out` of its fixed shuffled order."""
    if parse_data_spec(spec).procedural:
        return load_uint8(spec, img_size, seed, n, workers=0, progress=progress)
    return load_uint8(spec, img_size, SPLIT_SEED, n, offset=held_out, workers=workers, progress=progress)


def load_held_out(spec: str, img_size: int, n: int, shapes_seed: int, *, workers: int = DEFAULT_WORKERS):
    """Held-out examples for a small trainer's report: shapes rendered with `shapes_seed`; a real source's
    first `n` examples of its fixed shuffled order."""
    procedural = parse_data_spec(spec).procedural
    return load_uint8(spec, img_size, shapes_seed if procedural else SPLIT_SEED, n, workers=0 if procedural else workers)


def check_source(spec: str, img_size: int = 64) -> None:
    """Open a spec's source once (a missing folder, an offline hub name, a font that is not there ...) so a
    command fails before it writes anything."""
    parsed = parse_data_spec(spec)
    if not parsed.procedural:
        open_source(parsed, img_size)
