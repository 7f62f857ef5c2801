"""An approximate nearest-neighbour index of a large bank (faiss), for the `retrieval` prior's top-k.

Exact search in chunks (`bank.EmbeddingBank`) costs one pass over the bank per batch of queries: a few ms per
query at 10^6 rows on a CPU (benchmarks/prior_bank.py), where sampling an image costs about as much. Beyond that an
inverted-file index pays: faiss's IVF-Flat (inner product) with nlist = 4·sqrt(N) lists, searching NPROBE of them.
It is built when the statistics of a bank of at least ANN_MIN_ROWS rows are measured and faiss is installed
(`pip install 'cclddg[ann]'`), and kept beside them (`embedding_index.faiss`: faiss's own format, not a pickle).
The `posterior` prior always searches exactly: a softmax over the whole bank has no top-k to approximate.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cclddg.errors import UserError

ANN_MIN_ROWS = 1_000_000  # banks from this size get an index (below it exact search is as fast: the benchmark)
NPROBE = 32  # inverted lists searched per query
INDEX_FILE = "embedding_index.faiss"
TRAIN_PER_LIST = 64  # k-means training rows per list


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


class AnnIndex:
    """faiss IVF-Flat over unit embeddings, inner product: `topk(queries, k) -> indices (B, k)`."""

    def __init__(self, index):
        self.index = index

    @classmethod
    def build(cls, bank: Tensor, seed: int = 0) -> "AnnIndex":
        import faiss

        n, d = bank.shape
        nlist = max(1, int(4 * math.sqrt(n)))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        train = np.random.default_rng(seed).permutation(n)[:min(n, TRAIN_PER_LIST * nlist)]
        index.train(bank[torch.from_numpy(np.sort(train))].float().numpy())
        for start in range(0, n, 100_000):
            index.add(bank[start:start + 100_000].float().numpy())
        index.nprobe = NPROBE
        return cls(index)

    def topk(self, queries: Tensor, k: int) -> Tensor:
        _, found = self.index.search(queries.detach().float().cpu().numpy(), k)
        return torch.from_numpy(found).to(queries.device)

    def save(self, path: Path) -> None:
        import faiss

        from cclddg.atomic import atomic_path

        with atomic_path(path) as tmp:
            faiss.write_index(self.index, str(tmp))

    @classmethod
    def load(cls, path: Path) -> "AnnIndex | None":
        """The index beside a run's statistics; None without faiss (exact search then serves)."""
        if not faiss_available():
            return None
        import faiss

        try:
            index = faiss.read_index(str(path))
        except Exception as exc:  # faiss raises RuntimeError with its own text for a damaged file
            raise UserError(f"{path} is damaged ({type(exc).__name__}); measure the statistics again with "
                            f"`cclddg embedding-stats {path.parent}`") from None
        index.nprobe = NPROBE
        return cls(index)
