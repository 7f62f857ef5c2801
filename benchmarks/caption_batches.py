"""Captions through the frozen sentence encoder (all-MiniLM-L6-v2, the own CLOOB's text tower): in the given order,
each batch padded to its longest (the baseline, as `SentenceEncoder.encode` ran before), against `encode`, which
batches captions of similar length. The demo embeds ~20,000 shapes captions twice (the CLOOB's training features
and the cache), 3 to 18 tokens each.

Rounds alternate the two (a drift in machine load hits both); the figure is the ratio of the medians, and the
largest difference between the two methods' features says they compute the same thing.

    python benchmarks/caption_batches.py --threads 1       # 2,048 captions, 3 rounds
    python benchmarks/caption_batches.py --tiny            # 64 captions, one round: what CI runs
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from cclddg.cpu import tune_cpu
from cclddg.data.sources import open_source
from cclddg.encoders.sentence import load_sentence_encoder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2048, help="captions")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args()
    n, repeats = (64, 1) if args.tiny else (args.n, args.repeats)
    tune_cpu(1 if args.tiny else args.threads)
    source = open_source("shapes:64", 64, seed=0, length=n)
    captions = [source.record(i).caption for i in range(n)]
    encoder = load_sentence_encoder()

    @torch.no_grad()
    def given_order() -> torch.Tensor:
        return torch.cat([encoder(*encoder.tokenize(captions[i:i + 256])) for i in range(0, n, 256)])

    def by_length() -> torch.Tensor:
        return encoder.encode(captions)

    difference = (given_order() - by_length()).abs().max().item()  # also the warm-up of both
    times: dict[str, list[float]] = {"given order": [], "by length": []}
    for _ in range(repeats):
        for name, fn in (("given order", given_order), ("by length", by_length)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    a, b = statistics.median(times["given order"]), statistics.median(times["by length"])
    print(f"{n} shapes captions, {torch.get_num_threads()} threads, {repeats} rounds (medians)")
    print(f"given order: {a:.3f} s ({n / a:.0f} captions/s); by length: {b:.3f} s ({n / b:.0f} captions/s); "
          f"ratio {a / b:.2f}x; largest feature difference {difference:.1e}")


if __name__ == "__main__":
    main()
