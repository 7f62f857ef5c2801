"""The statistics of a run's training data that the text priors read (`RUN/embedding_stats.safetensors`).

- the mean image and the mean text embedding (the modality gap);
- a bank of the data's image embeddings (all of them up to BANK_SIZE, else a seeded random sample of that many);
- the inverse temperature under which the bank's softmax best explains the data's own caption-image pairs
  (`bank.calibrate_inv_temperature`): the `posterior` prior draws from softmax(inv_temperature x cosine);
- for a bank of ANN_MIN_ROWS rows or more, an approximate index of it (`ann.py`, with faiss installed), kept beside
  them (`embedding_index.faiss`), for the `retrieval` prior's top-k.

They are measured once, when an embedding run starts (or by `cclddg embedding-stats RUN` for an older run).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cclddg.atomic import atomic_path
from cclddg.data.images import uint8_to_unit
from cclddg.errors import UserError
from cclddg.priors.ann import ANN_MIN_ROWS, INDEX_FILE, AnnIndex, faiss_available
from cclddg.priors.bank import EmbeddingBank, calibrate_inv_temperature
from cclddg.priors.pairs import CHUNK, EmbeddingPairs

STATS_FILE = "embedding_stats.safetensors"
BANK_SIZE = 1_000_000  # image embeddings kept for the retrieval priors (256 MB at 128-d, 1 GB at 512-d, in fp16)
CALIBRATION_BANK = 20_000  # bank rows the temperature is calibrated over (it is a property of the space, not N)
CALIBRATION_QUERIES = 1000  # captions it is calibrated on


@dataclass
class EmbeddingStats:
    """Mean image and mean text embedding of a dataset (the modality gap), a bank of its image embeddings and the
    bank softmax's calibrated inverse temperature."""

    image_mean: Tensor  # (dim,)
    text_mean: Tensor | None  # (dim,); None when the data had no captions (then no gap, the bank still serves)
    bank: Tensor  # (N, dim) unit image embeddings, float16
    source: str = ""  # what they were measured on
    inv_temperature: float | None = None  # None: measured before it existed, or data without captions
    index: AnnIndex | None = None  # an approximate index of a bank of >= ANN_MIN_ROWS rows (priors/ann.py)

    @classmethod
    def measure(cls, pairs: EmbeddingPairs, source: str, bank_size: int = BANK_SIZE,
                seed: int = 0) -> "EmbeddingStats":
        """From a dataset's embedding pairs (`priors.pairs`), read in chunks."""
        n = len(pairs)
        keep = np.sort(np.random.default_rng(seed).permutation(n)[:bank_size]) if n > bank_size else np.arange(n)
        image_mean, text_mean = pairs.means()
        image, text = zip(*(pairs.get(keep[i:i + CHUNK]) for i in range(0, len(keep), CHUNK)))
        bank = torch.cat(image).half().contiguous()
        stats = cls(image_mean, text_mean, bank, source)
        stats.inv_temperature = _calibrate(bank, torch.cat(text), pairs.captioned[torch.from_numpy(keep)], seed)
        if len(bank) >= ANN_MIN_ROWS and faiss_available():
            stats.index = AnnIndex.build(bank, seed)
        return stats

    @property
    def gap(self) -> Tensor:
        """The vector from the mean text embedding to the mean image embedding."""
        if self.text_mean is None:
            raise UserError(f"the embedding statistics ({self.source}) were measured on data without captions, so "
                            "they hold no modality gap: measure them on a captioned source, "
                            "cclddg embedding-stats RUN --data SOURCE (or use --text_prior retrieval)")
        return self.image_mean - self.text_mean

    @property
    def dim(self) -> int:
        return self.bank.shape[1]

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        tensors = {"image_mean": self.image_mean.contiguous(), "bank": self.bank.contiguous()}
        if self.text_mean is not None:
            tensors["text_mean"] = self.text_mean.contiguous()
        metadata = {"source": self.source, "format": "2"}
        if self.inv_temperature is not None:
            metadata["inv_temperature"] = repr(float(self.inv_temperature))
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        if self.index is not None:
            self.index.save(path.with_name(INDEX_FILE))

    @classmethod
    def load(cls, path: Path) -> "EmbeddingStats":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            text_mean = tensors["text_mean"].float() if "text_mean" in tensors else None
            beta = float(meta["inv_temperature"]) if "inv_temperature" in meta else None
            stats = cls(tensors["image_mean"].float(), text_mean, tensors["bank"], meta.get("source", ""), beta)
        except Exception as exc:
            raise UserError(f"{path} is damaged ({type(exc).__name__}); measure it again with "
                            f"`cclddg embedding-stats {path.parent}`") from None
        index_path = path.with_name(INDEX_FILE)
        stats.index = AnnIndex.load(index_path) if index_path.is_file() else None
        return stats

    def describe(self) -> str:
        gap = None if self.text_mean is None else round(float(self.gap.norm()), 4)
        beta = None if self.inv_temperature is None else round(self.inv_temperature, 2)
        return json.dumps({"source": self.source, "bank": len(self.bank), "gap_norm": gap, "inv_temperature": beta})


def _calibrate(bank: Tensor, text_emb: Tensor, captioned: Tensor, seed: int) -> float | None:
    """The bank softmax's inverse temperature on up to CALIBRATION_QUERIES captions of its own rows, over a random
    CALIBRATION_BANK rows (None without captions)."""
    rng = np.random.default_rng([seed, 1])
    rows = np.sort(rng.permutation(len(bank))[:CALIBRATION_BANK])
    with_caption = np.nonzero(captioned.numpy()[rows])[0]
    if len(with_caption) < 2:
        return None
    queries = np.sort(rng.permutation(with_caption)[:CALIBRATION_QUERIES])
    sub = EmbeddingBank(bank[torch.from_numpy(rows)])
    return calibrate_inv_temperature(sub, text_emb[torch.from_numpy(rows[queries])], torch.from_numpy(queries))


@torch.no_grad()
def measure_stats(embedder, data: str, img_size: int, n: int = 5000, seed: int = 0,
                  progress: bool = True) -> EmbeddingStats:
    """Embedding statistics of a latent cache (its stored embeddings, which must be this embedder's) or of the
    first n examples of a captioned source, embedded now (`cclddg embedding-stats`)."""
    from cclddg.data.latent_cache import LatentCache, is_cache_spec
    from cclddg.data.sources import load_uint8, parse_data_spec

    if is_cache_spec(data):
        cache = LatentCache(Path(data).expanduser())
        if cache.embed_dim != embedder.dim:
            raise UserError(f"the cache {data} holds {cache.embed_dim}-d embeddings, the run's encoder gives "
                            f"{embedder.dim}-d: give a cache encoded with the run's --encoder, or a data source")
        return EmbeddingStats.measure(EmbeddingPairs.of_cache(cache), str(data), seed=seed)
    parsed = parse_data_spec(data)
    images, captions = load_uint8(data, parsed.size or img_size, seed, n, workers=0 if parsed.procedural else 2,
                                  progress=progress)
    image_emb = torch.cat([embedder.embed_images(uint8_to_unit(images[i:i + 256])).cpu()
                           for i in range(0, len(images), 256)])
    text_emb = embedder.embed_texts([c if c.strip() else "." for c in captions]).cpu()
    captioned = torch.tensor([bool(c.strip()) for c in captions])
    return EmbeddingStats.measure(EmbeddingPairs(image_emb, text_emb, captioned), f"{data} (first {len(images)})",
                                  seed=seed)


def stats_path(run: Path) -> Path:
    """Where a run (or model folder) keeps its embedding statistics (a checkpoint folder finds its run's)."""
    run = Path(run)
    if run.parent.name == "checkpoints":
        run = run.parent.parent
    return run / STATS_FILE


def load_stats(run: Path) -> EmbeddingStats | None:
    path = stats_path(run)
    return EmbeddingStats.load(path) if path.is_file() else None
