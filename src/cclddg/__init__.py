"""cclddg: CLOOB-conditioned latent denoising diffusion GANs."""

__version__ = "0.1.0"
