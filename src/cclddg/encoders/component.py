"""An embedder as a component of an exported model folder (`embedder/`), in diffusers' conventions: a
`ModelMixin` with `save_pretrained` / `from_pretrained`, so `DiffusionPipeline` loads and moves it like any model.

    embedder/config.json                   {"kind": "cloob-tiny" | "cloob-vit-b16", "dim": ...}
    embedder/cloob/                        own CLOOB: its config.json + safetensors (the trained towers)
    embedder/sentence/                     own CLOOB with the MiniLM text tower: the frozen sentence encoder's files
    embedder/cloob.safetensors             pretrained CLOOB ViT-B/16: the converted weights (config in the metadata)

Everything the embedder needs is in the folder (no paths to elsewhere, no pickles). It embeds in float32 whatever
dtype the pipeline's other models run in: the embeddings are tiny, and their precision decides the conditions.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from cclddg.encoders.base import Embedder
from cclddg.errors import UserError

EXPORTABLE = ("cloob-tiny", "cloob-vit-b16")


class EmbedderModel(ModelMixin, ConfigMixin):
    """Holds an `Embedder` (`.embedder`) for a pipeline; saves and loads it as plain files."""

    @register_to_config
    def __init__(self, kind: str = "cloob-tiny", dim: int = 0):
        super().__init__()
        self.embedder: Embedder | None = None

    @classmethod
    def wrap(cls, embedder: Embedder) -> EmbedderModel:
        kind = (getattr(embedder, "spec", "") or "").partition(":")[0]
        if kind not in EXPORTABLE:
            raise UserError(f"cannot export the encoder {embedder.spec!r}: only {', '.join(EXPORTABLE)} models can "
                            "go into a model folder")
        component = cls(kind=kind, dim=embedder.dim)
        component.embedder = embedder
        return component

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> None:
        from cclddg.encoders.cloob_pretrained import write_converted

        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        self.save_config(folder)
        if self.config.kind == "cloob-tiny":
            self.embedder.model.save_pretrained(folder / "cloob", safe_serialization=True)
            if self.embedder.sentence is not None:
                from cclddg.encoders.sentence import FILES

                (folder / "sentence").mkdir(exist_ok=True)
                for name in FILES:
                    shutil.copyfile(self.embedder.sentence_folder / name, folder / "sentence" / name)
        elif not write_converted(folder / "cloob.safetensors", self.embedder):
            raise UserError(f"could not write {folder / 'cloob.safetensors'}")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> EmbedderModel:
        """The component from its folder (diffusers' loading options, e.g. torch_dtype, are not needed: it
        embeds in float32)."""
        folder = Path(pretrained_model_name_or_path)
        if kwargs.get("subfolder"):
            folder = folder / kwargs["subfolder"]
        config = cls.load_config(folder)
        component = cls(kind=config.get("kind", ""), dim=config.get("dim", 0))
        if component.config.kind == "cloob-tiny":
            from cclddg.encoders.own_cloob import load_own_cloob

            sentence = folder / "sentence"
            embedder = load_own_cloob(folder / "cloob", sentence_folder=sentence if sentence.is_dir() else None)
        elif component.config.kind == "cloob-vit-b16":
            from cclddg.encoders.cloob_pretrained import load_pretrained_cloob

            embedder = load_pretrained_cloob(folder / "cloob.safetensors")
        else:
            raise UserError(f"{folder}: unknown embedder kind {component.config.kind!r}")
        embedder.spec = f"{component.config.kind}:{folder}"
        component.embedder = embedder.eval().requires_grad_(False)
        return component

    def to(self, *args: Any, **kwargs: Any) -> EmbedderModel:
        """Moves to a device; a dtype is ignored (the embeddings stay float32)."""
        device, _, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        if device is not None:
            torch.nn.Module.to(self, device, non_blocking=non_blocking)
        return self
