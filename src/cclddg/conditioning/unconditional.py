"""`none`: no condition; the nets see the null one, and a request carries nothing."""

from __future__ import annotations

from typing import Sequence

from torch import Tensor

from cclddg.conditioning.base import ConditionKind
from cclddg.config import TrainConfig


class Unconditional(ConditionKind):
    name = "none"
    described = "unconditional (trained with --cond none)"

    def width(self, embed_dim: int) -> int:
        return 0

    def training_condition(self, labels: Tensor | None, embeddings: tuple[Tensor, Tensor] | None,
                           cfg: TrainConfig, random: bool = True) -> None:
        return None

    def request_conditions(self, requests: Sequence[dict[str, str]]) -> None:
        return None


KIND = Unconditional()
