"""The one preprocessing path every source goes through: record -> checked RGB image -> square tensor.

Decoding is where bad files show up, so the checks live here too: each bad example raises `BadExample`
with a short, stable `kind` (counted per kind by `SkipLog`) and a detail for the first few warnings.
"""

from __future__ import annotations

import io
import random
import warnings
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from cclddg.data.records import Record
from cclddg.errors import OneLineWarning

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb limit (~0.25 GB of 24-bit pixels)
CROPS = ("center", "random")
SKIP_KINDS = ("empty file", "not an image", "truncated image", "too many pixels", "unreadable",
              "no image", "caption not UTF-8")
NAMED_SKIPS = 5  # bad examples named one by one; the rest are only counted


class BadExample(Exception):
    """An example that cannot be used; `kind` is one of SKIP_KINDS."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind, self.detail = kind, detail


class BadDataWarning(OneLineWarning):
    """A bad example was skipped (the first few are named; all are counted)."""


@dataclass
class SkipLog:
    """Counts skipped examples by kind, names the first few (as warnings) and summarises the rest."""

    counts: Counter = field(default_factory=Counter)
    examples: list[tuple[str, str]] = field(default_factory=list)
    good: int = 0
    warn: bool = True

    def add(self, key: str, kind: str, detail: str = "") -> None:
        self.counts[kind] += 1
        if len(self.examples) < NAMED_SKIPS:
            self.examples.append((key, f"{kind}: {detail}" if detail else kind))
            if self.warn:
                more = " (further bad examples are counted, not named)" if len(self.examples) == NAMED_SKIPS else ""
                warnings.warn(f"skipped {key}: {self.examples[-1][1]}{more}", BadDataWarning, stacklevel=2)

    @property
    def skipped(self) -> int:
        return sum(self.counts.values())

    def summary(self, named: int = 0) -> str:
        """One line: how many were skipped and why, with the first `named` of them (empty when none were)."""
        if not self.skipped:
            return ""
        kinds = ", ".join(f"{n} {kind}" for kind, n in self.counts.most_common())
        line = f"skipped {self.skipped} bad example(s) of {self.good + self.skipped} read: {kinds}"
        if named and self.examples:
            line += "; e.g. " + "; ".join(f"{key} ({why})" for key, why in self.examples[:named])
        return line

    def as_dict(self) -> dict:
        return {"good": self.good, "skipped": self.skipped, "by_kind": dict(self.counts.most_common()),
                "first": [list(e) for e in self.examples]}

    @classmethod
    def from_dict(cls, counts: dict) -> SkipLog:
        """A log holding the counts of an `as_dict()` (e.g. a cache's `skipped`), without warnings."""
        log = cls(warn=False)
        log.merge(counts)
        return log

    def merge(self, other: dict) -> None:
        """Add the counts of another log's `as_dict()` (e.g. one finished cache shard's)."""
        self.good += int(other.get("good", 0))
        self.counts.update(other.get("by_kind", {}))
        for key, why in other.get("first", []):
            if len(self.examples) < NAMED_SKIPS:
                self.examples.append((key, why))


def decode_caption(caption: str | bytes | None) -> str:
    if caption is None:
        return ""
    if isinstance(caption, bytes):
        try:
            caption = caption.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadExample("caption not UTF-8", f"byte {exc.start}") from None
    return caption.strip()


def open_image(data: bytes | Image.Image, max_pixels: int, draft_size: int | None = None) -> Image.Image:
    """Bytes (or a PIL image) -> a fully loaded PIL image, EXIF orientation applied; bad files -> BadExample.

    The pixel limit is checked on the header, before any pixel is decoded (decompression bombs). With
    `draft_size`, JPEGs are decoded at the smallest DCT scale whose shorter side still covers it (much
    faster for large photos, same result after the resize)."""
    if isinstance(data, Image.Image):
        image = data
    else:
        if len(data) == 0:
            raise BadExample("empty file")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise BadExample("too many pixels", str(exc).split(" pixels")[0]) from None
        except UnidentifiedImageError:
            raise BadExample("not an image") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise BadExample("not an image", str(exc)) from None
    w, h = image.size
    if w * h > max_pixels:
        raise BadExample("too many pixels", f"{w}x{h} > {max_pixels:,}")
    if w < 1 or h < 1:
        raise BadExample("not an image", f"size {w}x{h}")
    if not isinstance(data, Image.Image):
        if draft_size and image.format == "JPEG":
            scale = draft_size / min(w, h)
            image.draft("RGB", (max(1, int(w * scale + 0.999)), max(1, int(h * scale + 0.999))))
        try:
            image.load()  # the first frame of an animation
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise BadExample("truncated image", str(exc)) from None
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # a damaged EXIF block: the pixels are still good
        return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any mode -> RGB: palette, grayscale, CMYK, 16-bit and float converted; alpha composited on white."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # high bit depth grayscale: scale to 8 bits
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or array.max() > 255 else 255.0
        if mode == "F":
            top = 1.0 if array.max() <= 1.0 else 255.0
        image = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
        mode = "L"
    # "transparency" on P is a palette alpha; on L/RGB (PNG tRNS) a colour key: both become alpha, then white
    if mode in ("P", "L", "RGB") and "transparency" in image.info or mode in ("PA", "LA", "La", "RGBa"):
        image = image.convert("RGBA")
    elif mode == "P":
        image = image.convert("RGB")
    if image.mode == "RGBA":
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def resize_crop(image: Image.Image, size: int, crop: str = "center", flip: bool = False,
                rng: random.Random | None = None) -> Image.Image:
    """Shorter side to `size` (antialiased), then a `size` square: centre crop, or a random crop (and, with
    `flip`, a horizontal flip half the time) drawn from `rng`."""
    if crop not in CROPS:
        raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
    w, h = image.size
    if min(w, h) != size:
        scale = size / min(w, h)
        w, h = max(size, round(w * scale)), max(size, round(h * scale))
        image = image.resize((w, h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    rng = rng or random.Random(0)
    if crop == "random":
        left, top = rng.randint(0, w - size), rng.randint(0, h - size)
    else:
        left, top = (w - size) // 2, (h - size) // 2
    if (left, top, w, h) != (0, 0, size, size):
        image = image.crop((left, top, left + size, top + size))
    if flip and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image


def prepare(record: Record, size: int, crop: str = "center", flip: bool = False, rng: random.Random | None = None,
            max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[torch.Tensor, str]:
    """A record -> ((3, size, size) uint8 tensor, caption); raises BadExample for anything unusable."""
    if record.error:
        raise BadExample("unreadable", record.error)
    if record.image is None:
        raise BadExample("no image")
    caption = decode_caption(record.caption)
    image = resize_crop(to_rgb(open_image(record.image, max_pixels, draft_size=size)), size, crop, flip, rng)
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))), caption

