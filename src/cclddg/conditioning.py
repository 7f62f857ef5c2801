"""Conditioning: the vector `c` the nets see, in training and at sampling, in one place.

- The null condition is zeros (DESIGN.md); dropping `c` to it with probability pct_zeros in training is
  what classifier-free guidance needs.
- Embedding runs condition each example on its image's embedding, or with probability pct_text on its
  caption's text embedding.
- Pseudo-text (LAFITE, Zhou et al. 2022): an image embedding perturbed by scaled Gaussian noise and
  renormalised, `c' = normalize(c + xi·|c|·e/|e|)`, so a generator trained on images alone also learns the
  neighbourhood where text embeddings fall.
- Text priors at sampling: a text embedding sits off the image embeddings (the modality gap: matched
  cosine ~0.6 for our CLOOB), which a generator trained on image embeddings has never seen. `gap` moves it
  by the difference of the mean image and mean text embedding (Liang et al. 2022, "Mind the Gap");
  `retrieval` replaces it by one of its k nearest image embeddings of the training data (as kNN-Diffusion,
  Sheynin et al. 2023): a point the generator was trained on. Image prompts are never moved.
- Label runs (shapes) are conditioned on the label vector of a request.

The statistics the priors need (`EmbeddingStats`) are measured once on the run's data and stored in the
run folder (`RUN/embedding_stats.safetensors`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cclddg.atomic import atomic_path
from cclddg.config import TEXT_PRIORS
from cclddg.data.latent_cache import LatentCache
from cclddg.data.shapes import (
    COLORS,
    LABEL_DIM,
    POSITIONS,
    SHAPES,
    attrs_to_label,
    parse_attrs,
    request_prompt,
)
from cclddg.data.sources import load_uint8, parse_data_spec
from cclddg.errors import UserError

STATS_FILE = "embedding_stats.safetensors"
BANK_SIZE = 20000  # image embeddings kept for the retrieval prior (10 MB at 256-d in fp16)
PRIOR_CHUNK = 1024  # text embeddings the retrieval prior compares with the bank at once (80 MB of similarities)


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


def request_condition(cond: str, attrs: str | None, n: int, guided: bool = False) -> Tensor | None:
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
    return None if attrs is None else request_conditions(cond, [parse_attrs(attrs)] * n)


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
    """The null condition (zeros, DESIGN.md): what dropout trains on and what guidance pushes away from."""
    return torch.zeros_like(cond)


# ---- training ---------------------------------------------------------------------------------------------
def drop(cond: Tensor, p: float) -> Tensor:
    """Replace each row by the null condition (zeros) with probability p (classifier-free guidance)."""
    if p <= 0:
        return cond
    keep = torch.rand(cond.shape[0], 1, device=cond.device) >= p
    return torch.where(keep, cond, null_like(cond))


def pseudo_text(image_emb: Tensor, xi: float) -> Tensor:
    """LAFITE's fixed perturbation: normalize(c + xi·|c|·e/|e|), e ~ N(0, I); xi = 0 returns c unchanged."""
    if xi <= 0:
        return image_emb
    noise = torch.randn_like(image_emb)
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


# ---- the statistics the text priors need ------------------------------------------------------------------
@dataclass
class EmbeddingStats:
    """Mean image and mean text embedding of a dataset (the modality gap) and a bank of its image embeddings."""

    image_mean: Tensor  # (dim,)
    text_mean: Tensor | None  # (dim,); None when the data had no captions (then no gap, the bank still serves)
    bank: Tensor  # (N, dim) unit image embeddings, float16
    source: str = ""  # what they were measured on

    @classmethod
    def measure(cls, image_emb: Tensor, text_emb: Tensor, source: str, captioned: Tensor | None = None,
                bank_size: int = BANK_SIZE, seed: int = 0) -> "EmbeddingStats":
        """From aligned (N, dim) image and text embeddings; `captioned` marks the examples with a caption."""
        image_emb, text_emb = image_emb.float(), text_emb.float()
        if captioned is not None:
            text_emb = text_emb[captioned]
        n = len(image_emb)
        keep = np.sort(np.random.default_rng(seed).permutation(n)[:bank_size]) if n > bank_size else np.arange(n)
        bank = F.normalize(image_emb[torch.from_numpy(keep)], dim=-1).half()
        return cls(image_emb.mean(0), text_emb.mean(0) if len(text_emb) else None, bank.contiguous(), source)

    @property
    def gap(self) -> Tensor:
        """The vector from the mean text embedding to the mean image embedding."""
        if self.text_mean is None:
            raise UserError(f"the embedding statistics ({self.source}) were measured on data without captions, so "
                            "they hold no modality gap: measure them on a captioned source, "
                            "cclddg embedding-stats RUN --data SOURCE (or use --text_prior retrieval)")
        return self.image_mean - self.text_mean

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        tensors = {"image_mean": self.image_mean.contiguous(), "bank": self.bank.contiguous()}
        if self.text_mean is not None:
            tensors["text_mean"] = self.text_mean.contiguous()
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"source": self.source, "format": "1"})

    @classmethod
    def load(cls, path: Path) -> "EmbeddingStats":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            text_mean = tensors["text_mean"].float() if "text_mean" in tensors else None
            return cls(tensors["image_mean"].float(), text_mean, tensors["bank"], meta.get("source", ""))
        except Exception as exc:
            raise UserError(f"{path} is damaged ({type(exc).__name__}); measure it again with "
                            f"`cclddg embedding-stats {path.parent}`") from None


@torch.no_grad()
def measure_stats(embedder, data: str, img_size: int, n: int = 5000, seed: int = 0,
                  progress: bool = True) -> EmbeddingStats:
    """Embedding statistics of a latent cache (its stored embeddings, which must be this embedder's) or of the
    first n examples of a captioned source, embedded now (`cclddg embedding-stats`)."""

    if Path(data).expanduser().is_dir() and (Path(data).expanduser() / "cache.json").is_file():

        cache = LatentCache(Path(data).expanduser())
        if cache.embed_dim != embedder.dim:
            raise UserError(f"the cache {data} holds {cache.embed_dim}-d embeddings, the run's encoder gives "
                            f"{embedder.dim}-d: give a cache encoded with the run's --encoder, or a data source")
        return EmbeddingStats.measure(*cache.embeddings(), source=str(data), seed=seed)
    parsed = parse_data_spec(data)
    images, captions = load_uint8(data, parsed.size or img_size, seed, n, workers=0 if parsed.procedural else 2,
                                  progress=progress)
    image_emb = torch.cat([embedder.embed_images(images[i:i + 256].float() / 127.5 - 1).cpu()
                           for i in range(0, len(images), 256)])
    text_emb = embedder.embed_texts([c if c.strip() else "." for c in captions]).cpu()
    captioned = torch.tensor([bool(c.strip()) for c in captions])
    return EmbeddingStats.measure(image_emb, text_emb, f"{data} (first {len(images)})", captioned, seed=seed)


def stats_path(run: Path) -> Path:
    """Where a run keeps its embedding statistics (a checkpoint folder finds its run's)."""
    run = Path(run)
    if run.parent.name == "checkpoints":
        run = run.parent.parent
    return run / STATS_FILE


def load_stats(run: Path) -> EmbeddingStats | None:
    path = stats_path(run)
    return EmbeddingStats.load(path) if path.is_file() else None


# ---- sampling ------------------------------------------------------------------------------------------
def apply_text_prior(text_emb: Tensor, prior: str, stats: EmbeddingStats | None, k: int = 8,
                     generator: torch.Generator | None = None, pick: str = "sample") -> Tensor:
    """Map text embeddings (B, dim) to conditions a generator trained on image embeddings knows.

    `gap`: normalize(t + mean_image - mean_text). `retrieval`: the k image embeddings of the bank nearest to t;
    `pick="sample"` draws one of them per row (with `generator`), `pick="mean"` takes their normalised mean.
    """
    if prior not in TEXT_PRIORS:
        raise UserError(f"--text_prior {prior!r} is not valid; choose one of {', '.join(TEXT_PRIORS)}")
    if prior == "none":
        return text_emb
    if stats is None:
        raise UserError(f"--text_prior {prior} needs the run's embedding statistics, which it lacks (a run from "
                        "before they existed); measure them into the run: cclddg embedding-stats RUN")
    device = text_emb.device
    if prior == "gap":
        return F.normalize(text_emb + stats.gap.to(device), dim=-1)
    bank = stats.bank.to(device=device, dtype=text_emb.dtype)
    k = max(1, min(int(k), len(bank)))
    top = (text_emb @ bank.T).topk(k, dim=-1).indices  # (B, k)
    if pick == "mean":
        return F.normalize(bank[top].mean(1), dim=-1)
    choice = torch.randint(0, k, (len(text_emb),), generator=generator, device=generator.device if generator else "cpu")
    return bank[top[torch.arange(len(top), device=device), choice.to(device)]]


class PromptConditioner:
    """Text and image prompts -> the conditions of an embedding-conditioned generator.

    Text goes through the run's text prior; images are embedded as they are; both given, their embeddings
    are mixed (image_weight) after the prior.
    """

    def __init__(self, embedder, prior: str = "none", stats: EmbeddingStats | None = None, k: int = 8,
                 run: str | Path = "RUN"):
        if prior not in TEXT_PRIORS:
            raise UserError(f"--text_prior {prior!r} is not valid; choose one of {', '.join(TEXT_PRIORS)}")
        if k < 1:
            raise UserError(f"--prior_k must be >= 1, got {k}")
        if prior != "none" and stats is None:
            raise UserError(f"--text_prior {prior} needs the run's embedding statistics, which {run} lacks (made before "
                            f"they existed); measure them into it: cclddg embedding-stats {run}")
        if stats is not None and stats.bank.shape[1] != embedder.dim:
            raise UserError(f"the embedding statistics are {stats.bank.shape[1]}-d but the encoder gives "
                            f"{embedder.dim}-d embeddings: measure them again with `cclddg embedding-stats RUN`")
        self.embedder, self.prior, self.stats, self.k = embedder, prior, stats, k

    def texts(self, prompts: Sequence[str], generator: torch.Generator | None = None, pick: str = "sample") -> Tensor:
        """(len(prompts), dim): each distinct prompt is embedded once, however often it repeats (n samples of
        one prompt), and the prior maps the rows in chunks, so memory does not grow with the repeats."""
        checked = [self.embedder.check_prompt(p) for p in prompts]
        unique = {p: i for i, p in enumerate(dict.fromkeys(checked))}
        embedded = self.embedder.embed_texts(list(unique))
        rows = embedded[torch.tensor([unique[p] for p in checked], dtype=torch.long)]
        return torch.cat([apply_text_prior(chunk, self.prior, self.stats, self.k, generator, pick)
                          for chunk in rows.split(PRIOR_CHUNK)])

    def images(self, images: Sequence[Tensor] | Tensor) -> Tensor:
        if isinstance(images, Tensor) and images.ndim == 4:
            return self.embedder.embed_images(images)
        return torch.cat([self.embedder.embed_images(_square(i)[None]) for i in images])

    def __call__(self, prompts: Sequence[str] | None = None, images: Sequence[Tensor] | None = None,
                 image_weight: float = 0.5, n: int = 1, seed: int = 0) -> Tensor:
        """(rows·n, dim): each row's condition repeated n times (prompt-major); with the retrieval prior every
        repeat draws its own neighbour (seeded), so n samples of one prompt differ as image variations do."""
        prompts = list(prompts) if prompts is not None else []
        images = list(images) if images is not None else []
        if not prompts and not images:
            raise UserError("give at least one prompt or image")
        if not 0.0 <= image_weight <= 1.0:
            raise UserError(f"the image weight must be in [0, 1], got {image_weight}")
        if prompts and images and len(prompts) != len(images) and 1 not in (len(prompts), len(images)):
            raise UserError(f"{len(prompts)} prompts and {len(images)} images: give as many of each, or one of either")
        generator = torch.Generator().manual_seed(seed)
        text = self.texts([p for p in prompts for _ in range(n)], generator) if prompts else None
        image = self.images(images).repeat_interleave(n, dim=0) if images else None
        if text is None:
            return image
        if image is None:
            return text
        rows = max(len(prompts), len(images))
        text = text.view(len(prompts), n, -1).expand(rows, n, -1).reshape(rows * n, -1)
        image = image.view(len(images), n, -1).expand(rows, n, -1).reshape(rows * n, -1)
        return F.normalize((1 - image_weight) * text + image_weight * image, dim=-1)

    def negative(self, prompt: str | None) -> Tensor | None:
        """The embedding guidance pushes away from instead of the null one (None: the null embedding)."""
        if prompt is None:
            return None
        return self.texts([prompt], pick="mean")


def _square(image: Tensor) -> Tensor:
    """Centre crop to a square (embedders see square images)."""
    h, w = image.shape[-2:]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return image[..., top:top + s, left:left + s]


def describe(stats: EmbeddingStats) -> str:
    gap = None if stats.text_mean is None else round(float(stats.gap.norm()), 4)
    return json.dumps({"source": stats.source, "bank": len(stats.bank), "gap_norm": gap})
