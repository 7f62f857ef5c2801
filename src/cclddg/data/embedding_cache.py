"""Embeddings of a finite dataset, computed once and kept on disk, so training never runs the embedder.

For example i the cache holds the image embedding of its image and the text embedding of its caption.
The file name is a hash of everything they depend on (data source, size, seed, length, the encoder
spec and a fingerprint of its weights), so a changed encoder never reuses stale embeddings. Files are
written to a temporary name and renamed: an interrupted build leaves no half-written cache.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from cclddg.encoders.base import Embedder
from cclddg.storage import save_tensors_atomic

FORMAT = 1


def cache_key(data: str, img_size: int, seed: int, length: int, encoder_spec: str, fingerprint: str) -> dict:
    return {"format": FORMAT, "data": data, "img_size": img_size, "seed": seed, "length": length,
            "encoder": encoder_spec, "fingerprint": fingerprint}


def cache_file(cache_dir: str | Path, key: dict) -> Path:
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return Path(cache_dir) / f"embeddings-{digest}.safetensors"


def _read(path: Path, key: dict) -> dict[str, torch.Tensor] | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            if json.loads((f.metadata() or {}).get("key", "{}")) != key:
                return None
            return {name: f.get_tensor(name) for name in ("image", "text")}
    except Exception:  # damaged or foreign: it is only a cache, rebuild it
        return None


@torch.no_grad()
def dataset_embeddings(dataset, length: int, embedder: Embedder, key: dict, cache_dir: str | Path,
                       progress: bool = True, chunk: int = 1000) -> dict[str, torch.Tensor]:
    """{"image": (N, dim), "text": (N, dim)} for examples 0..N-1 of `dataset`, from the cache or computed now."""

    path = cache_file(cache_dir, key)
    if path.is_file():
        found = _read(path, key)
        if found is not None and found["image"].shape[0] == length:
            return found
    image_parts, captions = [], []
    for start in tqdm(range(0, length, chunk), desc="embedding images", disable=not progress):
        images, _, caps = dataset.get_batch(range(start, min(start + chunk, length)))
        image_parts.append(embedder.embed_images(images).cpu())
        captions += caps
    unique = sorted(set(captions))
    text_parts = [embedder.embed_texts(unique[i:i + chunk]).cpu()
                  for i in tqdm(range(0, len(unique), chunk), desc="embedding captions", disable=not progress)]
    position = {c: i for i, c in enumerate(unique)}
    index = torch.tensor([position[c] for c in captions], dtype=torch.long)
    out = {"image": torch.cat(image_parts).contiguous(), "text": torch.cat(text_parts)[index].contiguous()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tensors_atomic(path, out, metadata={"key": json.dumps(key, sort_keys=True)})
    return out
