"""The DDGAN discriminator: is x_prev a real denoising step from x_t, given t and c?"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from cclddg.errors import UserError
from cclddg.models.blocks import (
    Downsample,
    MLPEmbedding,
    ResBlock,
    SelfAttention,
    StepEmbedding,
    append_coords,
    check_common,
    check_cond_scale,
    check_spatial,
    steps_tensor,
    vector_or_null,
    widths,
)


class Discriminator(ModelMixin, ConfigMixin):
    """Residual downsampling encoder on concat(x_prev, x_t), conditioned on (t, c).

    logit = Linear(h) + <h, Embed(c)> (projection discriminator, Miyato & Koyama 2018): the
    inner product is what forces a conditional D to check that x_prev matches c, rather than
    only judging realism. h is the mean-pooled final feature map, so the logit scale does not
    grow with resolution.
    """

    @register_to_config
    def __init__(
        self,
        image_channels: int = 3,
        n_channels: int = 64,
        ch_mults: Sequence[int] = (1, 2, 2, 2),
        is_attn: Sequence[bool] = (False, False, False, False),
        n_blocks: int = 1,
        cond_dim: int = 0,
        n_cond_channels: int = 256,
        n_time_channels: int = -1,
        denom_factor: float = 16.0,
        dropout: float = 0.0,
        norm_groups: int = 8,
        injection: str = "adagn",
        attn_heads: int = 4,
        sample_size: int | None = None,
        coord_channels: bool = False,
        cond_scale: float = 1.0,
        mid_block: bool = False,
    ):
        super().__init__()
        mults, attn, n_time = check_common(
            image_channels=image_channels, n_channels=n_channels, ch_mults=ch_mults, is_attn=is_attn,
            n_blocks=n_blocks, cond_dim=cond_dim, n_cond_channels=n_cond_channels,
            n_time_channels=n_time_channels, denom_factor=denom_factor, dropout=dropout,
            norm_groups=norm_groups, injection=injection, attn_heads=attn_heads, sample_size=sample_size,
        )  # fmt: skip
        check_cond_scale(cond_scale)
        if not isinstance(mid_block, bool):
            raise UserError(f"mid_block={mid_block!r} is invalid: use True or False")
        ws = widths(n_channels, mults)
        self.levels = len(mults)

        self.step_emb = StepEmbedding(n_time, denom_factor)
        self.cond_emb = MLPEmbedding(cond_dim, n_cond_channels) if cond_dim else None
        emb_dim = n_time + (n_cond_channels if cond_dim else 0)

        self.conv_in = nn.Conv2d(2 * image_channels + (2 if coord_channels else 0), n_channels, 3, padding=1)
        ch = n_channels
        self.res, self.attn, self.downsample = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for i, w in enumerate(ws):
            for _ in range(n_blocks):
                self.res.append(ResBlock(ch, w, emb_dim, injection, norm_groups, dropout))
                self.attn.append(SelfAttention(w, attn_heads, norm_groups) if attn[i] else nn.Identity())
                ch = w
            if i < self.levels - 1:
                self.downsample.append(Downsample(ch))

        # the seed's middle block (ResBlock, attention, ResBlock) at the lowest resolution
        self.mid = None
        if mid_block:
            self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, injection, norm_groups, dropout),
                                      SelfAttention(ch, attn_heads, norm_groups),
                                      ResBlock(ch, ch, emb_dim, injection, norm_groups, dropout)])

        self.head = nn.Linear(ch, 1)
        self.proj = nn.Linear(cond_dim, ch, bias=False) if cond_dim else None

    def forward(
        self,
        x_prev: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor | int,
        c: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B,) that x_prev is a real step x_{t-1} from x_t."""
        cfg = self.config
        check_spatial(x_prev, cfg.image_channels, self.levels, "x_prev")
        if x_t.shape != x_prev.shape:
            raise ValueError(f"x_t has shape {tuple(x_t.shape)} but x_prev has {tuple(x_prev.shape)}: they must match")
        b = x_prev.shape[0]
        t = steps_tensor(t, b, x_prev.device)
        c = vector_or_null(c, cfg.cond_dim, "c", "cond_dim", b, x_prev)
        if c is not None and cfg.cond_scale != 1.0:
            c = c * cfg.cond_scale
        emb = self.step_emb(t)
        if self.cond_emb is not None:
            emb = torch.cat([emb, self.cond_emb(c)], dim=1)

        h = torch.cat([x_prev, x_t], dim=1)
        h = self.conv_in(append_coords(h) if self.config.coord_channels else h)
        n = cfg.n_blocks
        for i in range(self.levels):
            for j in range(i * n, (i + 1) * n):
                h = self.attn[j](self.res[j](h, emb))
            if i < self.levels - 1:
                h = self.downsample[i](h)
        if self.mid is not None:
            h = self.mid[2](self.mid[1](self.mid[0](h, emb)), emb)

        h = F.silu(h).mean(dim=(2, 3))  # (B, F)
        logit = self.head(h).squeeze(1)
        if self.proj is not None:
            logit = logit + (h * self.proj(c)).sum(dim=1)
        return logit
