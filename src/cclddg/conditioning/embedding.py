"""`embedding`: an embedder's unit vectors (CLOOB, --encoder). In training each example is conditioned on its
image's embedding, or with probability pct_text on its caption's; LAFITE's pseudo-text (Zhou et al. 2022)
perturbs image embeddings, `c' = normalize(c + xi·|c|·e/|e|)`, so a generator trained on images alone also learns
the neighbourhood where text embeddings fall. Asked with text prompts (through the run's text prior, `priors/`)
and prompt images (embedded as they are), mixed (conditioning/prompts.py)."""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from cclddg.conditioning.base import ConditionKind, Request
from cclddg.conditioning.prompts import PromptConditioner
from cclddg.config import TrainConfig
from cclddg.encoders import parse_encoder_spec
from cclddg.errors import UserError


def pseudo_text(image_emb: Tensor, xi: float, generator: torch.Generator | None = None) -> Tensor:
    """LAFITE's fixed perturbation: normalize(c + xi·|c|·e/|e|), e ~ N(0, I); xi = 0 returns c unchanged."""
    if xi <= 0:
        return image_emb
    if generator is None:
        noise = torch.randn_like(image_emb)
    else:
        noise = torch.randn(image_emb.shape, generator=generator, device=generator.device).to(image_emb)
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


class Embedding(ConditionKind):
    name = "embedding"
    described = "conditioned on embeddings"
    asks = ("prompt", "image", "negative_prompt")
    required = ("prompt", "image")
    uses_encoder = True

    def width(self, embed_dim: int) -> int:
        return embed_dim

    def scale(self, embed_dim: int) -> float:
        """Unit embeddings have per-dimension values ~1/sqrt(dim); scaling by sqrt(dim) gives the nets inputs of
        unit variance, like the label vectors' ones (measured: much faster conditioning)."""
        return math.sqrt(embed_dim) if embed_dim else 1.0

    def check_config(self, cfg: TrainConfig) -> None:
        if not cfg.encoder:
            raise UserError("--cond embedding needs --encoder, e.g. --encoder cloob-tiny:runs/cloob "
                            "(train one with `cclddg train-cloob`)")
        parse_encoder_spec(cfg.encoder)

    def check_cache(self, cache) -> None:
        if not cache.embed_dim:
            raise UserError(f"{cache.path} holds no embeddings (encoded without --encoder); encode it with --encoder "
                            "or train with --cond labels/none")

    def training_condition(self, labels: Tensor | None, embeddings: tuple[Tensor, Tensor] | None,
                           cfg: TrainConfig, random: bool = True) -> Tensor:
        return training_condition(*embeddings, cfg.pct_text, cfg.pseudo_text_xi, random=random)

    def request_conditions(self, requests: Sequence[dict[str, str]]) -> Tensor:
        raise ValueError("an embedding run is asked with prompts (PromptConditioner), not label requests")

    def conditions(self, request: Request, n: int, seed: int,
                   conditioner: Callable[[], PromptConditioner]) -> tuple[Any, Tensor | None]:
        prompts_in = conditioner()
        rows = prompts_in.lazy(list(request.prompts), list(request.images), request.image_weight, n=n, seed=seed)
        return rows, prompts_in.negative(request.negative_prompt)


KIND = Embedding()
