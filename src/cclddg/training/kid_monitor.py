"""KID while a run trains (`--kid_every K --kid_n N`), so a run's best checkpoint can be picked from its log.

Features are the run's own embedder's: the real side is the image embeddings of N fixed training examples,
already in the cache (the embedder's features of the real images); the generated side is N samples of the
EMA generator asked with those examples' captions through the run's text prior (their image embeddings when
the data has no captions), decoded, quantised to uint8 like a saved sample, and embedded. The same noise and
conditions every time, so the curve moves with the model only. The metric is torchmetrics' KID
(evaluation/fidelity.py).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from cclddg.evaluation.fidelity import EmbedderFeatures, distribution_metrics, quantize
from cclddg.pipeline import sample_batches
from cclddg.priors.pairs import EmbeddingPairs


class KidMonitor:
    def __init__(self, pairs: EmbeddingPairs, prior: Callable[[Tensor, torch.Generator], Tensor],
                 load_embedder: Callable[[], object], n: int, seed: int):
        order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed))
        captioned = order[pairs.captioned[order]]
        self.asked_with = "captions" if len(captioned) >= n else "image embeddings"
        chosen = (captioned if self.asked_with == "captions" else order)[:n]
        image, text = pairs.get(chosen)
        self.real = image.double()
        self.cond = (prior(text, torch.Generator().manual_seed(seed)) if self.asked_with == "captions" else image).cpu()
        self._load_embedder, self._features, self.n, self.seed = load_embedder, None, len(chosen), seed

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, cfg, device, space, batch_size: int = 64) -> dict[str, float]:
        """{"kid": ..., "kid_std": ...} of the model's samples against the fixed real features."""
        if self._features is None:  # the embedder loads on the first call
            self._features = EmbedderFeatures(self._load_embedder(), "the run's own embedder")
        rng = torch.Generator(device=device).manual_seed(self.seed)
        batches = sample_batches(model, cfg, self.n, cond=self.cond, batch_size=batch_size, rng=rng, device=device,
                                 space=space)
        fake = torch.cat([self._features(quantize(images)) for images in batches])
        return distribution_metrics(self.real, fake, ("kid",))
