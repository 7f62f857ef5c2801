"""A dataset's (image embedding, caption embedding) pairs, which the priors are measured and trained on.

In memory (a run on the rendered shapes, a test), or read batch by batch from a latent cache's memory-mapped
shards (`LatentCache.get_batch(fields=...)`), so neither the statistics nor the learned prior needs the whole set
in memory at CC12M scale (12 M x 512-d pairs are 24 GB in fp16).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

CHUNK = 65536  # pairs read at once for the means


class EmbeddingPairs:
    """`get(indices) -> (image, text)` unit float32 embeddings; `captioned` marks the examples with a caption."""

    def __init__(self, image: Tensor | None = None, text: Tensor | None = None, captioned: Tensor | None = None,
                 cache=None):
        if (cache is None) == (image is None):
            raise ValueError("give either image and text embeddings or a latent cache")
        self.cache, self.image, self.text = cache, image, text
        if cache is not None:
            self.dim, n = cache.embed_dim, len(cache)
            self.captioned = cache.captioned() if captioned is None else captioned.bool()
        else:
            if text is None or text.shape != image.shape:
                raise ValueError(f"image and text embeddings must have one shape, got {tuple(image.shape)} and "
                                 f"{None if text is None else tuple(text.shape)}")
            self.dim, n = image.shape[1], len(image)
            self.captioned = torch.ones(n, dtype=torch.bool) if captioned is None else captioned.bool()
        if len(self.captioned) != n:
            raise ValueError(f"{len(self.captioned)} caption flags for {n} pairs")

    @classmethod
    def of_cache(cls, cache) -> "EmbeddingPairs":
        return cls(cache=cache)

    def __len__(self) -> int:
        return len(self.captioned)

    def get(self, indices: Tensor | np.ndarray) -> tuple[Tensor, Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        if self.cache is None:
            image, text = self.image[idx].float(), self.text[idx].float()
        else:
            found = self.cache.get_batch(idx.numpy(), fields=("image_emb", "text_emb"))
            image, text = found["image_emb"], found["text_emb"]
        return F.normalize(image, dim=-1), F.normalize(text, dim=-1)

    def means(self) -> tuple[Tensor, Tensor | None]:
        """The mean image embedding, and the mean text embedding of the captioned examples (None: no caption)."""
        image_sum = torch.zeros(self.dim, dtype=torch.float64)
        text_sum = torch.zeros(self.dim, dtype=torch.float64)
        for start in range(0, len(self), CHUNK):
            idx = torch.arange(start, min(start + CHUNK, len(self)))
            image, text = self._raw(idx)
            image_sum += image.double().sum(0)
            text_sum += text[self.captioned[idx]].double().sum(0)
        count = int(self.captioned.sum())
        return (image_sum / len(self)).float(), (text_sum / count).float() if count else None

    def _raw(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """The embeddings as stored (the means are of the stored vectors, as they always were)."""
        if self.cache is None:
            return self.image[idx].float(), self.text[idx].float()
        found = self.cache.get_batch(idx.numpy(), fields=("image_emb", "text_emb"))
        return found["image_emb"], found["text_emb"]
