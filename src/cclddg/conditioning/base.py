"""What a conditioning kind is (`ConditionKind`), what a user asks a model for (`Request`), and the parts every kind
shares: the null condition and its dropout (classifier-free guidance), and rows repeated without copies.

A kind owns the vector `c` of its runs: its width and scale, the training condition an example gets, what a
request may carry and how it becomes `c`, and what data and settings it needs. The trainer, sampling, evaluation,
the command line, the model folder and the web page ask the run's kind (`conditioning.get(cfg.cond)`) and never
test its name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, Sequence

import torch
from torch import Tensor

from cclddg.errors import UserError

if TYPE_CHECKING:
    from cclddg.conditioning.prompts import PromptConditioner
    from cclddg.config import TrainConfig

# What a request may carry, and how each front door names it in its messages.
REQUEST_FIELDS = ("prompt", "image", "negative_prompt", "attrs")
CLI_NAMES = {"prompt": "--prompt \"...\"", "image": "--image PATH", "negative_prompt": "--negative_prompt",
             "attrs": "--attrs (e.g. color=red,shape=circle)"}
PIPELINE_NAMES = {"prompt": "a prompt", "image": "an image", "negative_prompt": "negative_prompt=",
                  "attrs": "attrs= (e.g. \"color=red,shape=circle\")"}


# ---- shared by every kind ----------------------------------------------------------------------------------
def null_like(cond: Tensor) -> Tensor:
    """The null condition (zeros, docs/DESIGN.md): what dropout trains on and what guidance pushes away from."""
    return torch.zeros_like(cond)


def drop(cond: Tensor, p: float) -> Tensor:
    """Replace each row by the null condition (zeros) with probability p (classifier-free guidance)."""
    if p <= 0:
        return cond
    keep = torch.rand(cond.shape[0], 1, device=cond.device) >= p
    return torch.where(keep, cond, null_like(cond))


class RepeatedRows:
    """Each row of `rows` n times (row-major), sliced without making the n copies: a label request for --n 10**9."""

    def __init__(self, rows: Tensor, n: int):
        self.rows, self.n = rows, n

    def __len__(self) -> int:
        return len(self.rows) * self.n

    def __getitem__(self, index: slice) -> Tensor:
        start, stop, _ = index.indices(len(self))
        return self.rows[torch.arange(start, max(start, stop)) // self.n]


@dataclass(frozen=True)
class Request:
    """What a user asks a model for, from the command line, `CCLDDGPipeline` or the web page: text prompts, prompt
    images (each (3, H, W) in [-1, 1]) mixed with them by `image_weight`, a negative prompt, shapes attribute
    requests. A kind takes the fields in its `asks`."""

    prompts: tuple[str, ...] = ()
    images: tuple[Tensor, ...] = ()
    image_weight: float = 0.5
    negative_prompt: str | None = None
    attrs: tuple[dict[str, str], ...] = ()

    @property
    def given(self) -> tuple[str, ...]:
        """The REQUEST_FIELDS this request carries."""
        present = {"prompt": bool(self.prompts), "image": bool(self.images),
                   "negative_prompt": self.negative_prompt is not None, "attrs": bool(self.attrs)}
        return tuple(f for f in REQUEST_FIELDS if present[f])


# ---- the kind ------------------------------------------------------------------------------------------------
class ConditionKind:
    """One kind of conditioning (`cfg.cond`), registered by name in `conditioning.KINDS`."""

    name: ClassVar[str]
    described: ClassVar[str]  # "conditioned on ...", for messages
    asks: ClassVar[tuple[str, ...]] = ()  # the REQUEST_FIELDS a request may carry (the CLI and the web page offer them)
    required: ClassVar[tuple[str, ...]] = ()  # a request must carry one of these (none: it may ask for nothing)
    uses_encoder: ClassVar[bool] = False  # c is an embedder's (--encoder; a cache's embeddings; a folder's embedder)
    uses_labels: ClassVar[bool] = False  # c is made from an example's labels (a labelled source: shapes)

    @property
    def conditional(self) -> bool:
        """Whether a request can say anything to this kind's models (an unconditional model takes nothing)."""
        return bool(self.asks)

    # -- the nets
    def width(self, embed_dim: int) -> int:
        """The width of c (`embed_dim`: the run's embedder's, 0 without one)."""
        raise NotImplementedError

    def scale(self, embed_dim: int) -> float:
        """What the nets multiply c by (to inputs of about unit variance)."""
        return 1.0

    # -- what a run needs
    def check_config(self, cfg: TrainConfig) -> None:
        """Refuse settings this kind cannot train with (run_config.validate); by default, the encoder's."""
        if cfg.encoder:
            raise UserError(f"--encoder is only used by runs conditioned on embeddings (--cond embedding); this run "
                            f"has --cond {self.name}")
        if cfg.kid_every:
            raise UserError("--kid_every measures KID on the run's own embedder's features: it needs --cond embedding "
                            "(score other runs afterwards with cclddg eval --metrics kid --features SPEC)")

    def check_source(self, data: str, procedural: bool) -> None:
        """Refuse a data source (`--data`) that cannot give this kind's condition."""

    def check_cache(self, cache: Any) -> None:
        """Refuse a latent cache (`data.latent_cache.LatentCache`) that cannot give this kind's condition."""

    # -- training
    def training_condition(self, labels: Tensor | None, embeddings: tuple[Tensor, Tensor] | None,
                           cfg: TrainConfig, random: bool = True) -> Tensor | None:
        """A batch's conditions before dropout, from its label vectors and (image, caption) embeddings (those the
        kind uses); `random=False` (fixed grids) draws nothing from the RNG. None: the nets see no condition."""
        raise NotImplementedError

    # -- requests
    def request_conditions(self, requests: Sequence[dict[str, str]]) -> Tensor | None:
        """The conditions of shapes attribute requests ({"color": "red", ...}): evaluation, grids, `--attrs`."""
        raise NotImplementedError

    def conditions(self, request: Request, n: int, seed: int,
                   conditioner: Callable[[], PromptConditioner]) -> tuple[Any, Tensor | None]:
        """(n conditions per row of the request, as rows sliced batch by batch, or None for no condition; the
        negative prompt's condition or None). `conditioner()` gives the model's PromptConditioner."""
        if request.attrs:
            return RepeatedRows(self.request_conditions(list(request.attrs)), n), None
        return None, None

    def request_problem(self, request: Request, names: Mapping[str, str]) -> str | None:
        """What is wrong with a request for this kind's models, in the caller's `names` of the fields
        (CLI_NAMES, PIPELINE_NAMES); None when nothing is."""
        unwanted = [f for f in request.given if f not in self.asks]
        if unwanted:
            return f"this model is {self.described}: {names[unwanted[0]]} is not for it; {self.how_to_ask(names)}"
        if self.required and not any(f in request.given for f in self.required):
            return self.how_to_ask(names)
        return None

    def how_to_ask(self, names: Mapping[str, str]) -> str:
        if not self.asks:
            return "ask for nothing"
        return "give " + " or ".join(names[f] for f in (self.required or self.asks))

    def check_request(self, request: Request, names: Mapping[str, str]) -> None:
        problem = self.request_problem(request, names)
        if problem:
            raise UserError(problem)
