"""Conditioning: the vector `c` the nets see, in training and at sampling, in one place.

- The null condition is zeros (docs/DESIGN.md, "Conditions"); dropping `c` to it with probability pct_zeros in training is
  what classifier-free guidance needs.
- Embedding runs condition each example on its image's embedding, or with probability pct_text on its
  caption's text embedding.
- Pseudo-text (LAFITE, Zhou et al. 2022): an image embedding perturbed by scaled Gaussian noise and
  renormalised, `c' = normalize(c + xi·|c|·e/|e|)`, so a generator trained on images alone also learns the
  neighbourhood where text embeddings fall.
- Text prompts reach a generator trained on image embeddings through a text prior (`priors/`: the modality-gap
  shift, retrieval from the data's image embeddings, or the learned prior). Image prompts are never moved.
- Label runs (shapes) are conditioned on the label vector of a request.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cclddg.data.shapes import (
    COLORS,
    LABEL_DIM,
    POSITIONS,
    SHAPES,
    attrs_to_label,
    parse_attrs,
    request_prompt,
)
from cclddg.errors import UserError
from cclddg.priors import TextPrior

PRIOR_CHUNK = 1024  # text embeddings a text prior maps at once


# ---- the kinds of conditioning (cfg.cond): labels, embedding, none -----------------------------------------
def width(cond: str, embed_dim: int = 0) -> int:
    """Width of the conditioning vector: the shapes label vector's, the embedder's dim, or 0 (unconditional)."""
    return {"labels": LABEL_DIM, "embedding": embed_dim, "none": 0}[cond]


def scale(cond: str, embed_dim: int) -> float:
    """Unit embeddings have per-dimension values ~1/sqrt(dim); scaling by sqrt(dim) gives the nets inputs of
    unit variance, like the label vectors' ones (measured: much faster conditioning)."""
    return math.sqrt(embed_dim) if cond == "embedding" and embed_dim else 1.0


# ---- labels (shapes) -----------------------------------------------------------------------------------------
def label_condition(requests: Sequence[dict[str, str]]) -> Tensor:
    """The label vectors of shapes requests ({"color": "red", ...}; unnamed attributes stay unnamed)."""
    return torch.from_numpy(np.stack([attrs_to_label(r) for r in requests]))


def request_condition(cond: str, attrs: str | None, n: int, guided: bool = False) -> RepeatedRows | None:
    """`cclddg sample --attrs "color=red,..."`: the label condition repeated n times; None for no request (or an
    unconditional run). A request a run of this kind cannot take (`guided`: with --cfg) is one line."""
    if cond == "embedding":
        raise UserError("this model is conditioned on embeddings: give --prompt \"...\" and/or --image PATH")
    if cond == "none" and attrs:
        raise UserError("this model is unconditional (trained with --cond none); drop --attrs")
    if cond == "none" and guided:
        raise UserError("this model is unconditional (trained with --cond none): --cfg has nothing to guide; drop it")
    if guided and not attrs:
        raise UserError("--cfg guides towards a request: give --attrs (e.g. color=red), or drop --cfg")
    return None if attrs is None else RepeatedRows(request_conditions(cond, [parse_attrs(attrs)]), n)


def request_conditions(cond: str, requests: Sequence[dict[str, str]]) -> Tensor | None:
    """The conditions of shapes requests for a label run (their label vectors) or an unconditional one (None)."""
    if cond == "embedding":
        raise ValueError("an embedding run is asked with prompts (PromptConditioner), not label requests")
    return label_condition(requests) if cond == "labels" else None


def grid_requests(rows: int) -> list[dict[str, str]]:
    """One request per grid row, the same in every run so a run's grids compare over time."""
    return [{"color": COLORS[i % len(COLORS)], "shape": SHAPES[i % len(SHAPES)],
             "position": POSITIONS[(4 * i) % len(POSITIONS)]} for i in range(rows)]


def grid_prompts(rows: int) -> list[str]:
    """The grid requests as captions (embedding runs ask for their grids with these)."""
    return [request_prompt(r) for r in grid_requests(rows)]


def grid_condition(cond: str, rows: int) -> Tensor | None:
    """A label run's fixed grid conditions (embedding runs embed `grid_prompts`; unconditional runs: None)."""
    return request_conditions(cond, grid_requests(rows))


# ---- the null condition ----------------------------------------------------------------------------------
def null_like(cond: Tensor) -> Tensor:
    """The null condition (zeros, docs/DESIGN.md): what dropout trains on and what guidance pushes away from."""
    return torch.zeros_like(cond)


# ---- training ---------------------------------------------------------------------------------------------
def drop(cond: Tensor, p: float) -> Tensor:
    """Replace each row by the null condition (zeros) with probability p (classifier-free guidance)."""
    if p <= 0:
        return cond
    keep = torch.rand(cond.shape[0], 1, device=cond.device) >= p
    return torch.where(keep, cond, null_like(cond))


def pseudo_text(image_emb: Tensor, xi: float, generator: torch.Generator | None = None) -> Tensor:
    """LAFITE's fixed perturbation: normalize(c + xi·|c|·e/|e|), e ~ N(0, I); xi = 0 returns c unchanged."""
    if xi <= 0:
        return image_emb
    if generator is None:
        noise = torch.randn_like(image_emb)
    else:
        noise = torch.randn(image_emb.shape, generator=generator, device=generator.device).to(image_emb)
    noise = noise / noise.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return F.normalize(image_emb + xi * image_emb.norm(dim=-1, keepdim=True) * noise, dim=-1)


def training_condition(image_emb: Tensor, text_emb: Tensor, pct_text: float, xi: float,
                       random: bool = True) -> Tensor:
    """Each example's embedding condition: its caption's text embedding with probability pct_text, else its
    image embedding, perturbed into pseudo-text when xi > 0. `random=False` (fixed grids) takes the image
    embeddings as they are and draws nothing from the RNG."""
    if not random:
        return image_emb
    b = image_emb.shape[0]
    use_text = torch.rand(b, 1) < pct_text
    return torch.where(use_text.to(image_emb.device), text_emb, pseudo_text(image_emb, xi))


# ---- prompts -> conditions ----------------------------------------------------------------------------
class PromptConditioner:
    """Text and image prompts -> the conditions of an embedding-conditioned generator.

    Text goes through the run's text prior (`priors.TextPrior`); images are embedded as they are; both given,
    their embeddings are mixed (image_weight) after the prior.
    """

    def __init__(self, embedder, prior: TextPrior | None = None):
        self.embedder, self.prior = embedder, prior or TextPrior()

    def texts(self, prompts: Sequence[str], generator: torch.Generator | None = None, pick: str = "sample") -> Tensor:
        """(len(prompts), dim): each distinct prompt is embedded once, however often it repeats (n samples of
        one prompt), and the prior maps the rows in chunks, so memory does not grow with the repeats. `pick`:
        "sample" draws one condition per row (seeded by `generator`), "mean" takes the prior's representative."""
        rows = self.embed_prompts(prompts)
        if pick == "mean":
            return torch.cat([self.prior.mean(chunk) for chunk in rows.split(PRIOR_CHUNK)])
        return torch.cat([self.prior(chunk, generator) for chunk in rows.split(PRIOR_CHUNK)])

    def embed_prompts(self, prompts: Sequence[str]) -> Tensor:
        """(len(prompts), dim) text embeddings, each prompt checked, and each distinct one embedded once."""
        checked = [self.embedder.check_prompt(p) for p in prompts]
        unique = {p: i for i, p in enumerate(dict.fromkeys(checked))}
        return self.embedder.embed_texts(list(unique))[torch.tensor([unique[p] for p in checked], dtype=torch.long)]

    def images(self, images: Sequence[Tensor] | Tensor) -> Tensor:
        if isinstance(images, Tensor) and images.ndim == 4:
            return self.embedder.embed_images(images)
        return torch.cat([self.embedder.embed_images(_square(i)[None]) for i in images])

    def __call__(self, prompts: Sequence[str] | None = None, images: Sequence[Tensor] | None = None,
                 image_weight: float = 0.5, n: int = 1, seed: int = 0) -> Tensor:
        """(rows·n, dim): each row's condition n times (prompt-major), every one its own draw of the text prior
        (seeded), so n samples of one prompt differ as the images a prompt fits do. `lazy` makes the same rows
        slice by slice."""
        conditions = self.lazy(prompts, images, image_weight, n, seed)
        return conditions[:]

    def lazy(self, prompts: Sequence[str] | None = None, images: Sequence[Tensor] | None = None,
             image_weight: float = 0.5, n: int = 1, seed: int = 0) -> PromptConditions:
        """The rows of `__call__` as a sequence made when a slice asks for them: memory independent of n."""
        prompts = list(prompts) if prompts is not None else []
        images = list(images) if images is not None else []
        if not prompts and not images:
            raise UserError("give at least one prompt or image")
        if not 0.0 <= image_weight <= 1.0:
            raise UserError(f"the image weight must be in [0, 1], got {image_weight}")
        if prompts and images and len(prompts) != len(images) and 1 not in (len(prompts), len(images)):
            raise UserError(f"{len(prompts)} prompts and {len(images)} images: give as many of each, or one of either")
        if not (isinstance(n, int) and n >= 1):
            raise UserError(f"n must be an integer >= 1, got {n!r}")
        text = self.embed_prompts(prompts) if prompts else None
        image = self.images(images) if images else None
        return PromptConditions(self.prior, text, image, image_weight, n, seed)

    def negative(self, prompt: str | None) -> Tensor | None:
        """The embedding guidance pushes away from instead of the null one (None: the null embedding)."""
        if prompt is None:
            return None
        return self.texts([prompt], pick="mean")


class PromptConditions:
    """n conditions for each prompt/image row (prompt-major), as a sequence of rows made when a slice asks for them
    (`len`, `[start:stop]`): memory is one chunk of PRIOR_CHUNK rows and an embedding per row, whatever n is.
    Chunk k of the rows draws the text prior from its own generator (seed + k·CHUNK_SEED), so a row's condition
    is the same however the rows are batched."""

    CHUNK_SEED = 1_000_003

    def __init__(self, prior: TextPrior, text: Tensor | None, image: Tensor | None, image_weight: float, n: int,
                 seed: int):
        self.prior, self.text, self.image, self.image_weight = prior, text, image, image_weight
        self.n, self.seed = n, seed
        self.rows = max(len(t) for t in (text, image) if t is not None)
        self._chunk_cache: tuple[int, Tensor] | None = None

    def __len__(self) -> int:
        return self.rows * self.n

    def __getitem__(self, index: slice) -> Tensor:
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("PromptConditions are read in slices [start:stop]")
        start, stop, _ = index.indices(len(self))
        stop = max(start, stop)
        first, last = start // PRIOR_CHUNK, -(-stop // PRIOR_CHUNK)
        parts = [self._chunk(k)[max(start - k * PRIOR_CHUNK, 0):stop - k * PRIOR_CHUNK] for k in range(first, last)]
        return torch.cat(parts) if parts else self._chunk(0)[:0]

    def _chunk(self, k: int) -> Tensor:
        if self._chunk_cache is not None and self._chunk_cache[0] == k:
            return self._chunk_cache[1]
        lo, hi = k * PRIOR_CHUNK, min(len(self), (k + 1) * PRIOR_CHUNK)
        row = torch.arange(lo, hi) // self.n  # the prompt/image row of each condition
        cond = None
        if self.text is not None:
            text = self.text[row if len(self.text) > 1 else torch.zeros_like(row)]
            cond = self.prior(text, torch.Generator().manual_seed(self.seed + k * self.CHUNK_SEED))
        if self.image is not None:
            image = self.image[row if len(self.image) > 1 else torch.zeros_like(row)]
            cond = image if cond is None else \
                F.normalize((1 - self.image_weight) * cond + self.image_weight * image, dim=-1)
        self._chunk_cache = (k, cond)
        return cond


class RepeatedRows:
    """Each row of `rows` n times (row-major), sliced without making the n copies: a label request for --n 10**9."""

    def __init__(self, rows: Tensor, n: int):
        self.rows, self.n = rows, n

    def __len__(self) -> int:
        return len(self.rows) * self.n

    def __getitem__(self, index: slice) -> Tensor:
        start, stop, _ = index.indices(len(self))
        return self.rows[torch.arange(start, max(start, stop)) // self.n]


def _square(image: Tensor) -> Tensor:
    """Centre crop to a square (embedders see square images)."""
    h, w = image.shape[-2:]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return image[..., top:top + s, left:left + s]



