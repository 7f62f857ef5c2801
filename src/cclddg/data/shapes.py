"""The built-in `shapes` data: one flat palette shape on a flat palette background.

It follows docs/DESIGN.md's "The shapes contract" exactly, because `cclddg.evaluation.shapes_eval`
judges generated images against the same rules.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from cclddg.data.images import array_to_tensor
from cclddg.errors import UserError

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
ATTRIBUTES: tuple[str, ...] = ("color", "shape", "size", "position", "background")
ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {
    "color": COLORS,
    "shape": SHAPES,
    "size": SIZES,
    "position": POSITIONS,
    "background": COLORS,
}

SIZE_FRACTION = {"small": 0.25, "large": 0.45}  # bounding-box side / S
SIZE_JITTER = 0.10  # relative
GRID = (0.25, 0.5, 0.75)  # centre coordinates / S
SUPERSAMPLE = 4
DEFAULT_NAME_PROBS: dict[str, float] = {
    "color": 0.9, "shape": 0.9, "size": 0.6, "position": 0.8, "background": 0.6,
}
MIN_SIZE = 8

LABEL_BLOCKS: dict[str, int] = {a: len(v) + 1 for a, v in ATTRIBUTE_VALUES.items()}
LABEL_OFFSETS: dict[str, int] = {
    a: sum(LABEL_BLOCKS[b] for b in ATTRIBUTES[:i]) for i, a in enumerate(ATTRIBUTES)
}
LABEL_DIM: int = sum(LABEL_BLOCKS.values())

_ALIASES = {"colour": "color", "bg": "background", "pos": "position"}
_VALUE_ALIASES = {"centre": "center", "middle": "center"}
Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels
Holdout = frozenset[tuple[str, str]]  # (colour, shape) pairs no image shows (check_holdout)
_PALETTE_ARRAY = np.array([PALETTE[c] for c in COLORS], dtype=np.float32)


@dataclass
class ShapeSample:
    """One example: the image, its caption, the true attributes and which ones the caption names."""

    image: Image.Image
    caption: str
    attrs: dict[str, str]
    named: tuple[str, ...]
    box: Box = (0.0, 0.0, 0.0, 0.0)  # the shape's bounding box, x0, y0, x1, y1 in pixels

    @property
    def named_attrs(self) -> dict[str, str]:
        """The attributes the caption names: what a generator is asked for."""
        return {a: self.attrs[a] for a in self.named}


# ---------------------------------------------------------------- validation


def _check_value(attr: str, value: str) -> str:
    """Return the canonical value, or fail with the valid choices."""
    value = _VALUE_ALIASES.get(value, value)
    if value not in ATTRIBUTE_VALUES[attr]:
        raise UserError(f"unknown {attr} {value!r}; choose one of: {', '.join(ATTRIBUTE_VALUES[attr])}")
    return value


def _check_key(key: str) -> str:
    """Return the canonical attribute name, or fail with the valid choices."""
    key = _ALIASES.get(key, key)
    if key not in ATTRIBUTES:
        raise UserError(f"unknown attribute {key!r}; choose from: {', '.join(ATTRIBUTES)}")
    return key


def validate_attrs(attrs: Mapping[str, str], complete: bool) -> dict[str, str]:
    """Canonical attribute dict; `complete` demands all five (rendering needs them)."""
    out = {_check_key(str(k).strip().lower()): str(v).strip().lower() for k, v in attrs.items()}
    out = {k: _check_value(k, v) for k, v in out.items()}
    missing = [a for a in ATTRIBUTES if a not in out]
    if complete and missing:
        raise UserError(f"render needs every attribute; missing: {', '.join(missing)}")
    if complete and out["color"] == out["background"]:
        raise UserError(f"shape colour and background are both {out['color']!r}; they must differ")
    return out


def _check_name_probs(name_probs: Mapping[str, float] | None) -> dict[str, float]:
    """Defaults overlaid with the user's probabilities, each checked to lie in [0, 1]."""
    probs = dict(DEFAULT_NAME_PROBS)
    for key, p in (name_probs or {}).items():
        key = _check_key(key)
        if not 0.0 <= float(p) <= 1.0:
            raise UserError(f"name_probs[{key!r}] = {p} must lie in [0, 1]")
        probs[key] = float(p)
    return probs


def _check_size(size: int) -> int:
    if int(size) != size or size < MIN_SIZE:
        raise UserError(f"shapes image size must be an integer >= {MIN_SIZE}, got {size!r}")
    return int(size)


# ---------------------------------------------------------------- holdout


def check_holdout(pairs: Iterable[tuple[str, str]]) -> Holdout:
    """The (colour, shape) pairs no image of the data shows, checked: known values, and every colour and every
    shape still drawn with some other partner (so a held-out pair is a new combination of seen parts)."""
    holdout = frozenset((_check_value("color", c), _check_value("shape", s)) for c, s in pairs)
    for color in COLORS:
        if all((color, s) in holdout for s in SHAPES):
            raise UserError(f"the holdout leaves out every shape in {color}; keep at least one")
    for shape in SHAPES:
        if all((c, shape) in holdout for c in COLORS):
            raise UserError(f"the holdout leaves out every colour of the {shape}; keep at least one")
    return holdout


def parse_holdout(text: str) -> Holdout:
    """'red-triangle,blue-circle' -> {(red, triangle), (blue, circle)} (checked by check_holdout)."""
    pairs = []
    for item in (p.strip() for p in text.split(",")):
        color, sep, shape = item.partition("-")
        if not sep or not color or not shape:
            raise UserError(f"bad holdout pair {item!r}: write COLOR-SHAPE pairs separated by commas, "
                            f"e.g. holdout=red-triangle,blue-circle")
        pairs.append((color.strip().lower(), shape.strip().lower()))
    return check_holdout(pairs)


def format_holdout(holdout: Holdout) -> str:
    """The inverse of parse_holdout, in a fixed order (COLORS, then SHAPES)."""
    return ",".join(f"{c}-{s}" for c in COLORS for s in SHAPES if (c, s) in holdout)


def is_held_out(attrs: Mapping[str, str], holdout: Holdout) -> bool:
    """Whether a request or an image combines a held-out colour and shape."""
    return (attrs.get("color"), attrs.get("shape")) in holdout


# ---------------------------------------------------------------- rendering


def shape_box(size: int, attrs: Mapping[str, str], jitter: np.ndarray | None) -> Box:
    """Bounding box (x0, y0, x1, y1) in pixels; `jitter` is 3 uniforms in [0, 1) or None for none."""
    u = np.full(3, 0.5) if jitter is None else jitter
    side = SIZE_FRACTION[attrs["size"]] * size * (1.0 + SIZE_JITTER * (2.0 * u[0] - 1.0))
    row, col = divmod(POSITIONS.index(attrs["position"]), 3)
    half = side / 2.0
    cx = min(max(GRID[col] * size + (2.0 * u[1] - 1.0) * size / 32.0, half), size - half)
    cy = min(max(GRID[row] * size + (2.0 * u[2] - 1.0) * size / 32.0, half), size - half)
    return (cx - half, cy - half, cx + half, cy + half)


def shape_coverage(shape: str, box: Box, px0: int, py0: int, w: int, h: int) -> np.ndarray:
    """Fraction of each pixel in the (h, w) window at (px0, py0) that the shape covers (4x4 samples).

    The analyzer fits these same coverages to generated images, so both share one definition.
    """
    s = SUPERSAMPLE
    xs = px0 + (np.arange(w * s, dtype=np.float32) + 0.5) / s
    ys = py0 + (np.arange(h * s, dtype=np.float32) + 0.5) / s
    x0, y0, x1, y1 = box
    in_x = (xs >= x0) & (xs <= x1)
    in_y = (ys >= y0) & (ys <= y1)
    if shape == "square":
        inside = in_y[:, None] & in_x[None, :]
    elif shape == "circle":
        r = (x1 - x0) / 2.0
        dx2 = (xs - (x0 + r)) ** 2
        dy2 = (ys - (y0 + r)) ** 2
        inside = (dy2[:, None] + dx2[None, :]) <= r * r
    else:  # triangle, apex up, base width = height: half width grows 0.5 px per px down
        half = (ys - y0) * 0.5
        inside = in_y[:, None] & (np.abs(xs - (x0 + x1) / 2.0)[None, :] <= half[:, None])
    return inside.reshape(h, s, w, s).mean(axis=(1, 3), dtype=np.float32)


def _render_array(size: int, attrs: Mapping[str, str], jitter: np.ndarray | None) -> tuple[np.ndarray, Box]:
    """uint8 (S, S, 3) image and the shape's box; the shape blends linearly into the background."""
    box = shape_box(size, attrs, jitter)
    bg = _PALETTE_ARRAY[COLORS.index(attrs["background"])]
    fg = _PALETTE_ARRAY[COLORS.index(attrs["color"])]
    image = np.empty((size, size, 3), np.uint8)
    image[:] = bg.astype(np.uint8)
    px0, py0 = max(int(np.floor(box[0])), 0), max(int(np.floor(box[1])), 0)
    px1, py1 = min(int(np.ceil(box[2])), size), min(int(np.ceil(box[3])), size)
    cov = shape_coverage(attrs["shape"], box, px0, py0, px1 - px0, py1 - py0)
    patch = bg + cov[:, :, None] * (fg - bg)
    image[py0:py1, px0:px1] = np.rint(patch).astype(np.uint8)
    return image, box


def render(size: int, attrs: Mapping[str, str], rng: np.random.Generator | None = None) -> Image.Image:
    """Draw one image; `rng` supplies the size and position jitter (None: no jitter)."""
    size = _check_size(size)
    attrs = validate_attrs(attrs, complete=True)
    jitter = None if rng is None else rng.random(3)
    return Image.fromarray(_render_array(size, attrs, jitter)[0], "RGB")


# ---------------------------------------------------------------- captions


def article(word: str) -> str:
    """"an" before a vowel ("an orange circle"), else "a": the captions' grammar, also for prompts."""
    return "an" if word[0] in "aeiou" else "a"


def position_phrase(position: str, u: float = 0.0) -> str:
    """'in the top left', 'at the bottom', 'on the left', ... (one of a few variants; u=0 the canonical one)."""
    if position == "center":
        variants = ("in the center", "at the center")
    elif " " in position:
        variants = (f"in the {position}", f"in the {position} corner", f"at the {position}")
    elif position in ("top", "bottom"):
        variants = (f"at the {position}", f"near the {position}")
    else:
        variants = (f"on the {position}", f"at the {position}")
    return variants[int(u * len(variants))]




def _background_phrase(background: str, u: float) -> str:
    """'on a blue background', 'against a blue background', ..."""
    lead = ("on", "against", "with")[int(u * 3)]
    return f"{lead} {article(background)} {background} background"


def _join(*parts: str | None) -> str:
    return " ".join(p for p in parts if p)


def _caption(attrs: Mapping[str, str], named: Sequence[str], u: np.ndarray) -> str:
    """Caption naming exactly the attributes in `named`; `u` holds 3 uniforms for the wording."""
    words = [attrs[a] for a in ("size", "color") if a in named]
    bare = " ".join(words + [attrs["shape"] if "shape" in named else "shape"])
    noun = f"{article(bare)} {bare}"
    pos_bare = attrs["position"] if "position" in named else None
    pos = position_phrase(attrs["position"], u[1]) if pos_bare else None
    bg_bare = f"{attrs['background']} background" if "background" in named else None
    bg = _background_phrase(attrs["background"], u[2]) if bg_bare else None
    templates = (
        lambda: _join(noun, pos, bg),
        lambda: _join(bg_bare and bg_bare + ",", bare, pos),
        lambda: _join(noun, bg, pos),
        lambda: _join("a picture of", noun, pos, bg),
        lambda: _join("there is", noun, pos, bg),
        lambda: _join(bg_bare and f"{article(bg_bare)} {bg_bare} with", noun, pos),
        lambda: ", ".join(p for p in (bare, pos_bare, bg_bare) if p),
        lambda: _join(pos and pos + ",", noun, bg),
        lambda: _join("an image of", noun, bg, pos),
    )
    return templates[int(u[0] * len(templates))]()


def request_prompt(request: Mapping[str, str]) -> str:
    """The text prompt naming exactly a request's attributes in the captions' first wording: "a red circle in the
    top left", "a red shape", "a small triangle on a blue background" (an empty request: "a shape")."""
    named = tuple(a for a in ATTRIBUTES if a in request)
    attrs = {a: request.get(a, ATTRIBUTE_VALUES[a][0]) for a in ATTRIBUTES}  # unnamed ones are not said
    return _caption(attrs, named, np.zeros(3))


def grid_requests(rows: int) -> list[dict[str, str]]:
    """One request per row of a training run's sample grids, the same in every run so a run's grids compare over
    time."""
    return [{"color": COLORS[i % len(COLORS)], "shape": SHAPES[i % len(SHAPES)],
             "position": POSITIONS[(4 * i) % len(POSITIONS)]} for i in range(rows)]


def grid_prompts(rows: int) -> list[str]:
    """The grid requests as captions (embedding runs ask for their grids with these)."""
    return [request_prompt(r) for r in grid_requests(rows)]


def parse_caption(caption: str) -> dict[str, str]:
    """The attributes a caption names (the inverse of the caption templates, also for prompts)."""
    text = " " + caption.lower().replace(",", " ").replace(".", " ") + " "
    out: dict[str, str] = {}
    found = re.search(r"\b(" + "|".join(COLORS) + r")\s+background\b", text)
    if found:
        out["background"] = found.group(1)
        text = text[:found.start()] + " " + text[found.end():]
    for position in sorted(POSITIONS, key=len, reverse=True):
        found = re.search(rf"\b{position}\b", text)
        if found:
            out["position"] = position
            text = text[:found.start()] + " " + text[found.end():]
            break
    for attr in ("color", "shape", "size"):
        found = re.search(r"\b(" + "|".join(ATTRIBUTE_VALUES[attr]) + r")\b", text)
        if found:
            out[attr] = found.group(1)
    return {a: out[a] for a in ATTRIBUTES if a in out}


# ---------------------------------------------------------------- samples


def _pick(values: Sequence[str], u: float) -> str:
    return values[min(int(u * len(values)), len(values) - 1)]


def _draw_attrs(u: np.ndarray, holdout: Holdout = frozenset()) -> dict[str, str]:
    """Uniform attributes from 5 uniforms; the background is uniform over the other 7 colours, the shape over
    those the colour is not held out with (all three without a holdout)."""
    color = _pick(COLORS, u[0])
    shapes = [s for s in SHAPES if (color, s) not in holdout] if holdout else SHAPES
    return {
        "color": color,
        "shape": _pick(shapes, u[1]),
        "size": _pick(SIZES, u[2]),
        "position": _pick(POSITIONS, u[3]),
        "background": _pick([c for c in COLORS if c != color], u[4]),
    }


def _draw_named(probs: Mapping[str, float], u: np.ndarray) -> tuple[str, ...]:
    """Which attributes the caption names (6 uniforms); at least one, so a caption says something."""
    named = tuple(a for a, x in zip(ATTRIBUTES, u[:5]) if x < probs[a])
    if named:
        return named
    weights = np.array([probs[a] for a in ATTRIBUTES], dtype=np.float64)
    if weights.sum() <= 0:
        weights = np.ones(len(ATTRIBUTES))
    cumulative = np.cumsum(weights / weights.sum())
    return (ATTRIBUTES[min(int(np.searchsorted(cumulative, u[5], side="right")), len(ATTRIBUTES) - 1)],)


def _sample(index: int, seed: int, size: int, probs: Mapping[str, float], holdout: Holdout = frozenset()) -> tuple:
    """(uint8 image, caption, attrs, named, box), deterministic from (seed, index)."""
    if index < 0 or seed < 0:
        raise UserError(f"shapes samples need index >= 0 and seed >= 0, got index={index}, seed={seed}")
    u = np.random.default_rng([seed, index]).random(17)
    attrs = _draw_attrs(u[0:5], holdout)
    image, box = _render_array(size, attrs, u[5:8])
    named = _draw_named(probs, u[8:14])
    return image, _caption(attrs, named, u[14:17]), attrs, named, box


def make_sample(index: int, seed: int = 0, size: int = 64, name_probs: Mapping[str, float] | None = None,
                holdout: Holdout = frozenset()) -> ShapeSample:
    """Sample `index` of the stream `seed`: the same pair always gives the same sample."""
    image, caption, attrs, named, box = _sample(int(index), int(seed), _check_size(size), _check_name_probs(name_probs),
                                                check_holdout(holdout))
    return ShapeSample(Image.fromarray(image, "RGB"), caption, attrs, named, box)


# ---------------------------------------------------------------- labels


def attrs_to_label(named_attrs: Mapping[str, str]) -> np.ndarray:
    """One-hot blocks in ATTRIBUTES order; an attribute left out sets its block's last slot."""
    attrs = validate_attrs(named_attrs, complete=False)
    label = np.zeros(LABEL_DIM, np.float32)
    for attr in ATTRIBUTES:
        values = ATTRIBUTE_VALUES[attr]
        slot = values.index(attrs[attr]) if attr in attrs else len(values)
        label[LABEL_OFFSETS[attr] + slot] = 1.0
    return label


def label_to_attrs(label: np.ndarray | torch.Tensor) -> dict[str, str]:
    """Inverse of attrs_to_label: the arg-max of each block, omitting 'not named'."""
    arr = label.detach().cpu().numpy() if isinstance(label, torch.Tensor) else np.asarray(label)
    if arr.shape != (LABEL_DIM,):
        raise UserError(f"a shapes label has shape ({LABEL_DIM},), got {arr.shape}")
    out = {}
    for attr in ATTRIBUTES:
        block = arr[LABEL_OFFSETS[attr]:LABEL_OFFSETS[attr] + LABEL_BLOCKS[attr]]
        slot = int(np.argmax(block))
        if slot < len(ATTRIBUTE_VALUES[attr]):
            out[attr] = ATTRIBUTE_VALUES[attr][slot]
    return out


def parse_attrs(text: str) -> dict[str, str]:
    """'color=red,shape=circle,position=top left' -> dict; '' -> {} (nothing requested)."""
    out: dict[str, str] = {}
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not value.strip():
            raise UserError(f"bad attribute {item!r}; write key=value pairs separated by commas, "
                            f"e.g. color=red,shape=circle,position=top left (keys: {', '.join(ATTRIBUTES)})")
        key = _check_key(key.strip().lower())
        if key in out:
            raise UserError(f"attribute {key!r} is given twice in {text!r}")
        out[key] = _check_value(key, " ".join(value.lower().split()))
    return {a: out[a] for a in ATTRIBUTES if a in out}


# ---------------------------------------------------------------- dataset


class ShapesDataset(torch.utils.data.Dataset):
    """Indexable shapes stream; `length=None` is endless (any index >= 0 is valid).

    An endless dataset reports len 2**62: pair it with a sequential sampler, not
    RandomSampler (which would try to permute 2**62 indices); the samples are random anyway.
    """

    INFINITE = 2 ** 62

    def __init__(self, size: int = 64, length: int | None = None, seed: int = 0,
                 name_probs: Mapping[str, float] | None = None, holdout: Iterable[tuple[str, str]] = ()) -> None:
        if length is not None and (int(length) != length or length < 1):
            raise UserError(f"ShapesDataset length must be a positive integer or None (endless), got {length!r}")
        if int(seed) != seed or seed < 0:
            raise UserError(f"ShapesDataset seed must be an integer >= 0, got {seed!r}")
        self.size = _check_size(size)
        self.length = None if length is None else int(length)
        self.seed = int(seed)
        self.name_probs = _check_name_probs(name_probs)
        self.holdout = check_holdout(holdout)  # (colour, shape) pairs no example shows

    def __len__(self) -> int:
        return self.INFINITE if self.length is None else self.length

    def _index(self, i: int) -> int:
        i = int(i)
        if self.length is not None and not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for a ShapesDataset of length {self.length}")
        if i < 0:
            raise IndexError(f"index {i} is negative; an endless ShapesDataset takes indices >= 0")
        return i

    def __getitem__(self, i: int) -> dict:
        i = self._index(i)
        image, caption, attrs, named, _ = _sample(i, self.seed, self.size, self.name_probs, self.holdout)
        label = attrs_to_label({a: attrs[a] for a in named})
        return {"image": array_to_tensor(image), "label": torch.from_numpy(label), "caption": caption, "index": i}

    def get_batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Fast path: (images (B,3,S,S) in [-1,1], labels (B,LABEL_DIM), captions)."""
        images, labels, captions = [], [], []
        for i in indices:
            image, caption, attrs, named, _ = _sample(self._index(i), self.seed, self.size, self.name_probs, self.holdout)
            images.append(image)
            labels.append(attrs_to_label({a: attrs[a] for a in named}))
            captions.append(caption)
        if not images:
            raise UserError("get_batch needs at least one index")
        return array_to_tensor(np.stack(images)), torch.from_numpy(np.stack(labels)), captions

    def sample(self, i: int) -> ShapeSample:
        """The full sample (true attributes and named ones) behind item `i`."""
        return make_sample(self._index(i), self.seed, self.size, self.name_probs, self.holdout)

    def iter_source(self) -> Iterator[tuple[Image.Image, str]]:
        """The data-source interface: (PIL image, caption) pairs, endless when length is None."""
        i = 0
        while self.length is None or i < self.length:
            image, caption, *_ = _sample(i, self.seed, self.size, self.name_probs, self.holdout)
            yield Image.fromarray(image, "RGB"), caption
            i += 1
