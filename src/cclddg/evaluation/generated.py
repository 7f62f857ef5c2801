"""Score a trained shapes model: sample for random requests, analyse each image, report accuracies."""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from cclddg.config import TrainConfig
from cclddg.data.shapes import ATTRIBUTE_VALUES, attrs_to_label
from cclddg.evaluation.shapes_eval import score
from cclddg.pipeline import sample

REQUESTED = ("color", "shape", "position")


def random_requests(n: int, seed: int, attributes: tuple[str, ...] = REQUESTED) -> list[dict[str, str]]:
    """`n` requests naming `attributes`, each value drawn uniformly."""
    rng = np.random.default_rng(seed)
    return [{a: str(rng.choice(ATTRIBUTE_VALUES[a])) for a in attributes} for _ in range(n)]


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, cfg: TrainConfig, n: int = 500, guidance: float = 1.0,
                   sampler: str | None = None, n_sample_steps: int | None = None, seed: int = 0,
                   batch_size: int = 100, device: str | torch.device = "cpu",
                   progress: bool = True) -> dict[str, float]:
    """Per-attribute accuracy and validity of `n` samples asked for random colour, shape and position."""
    if cfg.cond == "none":
        requests: list[dict[str, str]] = [{} for _ in range(n)]
    else:
        requests = random_requests(n, seed)
    rng = torch.Generator(device=device).manual_seed(seed)
    images = []
    for start in tqdm(range(0, n, batch_size), desc="eval", disable=not progress):
        chunk = requests[start:start + batch_size]
        cond = None
        if cfg.cond != "none":
            cond = torch.from_numpy(np.stack([attrs_to_label(r) for r in chunk])).to(device)
        images.append(sample(model, cfg, len(chunk), cond, guidance, sampler, n_sample_steps, rng, device).cpu())
    return score(list(torch.cat(images)), requests)
