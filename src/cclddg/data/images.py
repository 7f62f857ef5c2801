"""PIL <-> tensor conversions and image grids, so nothing needs torchvision."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cclddg.atomic import atomic_path
from cclddg.errors import UserError


def array_to_tensor(array: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) or (B, H, W, 3) -> float32 channels-first in [-1, 1].

    numpy does the arithmetic: small images are faster without torch's thread pool.
    """
    scaled = np.moveaxis(array, -1, -3).astype(np.float32) * np.float32(1 / 127.5) - np.float32(1.0)
    return torch.from_numpy(np.ascontiguousarray(scaled))


def uint8_to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 channels-first images (a saved file's pixels) -> float32 in [-1, 1], as x / 127.5 - 1."""
    return images.float() / 127.5 - 1.0


def batch_to_unit(images: torch.Tensor) -> torch.Tensor:
    """The training data's mapping (`array_to_tensor`'s, for a stacked uint8 batch): x * (1 / 127.5) - 1, in one
    new tensor. It differs from `uint8_to_unit` in the last bit for 111 of the 256 values; both are kept so that
    caches, runs and measurements made before give the same numbers bit for bit."""
    return images.to(torch.float32, copy=True).mul_(1 / 127.5).sub_(1.0)


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image -> (3, H, W) float32 in [-1, 1], the range every model here works in."""
    if not isinstance(image, Image.Image):
        raise UserError(f"image_to_tensor needs a PIL image, got {type(image).__name__}")
    return array_to_tensor(np.asarray(image.convert("RGB"), dtype=np.uint8))


def tensor_to_array(t: torch.Tensor) -> np.ndarray:
    """(3, H, W) or (B, 3, H, W) in [-1, 1] -> uint8 channels-last, clamped and rounded."""
    if t.ndim not in (3, 4) or t.shape[-3] != 3:
        raise UserError(f"expected a (3, H, W) or (B, 3, H, W) tensor, got shape {tuple(t.shape)}")
    arr = t.detach().to("cpu", torch.float32).numpy()
    arr = np.rint(np.clip(np.nan_to_num((arr + 1.0) * 127.5, nan=127.5), 0.0, 255.0)).astype(np.uint8)  # NaN: mid grey
    return np.ascontiguousarray(np.moveaxis(arr, -3, -1))


def tensor_to_image(t: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> PIL RGB image (values outside the range are clamped)."""
    if t.ndim != 3:
        raise UserError(f"tensor_to_image needs one (3, H, W) image, got shape {tuple(t.shape)}")
    return Image.fromarray(tensor_to_array(t), "RGB")


class GridCanvas:
    """A grid image filled tile by tile as uint8, so a grid of thousands of samples never holds them as floats."""

    MAX_PIXELS = 400_000_000  # ~1.2 GB of RGB: a grid larger than this is refused before any sampling

    def __init__(self, count: int, nrow: int, height: int, width: int, padding: int = 2, pad_value: float = 1.0):
        shape = self.check(count, nrow, height, width, padding)
        self.cols = min(nrow, count)
        self.count, self.h, self.w, self.padding = count, height, width, padding
        fill = int(round((max(-1.0, min(1.0, pad_value)) + 1.0) * 127.5))
        self.canvas = np.full((*shape, 3), fill, np.uint8)

    @classmethod
    def check(cls, count: int, nrow: int, height: int, width: int, padding: int = 2) -> tuple[int, int]:
        """The grid's (height, width) in pixels; a grid too large for one image is refused, before any sampling."""
        if count < 1 or nrow < 1 or padding < 0:
            raise UserError(f"a grid needs count >= 1, nrow >= 1 and padding >= 0, got {count}, {nrow}, {padding}")
        cols = min(nrow, count)
        shape = (-(-count // cols) * (height + padding) + padding, cols * (width + padding) + padding)
        if shape[0] * shape[1] > cls.MAX_PIXELS:
            raise UserError(f"a grid of {count} images would be {shape[1]}x{shape[0]} pixels, too large for one "
                            "image; write them one by one with --singles FOLDER, or ask for fewer")
        return shape

    def put(self, index: int, tiles: np.ndarray) -> None:
        """Place uint8 (B, H, W, 3) tiles at grid cells index, index+1, ..."""
        step_y, step_x = self.h + self.padding, self.w + self.padding
        for k, tile in enumerate(tiles, start=index):
            y, x = self.padding + (k // self.cols) * step_y, self.padding + (k % self.cols) * step_x
            self.canvas[y:y + self.h, x:x + self.w] = tile

    def image(self) -> Image.Image:
        return Image.fromarray(self.canvas, "RGB")


def make_grid(images: torch.Tensor, nrow: int, padding: int = 2, pad_value: float = 1.0) -> Image.Image:
    """Tile (B, 3, H, W) images in [-1, 1] into one PIL image, `nrow` images per row."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise UserError(f"make_grid needs a (B, 3, H, W) tensor, got shape {tuple(images.shape)}")
    if nrow < 1 or padding < 0:
        raise UserError(f"make_grid needs nrow >= 1 and padding >= 0, got nrow={nrow}, padding={padding}")
    b, _, h, w = images.shape
    canvas = GridCanvas(max(b, 1), nrow, h, w, padding, pad_value)
    if b:
        canvas.put(0, tensor_to_array(images))
    return canvas.image()


def save_image_atomic(image: Image.Image, path: str | Path) -> None:
    """Save under a temporary name beside `path` (same format suffix), then rename: never half-written."""
    path = Path(path)
    with atomic_path(path, suffix=path.suffix or ".png") as tmp:
        image.save(tmp)
