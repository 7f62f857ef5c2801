"""Score a trained shapes model: sample for random requests, analyse each image, report accuracies.

Label runs are asked with label vectors; embedding runs with text prompts naming the requested
colour, shape and position ("a red circle in the top left", or paraphrased: "a crimson disc in the upper
left"), mapped by the run's text prior, or with held-out real images (asked for the attributes of the
prompt image). Embedding runs also get the CLOOB score: the mean cosine
between each generated image's image embedding and its request's text embedding.
"""

from __future__ import annotations

import functools
import itertools
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from cclddg import conditioning
from cclddg.conditioning.base import ConditionKind
from cclddg.conditioning.prompts import PromptConditioner
from cclddg.config import TrainConfig
from cclddg.data.images import uint8_to_unit
from cclddg.data.shapes import (
    ATTRIBUTE_VALUES,
    Holdout,
    ShapesDataset,
    format_holdout,
    is_held_out,
    parse_holdout,
    request_prompt,
)
from cclddg.errors import UserError
from cclddg.evaluation.fidelity import (
    METRICS,
    Features,
    check_sizes,
    distribution_metrics,
    features_cache_dir,
    load_cached_features,
    quantize,
    store_cached_features,
)
from cclddg.evaluation.shapes_eval import Analysis, analyze, summarize
from cclddg.evaluation.variety import variety_report, z_variety
from cclddg.evaluation.zero_shot import (
    HELD_OUT_SEED,
    PARAPHRASE_VARIANTS,
    held_out,
    paraphrase_prompt,
)
from cclddg.pipeline import SamplingConfig, sample, sample_batches

REQUESTED = ("color", "shape", "position")
PROMPT_KINDS = ("text", "paraphrase", "image")


def random_requests(n: int, seed: int, attributes: tuple[str, ...] = REQUESTED,
                    holdout: Holdout = frozenset()) -> list[dict[str, str]]:
    """`n` requests naming `attributes`, each value drawn uniformly; none combines a held-out colour and shape."""
    rng = np.random.default_rng(seed)
    out: list[dict[str, str]] = []
    while len(out) < n:
        request = {a: str(rng.choice(ATTRIBUTE_VALUES[a])) for a in attributes}
        if not is_held_out(request, holdout):
            out.append(request)
    return out


def held_out_requests(n: int, seed: int, holdout: Holdout) -> list[dict[str, str]]:
    """`n` requests for held-out (colour, shape) pairs (uniform over the pairs), each at a random position."""
    rng = np.random.default_rng([seed, 2])
    pairs = sorted(holdout)
    return [{"color": pairs[i][0], "shape": pairs[i][1], "position": str(rng.choice(ATTRIBUTE_VALUES["position"]))}
            for i in rng.integers(0, len(pairs), n)]


def run_holdout(cfg) -> Holdout:
    """The pairs a run's (or model folder's) training images never showed."""
    return parse_holdout(cfg.holdout) if getattr(cfg, "holdout", "") else frozenset()


def request_texts(requests: list[dict[str, str]], kind: str, seed: int) -> list[str]:
    """Text prompts for requests: in the captions' wording, or paraphrased (a random variant per request)."""
    if kind == "paraphrase":
        variants = np.random.default_rng([seed, 1]).integers(0, PARAPHRASE_VARIANTS, len(requests))
        return [paraphrase_prompt(r, int(v)) for r, v in zip(requests, variants)]
    return [request_prompt(r) for r in requests]


def clip_scores(embedder, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Each image embedding's cosine similarity with its prompt's text embedding."""
    return (embedder.embed_images(images) * embedder.embed_texts(prompts)).sum(-1)


def clip_score(embedder, images: torch.Tensor, prompts: list[str]) -> float:
    """Mean cosine similarity between the images' embeddings and their prompts' text embeddings."""
    return float(clip_scores(embedder, images, prompts).mean())


def kind_of(cfg: TrainConfig, conditioner: PromptConditioner | None) -> ConditionKind:
    """The run's conditioning kind; one conditioned on an embedder needs its `conditioner` (one line if missing)."""
    kind = conditioning.get(cfg.cond)
    if kind.uses_encoder and conditioner is None:
        raise UserError("an embedding run is evaluated through its embedder: give a PromptConditioner")
    return kind


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, cfg: TrainConfig, n: int = 500, *, guidance: float = 1.0,
                   sampler: str | None = None, n_sample_steps: int | None = None, seed: int = 0,
                   batch_size: int = 100, device: str | torch.device = "cpu", progress: bool = True,
                   conditioner: PromptConditioner | None = None, prompts: str = "text") -> dict[str, Any]:
    """Per-attribute accuracy and validity of `n` samples asked for colour, shape and position.

    Embedding runs are asked through `conditioner` (the run's embedder and text prior) with text prompts in the
    captions' wording (`prompts="text"`), paraphrased (`"paraphrase"`), or with held-out images (`"image"`).
    A run whose data held (colour, shape) pairs out is asked for seen pairs, and apart (`held_out`) for `n` more
    requests of the held-out pairs: combinations no training image showed."""
    if prompts not in PROMPT_KINDS:
        raise UserError(f"--prompts {prompts!r} is not valid; choose one of {', '.join(PROMPT_KINDS)}")
    kind = kind_of(cfg, conditioner)
    embedded = kind.uses_encoder  # asked through the embedder (else by the kind's request conditions)
    by_image = embedded and prompts == "image"
    holdout = run_holdout(cfg) if kind.conditional else frozenset()
    ask = functools.partial(_sample_and_read, model, cfg, guidance=guidance, sampler=sampler,
                            n_sample_steps=n_sample_steps, seed=seed, batch_size=batch_size, device=device,
                            progress=progress, conditioner=conditioner, prompts=prompts)
    if not kind.conditional:
        requests: list[dict[str, str]] = [{} for _ in range(n)]
    elif by_image:
        prompt_images = ShapesDataset(size=cfg.img_size, seed=HELD_OUT_SEED + 1)
        requests = [{a: prompt_images.sample(i).attrs[a] for a in REQUESTED} for i in range(n)]
    else:
        requests = random_requests(n, seed, holdout=holdout)
    analyses, scores = ask(requests)
    if by_image and holdout:  # the prompt images of held-out pairs are reported apart
        seen = [i for i, r in enumerate(requests) if not is_held_out(r, holdout)]
        held = [i for i, r in enumerate(requests) if is_held_out(r, holdout)]
        report = _report(*_pick(analyses, scores, seen), [requests[i] for i in seen])
        report["held_out"] = _report(*_pick(analyses, scores, held), [requests[i] for i in held])
    else:
        report = _report(analyses, scores, requests)
        if holdout:
            held_requests = held_out_requests(n, seed, holdout)
            report["held_out"] = _report(*ask(held_requests), held_requests)
    if holdout:
        report["holdout"] = format_holdout(holdout)
    if embedded:
        report["prompts"] = prompts
        report["text_prior"] = conditioner.prior.describe()
    return report


def _sample_and_read(model: torch.nn.Module, cfg: TrainConfig, requests: list[dict[str, str]], *, guidance: float,
                     sampler: str | None, n_sample_steps: int | None, seed: int, batch_size: int,
                     device: str | torch.device, progress: bool, conditioner: PromptConditioner | None,
                     prompts: str) -> tuple[list[Analysis], list[float] | None]:
    """One sample per request, read by the analyzer, batch by batch (memory does not grow with the count); with
    an embedder, each sample's CLOOB score against its request in the captions' wording."""
    kind = conditioning.get(cfg.cond)
    embedded = kind.uses_encoder
    by_image = embedded and prompts == "image"
    prompt_images = ShapesDataset(size=cfg.img_size, seed=HELD_OUT_SEED + 1) if by_image else None
    texts = request_texts(requests, prompts, seed) if embedded and not by_image else []
    rng = torch.Generator(device=device).manual_seed(seed)
    prior_rng = torch.Generator().manual_seed(seed)
    analyses: list[Analysis] = []
    scores: list[float] = []
    for start in tqdm(range(0, len(requests), batch_size), desc="eval", disable=not progress):
        chunk = requests[start:start + batch_size]
        if by_image:
            cond = conditioner.images(prompt_images.get_batch(range(start, start + len(chunk)))[0]).to(device)
        elif embedded:
            cond = conditioner.texts(texts[start:start + len(chunk)], prior_rng).to(device)
        else:
            cond = kind.request_conditions(chunk)
            cond = None if cond is None else cond.to(device)
        images = sample(model, cfg, len(chunk), cond=cond, guidance=guidance, sampler=sampler, steps=n_sample_steps,
                        rng=rng, device=device).cpu()
        analyses.extend(analyze(x) for x in images)
        if embedded:
            # scored against the captions' wording, whatever the prompts were: the same yardstick for every kind
            scores.extend(clip_scores(conditioner.embedder, images, [request_prompt(r) for r in chunk]).tolist())
    return analyses, scores if embedded else None


def _pick(analyses: list[Analysis], scores: list[float] | None, rows: list[int]):
    return [analyses[i] for i in rows], None if scores is None else [scores[i] for i in rows]


def _report(analyses: list[Analysis], scores: list[float] | None, requests: list[dict[str, str]]) -> dict[str, Any]:
    report = summarize(analyses, requests)
    if scores is not None:
        report["cloob_score"] = float(np.mean(scores)) if scores else None
    return report


@torch.no_grad()
def evaluate_variety(model: torch.nn.Module, cfg: TrainConfig, n: int = 32, *, requests_per_group: int = 8,
                     guidance: float = 1.0, seed: int = 0, batch_size: int = 100, device: str | torch.device = "cpu",
                     progress: bool = True, conditioner: PromptConditioner | None = None) -> dict[str, Any]:
    """The variety table of a label or embedding run (evaluation/variety.py): what requests naming 1-3
    attributes leave open, beside real images, and what z adds to one fixed condition."""
    kind = kind_of(cfg, conditioner)
    if not kind.conditional:
        raise UserError(f"variety is measured per request: this model is {kind.described}")
    embedded = kind.uses_encoder
    prior_rng = torch.Generator().manual_seed(seed)

    def conditions(requests):
        if embedded:
            return conditioner.texts([request_prompt(r) for r in requests], prior_rng)
        return kind.request_conditions(requests)

    def image_condition(image: torch.Tensor, attrs: dict[str, str]):
        return conditioner.images(image[None]) if embedded else kind.request_conditions([attrs])

    def sample_all(cond, count: int, sample_seed: int) -> torch.Tensor:
        rng = torch.Generator().manual_seed(sample_seed)
        return torch.cat(list(sample_batches(model, cfg, count, cond=cond, batch_size=batch_size, rng=rng,
                                             device=device, guidance=guidance)))

    def sample_z_only(cond, count: int, sample_seed: int) -> torch.Tensor:
        """The same x_T and step noise (one seed) for every image, a fresh z for each."""
        return torch.cat([sample(model, cfg, 1, cond=cond[j:j + 1].to(device), guidance=guidance, device=device,
                                 rng=torch.Generator().manual_seed(sample_seed),
                                 z_rng=torch.Generator().manual_seed(sample_seed * 1000 + j + 1)).cpu()
                          for j in range(count)])

    holdout = run_holdout(cfg)
    bar = (lambda groups: tqdm(groups, desc="variety", disable=not progress))
    report = variety_report(sample_all, conditions, cfg.img_size, holdout, requests_per_group, n, seed, progress=bar)
    has_z = SamplingConfig.of(cfg).z_dim > 0
    report["z"] = z_variety(sample_all, sample_z_only if has_z else None, image_condition, cfg.img_size, seed=seed)
    report["guidance"] = guidance
    if embedded:
        report["text_prior"] = conditioner.prior.describe()
    return report


@torch.no_grad()
def real_clip_score(embedder, n: int = 500, size: int = 32) -> float:
    """The CLOOB score of real held-out images with prompts naming their colour, shape and position."""
    images, truth = held_out(n, size, HELD_OUT_SEED + 1)
    return clip_score(embedder, images, [request_prompt(t) for t in truth])


@torch.no_grad()
def evaluate_fidelity(model: torch.nn.Module, cfg: TrainConfig, data: str, n: int, features: Features, *,
                      metrics: tuple[str, ...] = METRICS, guidance: float = 1.0, sampler: str | None = None,
                      n_sample_steps: int | None = None, seed: int = 0, batch_size: int = 100,
                      device: str | torch.device = "cpu", progress: bool = True,
                      conditioner: PromptConditioner | None = None, cache_dir: Path | None = None) -> dict[str, Any]:
    """FID / KID / precision-recall of n generated images against n real ones of `data` (evaluation/fidelity.py),
    beside the same metrics of n other real images (`floor`: what a perfect model would score at this n).

    Each generated image is asked for what one of those other real images shows: its caption through the run's
    text prior (an embedding run; an image without a caption: its image embedding), its labels (a label run), or
    nothing. The real images are read once, a batch at a time (memory does not grow with n), and their features
    are cached per (source, size, features, n, seed)."""
    from cclddg.data.sources import open_source, parse_data_spec
    from cclddg.data.stream import iter_examples

    check_sizes(metrics, n, features.dim)
    spec = parse_data_spec(data)
    if not spec.procedural and data == getattr(cfg, "data", None):
        raise UserError(f"--data {data} is the data the run trained on, which has no held-out part: give images "
                        "it never saw (another folder or split), or shapes (its held-out seed)")
    kind = kind_of(cfg, conditioner)
    key = {"data": data, "size": cfg.img_size, "features": features.fingerprint, "n": 2 * n, "seed": HELD_OUT_SEED}
    cache_dir = cache_dir or features_cache_dir()
    cached = load_cached_features(key, cache_dir)
    # One pass over 2n real images, a batch at a time (no image is kept): set A is compared with; the samples are
    # asked what set B shows, and B itself against A is the floor (asking for A's own captions would pair each
    # sample with its reference image and flatter the model).
    source = open_source(spec, cfg.img_size, seed=HELD_OUT_SEED, length=2 * n)
    stream = iter_examples(source, cfg.img_size, limit=2 * n)
    real_parts, asks, seen = [], [], 0
    for part in (0, 1):
        for chunk in _chunks(stream, n, batch_size):
            seen += len(chunk)
            images = torch.stack([torch.as_tensor(e.image) for e in chunk])
            if cached is None:
                real_parts.append(features(images))
            if part == 1:
                asks.append(_asks(kind, chunk, images, conditioner, data))
    if seen < 2 * n:
        raise UserError(f"--data {data} has {seen} usable images; the metrics at --n {n} need {2 * n} "
                        f"(n to compare with and n for the finite-sample floor): give --n {seen // 2} or less")
    both = cached if cached is not None else torch.cat(real_parts)
    if cached is None:
        store_cached_features(key, both, cache_dir)
    real, other_real = both[:n], both[n:]
    kinds = {kind for ask in asks for kind in ask["kinds"]}
    asked = " and ".join(sorted(kinds)) if kinds else "none"
    rng, prior_rng = torch.Generator(device=device).manual_seed(seed), torch.Generator().manual_seed(seed)
    fake = []
    for ask in tqdm(asks, desc="fidelity", disable=not progress):
        cond = _condition(ask, conditioner, prior_rng)
        images = sample(model, cfg, ask["rows"], cond=None if cond is None else cond.to(device), guidance=guidance,
                        sampler=sampler, steps=n_sample_steps, rng=rng, device=device).cpu()
        fake.append(features(quantize(images)))  # the uint8 path a saved sample takes, as the real files do
    report = distribution_metrics(real, torch.cat(fake), metrics)
    report["floor"] = distribution_metrics(real, other_real, metrics)  # n real vs n other real: what 0 looks like
    report.update({"features": features.name, "n": n, "real": data, "asked_with": asked})
    return report


def _chunks(stream, n: int, size: int):
    """The next n items of `stream`, in lists of at most `size`."""
    left = n
    while left > 0:
        chunk = list(itertools.islice(stream, min(size, left)))
        if not chunk:
            return
        left -= len(chunk)
        yield chunk


def _asks(kind: ConditionKind, chunk: list, images: torch.Tensor, conditioner: PromptConditioner | None,
          data: str) -> dict[str, Any]:
    """What a batch of set B's images asks the samples for: each one's caption (an embedding run; its image
    embedding where it has none), its labels (a label run), or nothing."""
    ask: dict[str, Any] = {"rows": len(chunk), "kinds": set()}
    if kind.uses_encoder:
        captions = [e.caption if e.caption and e.caption.strip() else None for e in chunk]
        ask["captions"] = captions
        if any(c is None for c in captions):
            ask["image_cond"] = conditioner.images(uint8_to_unit(images)).cpu()
            ask["kinds"].add("image embeddings")
        if any(c is not None for c in captions):
            ask["kinds"].add("captions")
    elif kind.uses_labels:
        if any(e.labels is None for e in chunk):
            raise UserError(f"this model is conditioned on labels and --data {data} has none: give shapes data")
        ask["labels"] = torch.from_numpy(np.stack([np.asarray(e.labels, np.float32) for e in chunk]))
        ask["kinds"].add("labels")
    return ask


def _condition(ask: dict[str, Any], conditioner: PromptConditioner | None,
               prior_rng: torch.Generator) -> torch.Tensor | None:
    """The rows' conditions: captions through the text prior (image embeddings where a row has no caption),
    label vectors, or None."""
    if "labels" in ask:
        return ask["labels"]
    if "captions" not in ask:
        return None
    captions = ask["captions"]
    if all(c is None for c in captions):
        return ask["image_cond"]
    texts = conditioner.texts([c for c in captions if c is not None], prior_rng)
    if "image_cond" not in ask:
        return texts
    out, k = ask["image_cond"].clone(), 0
    for i, c in enumerate(captions):
        if c is not None:
            out[i], k = texts[k], k + 1
    return out
