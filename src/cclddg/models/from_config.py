"""The one mapping from a run's config to the networks' constructor arguments (the fields are named as the seed's
flags; the models take their own names). `cond_dim` and `cond_scale` come from the run's conditioning kind."""

from __future__ import annotations

from cclddg.config import TrainConfig
from cclddg.models.discriminator import Discriminator
from cclddg.models.unet import UNet


def generator_from_config(cfg: TrainConfig, cond_dim: int, cond_scale: float, z_dim: int) -> UNet:
    """The generator (or a diffusion model's ε network) of a run; `cond_dim` 0 when it never sees the condition."""
    return UNet(image_channels=cfg.latent_channels, n_channels=cfg.n_channels_unet, ch_mults=cfg.ch_mults,
                is_attn=cfg.is_attn, n_blocks=cfg.n_blocks, z_dim=z_dim, n_z_channels=cfg.n_z_channels,
                cond_dim=cond_dim, n_cond_channels=cfg.n_cond_channels, n_time_channels=cfg.n_time_channels,
                denom_factor=cfg.denom_factor, dropout=cfg.dropout, injection=cfg.injection,
                sample_size=cfg.latent_size, coord_channels=cfg.coord_channels, cond_map_size=cfg.cond_map_size,
                cond_scale=cond_scale, narrow_before_upsample=cfg.narrow_before_upsample)


def discriminator_from_config(cfg: TrainConfig, cond_dim: int, cond_scale: float) -> Discriminator:
    """The discriminator of a DDGAN run; `cond_dim` 0 when it never sees the condition."""
    n_cond = cfg.n_cond_channels_disc if cfg.n_cond_channels_disc > 0 else cfg.n_cond_channels
    return Discriminator(image_channels=cfg.latent_channels, n_channels=cfg.n_channels_disc,
                         ch_mults=cfg.ch_mults_disc, is_attn=cfg.is_attn_disc, n_blocks=cfg.n_blocks_disc,
                         cond_dim=cond_dim, n_cond_channels=n_cond, n_time_channels=cfg.n_time_channels,
                         denom_factor=cfg.denom_factor, injection=cfg.injection, sample_size=cfg.latent_size,
                         coord_channels=cfg.coord_channels, cond_scale=cond_scale, mid_block=cfg.mid_block_disc)
