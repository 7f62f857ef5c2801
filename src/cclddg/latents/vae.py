"""A diffusers autoencoder (`AutoencoderKL` or `AutoencoderTiny`) as a `LatentSpace`."""

from __future__ import annotations

from torch import Tensor, nn

from cclddg.latents.base import LatentSpace


class DiffusersVAE(LatentSpace):
    """Wraps `diffusers.AutoencoderKL` (encodes to the posterior mean: deterministic caches) or
    `diffusers.AutoencoderTiny` (TAESD, a deterministic encoder)."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        cfg = vae.config
        self.channels = int(cfg.latent_channels)
        if hasattr(cfg, "encoder_block_out_channels"):  # AutoencoderTiny (it also registers block_out_channels)
            self.factor = _tiny_factor(cfg)
        else:  # AutoencoderKL: one downsampling per level but the last
            self.factor = 2 ** (len(cfg.block_out_channels) - 1)
        self.kl = hasattr(vae, "quant_conv")

    def _encode(self, images: Tensor) -> Tensor:
        out = self.vae.encode(images.to(self.vae.dtype))  # an exported pipeline's VAE may run in half precision
        if self.kl:
            return out.latent_dist.mode()
        return out.latents

    def _decode(self, latents: Tensor) -> Tensor:
        dtype = next(self.vae.decoder.parameters()).dtype  # the encoder's may differ (`decode_in`)
        return self.vae.decode(latents.to(dtype)).sample

    def decoder_modules(self) -> list[nn.Module]:
        return [m for m in (getattr(self.vae, "post_quant_conv", None), self.vae.decoder) if m is not None]


def _tiny_factor(cfg) -> int:
    """AutoencoderTiny downsamples once per encoder block group after the first (TAESD: 8)."""
    return 2 ** (len(cfg.encoder_block_out_channels) - 1)
