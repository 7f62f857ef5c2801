"""The retrieval priors at data scale: exact search in chunks against an approximate index (faiss).

What it measures
----------------
For banks of N random unit embeddings of width d (fp16, as the run's statistics keep them) and batches of B random
unit queries:

- ``exact top-k``       ``priors.bank.EmbeddingBank.topk`` (the `retrieval` prior): one matrix product per chunk
                        of 65,536 rows, a running top-k; memory one chunk of similarities;
- ``exact posterior``   ``EmbeddingBank.sample`` (the `posterior` prior): a draw from the softmax over the whole bank,
                        two passes over it (exact, whatever N);
- ``faiss IVF-Flat``    ``priors.ann.AnnIndex``, what a run builds for a bank of 10^6 rows or more (inner product,
                        nlist = 4·sqrt(N), trained on 64·nlist rows, nprobe 32): build seconds, query time, memory
                        of the index, recall@k against the exact top-k;
- ``faiss HNSW``        ``faiss.IndexHNSWFlat`` (M 32, efSearch 64): the same.

Uniform random embeddings are the hard case for an index (no clusters to exploit): their recall is a lower bound.
``--clustered`` draws bank and queries around 1,000 directions (cosine ~0.9 to theirs), closer to how real image
embeddings gather by kind. Memory is the index's own size (``faiss.serialize_index``) and the bank's bytes.

How to run
----------
    python benchmarks/prior_bank.py                   # N = 1e5, 1e6; d = 256, 768 (~10 min, 2 cores, ~8 GB)
    python benchmarks/prior_bank.py --sizes 100000 --dims 256 --no_hnsw [--clustered]
    python benchmarks/prior_bank.py --tiny            # N = 2000, d = 32: what CI runs

faiss is optional (``pip install 'cclddg[ann]'``); without it only the exact rows are printed.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch
import torch.nn.functional as F

from _timing import timed
from cclddg.priors.ann import NPROBE, AnnIndex, faiss_available
from cclddg.priors.bank import EmbeddingBank


CLUSTERS = 1000  # --clustered: embeddings around this many directions (as images of a kind cluster)
SPREAD = 0.5  # --clustered: the noise around a direction, relative to it (cosine ~0.9 to it)


def unit(n: int, d: int, seed: int, clustered: bool = False) -> torch.Tensor:
    """n random unit embeddings, uniform on the sphere or (`clustered`) around CLUSTERS random directions."""
    g = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(CLUSTERS, d, generator=torch.Generator().manual_seed(0)), dim=-1)
    out = torch.empty(n, d, dtype=torch.float16)
    for start in range(0, n, 100_000):  # in pieces: float32 of 1e6 x 768 is 3 GB at once
        stop = min(n, start + 100_000)
        x = torch.randn(stop - start, d, generator=g)
        if clustered:
            pick = torch.randint(0, CLUSTERS, (stop - start,), generator=g)
            x = centers[pick] + SPREAD * x / d ** 0.5
        out[start:stop] = F.normalize(x, dim=-1).half()
    return out


def index_row(name: str, build, search, size_mb, queries: torch.Tensor, exact: np.ndarray, k: int,
              repeats: int) -> dict:
    start = time.perf_counter()
    index = build()
    build_s = time.perf_counter() - start
    seconds = timed(lambda: search(index), repeats)
    found = np.asarray(search(index))
    recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found, exact)]))
    return {"method": name, "build_s": round(build_s, 2), "query_ms": round(1000 * seconds / len(queries), 3),
            "memory_mb": round(size_mb(index), 1), "recall": round(recall, 4)}


def faiss_rows(rows: torch.Tensor, queries: torch.Tensor, exact: np.ndarray, k: int, repeats: int,
               hnsw: bool) -> list[dict]:
    """The index the retrieval prior ships (priors.ann.AnnIndex) and, optionally, HNSW beside it."""
    if not faiss_available():
        return []
    import faiss

    size = lambda index: len(faiss.serialize_index(index)) / 2**20  # noqa: E731
    out = [index_row(f"faiss IVF-Flat (AnnIndex, nprobe {NPROBE})", lambda: AnnIndex.build(rows),
                     lambda index: index.topk(queries, k).numpy(), lambda index: size(index.index),
                     queries, exact, k, repeats)]
    if hnsw:
        data, q = rows.float().numpy(), queries.float().numpy()

        def build_hnsw():
            index = faiss.IndexHNSWFlat(data.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efSearch = 64
            index.add(data)
            return index

        out.append(index_row("faiss HNSW (M 32, efSearch 64)", build_hnsw, lambda index: index.search(q, k)[1],
                             size, queries, exact, k, repeats))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--dims", default="256,768")
    ap.add_argument("--queries", type=int, default=64)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no_hnsw", action="store_true", help="skip HNSW (its build is the slowest part)")
    ap.add_argument("--clustered", action="store_true",
                    help=f"embeddings around {CLUSTERS} directions (cosine ~0.9), as real ones cluster; queries too")
    ap.add_argument("--tiny", action="store_true", help="N 2000, d 32, one repeat: a smoke run")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    if args.tiny:
        args.sizes, args.dims, args.repeats, args.threads, args.queries = "2000", "32", 1, 1, 8
    torch.set_num_threads(args.threads)
    have_faiss = faiss_available()
    if have_faiss:
        import faiss

        faiss.omp_set_num_threads(args.threads)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads, "
          f"{'clustered' if args.clustered else 'uniform'} embeddings, {args.queries} queries per batch, k {args.k}{'' if have_faiss else ' (faiss not installed)'}")
    print("| N | d | method | build (s) | per query (ms) | memory (MB) | recall@k |")
    print("|---|---|---|---|---|---|---|")
    results = []
    for n in map(int, args.sizes.split(",")):
        for d in map(int, args.dims.split(",")):
            rows = unit(n, d, seed=1, clustered=args.clustered)
            queries = unit(args.queries, d, seed=2, clustered=args.clustered).float()
            bank = EmbeddingBank(rows)
            exact = bank.topk(queries, args.k)[1].numpy()
            g = torch.Generator().manual_seed(0)
            found = [
                {"method": "exact top-k", "build_s": 0.0,
                 "query_ms": round(1000 * timed(lambda: bank.topk(queries, args.k), args.repeats) / len(queries), 3),
                 "memory_mb": round(rows.numel() * 2 / 2**20, 1), "recall": 1.0},
                {"method": "exact posterior", "build_s": 0.0,
                 "query_ms": round(1000 * timed(lambda: bank.sample(queries, 30.0, g), args.repeats) / len(queries), 3),
                 "memory_mb": round(rows.numel() * 2 / 2**20, 1), "recall": None},
            ] + faiss_rows(rows, queries, exact, args.k, args.repeats, not args.no_hnsw)
            for row in found:
                row.update(n=n, d=d)
                recall = "-" if row["recall"] is None else f"{row['recall']:.3f}"
                print(f"| {n:,} | {d} | {row['method']} | {row['build_s']} | {row['query_ms']} | {row['memory_mb']} | "
                      f"{recall} |", flush=True)
            results += found
            del rows, bank
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
