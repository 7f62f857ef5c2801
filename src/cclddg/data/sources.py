"""Data specs on the command line (`shapes`, `shapes:64`) to datasets."""

from __future__ import annotations

from cclddg.errors import UserError

KNOWN = ("shapes",)


def parse_data_spec(spec: str, img_size: int) -> tuple[str, int]:
    """`shapes` -> ("shapes", img_size); `shapes:64` -> ("shapes", 64)."""
    name, _, arg = spec.partition(":")
    if name not in KNOWN:
        raise UserError(f"unknown data source {spec!r}; this version knows {', '.join(KNOWN)} "
                        "(e.g. --data shapes or --data shapes:64)")
    if arg:
        try:
            img_size = int(arg)
        except ValueError:
            raise UserError(f"--data {spec!r}: the size after ':' must be an integer, e.g. shapes:64") from None
    if img_size < 8:
        raise UserError(f"image size {img_size} is too small for shapes; use 8 or more")
    return name, img_size


def open_dataset(spec: str, img_size: int, seed: int = 0, length: int | None = None):
    """The dataset behind a spec: it has `get_batch(indices) -> (images, labels, captions)`."""
    from cclddg.data.shapes import ShapesDataset

    _, size = parse_data_spec(spec, img_size)
    return ShapesDataset(size=size, length=length, seed=seed)


def load_uint8(spec: str, img_size: int, seed: int, n: int, chunk: int = 1000):
    """Examples 0..n-1 of a source, read once: (uint8 images (n, 3, S, S), captions) — small trainers keep
    their whole training set in memory like this (a quarter of the float32 size)."""
    import torch

    data = open_dataset(spec, img_size, seed=seed, length=n)
    images, captions = [], []
    for start in range(0, n, chunk):
        x, _, c = data.get_batch(range(start, min(start + chunk, n)))
        images.append(((x + 1) * 127.5).round().to(torch.uint8))
        captions += c
    return torch.cat(images), captions
