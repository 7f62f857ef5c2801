"""Score a trained shapes model: sample for random requests, analyse each image, report accuracies.

Label runs are asked with label vectors; embedding runs with text prompts naming the requested
colour, shape and position ("a red circle in the top left"), or with held-out real images (asked
for the attributes of the prompt image). Embedding runs also get the CLOOB score: the mean cosine
between each generated image's image embedding and its request's text embedding.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from cclddg.config import TrainConfig
from cclddg.data.shapes import ATTRIBUTE_VALUES, ShapesDataset, attrs_to_label
from cclddg.evaluation.shapes_eval import score
from cclddg.evaluation.zero_shot import HELD_OUT_SEED, held_out, request_prompt
from cclddg.pipeline import sample

REQUESTED = ("color", "shape", "position")
PROMPT_KINDS = ("text", "image")


def random_requests(n: int, seed: int, attributes: tuple[str, ...] = REQUESTED) -> list[dict[str, str]]:
    """`n` requests naming `attributes`, each value drawn uniformly."""
    rng = np.random.default_rng(seed)
    return [{a: str(rng.choice(ATTRIBUTE_VALUES[a])) for a in attributes} for _ in range(n)]


def clip_score(embedder, images: torch.Tensor, prompts: list[str]) -> float:
    """Mean cosine similarity between the images' embeddings and their prompts' text embeddings."""
    return float((embedder.embed_images(images) * embedder.embed_texts(prompts)).sum(-1).mean())


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, cfg: TrainConfig, n: int = 500, guidance: float = 1.0,
                   sampler: str | None = None, n_sample_steps: int | None = None, seed: int = 0,
                   batch_size: int = 100, device: str | torch.device = "cpu", progress: bool = True,
                   embedder=None, prompts: str = "text") -> dict[str, float]:
    """Per-attribute accuracy and validity of `n` samples asked for colour, shape and position."""
    if cfg.cond == "none":
        requests: list[dict[str, str]] = [{} for _ in range(n)]
    elif cfg.cond == "embedding" and prompts == "image":
        prompt_images = ShapesDataset(size=cfg.img_size, seed=HELD_OUT_SEED + 1)
        requests = [{a: prompt_images.sample(i).attrs[a] for a in REQUESTED} for i in range(n)]
    else:
        requests = random_requests(n, seed)
    rng = torch.Generator(device=device).manual_seed(seed)
    images = []
    for start in tqdm(range(0, n, batch_size), desc="eval", disable=not progress):
        chunk = requests[start:start + batch_size]
        cond = None
        if cfg.cond == "labels":
            cond = torch.from_numpy(np.stack([attrs_to_label(r) for r in chunk])).to(device)
        elif cfg.cond == "embedding" and prompts == "image":
            cond = embedder.embed_images(prompt_images.get_batch(range(start, start + len(chunk)))[0]).to(device)
        elif cfg.cond == "embedding":
            cond = embedder.embed_texts([request_prompt(r) for r in chunk]).to(device)
        images.append(sample(model, cfg, len(chunk), cond, guidance, sampler, n_sample_steps, rng, device).cpu())
    images = torch.cat(images)
    report = score(list(images), requests)
    if cfg.cond == "embedding":
        report["cloob_score"] = clip_score(embedder, images, [request_prompt(r) for r in requests])
        report["prompts"] = prompts
    return report


@torch.no_grad()
def real_clip_score(embedder, n: int = 500, size: int = 32) -> float:
    """The CLOOB score of real held-out images with prompts naming their colour, shape and position."""
    images, truth = held_out(n, size, HELD_OUT_SEED + 1)
    return clip_score(embedder, images, [request_prompt(t) for t in truth])
