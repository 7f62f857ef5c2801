"""`labels`: the shapes label vector (one-hot colour, shape and position blocks, each with an "unnamed" slot;
data/shapes.py), for the built-in shapes data. Asked with attribute requests (`--attrs color=red,...`)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from cclddg.conditioning.base import ConditionKind
from cclddg.config import TrainConfig
from cclddg.data.shapes import LABEL_DIM, attrs_to_label
from cclddg.errors import UserError


def label_condition(requests: Sequence[dict[str, str]]) -> Tensor:
    """The label vectors of shapes requests ({"color": "red", ...}; unnamed attributes stay unnamed)."""
    return torch.from_numpy(np.stack([attrs_to_label(r) for r in requests]))


class Labels(ConditionKind):
    name = "labels"
    described = "conditioned on shapes labels"
    asks = ("attrs",)
    uses_labels = True

    def width(self, embed_dim: int) -> int:
        return LABEL_DIM

    def check_source(self, data: str, procedural: bool) -> None:
        if not procedural:
            raise UserError(f"--data {data} has no class labels (only shapes do): use --cond embedding "
                            "--encoder SPEC (its images and captions), or --cond none")

    def check_cache(self, cache) -> None:
        if not cache.has_labels:
            raise UserError(f"{cache.path} holds no labels; train it with --cond embedding or none")

    def training_condition(self, labels: Tensor | None, embeddings: tuple[Tensor, Tensor] | None,
                           cfg: TrainConfig, random: bool = True) -> Tensor:
        return labels

    def request_conditions(self, requests: Sequence[dict[str, str]]) -> Tensor:
        return label_condition(requests)


KIND = Labels()
