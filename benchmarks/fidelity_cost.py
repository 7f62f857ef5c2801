"""What the distribution metrics cost on a run: `cclddg eval --metrics fid,kid,pr` at N images (real features
computed, then cached), against sampling the same N images alone (the baseline, in the same run), and one
training-time KID call (`--kid_every`, N = --kid_n) against the run's training step.

    python benchmarks/fidelity_cost.py runs/demo/gen --data shapes:64 --n 1000 --kid_n 256
    python benchmarks/fidelity_cost.py --tiny      # a tiny run trained here, N 40: what CI runs
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from cclddg.conditioning.prompts import PromptConditioner
from cclddg.encoders import load_embedder
from cclddg.evaluation.fidelity import EmbedderFeatures
from cclddg.evaluation.generated import evaluate_fidelity
from cclddg.pipeline import load_generator, run_text_prior, sample_batches
from cclddg.training.data import run_embedding_pairs
from cclddg.training.kid_monitor import KidMonitor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", nargs="?", help="an embedding run (its own CLOOB gives the features)")
    parser.add_argument("--data", default="shapes:64")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--kid_n", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=100)
    parser.add_argument("--tiny", action="store_true", help="train a tiny run here and measure at N 40: a smoke run")
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    with tempfile.TemporaryDirectory() as root:
        if args.tiny:
            args.run, args.data, args.n, args.kid_n, args.batch_size = tiny_run(Path(root)), "shapes:16", 40, 8, 20
        elif not args.run:
            parser.error("give RUN (an embedding run) or --tiny")
        measure(args)


def tiny_run(root: Path) -> str:
    """A tiny pixel-space embedding run on shapes:16 with a tiny CLOOB, trained for 2 steps."""
    from cclddg.cli import main as cclddg

    assert cclddg(["train-cloob", "--out", str(root / "cloob"), "--img_size", "16", "--widths", "8,16", "--dim", "16",
                   "--train_size", "64", "--batch_size", "16", "--eval_size", "16", "--n_batches", "2",
                   "--no_progress"]) == 0
    assert cclddg(["train", "--out", str(root / "gen"), "--preset", "fast", "--img_size", "16", "--n_channels_unet",
                   "8", "--ch_mults", "1,2", "--is_attn", "0,0", "--n_channels_disc", "8", "--ch_mults_disc", "1,2",
                   "--is_attn_disc", "0,0", "--batch_size", "4", "--z_dim", "4", "--cond_map_size", "0",
                   "--data", "shapes:16", "--data_size", "32", "--encoder", f"cloob-tiny:{root / 'cloob'}",
                   "--cache_dir", str(root / "cache"), "--n_batches", "2", "--log_every", "1", "--no_progress"]) == 0
    return str(root / "gen")


def measure(args: argparse.Namespace) -> None:
    model, cfg = load_generator(args.run)
    embedder = load_embedder(cfg.encoder)
    prior = run_text_prior(args.run, cfg, embedder.dim)
    conditioner = PromptConditioner(embedder, prior)
    features = EmbedderFeatures(embedder, f"own ({cfg.encoder})")

    start = time.perf_counter()
    cond = conditioner.texts(["a red circle"] * args.n, torch.Generator().manual_seed(0))
    for _ in sample_batches(model, cfg, args.n, cond=cond, batch_size=args.batch_size,
                            rng=torch.Generator().manual_seed(0)):
        pass
    sampling = time.perf_counter() - start

    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        report = evaluate_fidelity(model, cfg, args.data, args.n, features, batch_size=args.batch_size,
                                   conditioner=conditioner, cache_dir=Path(cache), progress=False)
        first = time.perf_counter() - start
        start = time.perf_counter()
        evaluate_fidelity(model, cfg, args.data, args.n, features, batch_size=args.batch_size,
                          conditioner=conditioner, cache_dir=Path(cache), progress=False)
        cached = time.perf_counter() - start

    pairs = run_embedding_pairs(cfg, Path(args.run), progress=False)
    monitor = KidMonitor(pairs, prior, lambda: embedder, args.kid_n, cfg.seed)
    start = time.perf_counter()
    kid = monitor(model, cfg, "cpu", None)
    kid_seconds = time.perf_counter() - start

    log = [json.loads(line) for line in (Path(args.run) / "log.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in log if "samples_per_s" in r]
    step = cfg.batch_size / rates[-1] if rates else float("nan")
    print(json.dumps({k: v for k, v in report.items()}, indent=2))
    print(f"{torch.get_num_threads()} threads; N = {args.n}: sampling alone {sampling:.1f} s; eval --metrics "
          f"{first:.1f} s with the real features computed ({first / sampling:.2f}x sampling), {cached:.1f} s "
          f"cached ({cached / sampling:.2f}x)")
    print(f"training-time KID (kid_n {args.kid_n}): {kid_seconds:.1f} s per call (KID {kid['kid']:.4f}); the run's "
          f"step {step:.2f} s, so --kid_every 500 costs {kid_seconds / (500 * step):.1%} of the run")


if __name__ == "__main__":
    main()
