"""The learned prior: p(image embedding | text embedding) as a small conditional flow in the embedding space.

A generator trained on image embeddings is asked with text through a prior that turns a text embedding into a
*sample* of the image embeddings that fit it (DALL-E 2's prior, Ramesh et al. 2022, here a rectified flow instead of
a diffusion model, and an MLP instead of a transformer: the condition is one vector). Being a density model and not
a lookup, it samples what a prompt leaves open with the data's frequencies, needs no bank of the data at sampling
time (a few MB at any data size), and can land where no training image is.

Rectified flow (Liu et al. 2023; Lipman et al. 2023's flow matching): with x0 ~ N(0, I), x1 an image embedding
scaled by sqrt(dim) (unit variance per entry) and s ~ U(0, 1), the net learns v(x_s, s, c) ≈ x1 - x0 at
x_s = (1 - s)·x0 + s·x1; sampling integrates dx/ds = v from s = 0 to 1 (Euler, `steps` evaluations) and normalises.
The condition c (the text embedding, scaled the same way) is dropped to zeros in training with probability
`cond_drop`, so the prior also knows the unconditional distribution and can be guided.

What it is trained on (training/prior_trainer.py; `source` and `condition_noise` record it): the captions' text
embeddings paired with their images', a little perturbed so that captions of one meaning share their images
(`captions`), or, language-free, LAFITE pseudo-text made from the image embeddings themselves (`pseudo-text`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import Tensor, nn

SAMPLE_STEPS = 16  # Euler steps of a draw (32 gave the same figures)


def time_features(s: Tensor, n: int) -> Tensor:
    """Sinusoidal features of the flow time s in [0, 1] (B,) -> (B, n)."""
    half = n // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=s.device, dtype=torch.float32) / half)
    angles = 1000.0 * s.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class FlowBlock(nn.Module):
    """A residual MLP block whose normalised input is scaled and shifted by the (time, condition) embedding."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.modulation = nn.Linear(width, 2 * width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.SiLU(), nn.Linear(2 * width, width))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        scale, shift = self.modulation(emb).chunk(2, dim=-1)
        return h + self.mlp(self.norm(h) * (1 + scale) + shift)


class FlowPrior(ModelMixin, ConfigMixin):
    """v(x_s, s, c): the velocity of the flow from noise to image embeddings, given a text embedding c."""

    @register_to_config
    def __init__(self, dim: int = 256, width: int = 1024, depth: int = 4, time_dim: int = 128,
                 cond_drop: float = 0.1, source: str = "captions", condition_noise: float = 0.0):
        super().__init__()
        self.x_in = nn.Linear(dim, width)
        self.cond_in = nn.Linear(dim, width)
        self.time_in = nn.Sequential(nn.Linear(time_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList(FlowBlock(width) for _ in range(depth))
        self.out_norm = nn.LayerNorm(width, elementwise_affine=False)
        self.out = nn.Linear(width, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs: Any) -> "FlowPrior":
        """diffusers' loading, in float32 whatever `torch_dtype` the pipeline's other models take: the prior is a
        few MB, and its draws are the conditions."""
        kwargs.pop("torch_dtype", None)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def to(self, *args: Any, **kwargs: Any) -> "FlowPrior":
        """Moves to a device; a dtype is ignored (the prior stays float32)."""
        device, _, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        if device is not None:
            nn.Module.to(self, device, non_blocking=non_blocking)
        return self

    @property
    def scale(self) -> float:
        """Unit embeddings times sqrt(dim) have entries of unit variance, like the noise."""
        return math.sqrt(self.config.dim)

    def forward(self, x: Tensor, s: Tensor, cond: Tensor) -> Tensor:
        """x: (B, dim) on the path (scaled units), s: (B,) in [0, 1], cond: (B, dim) scaled text embeddings
        (zeros: unconditional)."""
        emb = F.silu(self.time_in(time_features(s, self.config.time_dim)) + self.cond_in(cond))
        h = self.x_in(x) + emb
        for block in self.blocks:
            h = block(h, emb)
        return self.out(self.out_norm(h))

    def loss(self, image_emb: Tensor, cond_emb: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The flow-matching loss of unit image embeddings given unit condition embeddings (B, dim)."""
        b = len(image_emb)
        x1 = image_emb * self.scale
        x0 = torch.randn(x1.shape, generator=generator, device=x1.device)
        s = torch.rand(b, generator=generator, device=x1.device)
        keep = (torch.rand(b, 1, generator=generator, device=x1.device) >= self.config.cond_drop).float()
        cond = cond_emb * self.scale * keep
        x_s = (1 - s[:, None]) * x0 + s[:, None] * x1
        return F.mse_loss(self(x_s, s, cond).float(), x1 - x0)  # float: under bf16 autocast too

    @torch.no_grad()
    def sample(self, cond_emb: Tensor, generator: torch.Generator | None = None, steps: int = SAMPLE_STEPS,
               guidance: float = 1.0, guidance_start: float = 0.0) -> Tensor:
        """(B, dim) unit image embeddings, one drawn for each unit condition embedding (B, dim) by `steps` Euler
        steps from noise. `guidance` > 1 pushes away from the unconditional flow (classifier-free guidance) at flow
        times s >= `guidance_start`: guided from the start, the flow drops what the text leaves open; guided only
        once the draw has taken shape (as Kynkäänniemi et al. 2024 found for images), it keeps that variety and
        still follows the text where the data never showed it (measured in the README)."""
        device = next(self.parameters()).device
        cond = cond_emb.to(device=device, dtype=torch.float32) * self.scale
        x = torch.randn(cond.shape, generator=generator, device=generator.device if generator else "cpu").to(device)
        null = torch.zeros_like(cond)
        for i in range(steps):
            s = torch.full((len(x),), i / steps, device=device)
            v = self(x, s, cond)
            if guidance != 1.0 and i / steps >= guidance_start:
                v_null = self(x, s, null)
                v = v_null + guidance * (v - v_null)
            x = x + v / steps
        return F.normalize(x, dim=-1).to(cond_emb.dtype)
