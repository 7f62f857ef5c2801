"""The `LatentSpace` interface: images in [-1, 1] <-> latents of unit variance.

A latent space is an autoencoder seen from the diffusion model's side. Subclasses implement
`_encode` (images -> raw latents, e.g. the mean of a KL posterior) and `_decode` (raw latents ->
images); this class adds what every space needs: no gradients, batching, moving inputs to the
model's device, and the scale factor that gives the latents unit variance. The scale factor is
measured on the data (`measure_scale`), not hard-coded, and stored with the cache and the run.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from cclddg.errors import UserError


class LatentSpace(nn.Module):
    """An autoencoder, frozen. `channels` latent channels, `factor` spatial downsampling."""

    channels: int
    factor: int
    batch_size: int = 64

    def __init__(self) -> None:
        super().__init__()
        self.scale = 1.0  # raw latents * scale have unit variance on the data; set when made (load_latent_space)
        self.spec = ""
        self.fingerprint = ""

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    # ---- what subclasses implement -----------------------------------------------------------------
    def _encode(self, images: Tensor) -> Tensor:
        raise NotImplementedError

    def _decode(self, latents: Tensor) -> Tensor:
        raise NotImplementedError

    def decoder_modules(self) -> list[nn.Module]:
        """The modules `_decode` runs (what `decode_in` casts); none for a space without weights."""
        return []

    # ---- the public interface ------------------------------------------------------------------------
    def latent_shape(self, img_size: int) -> tuple[int, int, int]:
        if img_size % self.factor:
            raise UserError(f"image size {img_size} is not divisible by the autoencoder's downsampling "
                            f"factor {self.factor}; use a multiple of {self.factor}")
        return self.channels, img_size // self.factor, img_size // self.factor

    def with_scale(self, scale: float) -> LatentSpace:
        """This autoencoder (its weights shared, not copied) with another scale: a space's scale is fixed when it
        is made, so the scale a cache measured makes a new space instead of changing this one."""
        other = copy.copy(self)  # a new module object over the same parameter and submodule dicts
        other.scale = float(scale)
        return other

    def decode_in(self, dtype: torch.dtype) -> LatentSpace:
        """This space with its decoder cast to `dtype`, in place (e.g. bfloat16: 2x faster decoding on a CPU with
        native bf16); encoding stays float32 and `decode` still returns float32 images."""
        for module in self.decoder_modules():
            module.to(dtype)
        return self

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Images in [-1, 1], (B, 3, H, W) -> scaled latents (B, channels, H/factor, W/factor), float32."""
        return self.encode_unscaled(images) * self.scale

    @torch.no_grad()
    def encode_unscaled(self, images: Tensor) -> Tensor:
        """The raw latents (before the scale), e.g. to measure the scale."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise UserError(f"encode expects RGB images shaped (B, 3, H, W), got {tuple(images.shape)}")
        self.latent_shape(images.shape[-1])
        out = [self._encode(chunk.to(self.device, torch.float32)).float() for chunk in images.split(self.batch_size)]
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents -> images in [-1, 1], float32."""
        if latents.ndim != 4 or latents.shape[1] != self.channels:
            raise UserError(f"decode expects latents shaped (B, {self.channels}, h, w), got {tuple(latents.shape)}; "
                            "were they made with another autoencoder?")
        out = [self._decode(chunk.to(self.device, torch.float32) / self.scale).float()
               for chunk in latents.split(self.batch_size)]
        return torch.cat(out).clamp(-1, 1)


class PixelSpace(LatentSpace):
    """The identity: pixel-space training is latent training with this space."""

    channels = 3
    factor = 1

    def __init__(self) -> None:
        super().__init__()
        self.spec = "pixels"
        self.fingerprint = "pixels"

    def _encode(self, images: Tensor) -> Tensor:
        return images

    def _decode(self, latents: Tensor) -> Tensor:
        return latents


@torch.no_grad()
def measure_scale(space: LatentSpace, images: Tensor) -> float:
    """1 / std of the raw latents of `images`: the factor that gives the data's latents unit variance."""
    std = float(space.encode_unscaled(images).std())
    if not std > 0:
        raise UserError("the autoencoder's latents of these images have zero variance; is it trained?")
    return 1.0 / std
