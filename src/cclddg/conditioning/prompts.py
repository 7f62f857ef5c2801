"""Text and image prompts -> the conditions of an embedding-conditioned generator (the `embedding` kind's
requests): text through the run's text prior (`priors/`), images embedded as they are, both mixed.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from cclddg.errors import UserError
from cclddg.priors import TextPrior

PRIOR_CHUNK = 1024  # text embeddings a text prior maps at once


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


def _square(image: Tensor) -> Tensor:
    """Centre crop to a square (embedders see square images)."""
    h, w = image.shape[-2:]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return image[..., top:top + s, left:left + s]
