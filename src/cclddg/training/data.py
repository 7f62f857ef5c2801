"""What a run trains on: the examples, from a latent cache or a dataset (with its embeddings), and their conditions.

`TrainingData` opens (or builds, once) the caches a run needs, maps global stream positions to examples (a fresh
seeded permutation of a cache each epoch) and assembles a batch with its conditions (the run's conditioning kind). The
trainer asks it for the examples of a step; which positions a step, rank and micro-batch read is the trainer's.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cclddg import conditioning
from cclddg.conditioning.base import drop as drop_to_null
from cclddg.config import TrainConfig
from cclddg.data.embedding_cache import cache_key, dataset_embeddings
from cclddg.data.latent_cache import LatentCache, encode_dataset, is_cache_spec
from cclddg.data.preprocess import SkipLog
from cclddg.data.shapes import grid_prompts
from cclddg.data.sources import open_dataset, open_source, parse_data_spec
from cclddg.encoders import default_cache_dir, load_embedder
from cclddg.errors import UserError
from cclddg.latents import load_latent_space
from cclddg.priors.pairs import EmbeddingPairs
from cclddg.priors.stats import EmbeddingStats, load_stats, stats_path


class TrainingData:
    """The examples of a run and their conditions; built once per process (the main process builds the caches,
    the others then read them)."""

    def __init__(self, cfg: TrainConfig, accelerator, out: Path, progress: bool = True):
        """`cfg` is the run's config as resolved from its flags; a run that encodes its own source learns the
        latent facts from the cache it opens (`self.cache.meta`), which the trainer settles the config with
        (`run_config.with_cache`)."""
        self.cfg, self.accelerator, self.out, self.progress = cfg, accelerator, Path(out), progress
        self.device = accelerator.device
        self.kind = conditioning.get(cfg.cond)
        self.embedded = self.kind.uses_encoder  # conditioned on an embedder's vectors
        self.embeddings: dict[str, Tensor] = {}
        self.grid_text: Tensor | None = None  # embedding runs: the grid prompts' text embeddings
        self.pairs: EmbeddingPairs | None = None  # embedding runs: the (image, caption) embeddings of the data
        self.stats: EmbeddingStats | None = None  # embedding runs: the text priors' statistics
        self._stats_to_write = False
        self.cache = self.data = self.space = None
        self._perm, self._perm_epoch = None, None  # the cache's order in the current epoch (_cache_order)
        if is_cache_spec(cfg.data) or cfg.autoencoder != "pixels" or not parse_data_spec(cfg.data).procedural:
            self.embed_dim = self._open_cache()
        else:
            length = cfg.data_size if self.embedded else None
            self.data = open_dataset(cfg.data, cfg.img_size, seed=cfg.seed, length=length)
            self.embed_dim = self._prepare_embeddings() if self.embedded else 0

    def write_stats(self) -> None:
        """Write the embedding statistics measured at the start into the run folder (once it exists)."""
        if self._stats_to_write:
            self.stats.save(stats_path(self.out))
            self._stats_to_write = False

    def _open_cache(self) -> int:
        """Open the latent cache (`--data CACHE`, or the one this run's source is encoded into) and the
        autoencoder that decodes the grids, at the cache's latent scale."""
        cfg, acc = self.cfg, self.accelerator
        self.space = load_latent_space(cfg.autoencoder, self.device)  # loaded once: encodes a source, decodes grids
        embedder = load_embedder(cfg.encoder, self.device) if self.embedded else None
        if is_cache_spec(cfg.data):
            path = Path(cfg.data)
        else:
            if acc.is_main_process:  # one process encodes, the others then read the finished cache
                path = self._encode_source(embedder)
            acc.wait_for_everyone()
            if not acc.is_main_process:
                path = self._encode_source(embedder, progress=False)
        self.cache = LatentCache(path, autoencoder=cfg.autoencoder, encoder=cfg.encoder)
        self.kind.check_cache(self.cache)
        self.cache.check_flip(cfg.flip)
        self.space = self.space.with_scale(float(self.cache.meta["scale"]))  # grids decode the cache's latents
        if embedder is None:
            return 0
        self._text_prior_setup(embedder, EmbeddingPairs.of_cache(self.cache), source=str(path))
        return self.cache.embed_dim

    def _encode_source(self, embedder, progress: bool | None = None) -> Path:
        """A latent run on a data source (or a pixel run on a real one): encode `data_size` examples (0: all)
        once into a cache in --cache_dir, so training never decodes an image file or runs the autoencoder."""
        cfg = self.cfg
        key = json.dumps([cfg.data, cfg.img_size, cfg.seed, cfg.data_size, cfg.autoencoder, self.space.fingerprint,
                          cfg.encoder, getattr(embedder, "fingerprint", None), cfg.flip])
        path = Path(cfg.cache_dir or default_cache_dir()) / f"latents-{hashlib.sha1(key.encode()).hexdigest()[:20]}"
        source = open_source(cfg.data, cfg.img_size, seed=cfg.seed, length=cfg.data_size or None)
        out = encode_dataset(source, cfg.data, cfg.seed, cfg.data_size or None, cfg.img_size, self.space, embedder,
                             path, flip=cfg.flip, progress=self.progress if progress is None else progress,
                             workers=0 if parse_data_spec(cfg.data).procedural else cfg.workers)
        skipped = json.loads((out / "cache.json").read_text())["skipped"]
        if skipped["skipped"] and self.accelerator.is_main_process and progress is None:
            print(f"{cfg.data}: {SkipLog.from_dict(skipped).summary(named=3)} (also in {out / 'cache.json'})")
        return out

    def _prepare_embeddings(self) -> int:
        """Image and caption embeddings of the whole (finite) dataset, from the cache or computed once."""
        cfg, acc = self.cfg, self.accelerator
        embedder = load_embedder(cfg.encoder, self.device)
        key = cache_key(cfg.data, cfg.img_size, cfg.seed, cfg.data_size, cfg.encoder, embedder.fingerprint)
        cache_dir = cfg.cache_dir or default_cache_dir()
        if acc.is_main_process:  # one process builds the cache, the others then read it
            self.embeddings = dataset_embeddings(self.data, cfg.data_size, embedder, key, cache_dir, self.progress)
        acc.wait_for_everyone()
        if not acc.is_main_process:
            self.embeddings = dataset_embeddings(self.data, cfg.data_size, embedder, key, cache_dir, False)
        self._text_prior_setup(embedder, EmbeddingPairs(self.embeddings["image"], self.embeddings["text"]),
                               source=f"{cfg.data} (first {cfg.data_size})")
        return embedder.dim

    def _text_prior_setup(self, embedder, pairs: EmbeddingPairs, source: str) -> None:
        """The embedding statistics of the training data (the text priors' modality gap, image bank and temperature;
        written into the run folder once the folder exists) and the grid prompts' text embeddings."""
        self.pairs = pairs
        self.stats = load_stats(self.out)  # a resumed run keeps what it measured
        if self.stats is None:
            self.stats = EmbeddingStats.measure(pairs, source, seed=self.cfg.seed)
            self._stats_to_write = True
        self.grid_text = embedder.embed_texts(grid_prompts(6)).cpu()

    def _cache_order(self, positions: range) -> list[int]:
        """Cache indices at global stream positions: epoch e reads a permutation seeded by (seed, e)."""
        n = len(self.cache)
        out = []
        for p in positions:
            epoch, k = divmod(p, n)
            if self._perm_epoch != epoch:
                self._perm = np.random.default_rng([self.cfg.seed, epoch]).permutation(n)
                self._perm_epoch = epoch
            out.append(int(self._perm[k]))
        return out

    def indices(self, positions: range) -> list[int]:
        """The examples at global stream positions: a fresh permutation of a cache each epoch, a finite dataset's
        examples in a cycle, or the endless shapes stream as it is."""
        if self.cache is not None:
            return self._cache_order(positions)
        if self.embedded:
            return [i % self.cfg.data_size for i in positions]
        return list(positions)

    def batch(self, indices: list[int], drop: bool = True) -> tuple[Tensor, Tensor | None]:
        """The examples at `indices` (on the device) and their conditions.

        The run's conditioning kind makes the conditions from the labels and embeddings (conditioning/); with
        `drop`, each is replaced by the null one with probability pct_zeros (for CFG).
        """
        cfg = self.cfg
        b = len(indices)
        # Grids (drop=False) draw nothing from the RNG, so logging never changes the training stream.
        if self.cache is not None:
            flip = torch.rand(b) < 0.5 if drop and cfg.flip else None
            found = self.cache.get_batch(indices, flip)
            images, labels = found["latents"], found.get("labels")
            embeddings = (found["image_emb"], found["text_emb"]) if self.embedded else None
        else:
            images, labels, _ = self.data.get_batch(indices)
            idx = torch.tensor(indices)
            embeddings = (self.embeddings["image"][idx], self.embeddings["text"][idx]) if self.embedded else None
        memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        images = images.to(self.device, memory_format=memory_format)
        cond = self.kind.training_condition(labels, embeddings, cfg, random=drop)
        if cond is None:
            return images, None
        cond = cond.to(self.device)
        return images, drop_to_null(cond, cfg.pct_zeros) if drop else cond


def run_embedding_pairs(cfg: TrainConfig, out: Path, progress: bool = True) -> EmbeddingPairs:
    """The (image, caption) embedding pairs an embedding run trains on (its cache's, or its dataset's), for a
    command that works on an existing run (`cclddg train-prior`): read as the run reads them."""
    from accelerate import Accelerator

    kind = conditioning.get(cfg.cond)
    if not kind.uses_encoder:
        raise UserError(f"{out} is {kind.described}, not on embeddings")
    return TrainingData(cfg, Accelerator(cpu=True), Path(out), progress).pairs
