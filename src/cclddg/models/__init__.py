"""Generator UNet, discriminator and their shared blocks (diffusers ModelMixin: config.json + safetensors)."""

from __future__ import annotations

from torch import nn

from cclddg.models.discriminator import Discriminator
from cclddg.models.unet import UNet, seed_ch_mults


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those with requires_grad)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


__all__ = ["UNet", "Discriminator", "seed_ch_mults", "count_parameters"]
