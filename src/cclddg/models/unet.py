"""The generator: a conditional UNet predicting x_0 from (x_t, t, c, z)."""

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
    SpatialConditioning,
    StepEmbedding,
    Upsample,
    append_coords,
    check_common,
    check_cond_scale,
    check_positive_int,
    check_spatial,
    steps_tensor,
    vector_or_null,
    widths,
)


def seed_ch_mults(mults: Sequence[int]) -> tuple[int, ...]:
    """Convert the seed's per-level multipliers (relative to the previous level) to ours
    (relative to n_channels): their cumulative products. (1, 2, 2, 4) -> (1, 2, 4, 16)."""
    out: list[int] = []
    acc = 1
    for m in mults:
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise UserError(f"seed ch_mults {tuple(mults)!r} is invalid: give positive integers")
        acc *= m
        out.append(acc)
    return tuple(out)


class UNet(ModelMixin, ConfigMixin):
    """Conditional UNet: x_t, step t, conditioning c and latent z -> predicted x_0.

    Level i has width n_channels * ch_mults[i]. The step embedding, MLP(c) and MLP(z) are
    concatenated into one vector that every ResBlock receives. c=None / z=None mean the null
    embedding (zeros), which is also what classifier-free-guidance dropout feeds in training.
    """

    @register_to_config
    def __init__(
        self,
        image_channels: int = 3,
        n_channels: int = 64,
        ch_mults: Sequence[int] = (1, 2, 2, 2),
        is_attn: Sequence[bool] = (False, False, False, True),
        n_blocks: int = 2,
        z_dim: int = 8,
        n_z_channels: int = 64,
        cond_dim: int = 0,
        n_cond_channels: int = 256,
        n_time_channels: int = -1,
        denom_factor: float = 16.0,
        dropout: float = 0.0,
        norm_groups: int = 8,
        injection: str = "adagn",
        attn_heads: int = 4,
        sample_size: int | None = None,
        mid_attn: bool = True,
        coord_channels: bool = False,
        cond_map_size: int = 0,
        cond_scale: float = 1.0,
        narrow_before_upsample: bool = False,
    ):
        super().__init__()
        mults, attn, n_time = check_common(
            image_channels=image_channels, n_channels=n_channels, ch_mults=ch_mults, is_attn=is_attn,
            n_blocks=n_blocks, cond_dim=cond_dim, n_cond_channels=n_cond_channels,
            n_time_channels=n_time_channels, denom_factor=denom_factor, dropout=dropout,
            norm_groups=norm_groups, injection=injection, attn_heads=attn_heads, sample_size=sample_size,
        )  # fmt: skip
        check_cond_scale(cond_scale)
        check_positive_int("z_dim", z_dim, allow_zero=True)
        if z_dim:
            check_positive_int("n_z_channels", n_z_channels)
        if not isinstance(mid_attn, bool):
            raise UserError(f"mid_attn={mid_attn!r} is invalid: use True or False")
        if not isinstance(narrow_before_upsample, bool):
            raise UserError(f"narrow_before_upsample={narrow_before_upsample!r} is invalid: use True or False")
        if narrow_before_upsample and n_channels % norm_groups:
            raise UserError(f"norm_groups={norm_groups} does not divide n_channels={n_channels}, the width of the"
                            " last up block with narrow_before_upsample")
        ws = widths(n_channels, mults)
        if mid_attn and ws[-1] % attn_heads:
            raise UserError(
                f"attn_heads={attn_heads} does not divide the middle width {ws[-1]}: change attn_heads or set mid_attn=False"
            )
        self.levels = len(mults)

        # conditioning vector
        self.step_emb = StepEmbedding(n_time, denom_factor)
        self.cond_emb = MLPEmbedding(cond_dim, n_cond_channels) if cond_dim else None
        self.z_emb = MLPEmbedding(z_dim, n_z_channels) if z_dim else None
        emb_dim = n_time + (n_cond_channels if cond_dim else 0) + (n_z_channels if z_dim else 0)

        def res(i: int, o: int) -> ResBlock:
            return ResBlock(i, o, emb_dim, injection, norm_groups, dropout)

        def att(ch: int, on: bool) -> nn.Module:
            return SelfAttention(ch, attn_heads, norm_groups) if on else nn.Identity()

        # down path; skip_chs records the width of every tensor pushed on the skip stack
        self.conv_in = nn.Conv2d(image_channels + (2 if coord_channels else 0), n_channels, 3, padding=1)
        ch = n_channels
        skip_chs = [ch]
        self.down_res, self.down_attn, self.downsample = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for i, w in enumerate(ws):
            for _ in range(n_blocks):
                self.down_res.append(res(ch, w))
                self.down_attn.append(att(w, attn[i]))
                ch = w
                skip_chs.append(ch)
            if i < self.levels - 1:
                self.downsample.append(Downsample(ch))
                skip_chs.append(ch)

        check_positive_int("cond_map_size", cond_map_size, allow_zero=True)
        self.cond_map = SpatialConditioning(emb_dim, ch, cond_map_size) if cond_map_size else None
        self.mid_res1 = res(ch, ch)
        self.mid_attention = att(ch, mid_attn)
        self.mid_res2 = res(ch, ch)

        # up path: n_blocks + 1 blocks per level, each eats one skip. narrow_before_upsample (the seed's
        # layout): a level's last block already outputs the next level's width, so the upsample runs narrow.
        self.up_res, self.up_attn, self.upsample = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for i in reversed(range(self.levels)):
            for j in range(n_blocks + 1):
                w = ws[i]
                if narrow_before_upsample and j == n_blocks:
                    w = ws[i - 1] if i > 0 else n_channels
                self.up_res.append(res(ch + skip_chs.pop(), w))
                self.up_attn.append(att(w, attn[i]))
                ch = w
            if i > 0:
                self.upsample.append(Upsample(ch))

        self.norm_out = nn.GroupNorm(norm_groups, ch)
        self.conv_out = nn.Conv2d(ch, image_channels, 3, padding=1)

    def embed(self, t: torch.Tensor, c: torch.Tensor | None, z: torch.Tensor | None) -> torch.Tensor:
        """The conditioning vector every ResBlock sees: [step, MLP(c), MLP(z)]."""
        parts = [self.step_emb(t)]
        if self.cond_emb is not None:
            parts.append(self.cond_emb(c))
        if self.z_emb is not None:
            parts.append(self.z_emb(z))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | int,
        c: torch.Tensor | None = None,
        z: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict x_0 (same shape as x). t: int steps (B,) or scalar; c (B, cond_dim); z (B, z_dim)."""
        cfg = self.config
        check_spatial(x, cfg.image_channels, self.levels)
        b = x.shape[0]
        t = steps_tensor(t, b, x.device)
        c = vector_or_null(c, cfg.cond_dim, "c", "cond_dim", b, x)
        if c is not None and cfg.cond_scale != 1.0:
            c = c * cfg.cond_scale
        z = vector_or_null(z, cfg.z_dim, "z", "z_dim", b, x)
        emb = self.embed(t, c, z)

        h = self.conv_in(append_coords(x) if cfg.coord_channels else x)
        skips = [h]
        n = cfg.n_blocks
        for i in range(self.levels):
            for j in range(i * n, (i + 1) * n):
                h = self.down_attn[j](self.down_res[j](h, emb))
                skips.append(h)
            if i < self.levels - 1:
                h = self.downsample[i](h)
                skips.append(h)

        if self.cond_map is not None:
            h = h + self.cond_map(emb, h.shape[-2:])
        h = self.mid_res2(self.mid_attention(self.mid_res1(h, emb)), emb)

        for k in range(self.levels):
            for j in range(k * (n + 1), (k + 1) * (n + 1)):
                h = self.up_attn[j](self.up_res[j](torch.cat([h, skips.pop()], dim=1), emb))
            if k < self.levels - 1:
                h = self.upsample[k](h)

        return self.conv_out(F.silu(self.norm_out(h)))
