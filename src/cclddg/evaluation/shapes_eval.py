"""Read the attributes back out of a `shapes` image, to score what a generator drew.

The rules mirror the data contract (docs/DESIGN.md, "The shapes contract"): a flat palette background, one filled
palette shape, sizes 0.25/0.45 of the side, centres on a 3x3 grid. Generated images are
never perfect, so colours get a tolerance and specks of a few pixels are ignored.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image

from cclddg.data.images import tensor_to_array
from cclddg.data.shapes import (
    ATTRIBUTES,
    COLORS,
    GRID,
    PALETTE,
    POSITIONS,
    shape_coverage,
    validate_attrs,
)
from cclddg.errors import UserError

COLOR_TOL = 70.0  # max RGB distance from a palette colour
FOREGROUND_TOL = 32.0  # RGB distance from the background that marks a shape pixel
FLAT_TOL = 40.0  # border pixels this close to the background count as flat
MIN_FLAT_BORDER = 0.6  # the shape may touch the border, but not cover most of it
NOISE_TOL = 48.0  # distance from the background-shape colour blend that counts as noise
MAX_NOISE = 0.02  # fraction of noisy pixels tolerated
MAX_STRAY = 0.01  # fraction of shape-coloured pixels away from the shape tolerated
FIT_ERROR_BASE, FIT_ERROR_PER_PX = 0.12, 0.5  # allowed |coverage - template| / area: base + k / side
MAX_FIT_RATIO = 0.9  # best template error / runner-up's above this: too ambiguous to call
BLUR_SIGMAS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)  # px; templates are matched at their best blur
SIZE_THRESHOLD = 0.35  # between small (0.25) and large (0.45)
MIN_SIDE = 8

_PALETTE = np.array([PALETTE[c] for c in COLORS], dtype=np.float32)


@dataclass
class Analysis:
    """What the analyzer saw; attributes are None when they could not be read."""

    color: str | None = None
    shape: str | None = None
    size: str | None = None
    position: str | None = None
    background: str | None = None
    valid: bool = False
    reason: str = ""

    def attrs(self) -> dict[str, str | None]:
        return {a: getattr(self, a) for a in ATTRIBUTES}


# ---------------------------------------------------------------- input


def _to_array(image) -> np.ndarray:
    """PIL image, uint8 (H, W, 3) array or (3, H, W) tensor in [-1, 1] -> float32 (H, W, 3)."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise UserError(f"analyze needs a (3, H, W) tensor in [-1, 1], got shape {tuple(image.shape)}")
        return tensor_to_array(image).astype(np.float32)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise UserError(f"analyze needs a uint8 (H, W, 3) array, got {image.dtype} {image.shape}")
        return image.astype(np.float32)
    raise UserError(f"analyze takes a PIL image, a uint8 (H, W, 3) array or a (3, H, W) tensor, "
                    f"not {type(image).__name__}")


def _nearest_color(rgb: np.ndarray) -> tuple[str, float]:
    dist = np.linalg.norm(_PALETTE - rgb, axis=1)
    k = int(np.argmin(dist))
    return COLORS[k], float(dist[k])


# ---------------------------------------------------------------- components


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Horizontal runs of True: rows, starts, ends (exclusive), in row-major order."""
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), np.int8)
    padded[:, 1:-1] = mask
    step = np.diff(padded, axis=1)
    rows, starts = np.nonzero(step == 1)
    _, ends = np.nonzero(step == -1)
    return rows, starts, ends


def _find(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of `mask`, largest first, each as a boolean mask.

    Union-find over horizontal runs: a few runs per row, so it stays cheap without scipy.
    """
    rows, starts, ends = _runs(mask)
    n = len(rows)
    if n == 0:
        return []
    parent = list(range(n))
    bounds = np.searchsorted(rows, np.arange(mask.shape[0] + 1)).tolist()
    s, e = starts.tolist(), ends.tolist()
    for r in range(1, mask.shape[0]):
        i, i_end, j, j_end = bounds[r - 1], bounds[r], bounds[r], bounds[r + 1]
        while i < i_end and j < j_end:
            if s[i] <= e[j] and s[j] <= e[i]:
                a, b = _find(parent, i), _find(parent, j)
                if a != b:
                    parent[max(a, b)] = min(a, b)
            if e[i] < e[j]:
                i += 1
            else:
                j += 1
    roots = np.array([_find(parent, k) for k in range(n)])
    areas = np.bincount(roots, weights=ends - starts, minlength=n)
    out = []
    for root in np.argsort(-areas, kind="stable"):
        if areas[root] == 0:
            break
        pick = roots == root
        edges = np.zeros((mask.shape[0], mask.shape[1] + 1), np.int32)
        np.add.at(edges, (rows[pick], starts[pick]), 1)
        np.add.at(edges, (rows[pick], ends[pick]), -1)
        out.append(np.cumsum(edges, axis=1)[:, :-1] > 0)
    return out


def _min_area(h: int, w: int) -> float:
    """Smaller blobs are specks to ignore (well under a small triangle's ~0.03 S^2)."""
    return max(4.0, 0.004 * h * w)


# ---------------------------------------------------------------- features


def _interior_color(image: np.ndarray, comp: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """Median colour of the shape's most saturated pixels, away from its anti-aliased edge."""
    strong = comp & (dist >= 0.8 * np.quantile(dist[comp], 0.95))
    return np.median(image[strong], axis=0)


def _soft_coverage(alpha: np.ndarray) -> np.ndarray:
    """Stretch coverage about 0.5 so faint noise reads as 0 while edge integrals are kept."""
    return np.clip((alpha - 0.15) / 0.7, 0.0, 1.0)


# shape -> area of the shape / area of its square bounding box
_FILL = {"square": 1.0, "circle": float(np.pi / 4), "triangle": 0.5}


@dataclass
class _Fit:
    """The best-fitting template: its box (side, centre), relative error, and error vs the runner-up."""

    shape: str
    side: float
    cx: float
    cy: float
    error: float
    ratio: float


def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """(n, n) Gaussian blur along one axis that keeps each source pixel's mass."""
    if sigma <= 0:
        return np.eye(n, dtype=np.float32)
    i = np.arange(n, dtype=np.float32)
    g = np.exp(-((i[:, None] - i[None, :]) ** 2) / (2.0 * sigma * sigma))
    return g / g.sum(axis=0, keepdims=True)


def _template_error(shape: str, box: tuple, x0: int, y0: int, a: np.ndarray) -> float:
    """Smallest |template - observed| over a few blur widths, relative to the shape's area."""
    cov = shape_coverage(shape, box, x0, y0, a.shape[1], a.shape[0])
    errors = []
    for sigma in BLUR_SIGMAS:
        blurred = _blur_matrix(a.shape[0], sigma) @ cov @ _blur_matrix(a.shape[1], sigma).T
        errors.append(float(np.abs(_soft_coverage(blurred) - a).sum()))
    return min(errors) / float(a.sum())


def _fit_shape(alpha: np.ndarray, comp: np.ndarray) -> _Fit | None:
    """Fit each template to the shape's coverage by its area and centroid; keep the closest.

    Area and centroid survive blur and noise, and the templates are the renderer's own
    coverages (blurred a little, as generators blur), so this stays right down to 16 px
    images, where pixel heuristics such as fill ratios fail.
    """
    ys, xs = np.nonzero(comp)
    margin = 2 + int(np.ceil(2 * max(BLUR_SIGMAS)))
    y0, y1 = max(ys.min() - margin, 0), min(ys.max() + margin + 1, comp.shape[0])
    x0, x1 = max(xs.min() - margin, 0), min(xs.max() + margin + 1, comp.shape[1])
    a = _soft_coverage(alpha[y0:y1, x0:x1])
    area = float(a.sum())
    if area <= 0:
        return None
    mx = x0 + float((a.sum(axis=0) * (np.arange(x1 - x0) + 0.5)).sum()) / area
    my = y0 + float((a.sum(axis=1) * (np.arange(y1 - y0) + 0.5)).sum()) / area
    far = ~_dilate(comp, margin - 1)[y0:y1, x0:x1]  # background-only pixels: their coverage is noise
    noise = float(a[far].mean()) * a.size / area if far.any() else 0.0
    fits = []
    for shape, fill in _FILL.items():
        side = float(np.sqrt(area / fill))
        cy = my - side / 6.0 if shape == "triangle" else my  # a triangle's centroid is 2/3 down
        box = (mx - side / 2, cy - side / 2, mx + side / 2, cy + side / 2)
        fits.append((max(_template_error(shape, box, x0, y0, a) - noise, 0.0), shape, side, cy))
    fits.sort()
    (error, shape, side, cy), runner_up = fits[0], fits[1][0]
    return _Fit(shape, side, mx, cy, error, error / max(runner_up, 1e-9))


def _snap(coord: float, side: int) -> int:
    return int(np.argmin([abs(coord - g * side) for g in GRID]))


# ---------------------------------------------------------------- analyze


def _background(image: np.ndarray) -> tuple[np.ndarray, str | None, str]:
    """Measured background colour, its palette name (None if invalid) and why not."""
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    ref = np.median(border, axis=0)
    name, dist = _nearest_color(ref)
    if dist > COLOR_TOL:
        return ref, None, f"background {tuple(int(v) for v in ref)} is not a palette colour"
    flat = float((np.linalg.norm(border - ref, axis=1) <= FLAT_TOL).mean())
    if flat < MIN_FLAT_BORDER:
        return ref, None, f"background is not flat ({flat:.0%} of the border matches)"
    return ref, name, ""


def analyze(image) -> Analysis:
    """Judge one image: its five attributes, and whether it is one clean palette shape."""
    img = _to_array(image)
    h, w = img.shape[:2]
    if min(h, w) < MIN_SIDE:
        return Analysis(reason=f"image {w}x{h} is too small to analyse")
    bg_ref, bg_name, why = _background(img)
    out = Analysis(background=bg_name)
    if bg_name is None:
        out.reason = why
        return out
    dist = np.linalg.norm(img - bg_ref, axis=2)
    smooth = np.linalg.norm(_box3(img) - bg_ref, axis=2)  # pixel noise must not split or add shapes
    comps = [c for c in _components(smooth > FOREGROUND_TOL) if c.sum() >= _min_area(h, w)]
    if not comps:
        out.reason = "no shape"
        return out
    fg_ref = _interior_color(img, comps[0], dist)
    fg_name, fg_dist = _nearest_color(fg_ref)
    if fg_dist <= COLOR_TOL and fg_name != bg_name:
        out.color = fg_name
    diff = fg_ref - bg_ref
    alpha = np.clip(((img - bg_ref) @ diff) / max(float(diff @ diff), 1e-6), 0.0, 1.0)
    fit = _fit_shape(alpha, comps[0])
    if fit is None:
        out.reason = "no shape"
        return out
    if fit.error <= FIT_ERROR_BASE + FIT_ERROR_PER_PX / fit.side and fit.ratio <= MAX_FIT_RATIO:
        out.shape = fit.shape
    out.size = "large" if fit.side >= SIZE_THRESHOLD * min(h, w) else "small"
    out.position = POSITIONS[3 * _snap(fit.cy, h) + _snap(fit.cx, w)]
    out.reason = _invalid_reason(img, comps, alpha, bg_ref, diff, fg_ref, out)
    out.valid = not out.reason
    return out


def _invalid_reason(img: np.ndarray, comps: list[np.ndarray], alpha: np.ndarray, bg_ref: np.ndarray,
                    diff: np.ndarray, fg_ref: np.ndarray, out: Analysis) -> str:
    """Why the image is not one clean palette shape on a flat background ('' when it is)."""
    if len(comps) > 1:
        return f"{len(comps)} separate shapes"
    if out.color is None:
        return f"shape colour {tuple(int(v) for v in fg_ref)} is not a palette colour other than the background"
    residual = np.linalg.norm(img - (bg_ref + alpha[..., None] * diff), axis=2)
    noise = float((residual > NOISE_TOL).mean())
    if noise > MAX_NOISE:
        return f"noisy: {noise:.1%} of pixels are neither background nor shape colour"
    near = _dilate(comps[0], 2)
    stray = float(((alpha > 0.5) & ~near).mean())
    if stray > MAX_STRAY:
        return f"stray marks: {stray:.1%} of pixels are shape-coloured away from the shape"
    if out.shape is None:
        return "the shape is not clearly a circle, a square or a triangle"
    return ""


def _box3(img: np.ndarray) -> np.ndarray:
    """3x3 mean filter over the first two axes (edges repeated): divides per-pixel noise by 3."""
    p = np.pad(img, ((1, 1), (1, 1)) + ((0, 0),) * (img.ndim - 2), mode="edge")
    h, w = img.shape[:2]
    return sum(p[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)) / 9.0


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(steps):
        grown = out.copy()
        grown[1:, :] |= out[:-1, :]
        grown[:-1, :] |= out[1:, :]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


# ---------------------------------------------------------------- score


def _as_list(images) -> list:
    """A (B, 3, H, W) tensor, a uint8 (B, H, W, 3) array or a sequence of single images."""
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        return list(images)
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    if isinstance(images, (list, tuple)):
        return list(images)
    raise UserError("score takes a (B, 3, H, W) tensor, a uint8 (B, H, W, 3) array or a list of images, "
                    f"not {type(images).__name__}")


def score(images, requested: Sequence[Mapping[str, str]], return_analyses: bool = False) -> dict:
    """Per-attribute accuracy over the samples whose request names it, plus validity.

    An attribute read from an invalid image counts as wrong. `<attr>_acc` is None when no
    request names that attribute; `<attr>_n` is how many do.
    """
    items = _as_list(images)
    if len(items) != len(requested):
        raise UserError(f"score got {len(items)} images but {len(requested)} requests; they must pair up")
    return summarize([analyze(x) for x in items], requested, return_analyses)


def summarize(analyses: Sequence[Analysis], requested: Sequence[Mapping[str, str]],
              return_analyses: bool = False) -> dict:
    """`score` from analyses already made (a caller that analyses batch by batch keeps no images)."""
    if len(analyses) != len(requested):
        raise UserError(f"{len(analyses)} analyses but {len(requested)} requests; they must pair up")
    wanted = [validate_attrs(r, complete=False) for r in requested]
    result: dict = {"n": len(analyses), "validity": float(np.mean([a.valid for a in analyses])) if analyses else 0.0}
    accs = []
    for attr in ATTRIBUTES:
        hits = [a.valid and getattr(a, attr) == r[attr] for a, r in zip(analyses, wanted) if attr in r]
        result[f"{attr}_n"] = len(hits)
        result[f"{attr}_acc"] = float(np.mean(hits)) if hits else None
        if hits:
            accs.append(result[f"{attr}_acc"])
    result["mean_acc"] = float(np.mean(accs)) if accs else None
    if return_analyses:
        result["analyses"] = [asdict(a) for a in analyses]
    return result
