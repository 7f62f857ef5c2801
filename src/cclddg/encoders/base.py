"""The `Embedder` interface: images and texts -> L2-normalised vectors in one joint space.

Subclasses implement `_embed_images` (a batch of images in [-1, 1], already on the model's device)
and `_embed_texts` (a batch of strings). This class adds what every embedder needs: no gradients,
batching, moving inputs to the model's device, L2 normalisation and prompt checks.
"""

from __future__ import annotations

import unicodedata
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cclddg.errors import UserError


class Embedder(nn.Module):
    """A joint image-text embedding model, frozen. `dim` is the embedding width."""

    dim: int
    max_text_tokens: int = 77  # longest prompt the text tower reads without cutting it
    batch_size: int = 64

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    # ---- what subclasses implement -----------------------------------------------------------------
    def _embed_images(self, images: Tensor) -> Tensor:
        raise NotImplementedError

    def _embed_texts(self, texts: list[str]) -> Tensor:
        raise NotImplementedError

    def count_tokens(self, text: str) -> int:
        """How many tokens the text tower needs for `text` (start and end tokens included)."""
        raise NotImplementedError

    # ---- the public interface ------------------------------------------------------------------------
    @torch.no_grad()
    def embed_images(self, images: Tensor) -> Tensor:
        """Images in [-1, 1], NCHW RGB, any size -> (B, dim) unit vectors (float32, on the model's device)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise UserError(f"embed_images expects RGB images shaped (B, 3, H, W), got {tuple(images.shape)}")
        was_training = self.training
        self.eval()
        out = [self._embed_images(chunk.to(self.device, torch.float32)).float()
               for chunk in images.split(self.batch_size)]
        self.train(was_training)
        return F.normalize(torch.cat(out), dim=-1)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> Tensor:
        """Strings -> (B, dim) unit vectors (float32, on the model's device)."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        was_training = self.training
        self.eval()
        out = [self._embed_texts(texts[i:i + self.batch_size]).float() for i in range(0, len(texts), self.batch_size)]
        self.train(was_training)
        if not out:
            return torch.zeros(0, self.dim, device=self.device)
        return F.normalize(torch.cat(out), dim=-1)

    def check_prompt(self, text: str) -> str:
        """A prompt the user typed: reject empty ones and ones the text tower would have to cut."""
        if not isinstance(text, str):
            raise UserError(f"a prompt is text, not {type(text).__name__}")
        text = "".join(" " if unicodedata.category(ch) == "Cc" else ch for ch in text)  # control characters
        if not text.strip():
            raise UserError("a prompt is empty (or only control characters); give some words, e.g. \"a red circle\"")
        n = self.count_tokens(text)
        if n > self.max_text_tokens:
            raise UserError(f"the prompt {text[:40]!r}... is {n} tokens long; this encoder reads at most "
                            f"{self.max_text_tokens}: shorten it")
        return text.strip()


def reference_text_encoder(embedder) -> tuple:
    """(encode, name): the frozen sentence encoder under an embedder's text tower when it has one, else the text
    tower itself; the text-only references of the paraphrase evaluations read texts with it."""
    sentence = getattr(embedder, "sentence", None)
    if sentence is not None:
        return sentence.encode, "frozen sentence encoder"
    return embedder.embed_texts, "text tower"
