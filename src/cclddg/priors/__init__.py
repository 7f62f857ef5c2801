"""Text priors: how a text prompt's embedding becomes the condition of a generator trained on image embeddings.

A text embedding sits off the image embeddings (the modality gap), and one prompt fits many images: it leaves
attributes open. A prior maps it to conditions the generator was trained on, one drawn per sample:

| name        | a text embedding becomes                                                   | needs                      |
|-------------|----------------------------------------------------------------------------|----------------------------|
| `none`      | itself                                                                     | -                          |
| `gap`       | itself moved by the modality gap (Liang et al. 2022), renormalised         | the run's statistics       |
| `retrieval` | one of its k nearest training image embeddings, uniformly (kNN-Diffusion)  | the statistics' bank       |
| `posterior` | a training image embedding drawn from softmax(beta x cosine) over the whole | the bank and its calibrated |
|             | bank, beta calibrated on the data's own caption-image pairs                | beta                       |
| `flow`      | a sample of the learned prior p(image embedding | text) (`priors.flow`)    | a trained prior: RUN/prior |

Image prompts are never moved. The statistics (`priors.stats`) are measured when an embedding run starts; the learned
prior is trained before its generator (`cclddg train-prior`, `training/prior_trainer.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from cclddg.config import TEXT_PRIORS
from cclddg.errors import UserError
from cclddg.options import BELOW_1, GUIDANCE, number_problem
from cclddg.priors.bank import EmbeddingBank
from cclddg.priors.flow import FlowPrior
from cclddg.priors.stats import EmbeddingStats, load_stats

PRIOR_DIR = "prior"  # a run's (and a model folder's) learned prior
MEAN_SAMPLES = 16  # samples of a sampling prior averaged into its one representative (a negative prompt)


class TextPrior:
    """Maps (B, dim) unit text embeddings to (B, dim) conditions, one draw per row (`generator` seeds it)."""

    name: ClassVar[str] = "none"

    def __call__(self, text_emb: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return text_emb

    def mean(self, text_emb: Tensor) -> Tensor:
        """One deterministic representative per row (what a negative prompt pushes away from)."""
        return self(text_emb)

    def describe(self) -> str:
        """The prior and its settings, for reports: "retrieval (k 8)"."""
        return self.name


class GapPrior(TextPrior):
    name = "gap"

    def __init__(self, stats: EmbeddingStats):
        self.gap = stats.gap

    def __call__(self, text_emb: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return F.normalize(text_emb + self.gap.to(text_emb.device), dim=-1)


class RetrievalPrior(TextPrior):
    """One of the k bank rows nearest the text embedding, drawn uniformly per row."""

    name = "retrieval"

    def __init__(self, stats: EmbeddingStats, k: int = 8):
        self.bank, self.k = EmbeddingBank(stats.bank), max(1, min(int(k), len(stats.bank)))
        self.index = stats.index  # a large bank's approximate index (priors/ann.py), else exact search

    def nearest(self, text_emb: Tensor) -> Tensor:
        """(B, k) bank rows nearest each text embedding."""
        return self.bank.topk(text_emb, self.k)[1] if self.index is None else self.index.topk(text_emb, self.k)

    def __call__(self, text_emb: Tensor, generator: torch.Generator | None = None) -> Tensor:
        top = self.nearest(text_emb)  # (B, k)
        choice = torch.randint(0, self.k, (len(text_emb),), generator=generator,
                               device=generator.device if generator else "cpu").to(top.device)
        return self.bank[top[torch.arange(len(top), device=top.device), choice]].to(text_emb)

    def mean(self, text_emb: Tensor) -> Tensor:
        return F.normalize(self.bank[self.nearest(text_emb)].to(text_emb).mean(1), dim=-1)

    def describe(self) -> str:
        return f"retrieval (k {self.k}{', approximate index' if self.index is not None else ''})"


class PosteriorPrior(TextPrior):
    """A bank row drawn from softmax(inv_temperature x cosine) over the whole bank (exact, in chunks)."""

    name = "posterior"

    def __init__(self, stats: EmbeddingStats):
        self.bank, self.inv_temperature = EmbeddingBank(stats.bank), float(stats.inv_temperature)

    def __call__(self, text_emb: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self.bank[self.bank.sample(text_emb, self.inv_temperature, generator)].to(text_emb)

    def mean(self, text_emb: Tensor) -> Tensor:
        return F.normalize(self.bank.softmax_mean(text_emb, self.inv_temperature), dim=-1)

    def describe(self) -> str:
        return f"posterior (beta {self.inv_temperature:.1f})"


class FlowTextPrior(TextPrior):
    """A sample of the learned prior (priors.flow) for each text embedding; `guidance` > 1 sharpens it towards the
    text (classifier-free guidance of the prior)."""

    name = "flow"

    def __init__(self, flow: FlowPrior, guidance: float = 1.0, guidance_start: float = 0.0):
        self.flow, self.guidance, self.guidance_start = flow, float(guidance), float(guidance_start)

    def __call__(self, text_emb: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self.flow.sample(text_emb, generator, guidance=self.guidance,
                                guidance_start=self.guidance_start).to(text_emb.device)

    def mean(self, text_emb: Tensor) -> Tensor:
        generator = torch.Generator().manual_seed(0)
        draws = self(text_emb.repeat_interleave(MEAN_SAMPLES, dim=0), generator)
        return F.normalize(draws.view(len(text_emb), MEAN_SAMPLES, -1).mean(1), dim=-1)

    def describe(self) -> str:
        start = f" from flow time {self.guidance_start:g}" if self.guidance != 1 and self.guidance_start else ""
        return f"flow ({self.flow.config.source}, guidance {self.guidance:g}{start})"


@dataclass(frozen=True)
class PriorSettings:
    """How text prompts are sampled: the prior's name and its knobs. A run's config (and a model folder's index)
    holds them as `text_prior`, `prior_k`, `prior_guidance` and `prior_guidance_start` (CONFIG_NAMES)."""

    name: str = "none"
    k: int = 8  # retrieval: the neighbours drawn from
    guidance: float = 1.0  # flow: classifier-free guidance of the learned prior
    guidance_start: float = 0.0  # flow: the flow time guidance starts at

    CONFIG_NAMES: ClassVar[dict[str, str]] = {"name": "text_prior", "k": "prior_k", "guidance": "prior_guidance",
                                              "guidance_start": "prior_guidance_start"}

    @classmethod
    def of(cls, config, **overrides) -> "PriorSettings":
        """From a run's config, a SamplingConfig or a pipeline's config (attributes named as CONFIG_NAMES; an older
        one without some takes the defaults), with `overrides` (by those names; None: not given) on top."""
        values = {}
        for field, name in cls.CONFIG_NAMES.items():
            given = overrides.get(name)
            values[field] = given if given is not None else getattr(config, name, getattr(cls, field))
        return cls(**values)


def make_text_prior(settings: PriorSettings, stats: EmbeddingStats | None = None, flow: FlowPrior | None = None,
                    dim: int | None = None, where: str = "RUN") -> TextPrior:
    """The prior `settings` name, from what a run or model folder holds; what it lacks is one line saying how to
    add it. `dim`: the embedder's width, which the statistics and the learned prior must share."""
    name = settings.name
    if name not in TEXT_PRIORS:
        raise UserError(f"--text_prior {name!r} is not valid; choose one of {', '.join(TEXT_PRIORS)}")
    if settings.k < 1:
        raise UserError(f"--prior_k must be >= 1, got {settings.k}")
    for flag, value, rng in (("prior_guidance", settings.guidance, GUIDANCE),
                             ("prior_guidance_start", settings.guidance_start, BELOW_1)):
        problem = number_problem(value, rng)
        if problem:
            raise UserError(f"--{flag} {problem}")
    if name == "none":
        return TextPrior()
    if name == "flow":
        if flow is None:
            raise UserError(f"--text_prior flow needs a learned prior, which {where} lacks; train one into it: "
                            f"cclddg train-prior {where}")
        if dim is not None and flow.config.dim != dim:
            raise UserError(f"the learned prior is {flow.config.dim}-d but the encoder gives {dim}-d embeddings: "
                            f"train it again with `cclddg train-prior {where}`")
        return FlowTextPrior(flow, settings.guidance, settings.guidance_start)
    if stats is None:
        raise UserError(f"--text_prior {name} needs the run's embedding statistics, which {where} lacks (made before "
                        f"they existed); measure them into it: cclddg embedding-stats {where}")
    if dim is not None and stats.dim != dim:
        raise UserError(f"the embedding statistics are {stats.dim}-d but the encoder gives {dim}-d embeddings: "
                        f"measure them again with `cclddg embedding-stats {where}`")
    if name == "gap":
        stats.gap  # noqa: B018 -- statistics without captions say so in one line now, not at the first prompt
        return GapPrior(stats)
    if name == "retrieval":
        return RetrievalPrior(stats, settings.k)
    if stats.inv_temperature is None:
        raise UserError(f"--text_prior posterior needs the bank's calibrated temperature, which the statistics of "
                        f"{where} lack (measured before it existed, or on data without captions); measure them again "
                        f"on captioned data: cclddg embedding-stats {where} [--data SOURCE]")
    return PosteriorPrior(stats)


def flow_prior_path(path: str | Path) -> Path:
    """Where a run (or model folder) keeps its learned prior (a checkpoint folder finds its run's)."""
    path = Path(path)
    if path.parent.name == "checkpoints":
        path = path.parent.parent
    return path / PRIOR_DIR


def load_flow_prior(path: str | Path, device: torch.device | str = "cpu") -> FlowPrior | None:
    """A run's finished learned prior (RUN/prior/model, written when `cclddg train-prior` ends) or a model folder's
    component (FOLDER/prior); None when there is none."""
    from cclddg.storage import load_model

    folder = flow_prior_path(path)
    if (folder / "model").is_dir():
        return load_model(FlowPrior, folder / "model").to(device).eval()
    if (folder / "checkpoints").exists():
        raise UserError(f"the learned prior in {folder} was interrupted before it finished; finish it: "
                        f"cclddg train-prior {Path(path)} --resume")
    if (folder / "config.json").is_file():
        return load_model(FlowPrior, folder).to(device).eval()
    return None


def text_prior_of(path: str | Path, settings: PriorSettings, dim: int | None = None,
                  device: torch.device | str = "cpu") -> TextPrior:
    """The prior of a run or model folder with these settings, loading only what it needs."""
    stats = load_stats(Path(path)) if settings.name in ("gap", "retrieval", "posterior") else None
    flow = load_flow_prior(path, device) if settings.name == "flow" else None
    return make_text_prior(settings, stats, flow, dim, str(path))


__all__ = ["PriorSettings", "TextPrior", "GapPrior", "RetrievalPrior", "PosteriorPrior", "FlowTextPrior", "EmbeddingStats",
           "EmbeddingBank", "FlowPrior", "make_text_prior", "load_flow_prior", "text_prior_of", "flow_prior_path"]
