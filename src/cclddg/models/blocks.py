"""Building blocks shared by the generator UNet and the discriminator.

Small, flat modules. Every ResBlock takes one conditioning vector `emb` (step embedding, and,
when enabled, the embeddings of `c` and `z`, concatenated) and injects it either by adaptive
GroupNorm (default) or by the seed's additive bias.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cclddg.errors import UserError

INJECTIONS = ("adagn", "add")


# ----------------------------------------------------------------------------------------------
# config checks (shared by UNet and Discriminator; raise at construction, one line each)


def check_positive_int(name: str, value: object, allow_zero: bool = False) -> int:
    """Return `value` as an int, or raise UserError naming the knob."""
    ok = isinstance(value, int) and not isinstance(value, bool)
    lo = 0 if allow_zero else 1
    if not ok or value < lo:
        what = "a non-negative integer (0 turns it off)" if allow_zero else "a positive integer"
        raise UserError(f"{name}={value!r} is invalid: it must be {what}")
    return int(value)


def check_int_tuple(name: str, values: object) -> tuple[int, ...]:
    """A non-empty sequence of positive ints (configs loaded from json hold lists)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise UserError(f"{name}={values!r} is invalid: give a sequence of positive integers, e.g. (1, 2, 2)")
    out = tuple(values)
    if not out or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in out):
        raise UserError(f"{name}={values!r} is invalid: give a non-empty sequence of positive integers, e.g. (1, 2, 2)")
    return out


def check_bool_tuple(name: str, values: object, length: int, like: str) -> tuple[bool, ...]:
    """One bool per level, as many as `like` has entries."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise UserError(f"{name}={values!r} is invalid: give one True/False per level ({length} levels)")
    out = tuple(values)
    if any(not isinstance(v, (bool, int)) or v not in (0, 1) for v in out):
        raise UserError(f"{name}={values!r} is invalid: give one True/False per level ({length} levels)")
    out = tuple(bool(v) for v in out)
    if len(out) != length:
        raise UserError(
            f"{name} has {len(out)} entries but {like} has {length}: give one True/False per level"
        )
    return out


def check_cond_scale(value: object) -> float:
    """The factor conditioning vectors are multiplied by before the nets read them (> 0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise UserError(f"cond_scale={value!r} is invalid: it must be a number > 0")
    return float(value)


def check_common(
    *,
    image_channels: int,
    n_channels: int,
    ch_mults: object,
    is_attn: object,
    n_blocks: int,
    cond_dim: int,
    n_cond_channels: int,
    n_time_channels: int,
    denom_factor: float,
    dropout: float,
    norm_groups: int,
    injection: str,
    attn_heads: int,
    sample_size: int | None,
) -> tuple[tuple[int, ...], tuple[bool, ...], int]:
    """Validate the knobs both models share; return (ch_mults, is_attn, n_time_channels)."""
    check_positive_int("image_channels", image_channels)
    check_positive_int("n_channels", n_channels)
    mults = check_int_tuple("ch_mults", ch_mults)
    attn = check_bool_tuple("is_attn", is_attn, len(mults), "ch_mults")
    check_positive_int("n_blocks", n_blocks)
    check_positive_int("cond_dim", cond_dim, allow_zero=True)
    if cond_dim:
        check_positive_int("n_cond_channels", n_cond_channels)
    if n_time_channels == -1:
        n_time_channels = 4 * n_channels
    if isinstance(n_time_channels, bool) or not isinstance(n_time_channels, int) or n_time_channels < 8:
        raise UserError(
            f"n_time_channels={n_time_channels!r} is invalid: use an integer >= 8, or -1 for 4*n_channels"
        )
    if not isinstance(denom_factor, (int, float)) or not math.isfinite(denom_factor) or denom_factor <= 1:
        raise UserError(f"denom_factor={denom_factor!r} is invalid: it must be a number > 1 (default 16)")
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise UserError(f"dropout={dropout!r} is invalid: it must be in [0, 1)")
    check_positive_int("norm_groups", norm_groups)
    for m in mults:
        w = n_channels * m
        if w % norm_groups:
            raise UserError(
                f"norm_groups={norm_groups} does not divide the width {w} (n_channels={n_channels} x ch_mult {m}):"
                f" pick norm_groups dividing every n_channels*ch_mults[i]"
            )
    if injection not in INJECTIONS:
        raise UserError(f"injection={injection!r} is invalid: use one of {', '.join(map(repr, INJECTIONS))}")
    check_positive_int("attn_heads", attn_heads)
    for m, a in zip(mults, attn):
        if a and (n_channels * m) % attn_heads:
            raise UserError(
                f"attn_heads={attn_heads} does not divide the attention width {n_channels * m}:"
                f" pick attn_heads dividing n_channels*ch_mults[i] at every level with is_attn"
            )
    if sample_size is not None:
        check_positive_int("sample_size", sample_size)
        f = 2 ** (len(mults) - 1)
        if sample_size % f:
            raise UserError(
                f"sample_size={sample_size} is not divisible by {f} (2**(len(ch_mults)-1) with {len(mults)} levels):"
                f" use a multiple of {f} or fewer levels"
            )
    return mults, attn, n_time_channels


def check_spatial(x: torch.Tensor, image_channels: int, levels: int, name: str = "x") -> None:
    """Forward-time check of an NCHW input against the model's config (a caller's mistake: ValueError)."""
    if x.ndim != 4:
        raise ValueError(f"{name} must be a 4-D tensor (B, C, H, W); got shape {tuple(x.shape)}")
    if x.shape[1] != image_channels:
        raise ValueError(
            f"{name} has {x.shape[1]} channels but the model was built with image_channels={image_channels}"
        )
    f = 2 ** (levels - 1)
    if x.shape[2] % f or x.shape[3] % f:
        raise ValueError(
            f"{name} is {x.shape[2]}x{x.shape[3]}, but with {levels} levels H and W must be divisible by {f}:"
            f" pad/crop the input or use fewer ch_mults"
        )


def vector_or_null(
    v: torch.Tensor | None, dim: int, name: str, knob: str, batch: int, like: torch.Tensor
) -> torch.Tensor | None:
    """Check a (B, dim) conditioning input; None means the null embedding (zeros)."""
    if dim == 0:
        if v is not None:
            raise ValueError(f"{name} was given but the model was built with {knob}=0: pass {name}=None")
        return None
    if v is None:
        return like.new_zeros(batch, dim)
    if v.ndim != 2 or v.shape[1] != dim:
        feats = v.shape[-1] if v.ndim else 0
        raise ValueError(
            f"{name} has shape {tuple(v.shape)} ({feats} features) but the model was built with {knob}={dim}:"
            f" pass a (batch, {dim}) tensor"
        )
    if v.shape[0] != batch:
        raise ValueError(f"{name} has batch size {v.shape[0]} but x has {batch}")
    return v.to(dtype=like.dtype)


def steps_tensor(t: torch.Tensor | int, batch: int, device: torch.device) -> torch.Tensor:
    """Accept a (B,) tensor, a 0-dim tensor or a python int; return (B,) on `device`."""
    if not torch.is_tensor(t):
        t = torch.tensor(t, device=device)
    t = t.to(device)
    if t.ndim == 0 or (t.ndim == 1 and t.shape[0] == 1):
        return t.reshape(1).expand(batch)
    if t.ndim != 1 or t.shape[0] != batch:
        raise ValueError(f"t has shape {tuple(t.shape)}: pass an int or a (batch,)=({batch},) tensor of steps")
    return t


# ----------------------------------------------------------------------------------------------
# embeddings


class StepEmbedding(nn.Module):
    """Sinusoidal features of the integer step, then an MLP.

    Frequencies exp(-log(denom_factor) k / (half-1)): with few steps (t <= 8) a small
    denom_factor (16) keeps the features distinct instead of the usual 10000, where most
    channels barely move between t=1 and t=8.
    """

    def __init__(self, dim: int, denom_factor: float = 16.0, freq_dim: int | None = None):
        super().__init__()
        freq_dim = freq_dim if freq_dim is not None else max(4, dim // 4)
        self.half = max(2, freq_dim // 2)
        self.denom_factor = float(denom_factor)
        self.mlp = nn.Sequential(nn.Linear(2 * self.half, dim), nn.SiLU(), nn.Linear(dim, dim))

    def features(self, t: torch.Tensor) -> torch.Tensor:
        # Computed on the fly (no buffer): stays correct when diffusers loads on the meta device.
        k = torch.arange(self.half, device=t.device, dtype=torch.float32)
        freqs = torch.exp(-math.log(self.denom_factor) * k / (self.half - 1))
        args = t.float()[:, None] * freqs[None]
        return torch.cat([args.sin(), args.cos()], dim=1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        feats = self.features(t)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))


class MLPEmbedding(nn.Sequential):
    """Linear, SiLU, Linear: maps a conditioning vector (c or z) to its embedding width."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__(nn.Linear(in_dim, dim), nn.SiLU(), nn.Linear(dim, dim))


# ----------------------------------------------------------------------------------------------
# conv blocks

# On the CPU a convolution over at most this many pixels per image with at least this many weights runs as
# one matrix product over the batch (2.5-3x faster forward + backward there; benchmarks/cpu_step.py).
GEMM_MAX_PIXELS = 4
GEMM_MIN_WEIGHTS = 1_000_000


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameters and results) that computes a wide convolution over a tiny map as a matrix product.

    The seed's networks end in 1024-2048 channels at 2x2 pixels: there the weights are ~300x the activations and
    oneDNN's kernels, made for the opposite case, spent over half of a CPU training step in their backward.
    Unfolding the input (im2col) and multiplying once by the weight matrix reads the weights once per batch.
    Used for stride-1 "same" convolutions on the CPU; everything else is nn.Conv2d's own forward.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._as_matrix_product(x):
            return super().forward(x)
        b, _, h, w = x.shape
        k = self.kernel_size[0]
        if k == 1:
            cols = x.permute(0, 2, 3, 1).reshape(b * h * w, -1)
        else:
            cols = F.unfold(x, k, padding=k // 2).transpose(1, 2).reshape(b * h * w, -1)  # (B·HW, C·k·k)
        weight = self.weight.flatten(1).t()
        out = cols @ weight if self.bias is None else torch.addmm(self.bias, cols, weight)
        return out.view(b, h, w, -1).permute(0, 3, 1, 2)

    def _as_matrix_product(self, x: torch.Tensor) -> bool:
        k = self.kernel_size[0]
        return (x.device.type == "cpu" and x.dim() == 4 and x.shape[-2] * x.shape[-1] <= GEMM_MAX_PIXELS
                and self.weight.numel() >= GEMM_MIN_WEIGHTS and self.kernel_size == (k, k) and k % 2 == 1
                and self.padding == (k // 2, k // 2) and self.stride == (1, 1) and self.dilation == (1, 1)
                and self.groups == 1 and self.padding_mode == "zeros")


class ResBlock(nn.Module):
    """GN-SiLU-Conv, inject emb, GN-SiLU-Dropout-Conv, plus a (1x1) shortcut.

    "adagn": h = GN(h) * (1 + scale) + shift before the second conv, (scale, shift) from
    Linear(SiLU(emb)) initialised to zero, so the block starts unconditioned.
    "add": the seed's additive bias h = h + Linear(SiLU(emb)) after the first conv.
    The last conv is zero-initialised: every block starts as the identity, which keeps deep
    GAN generators stable early on.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        emb_dim: int,
        injection: str = "adagn",
        groups: int = 8,
        dropout: float = 0.0,
    ):
        super().__init__()
        if injection not in INJECTIONS:
            raise UserError(f"injection={injection!r} is invalid: use one of {', '.join(map(repr, INJECTIONS))}")
        self.injection = injection
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_ch if injection == "adagn" else out_ch)
        if injection == "adagn":
            nn.init.zeros_(self.emb_proj.weight)
            nn.init.zeros_(self.emb_proj.bias)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.shortcut = Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        e = self.emb_proj(F.silu(emb))[:, :, None, None]
        if self.injection == "adagn":
            scale, shift = e.chunk(2, dim=1)
            h = torch.addcmul(shift, self.norm2(h), 1 + scale)
        else:
            h = self.norm2(h + e)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.shortcut(x) + h


def twice_differentiable_attention() -> contextlib.AbstractContextManager:
    """Attention through a kernel that can be differentiated twice, for R1 (the gradient of D's input gradient):
    fused kernels (flash attention on CPU and GPU, memory-efficient on GPU) have no double backward; the math
    one has. Only the forward passes R1 differentiates need it."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3
        return torch.backends.cuda.sdp_kernel(enable_flash=False, enable_mem_efficient=False, enable_math=True)
    return sdpa_kernel(SDPBackend.MATH)


class SelfAttention(nn.Module):
    """Multi-head self-attention over spatial positions: GN pre-norm, residual, zero-init output."""

    def __init__(self, ch: int, heads: int = 4, groups: int = 8):
        super().__init__()
        if ch % heads:
            raise UserError(f"attn_heads={heads} does not divide the attention width {ch}")
        self.heads = heads
        self.norm = nn.GroupNorm(groups, ch)
        self.qkv = Conv2d(ch, 3 * ch, 1)
        self.out = Conv2d(ch, ch, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, hh * ww)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (B, heads, HW, d)
        h = F.scaled_dot_product_attention(q, k, v)
        h = h.transpose(-1, -2).reshape(b, c, hh, ww)
        return x + self.out(h)


class Downsample(nn.Module):
    """Halve H and W with a learned stride-2 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour then a 3x3 conv (no checkerboard of transposed convs)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def widths(n_channels: int, ch_mults: Sequence[int]) -> list[int]:
    """Channel width of each level (n_channels * mult, not cumulative)."""
    return [n_channels * m for m in ch_mults]


def append_coords(x: torch.Tensor) -> torch.Tensor:
    """x with two more channels holding the pixel's (x, y) position in [-1, 1] (CoordConv).

    Convolutions are translation-equivariant, so a global conditioning vector alone struggles to say
    *where* something goes; the coordinates make absolute position as easy to learn as colour.
    """
    b, _, h, w = x.shape
    ys = torch.linspace(-1.0, 1.0, h, device=x.device, dtype=x.dtype).view(1, 1, h, 1).expand(b, 1, h, w)
    xs = torch.linspace(-1.0, 1.0, w, device=x.device, dtype=x.dtype).view(1, 1, 1, w).expand(b, 1, h, w)
    return torch.cat([x, xs, ys], dim=1)


class SpatialConditioning(nn.Module):
    """A map (channels x k x k) made from the conditioning vector, resized to the bottleneck and added there.

    Scale/shift modulation is the same at every pixel, so it can say *what* but only slowly *where*;
    like a conditional GAN generator's first (linear -> spatial) layer, this map says where directly.
    Zero-initialised, so a model starts as if it were off.
    """

    def __init__(self, emb_dim: int, channels: int, size: int):
        super().__init__()
        self.channels, self.size = channels, size
        self.proj = nn.Linear(emb_dim, channels * size * size)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, emb: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        m = self.proj(F.silu(emb)).view(-1, self.channels, self.size, self.size)
        if tuple(hw) != (self.size, self.size):
            m = F.interpolate(m, size=tuple(hw), mode="bilinear", align_corners=False)
        return m
