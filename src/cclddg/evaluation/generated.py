"""Score a trained shapes model: sample for random requests, analyse each image, report accuracies.

Label runs are asked with label vectors; embedding runs with text prompts naming the requested
colour, shape and position ("a red circle in the top left", or paraphrased: "a crimson disc in the upper
left"), mapped by the run's text prior, or with held-out real images (asked for the attributes of the
prompt image). Embedding runs also get the CLOOB score: the mean cosine
between each generated image's image embedding and its request's text embedding.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from cclddg.conditioning import PromptConditioner, request_conditions
from cclddg.config import TrainConfig
from cclddg.data.shapes import ATTRIBUTE_VALUES, ShapesDataset, request_prompt
from cclddg.errors import UserError
from cclddg.evaluation.shapes_eval import analyze, summarize
from cclddg.evaluation.zero_shot import (
    HELD_OUT_SEED,
    PARAPHRASE_VARIANTS,
    held_out,
    paraphrase_prompt,
)
from cclddg.pipeline import sample

REQUESTED = ("color", "shape", "position")
PROMPT_KINDS = ("text", "paraphrase", "image")


def random_requests(n: int, seed: int, attributes: tuple[str, ...] = REQUESTED) -> list[dict[str, str]]:
    """`n` requests naming `attributes`, each value drawn uniformly."""
    rng = np.random.default_rng(seed)
    return [{a: str(rng.choice(ATTRIBUTE_VALUES[a])) for a in attributes} for _ in range(n)]


def request_texts(requests: list[dict[str, str]], kind: str, seed: int) -> list[str]:
    """Text prompts for requests: in the captions' wording, or paraphrased (a random variant per request)."""
    if kind == "paraphrase":
        variants = np.random.default_rng([seed, 1]).integers(0, PARAPHRASE_VARIANTS, len(requests))
        return [paraphrase_prompt(r, int(v)) for r, v in zip(requests, variants)]
    return [request_prompt(r) for r in requests]


def clip_score(embedder, images: torch.Tensor, prompts: list[str]) -> float:
    """Mean cosine similarity between the images' embeddings and their prompts' text embeddings."""
    return float((embedder.embed_images(images) * embedder.embed_texts(prompts)).sum(-1).mean())


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, cfg: TrainConfig, n: int = 500, guidance: float = 1.0,
                   sampler: str | None = None, n_sample_steps: int | None = None, seed: int = 0,
                   batch_size: int = 100, device: str | torch.device = "cpu", progress: bool = True,
                   conditioner: PromptConditioner | None = None, prompts: str = "text") -> dict[str, float]:
    """Per-attribute accuracy and validity of `n` samples asked for colour, shape and position.

    Embedding runs are asked through `conditioner` (the run's embedder and text prior) with text prompts in the
    captions' wording (`prompts="text"`), paraphrased (`"paraphrase"`), or with held-out images (`"image"`)."""
    if prompts not in PROMPT_KINDS:
        raise UserError(f"--prompts {prompts!r} is not valid; choose one of {', '.join(PROMPT_KINDS)}")
    embedded = cfg.cond == "embedding"  # asked through the embedder (else by label vectors, or nothing)
    if embedded and conditioner is None:
        raise UserError("an embedding run is evaluated through its embedder: give a PromptConditioner")
    by_image = embedded and prompts == "image"
    if cfg.cond == "none":
        requests: list[dict[str, str]] = [{} for _ in range(n)]
    elif by_image:
        prompt_images = ShapesDataset(size=cfg.img_size, seed=HELD_OUT_SEED + 1)
        requests = [{a: prompt_images.sample(i).attrs[a] for a in REQUESTED} for i in range(n)]
    else:
        requests = random_requests(n, seed)
    texts = request_texts(requests, prompts, seed) if embedded and not by_image else []
    rng = torch.Generator(device=device).manual_seed(seed)
    prior_rng = torch.Generator().manual_seed(seed)
    analyses, clip_sum = [], 0.0  # per batch: memory does not grow with n
    for start in tqdm(range(0, n, batch_size), desc="eval", disable=not progress):
        chunk = requests[start:start + batch_size]
        if by_image:
            cond = conditioner.images(prompt_images.get_batch(range(start, start + len(chunk)))[0]).to(device)
        elif embedded:
            cond = conditioner.texts(texts[start:start + len(chunk)], prior_rng).to(device)
        else:
            cond = request_conditions(cfg.cond, chunk)
            cond = None if cond is None else cond.to(device)
        images = sample(model, cfg, len(chunk), cond=cond, guidance=guidance, sampler=sampler, steps=n_sample_steps,
                        rng=rng, device=device).cpu()
        analyses.extend(analyze(x) for x in images)
        if embedded:
            # scored against the captions' wording, whatever the prompts were: the same yardstick for every kind
            clip_sum += clip_score(conditioner.embedder, images, [request_prompt(r) for r in chunk]) * len(chunk)
    report = summarize(analyses, requests)
    if embedded:
        report["cloob_score"] = clip_sum / n
        report["prompts"] = prompts
        report["text_prior"] = conditioner.prior
    return report


@torch.no_grad()
def real_clip_score(embedder, n: int = 500, size: int = 32) -> float:
    """The CLOOB score of real held-out images with prompts naming their colour, shape and position."""
    images, truth = held_out(n, size, HELD_OUT_SEED + 1)
    return clip_score(embedder, images, [request_prompt(t) for t in truth])
