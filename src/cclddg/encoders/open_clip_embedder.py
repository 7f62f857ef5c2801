"""OpenCLIP models as embedders. Needs a full `open-clip-torch` install (which brings torchvision);
cclddg itself never imports it unless `--encoder open_clip:MODEL:PATH` is asked for."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cclddg.encoders.base import Embedder
from cclddg.errors import UserError, first_line

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class OpenCLIPEmbedder(Embedder):
    def __init__(self, model: torch.nn.Module, tokenizer, image_size: int, dim: int):
        super().__init__()
        self.model, self.tokenizer, self.image_size, self.dim = model, tokenizer, image_size, dim
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    def _embed_images(self, images: Tensor) -> Tensor:
        x = F.interpolate((images + 1) / 2, size=(self.image_size, self.image_size), mode="bicubic", antialias=True)
        return self.model.encode_image((x - self.mean) / self.std)

    def _embed_texts(self, texts: list[str]) -> Tensor:
        return self.model.encode_text(self.tokenizer(texts).to(self.device))

    def count_tokens(self, text: str) -> int:
        return int((self.tokenizer([text])[0] != 0).sum())


def load_open_clip(model_name: str, path: str, device: str | torch.device = "cpu") -> OpenCLIPEmbedder:
    try:
        import open_clip
    except Exception as exc:  # ImportError, or torchvision missing inside open_clip
        raise UserError(f"--encoder open_clip needs a working open-clip-torch install (pip install open-clip-torch); "
                        f"importing it failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    try:
        model = open_clip.create_model(model_name, pretrained=path, device=device)
    except Exception as exc:
        raise UserError(f"open_clip could not build {model_name!r} from {path}: {first_line(exc)}") from None
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    dim = int(model.text_projection.shape[-1]) if hasattr(model, "text_projection") else int(model.visual.output_dim)
    return OpenCLIPEmbedder(model.eval(), open_clip.get_tokenizer(model_name), int(size), dim).to(device)
