"""Latent spaces (autoencoders), chosen everywhere with one spec string (`--autoencoder`).

    pixels            the identity: train on pixels
    kl-f8:PATH        latent diffusion's KL-f8 VAE: its model.ckpt, a diffusers folder or a .safetensors file
    taesd:PATH        TAESD (diffusers AutoencoderTiny) from a local folder
    own:RUN_DIR       a small KL autoencoder trained here with `cclddg train-ae`
"""

from __future__ import annotations

from pathlib import Path

import torch

from cclddg.encoders import weights_fingerprint
from cclddg.errors import UserError
from cclddg.latents.base import LatentSpace, PixelSpace, measure_scale

KINDS = ("pixels", "kl-f8", "taesd", "own")
EXAMPLES = "e.g. --autoencoder own:runs/ae, --autoencoder kl-f8:model.ckpt or --autoencoder pixels"


def parse_autoencoder_spec(spec: str) -> tuple[str, str | None]:
    """`pixels` -> ("pixels", None); `KIND:PATH` -> (kind, path)."""
    spec = spec or "pixels"
    if spec == "pixels":
        return "pixels", None
    kind, sep, path = spec.partition(":")
    if kind not in KINDS or kind == "pixels" or not sep or not path:
        raise UserError(f"--autoencoder {spec!r} is not valid: give pixels or KIND:PATH with KIND one of "
                        f"{', '.join(KINDS[1:])} ({EXAMPLES})")
    return kind, path


def absolute_autoencoder_spec(spec: str) -> str:
    """The same spec with its path made absolute, so a run folder can be used from anywhere."""
    kind, path = parse_autoencoder_spec(spec)
    return kind if path is None else f"{kind}:{Path(path).expanduser().resolve()}"


def load_latent_space(spec: str, device: str | torch.device = "cpu", scale: float | None = None,
                      decode_dtype: torch.dtype = torch.float32) -> LatentSpace:
    """The latent space behind a spec, frozen, on `device`, decoding in `decode_dtype`; `.spec`, `.fingerprint` and
    `.scale` set."""

    kind, path = parse_autoencoder_spec(spec)
    if kind == "pixels":
        space: LatentSpace = PixelSpace()
    else:
        if not Path(path).exists():
            raise UserError(f"--autoencoder {spec!r}: {path} does not exist")
        if kind == "kl-f8":
            from cclddg.latents.pretrained import load_kl_f8

            space = load_kl_f8(path)
        elif kind == "taesd":
            from cclddg.latents.pretrained import load_taesd

            space = load_taesd(path)
        else:
            from cclddg.latents.own_ae import load_own_ae

            space = load_own_ae(path)
        space.fingerprint = weights_fingerprint(path)
    space.spec = spec or "pixels"
    if scale is not None:
        space.scale = float(scale)
    return space.to(device).eval().requires_grad_(False).decode_in(decode_dtype)


__all__ = ["KINDS", "LatentSpace", "PixelSpace", "absolute_autoencoder_spec", "load_latent_space",
           "measure_scale", "parse_autoencoder_spec"]
