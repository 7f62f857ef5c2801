"""Our own small CLOOB: an image tower and a text tower trained on a captioned source (`cclddg train-cloob`).

Image tower: a small CNN with coordinate channels (so *where* the object is survives into the
embedding), flattened at 4x4 and projected. Text tower: by default the frozen pretrained sentence
encoder (all-MiniLM-L6-v2) with a trainable MLP head (`text_head="linear"`: a linear one; `"locked"`: none, so
the sentence encoder's own space is the joint space, as in LiT, and unseen wordings keep the neighbours the
encoder gives them); `text_tower="bpe"` is a small transformer over CLIP BPE tokens trained from scratch instead.
Only the trainable parts are saved (config.json + safetensors); the frozen encoder comes from its package.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import Tensor, nn

from cclddg.config import TEXT_HEADS, TEXT_TOWERS
from cclddg.encoders.base import Embedder
from cclddg.errors import UserError
from cclddg.models.blocks import append_coords
from cclddg.storage import load_model


def cloob_loss(image: Tensor, text: Tensor, inv_tau: float = 30.0, scale_hopfield: float = 15.0) -> Tensor:
    """CLOOB (Fürst et al. 2022): InfoLOOB on Hopfield-retrieved embeddings; inputs are unit vectors (B, d).

    Each embedding is replaced by a softmax-weighted average of the stored batch (images retrieve from
    images and from texts, texts likewise), renormalised; InfoLOOB then scores each positive pair against
    the negatives only (leave-one-out), which avoids InfoNCE's saturation. Rescaled as in cloob-training:
    divide by inv_tau / 2 for the paper's scale.
    """
    def retrieve(state: Tensor, stored: Tensor) -> Tensor:
        weights = torch.softmax(scale_hopfield * state @ stored.T, dim=-1)
        return F.normalize(weights @ stored, dim=-1)

    u_img, u_txt = retrieve(image, image), retrieve(text, text)  # each modality from itself
    v_img, v_txt = retrieve(text, image), retrieve(image, text)  # and from the other one
    return (info_loob(u_img, v_img, inv_tau) + info_loob(u_txt, v_txt, inv_tau)) / 2


def info_loob(anchors: Tensor, others: Tensor, inv_tau: float) -> Tensor:
    """-log( exp(s_ii) / sum_{j != i} exp(s_ij) ), averaged; s = inv_tau * cosine."""
    logits = inv_tau * anchors @ others.T
    eye = torch.eye(logits.shape[0], dtype=torch.bool, device=logits.device)
    positives = logits.diagonal()
    negatives = torch.logsumexp(logits.masked_fill(eye, float("-inf")), dim=-1)
    return (negatives - positives).mean()


class ConvBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)
        self.norm1 = nn.GroupNorm(min(8, c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(min(8, c_out), c_out)

    def forward(self, x: Tensor) -> Tensor:
        h = F.silu(self.norm1(self.conv1(x)))
        return h + F.silu(self.norm2(self.conv2(h)))


class BPETextTower(nn.Module):
    """A small pre-norm transformer over CLIP BPE tokens, read out at the end-of-text token."""

    def __init__(self, width: int, layers: int, heads: int, context: int, vocab: int = 49408):
        super().__init__()
        self.context = context
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.randn(context, width) * 0.01)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, tokens: Tensor) -> Tensor:
        eot = tokens.argmax(dim=-1)  # the end-of-text token has the largest id
        causal = torch.triu(torch.full((tokens.shape[1],) * 2, float("-inf"), device=tokens.device), 1)
        x = self.blocks(self.embed(tokens) + self.pos[: tokens.shape[1]], mask=causal)
        return self.norm(x[torch.arange(len(tokens)), eot])


class CLOOBModel(ModelMixin, ConfigMixin):
    """The trainable towers. `image_features(x)` and `text_head(features | tokens)` give unnormalised vectors."""

    @register_to_config
    def __init__(self, dim: int = 256, image_size: int = 32, widths: tuple[int, ...] = (32, 64, 128),
                 text_tower: str = "minilm", text_feature_dim: int = 384, text_hidden: int = 512,
                 bpe_width: int = 128, bpe_layers: int = 2, bpe_heads: int = 4, bpe_context: int = 32,
                 inv_tau: float = 30.0, scale_hopfield: float = 15.0, text_head: str = "mlp"):
        super().__init__()
        if text_tower not in TEXT_TOWERS:
            raise UserError(f"text_tower {text_tower!r} is not valid; choose one of {', '.join(TEXT_TOWERS)}")
        if text_head not in TEXT_HEADS:
            raise UserError(f"text_head {text_head!r} is not valid; choose one of {', '.join(TEXT_HEADS)}")
        if text_head == "locked" and (text_tower != "minilm" or dim != text_feature_dim):
            raise UserError(f"a locked text tower embeds into the sentence encoder's own {text_feature_dim}-d space: "
                            f"it needs --text_tower minilm and --dim {text_feature_dim} (got {text_tower}, {dim})")
        final = image_size // 2 ** len(widths)
        if final < 1 or image_size % 2 ** len(widths):
            raise UserError(f"image_size {image_size} is not divisible by {2 ** len(widths)} ({len(widths)} levels)")
        chans = [3 + 2, *widths]
        self.image_blocks = nn.Sequential(*(ConvBlock(a, b) for a, b in zip(chans[:-1], chans[1:])))
        self.image_proj = nn.Sequential(nn.Flatten(), nn.Linear(widths[-1] * final * final, 512), nn.GELU(),
                                        nn.Linear(512, dim))
        if text_tower == "minilm":
            if text_head == "locked":  # a fixed map: minus the training captions' mean feature (zeros: none)
                self.text_proj = nn.Identity()
                self.register_buffer("text_center", torch.zeros(text_feature_dim))
            elif text_head == "mlp" and text_hidden:
                self.text_proj = nn.Sequential(nn.Linear(text_feature_dim, text_hidden), nn.GELU(),
                                               nn.Linear(text_hidden, dim))
            else:  # a linear map keeps the sentence space's neighbourhoods (paraphrases) more intact
                self.text_proj = nn.Linear(text_feature_dim, dim)
            self.bpe = None
        else:
            self.bpe = BPETextTower(bpe_width, bpe_layers, bpe_heads, bpe_context)
            self.text_proj = nn.Linear(bpe_width, dim)

    def image_features(self, images: Tensor) -> Tensor:
        """Images in [-1, 1], any size (resized to image_size) -> (B, dim)."""
        size = self.config.image_size
        if images.shape[-1] != size or images.shape[-2] != size:
            images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return self.image_proj(self.image_blocks(append_coords(images)))

    def text_head(self, inputs: Tensor) -> Tensor:
        """Sentence features (minilm tower) or BPE token ids (bpe tower) -> (B, dim)."""
        if self.bpe is not None:
            return self.text_proj(self.bpe(inputs))
        if self.config.text_head == "locked":
            return inputs - self.text_center
        return self.text_proj(inputs)

    def loss(self, image_emb: Tensor, text_emb: Tensor) -> Tensor:
        return cloob_loss(F.normalize(image_emb, dim=-1), F.normalize(text_emb, dim=-1),
                          self.config.inv_tau, self.config.scale_hopfield)


class OwnCLOOB(Embedder):
    """Our trained CLOOB as an `Embedder`: the towers plus the frozen sentence encoder or BPE tokenizer."""

    def __init__(self, model: CLOOBModel, sentence_folder: str | Path | None = None):
        """`sentence_folder`: the frozen sentence encoder's files (default: the installed package's)."""
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.dim = model.config.dim
        self.batch_size = 256
        self.sentence = None
        self.tokenizer = None
        if model.config.text_tower == "minilm":
            from cclddg.encoders.sentence import load_sentence_encoder, model_dir

            self.sentence_folder = Path(sentence_folder) if sentence_folder is not None else model_dir()
            self.sentence = load_sentence_encoder(self.sentence_folder)
            self.max_text_tokens = self.sentence.max_tokens
        else:
            from cclddg.encoders.clip_tokenizer import CLIPTokenizer

            self.tokenizer = CLIPTokenizer()
            self.max_text_tokens = model.config.bpe_context

    def _embed_images(self, images: Tensor) -> Tensor:
        return self.model.image_features(images)

    def text_inputs(self, texts: list[str]) -> Tensor:
        """What the trainable text head reads: frozen sentence features or token ids."""
        if self.sentence is not None:
            return self.sentence.encode(texts)  # a submodule: already on the model's device
        return self.tokenizer(texts, context_length=self.model.config.bpe_context).to(self.device)

    def _embed_texts(self, texts: list[str]) -> Tensor:
        return self.model.text_head(self.text_inputs(texts))

    def count_tokens(self, text: str) -> int:
        if self.sentence is not None:
            return self.sentence.count_tokens(text)
        return self.tokenizer.count_tokens(text)


def load_own_cloob(path: str | Path, device: str | torch.device = "cpu",
                   sentence_folder: str | Path | None = None) -> OwnCLOOB:
    """An OwnCLOOB from a `train-cloob` run folder (its latest checkpoint) or a model folder."""

    path = Path(path)
    if not path.exists():
        raise UserError(f"CLOOB model {path} does not exist; train one with `cclddg train-cloob --out {path}`")
    latest = path / "checkpoints" / "latest"
    if latest.is_file():  # a run folder
        folder = path / "checkpoints" / latest.read_text().strip() / "cloob"
    elif (path / "cloob" / "config.json").is_file():  # one checkpoint folder
        folder = path / "cloob"
    elif (path / "config.json").is_file() and any(path.glob("*.safetensors")):  # the model folder itself
        folder = path
    else:
        raise UserError(f"{path} holds no CLOOB model (no checkpoints/latest, no model files); "
                        "point at a `cclddg train-cloob` run folder")
    model = load_model(CLOOBModel, folder)
    return OwnCLOOB(model, sentence_folder).to(device)
