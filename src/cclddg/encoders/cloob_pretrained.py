"""The pretrained CLOOB ViT-B/16 of the cloob-training project, in plain PyTorch.

Where the weights come from
---------------------------
cloob-training (github.com/crowsonkb/cloob-training) trained CLOOB on LAION-400M in JAX/Haiku and
published two checkpoints, listed in its `cloob_training/pretrained_configs/*.json`:

- cloob_laion_400m_vit_b_16_16_epochs  SHA-256 405a3c31572e0a38f8632fa0db704d0e4521ad663555479f86babd3d178b1892
- cloob_laion_400m_vit_b_16_32_epochs  SHA-256 646f61628eb4bc03a01ce5c23b727a348105f0405b6037a329da062739a06441

originally hosted at https://the-eye.eu/public/AI/models/cloob/<name>-<sha256>.pkl (~600 MB each).
Each file is a pickle `{'params': (image_params, text_params), ...}`; both halves map Haiku module
paths ('vi_t_image_encoder/~/layer_0/~/feed_forward/~/linear_0', ...) to dicts of numpy arrays.

What this module does
---------------------
`load_pretrained_cloob(path)` reads such a pickle WITHOUT running code from it (`safe_pickle`),
renames and transposes the arrays into the torch modules below, infers the sizes from the array
shapes, and caches the result as `<stem>.safetensors` beside the pickle (weights plus the config
as JSON metadata), which later loads read instead (much faster, and no pickle involved).

The architecture follows the project's own PyTorch port (`cloob_training/model_pt.py`): pre-norm
transformer blocks with biased q/k/v/out projections and an exact-GELU MLP, no final layer norm,
the class token (image) or the FIRST token (text) projected and L2-normalised. One quirk of that
port is reproduced on purpose, see `Block.attention`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from cclddg.encoders.base import Embedder
from cclddg.encoders.clip_tokenizer import CLIPTokenizer, default_tokenizer
from cclddg.encoders.safe_pickle import load_pickle_arrays
from cclddg.errors import UserError
from cclddg.storage import save_tensors_atomic

KNOWN_SHA256 = {
    "cloob_laion_400m_vit_b_16_16_epochs": "405a3c31572e0a38f8632fa0db704d0e4521ad663555479f86babd3d178b1892",
    "cloob_laion_400m_vit_b_16_32_epochs": "646f61628eb4bc03a01ce5c23b727a348105f0405b6037a329da062739a06441",
}
CONFIG_METADATA_KEY = "cclddg_cloob_config"
IMAGE_ROOT = "vi_t_image_encoder"
TEXT_ROOT = "text_encoder"


# ---------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class ImageTowerConfig:
    image_size: int = 224
    patch_size: int = 16
    n_layers: int = 12
    width: int = 768
    n_heads: int = 12

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class TextTowerConfig:
    n_layers: int = 12
    width: int = 512
    n_heads: int = 8
    context: int = 77
    vocab_size: int = 49408  # the end-of-text token is the last id, as in CLIP's vocabulary


@dataclass(frozen=True)
class CLOOBConfig:
    """Sizes of both towers; the defaults are the published ViT-B/16."""

    d_embed: int = 512
    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)  # of [0, 1] RGB pixels
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    def validate(self) -> CLOOBConfig:
        """Reject sizes the modules cannot be built with, in the user's terms."""
        for tower, width, heads in (("image", self.image.width, self.image.n_heads),
                                    ("text", self.text.width, self.text.n_heads)):
            if heads < 1 or width % heads:
                raise UserError(f"the {tower} tower's width {width} cannot be split into {heads} attention heads")
        if self.image.patch_size < 1 or self.image.image_size % self.image.patch_size:
            raise UserError(f"image size {self.image.image_size} is not a multiple of the patch size "
                            f"{self.image.patch_size}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise UserError("the normalisation needs three means and three positive standard deviations")
        return self

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "the config") -> CLOOBConfig:
        try:
            raw = json.loads(text)
            return cls(d_embed=int(raw["d_embed"]), image=ImageTowerConfig(**raw["image"]),
                       text=TextTowerConfig(**raw["text"]), mean=tuple(raw["mean"]), std=tuple(raw["std"]))
        except (ValueError, TypeError, KeyError) as e:
            raise UserError(f"{source} holds an unreadable CLOOB config: {e}") from None


VIT_B16 = CLOOBConfig()


def default_heads(width: int) -> int:
    """Head count for a width when the checkpoint cannot tell: 64 channels per head, as in ViT-B."""
    return max(1, width // 64)


# ---------------------------------------------------------------------------------------------- modules


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, width: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.attn_norm = nn.LayerNorm(width, eps=1e-5)
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        self.out = nn.Linear(width, width)
        self.ff_norm = nn.LayerNorm(width, eps=1e-5)
        self.ff_in = nn.Linear(width, 4 * width)
        self.ff_out = nn.Linear(4 * width, width)

    def attention(self, x: Tensor, query_mask: Tensor | None) -> Tensor:
        """Multi-head self-attention scaled by 1/sqrt(head width).

        QUIRK, kept on purpose: cloob-training masks padding along the QUERY axis, not the key axis.
        Rows of masked queries get all their logits set to -1e30, so their softmax is uniform over
        every key (their output is the plain mean of the values), while keys are never masked: the
        first token, whose output becomes the embedding, also attends to the padding positions.
        The published embeddings were trained and computed this way, so it is reproduced exactly
        (uniform rows are written as the mean of v, the other rows are unmasked attention).
        """
        b, s, d = x.shape
        q, k, v = (lin(x).view(b, s, self.n_heads, d // self.n_heads).transpose(1, 2)
                   for lin in (self.query, self.key, self.value))
        out = F.scaled_dot_product_attention(q, k, v)
        if query_mask is not None:
            out = torch.where(query_mask[:, None, :, None], out, v.mean(dim=2, keepdim=True))
        return self.out(out.transpose(1, 2).reshape(b, s, d))

    def forward(self, x: Tensor, query_mask: Tensor | None = None) -> Tensor:
        x = x + self.attention(self.attn_norm(x), query_mask)
        return x + self.ff_out(F.gelu(self.ff_in(self.ff_norm(x))))


class ImageTower(nn.Module):
    """ViT: patch embedding (no bias), class token, learned positions, blocks, projected class token."""

    def __init__(self, config: CLOOBConfig) -> None:
        super().__init__()
        c = config.image
        self.image_size = c.image_size
        self.patch_embed = nn.Conv2d(3, c.width, c.patch_size, stride=c.patch_size, bias=False)
        self.class_embed = nn.Parameter(torch.zeros(c.width))
        self.pos_embed = nn.Parameter(torch.zeros(1 + c.n_patches, c.width))
        self.blocks = nn.ModuleList(Block(c.width, c.n_heads) for _ in range(c.n_layers))
        self.proj = nn.Linear(c.width, config.d_embed)

    def tokens(self, pixels: Tensor) -> Tensor:
        """Normalised (B, 3, S, S) pixels -> the (B, 1 + patches, width) sequence the blocks read."""
        x = self.patch_embed(pixels).flatten(2).transpose(1, 2)
        cls = self.class_embed.expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + self.pos_embed

    def forward(self, pixels: Tensor) -> Tensor:
        if pixels.shape[-2:] != (self.image_size, self.image_size):
            raise UserError(f"the image tower reads {self.image_size}x{self.image_size} pixels, "
                            f"got {tuple(pixels.shape[-2:])}")
        x = self.tokens(pixels)
        for block in self.blocks:
            x = block(x)
        return F.normalize(self.proj(x[:, 0]), dim=-1)


class TextTower(nn.Module):
    """Transformer over CLIP tokens; the embedding is read at the first (start) token."""

    def __init__(self, config: CLOOBConfig) -> None:
        super().__init__()
        c = config.text
        self.eot_token = c.vocab_size - 1
        self.embed = nn.Embedding(c.vocab_size, c.width)
        self.pos_embed = nn.Parameter(torch.zeros(c.context, c.width))
        self.blocks = nn.ModuleList(Block(c.width, c.n_heads) for _ in range(c.n_layers))
        self.proj = nn.Linear(c.width, config.d_embed)

    def query_mask(self, ids: Tensor) -> Tensor:
        """True up to and including the first end-of-text token (no end token BEFORE the position)."""
        is_eot = ids == self.eot_token
        return (is_eot.cumsum(-1) - is_eot.long()) == 0

    def tokens(self, ids: Tensor) -> Tensor:
        return self.embed(ids) + self.pos_embed[:ids.shape[1]]

    def forward(self, ids: Tensor) -> Tensor:
        if ids.shape[1] > self.pos_embed.shape[0]:
            raise UserError(f"the text tower reads at most {self.pos_embed.shape[0]} tokens, got {ids.shape[1]}")
        mask = self.query_mask(ids)
        x = self.tokens(ids)
        for block in self.blocks:
            x = block(x, mask)
        return F.normalize(self.proj(x[:, 0]), dim=-1)


class PretrainedCLOOB(Embedder):
    """CLOOB image and text towers behind the `Embedder` interface."""

    def __init__(self, config: CLOOBConfig = VIT_B16, tokenizer: CLIPTokenizer | None = None) -> None:
        super().__init__()
        self.config = config.validate()
        self.dim = config.d_embed
        self.max_text_tokens = config.text.context
        self.image = ImageTower(config)
        self.text = TextTower(config)
        self.register_buffer("pixel_mean", torch.tensor(config.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(config.std).view(1, 3, 1, 1), persistent=False)
        self._tokenizer = tokenizer

    @property
    def tokenizer(self) -> CLIPTokenizer:
        """The CLIP tokenizer, read on first use so image-only use needs no vocabulary file."""
        if self._tokenizer is None:
            self._tokenizer = default_tokenizer()
        if len(self._tokenizer) != self.config.text.vocab_size:
            raise UserError(f"the text tower has a vocabulary of {self.config.text.vocab_size} tokens but the "
                            f"CLIP tokenizer has {len(self._tokenizer)}")
        return self._tokenizer

    def preprocess(self, images: Tensor) -> Tensor:
        """[-1, 1] images of any size -> [0, 1], shorter side resized (bicubic, antialiased), centre
        crop, normalised: what the towers were trained on."""
        size = self.config.image.image_size
        x = (images + 1) / 2
        h, w = x.shape[-2:]
        if min(h, w) != size:
            short = min(h, w)
            new_h, new_w = (size, int(size * w / short)) if h <= w else (int(size * h / short), size)
            x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
        top = round((x.shape[-2] - size) / 2)
        left = round((x.shape[-1] - size) / 2)
        x = x[..., top:top + size, left:left + size]
        return (x - self.pixel_mean) / self.pixel_std

    def _embed_images(self, images: Tensor) -> Tensor:
        return self.image(self.preprocess(images))

    def _embed_texts(self, texts: list[str]) -> Tensor:
        ids = self.tokenizer(texts, context_length=self.config.text.context)
        return self.text(ids.to(self.device))

    def count_tokens(self, text: str) -> int:
        return self.tokenizer.count_tokens(text)


# ---------------------------------------------------------------------------------------------- conversion


def _linear_weight(t: Tensor) -> Tensor:
    """Haiku stores Linear weights as (in, out); torch wants (out, in)."""
    return t.t()


def _conv_weight(t: Tensor) -> Tensor:
    """Haiku Conv2D kernels are HWIO; torch wants OIHW."""
    return t.permute(3, 2, 0, 1)


Fields = dict[str, tuple[str, Callable[[Tensor], Tensor] | None, int]]  # array -> (torch name, fix, ndim)
_LINEAR: Fields = {"w": ("weight", _linear_weight, 2), "b": ("bias", None, 1)}
_NORM: Fields = {"scale": ("weight", None, 1), "offset": ("bias", None, 1)}

# Haiku path below a tower's root -> (torch module name, fields)
_BLOCK_GROUPS: dict[tuple[str, ...], tuple[str, Fields]] = {
    ("self_attention", "layer_norm"): ("attn_norm", _NORM),
    ("self_attention", "multi_head_attention", "query"): ("query", _LINEAR),
    ("self_attention", "multi_head_attention", "key"): ("key", _LINEAR),
    ("self_attention", "multi_head_attention", "value"): ("value", _LINEAR),
    ("self_attention", "multi_head_attention", "linear"): ("out", _LINEAR),
    ("feed_forward", "layer_norm"): ("ff_norm", _NORM),
    ("feed_forward", "linear_0"): ("ff_in", _LINEAR),
    ("feed_forward", "linear_1"): ("ff_out", _LINEAR),
}
_IMAGE_GROUPS: dict[tuple[str, ...], tuple[str, Fields]] = {
    (): ("", {"class_embed": ("class_embed", None, 1)}),
    ("embed",): ("", {"w": ("patch_embed.weight", _conv_weight, 4)}),
    ("pos_embed",): ("", {"w": ("pos_embed", None, 2)}),
    ("proj",): ("proj", _LINEAR),
}
_TEXT_GROUPS: dict[tuple[str, ...], tuple[str, Fields]] = {
    ("embed",): ("", {"embeddings": ("embed.weight", None, 2)}),
    ("pos_embed",): ("", {"w": ("pos_embed", None, 2)}),
    ("proj",): ("proj", _LINEAR),
}


def _as_tensor(array: Any, ndim: int, where: str, source: str) -> Tensor:
    if not isinstance(array, np.ndarray) or not np.issubdtype(array.dtype, np.floating):
        raise UserError(f"{source} is not a cloob-training checkpoint: {where} is {type(array).__name__}"
                        f"{'' if not isinstance(array, np.ndarray) else ' of ' + str(array.dtype)}, not a float array")
    if array.ndim != ndim:
        raise UserError(f"{source}: {where} has shape {array.shape}, expected {ndim} dimensions")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _group_target(rest: tuple[str, ...], groups: dict[tuple[str, ...], tuple[str, Fields]]) -> tuple[str, Fields] | None:
    """Which torch module a Haiku path (below the tower's root) fills, or None if unknown."""
    if rest in groups:
        return groups[rest]
    layer = re.fullmatch(r"layer_(\d+)", rest[0]) if rest else None
    if layer and rest[1:] in _BLOCK_GROUPS:
        name, fields = _BLOCK_GROUPS[rest[1:]]
        return f"blocks.{int(layer.group(1))}.{name}", fields
    return None


def convert_tower(params: dict, root: str, prefix: str, source: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """One tower's Haiku params -> (torch state dict entries, torch name -> Haiku name for messages)."""
    groups = _IMAGE_GROUPS if root == IMAGE_ROOT else _TEXT_GROUPS
    state: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    for key, arrays in params.items():
        parts = [p for p in str(key).split("/") if p not in ("", "~")]  # '/~/' and '/' both occur
        target = _group_target(tuple(parts[1:]), groups) if parts and parts[0] == root else None
        if target is None or not isinstance(arrays, dict):
            raise UserError(f"{source} is not a cloob-training checkpoint: unexpected parameter group {key!r} "
                            f"(expected names under {root!r})")
        module, fields = target
        for name, array in arrays.items():
            if name not in fields:
                raise UserError(f"{source} is not a cloob-training checkpoint: unexpected array {key!r}[{name!r}]")
            suffix, fix, ndim = fields[name]
            where = f"{key}[{name!r}]"
            tensor = _as_tensor(array, ndim, where, source)
            torch_name = ".".join(p for p in (prefix, module, suffix) if p)
            state[torch_name] = fix(tensor) if fix else tensor
            origin[torch_name] = where
    return state, origin


def convert_checkpoint(obj: Any, source: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The unpickled `{'params': (image, text)}` -> a torch state dict for `PretrainedCLOOB`."""
    if not isinstance(obj, dict) or "params" not in obj:
        found = f"a dict with keys {sorted(map(str, obj))[:5]}" if isinstance(obj, dict) else type(obj).__name__
        raise UserError(f"{source} is not a cloob-training checkpoint: expected a dict with 'params', found {found}")
    params = obj["params"]
    if not isinstance(params, (tuple, list)) or len(params) != 2 or not all(isinstance(p, dict) for p in params):
        raise UserError(f"{source} is not a cloob-training checkpoint: 'params' should be a pair of dicts "
                        f"(image tower, text tower), found {type(params).__name__}")
    image_state, image_origin = convert_tower(params[0], IMAGE_ROOT, "image", source)
    text_state, text_origin = convert_tower(params[1], TEXT_ROOT, "text", source)
    return {**image_state, **text_state}, {**image_origin, **text_origin}


def _shape(state: dict[str, Tensor], name: str, source: str) -> tuple[int, ...]:
    if name not in state:
        raise UserError(f"{source} is not a complete CLOOB checkpoint: it has no weight for {name}")
    return tuple(state[name].shape)


def _count_layers(state: dict[str, Tensor], prefix: str) -> int:
    n = 0
    while f"{prefix}.blocks.{n}.query.weight" in state:
        n += 1
    return n


def infer_config(state: dict[str, Tensor], source: str, n_heads_image: int | None = None,
                 n_heads_text: int | None = None, stored: CLOOBConfig | None = None) -> CLOOBConfig:
    """Sizes from the weights' shapes; heads (which shapes cannot tell) from the arguments, else the
    stored config, else 64 channels per head."""
    width, _, patch, _ = _shape(state, "image.patch_embed.weight", source)
    n_pos = _shape(state, "image.pos_embed", source)[0]
    grid = math.isqrt(max(n_pos - 1, 0))
    if grid * grid != n_pos - 1 or grid == 0:
        raise UserError(f"{source}: the image position table has {n_pos} rows, not 1 + a square number of patches")
    d_embed = _shape(state, "image.proj.weight", source)[0]
    vocab, text_width = _shape(state, "text.embed.weight", source)
    context = _shape(state, "text.pos_embed", source)[0]
    text_d_embed = _shape(state, "text.proj.weight", source)[0]
    if text_d_embed != d_embed:
        raise UserError(f"{source}: the image tower embeds into {d_embed} dimensions but the text tower into "
                        f"{text_d_embed}")
    heads_i = n_heads_image or (stored.image.n_heads if stored else default_heads(width))
    heads_t = n_heads_text or (stored.text.n_heads if stored else default_heads(text_width))
    base = stored or VIT_B16
    return CLOOBConfig(
        d_embed=d_embed,
        image=ImageTowerConfig(image_size=grid * patch, patch_size=patch, n_layers=_count_layers(state, "image"),
                               width=width, n_heads=heads_i),
        text=TextTowerConfig(n_layers=_count_layers(state, "text"), width=text_width, n_heads=heads_t,
                             context=context, vocab_size=vocab),
        mean=base.mean, std=base.std,
    ).validate()


def load_weights(model: PretrainedCLOOB, state: dict[str, Tensor], source: str,
                 origin: dict[str, str] | None = None) -> None:
    """Copy `state` into `model`, naming the first missing, misshapen or unexpected tensor."""
    origin = origin or {}
    expected = model.state_dict()
    for name, target in expected.items():
        if name not in state:
            raise UserError(f"{source} does not fit this CLOOB config: it has no weight for {name}")
        if tuple(state[name].shape) != tuple(target.shape):
            where = f" ({origin[name]})" if name in origin else ""
            raise UserError(f"{source} does not fit this CLOOB config: {name}{where} has shape "
                            f"{tuple(state[name].shape)}, the config needs {tuple(target.shape)}")
    extra = [name for name in state if name not in expected]
    if extra:
        where = f" ({origin[extra[0]]})" if extra[0] in origin else ""
        raise UserError(f"{source} does not fit this CLOOB config: unexpected weight {extra[0]}{where}")
    model.load_state_dict(state)


# ---------------------------------------------------------------------------------------------- files


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks (the checkpoints are ~600 MB)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def check_known_hash(path: Path) -> None:
    """Warn when a file named like a published checkpoint is not byte-identical to it."""
    for name, expected in KNOWN_SHA256.items():
        if path.name.startswith(name):
            actual = sha256_file(path)
            if actual != expected:
                warnings.warn(f"{path.name} is named like {name} but its SHA-256 is {actual[:16]}..., not "
                              f"{expected[:16]}...: a damaged download or another model; embeddings may be off",
                              UserWarning, stacklevel=3)
            return


def cache_path(pkl: Path) -> Path:
    return pkl.with_suffix(".safetensors")


def _cache_is_fresh(pkl: Path, cache: Path) -> bool:
    """The cache stands for the pickle unless the pickle changed after it was written."""
    return cache.is_file() and cache.stat().st_mtime_ns >= pkl.stat().st_mtime_ns


def read_converted(path: Path) -> tuple[dict[str, Tensor], CLOOBConfig | None]:
    """A converted `.safetensors` file -> (state dict, the config stored with it if any)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            names = f.keys()
            state = {name: f.get_tensor(name) for name in names}
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except (OSError, SafetensorError, ValueError, RuntimeError) as e:
        raise UserError(f"{path} is not a readable safetensors file: {' '.join(str(e).split())}") from None
    stored = meta.get(CONFIG_METADATA_KEY)
    return state, (CLOOBConfig.from_json(stored, str(path)) if stored else None)


def write_converted(path: Path, model: PretrainedCLOOB) -> bool:
    """Write the weights and config to `path` atomically (temp file + rename); False if the folder
    is not writable, which only costs the speed-up."""

    state = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    try:
        save_tensors_atomic(path, state, metadata={"format": "pt", CONFIG_METADATA_KEY: model.config.to_json()})
        return True
    except (OSError, SafetensorError):
        return False


def build_model(state: dict[str, Tensor], source: str, stored: CLOOBConfig | None = None,
                origin: dict[str, str] | None = None, config: CLOOBConfig | None = None,
                n_heads_image: int | None = None, n_heads_text: int | None = None) -> PretrainedCLOOB:
    """A torch state dict -> `PretrainedCLOOB`, sized by `config` or else by the weights' shapes."""
    if config is None:
        cfg = infer_config(state, source, n_heads_image, n_heads_text, stored)
    else:
        cfg = replace(config, image=replace(config.image, n_heads=n_heads_image or config.image.n_heads),
                      text=replace(config.text, n_heads=n_heads_text or config.text.n_heads)).validate()
    model = PretrainedCLOOB(cfg)
    load_weights(model, state, source, origin)
    return model


def load_pretrained_cloob(path: str | Path, device: str | torch.device = "cpu", n_heads_image: int | None = None,
                          n_heads_text: int | None = None, config: CLOOBConfig | None = None) -> PretrainedCLOOB:
    """A cloob-training checkpoint (`.pkl`) or its conversion (`.safetensors`) -> a frozen `PretrainedCLOOB`.

    A `.pkl` is converted on first load and cached as `<stem>.safetensors` beside it; the cache is
    used while it is at least as new as the pickle (a cache that cannot be read, or does not fit,
    is rebuilt). `config` forces the sizes (default: read from the weights); the head counts can
    also be forced alone.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist; give a cloob-training checkpoint (.pkl) or its .safetensors "
                        "conversion")
    sizes = {"config": config, "n_heads_image": n_heads_image, "n_heads_text": n_heads_text}
    if path.suffix == ".safetensors":
        state, stored = read_converted(path)
        return build_model(state, str(path), stored, **sizes).to(device).eval().requires_grad_(False)
    cache = cache_path(path)
    if _cache_is_fresh(path, cache):
        try:
            state, stored = read_converted(cache)
            return build_model(state, str(cache), stored, **sizes).to(device).eval().requires_grad_(False)
        except UserError as e:
            if config is not None:  # a forced config that does not fit: the pickle would not fit either
                raise
            warnings.warn(f"ignoring the cached conversion: {e}; converting {path} again", UserWarning, stacklevel=2)
    state, origin = convert_checkpoint(load_pickle_arrays(path), str(path))
    model = build_model(state, str(path), None, origin, **sizes)
    check_known_hash(path)
    write_converted(cache, model)
    return model.to(device).eval().requires_grad_(False)
