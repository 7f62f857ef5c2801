"""A small KL autoencoder trained here (`cclddg train-ae`): diffusers' `AutoencoderKL` with a small config.

Users without pretrained weights (and the offline demo) still get a real latent space. The class is
the one latent diffusion's KL-f8 loads into, so everything downstream treats both the same way.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cclddg.errors import UserError
from cclddg.latents.vae import DiffusersVAE
from cclddg.storage import load_model


def build_autoencoder(widths: tuple[int, ...], latent_channels: int, layers_per_block: int = 1,
                      norm_groups: int = 8, attention: bool = False):
    """An AutoencoderKL downsampling by 2**(len(widths)-1); no mid-block attention by default (fully
    convolutional, so it can train on crops and run on any size)."""
    from diffusers import AutoencoderKL

    bad = [w for w in widths if w % norm_groups]
    if bad:
        raise UserError(f"widths {widths}: every width must be divisible by norm_groups {norm_groups}")
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=tuple(widths),
                         down_block_types=("DownEncoderBlock2D",) * len(widths),
                         up_block_types=("UpDecoderBlock2D",) * len(widths), layers_per_block=layers_per_block,
                         norm_num_groups=norm_groups, mid_block_add_attention=attention)


def find_model_folder(path: Path) -> Path:
    """The autoencoder folder in a `train-ae` run folder (latest checkpoint), a checkpoint, or the model itself."""
    latest = path / "checkpoints" / "latest"
    if latest.is_file():
        return path / "checkpoints" / latest.read_text().strip() / "autoencoder"
    if (path / "autoencoder" / "config.json").is_file():
        return path / "autoencoder"
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return path
    raise UserError(f"{path} holds no autoencoder (no checkpoints/latest, no model files); "
                    "point at a `cclddg train-ae` run folder")


def load_own_ae(path: str | Path, device: str | torch.device = "cpu") -> DiffusersVAE:
    from diffusers import AutoencoderKL

    path = Path(path)
    if not path.exists():
        raise UserError(f"autoencoder {path} does not exist; train one with `cclddg train-ae --out {path}`")
    return DiffusersVAE(load_model(AutoencoderKL, find_model_folder(path))).to(device)
