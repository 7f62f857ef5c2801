"""Steps to 99%: how many training steps a generator recipe needs before its samples follow text prompts, and its
seconds per step, so recipes compare by what a user waits for.

A run of `cclddg train` (the flags after `--`) is trained in blocks of `--every` steps, resumed after each (a
resumed run takes exactly the steps it would have taken), and after each block its EMA generator is asked for
`--n` random requests naming a colour, shape and position, in the captions' wording through the run's text prior
(`--text_prior` here: retrieval by default, which needs no training of its own), and read back by the shapes
analyzer (`evaluation/generated.evaluate_model`). It prints one line per block (steps, mean attributes right, and
seconds per step: the median of the block's logged samples/s, start-up excluded) and the first block at or above
`--target`.

    python benchmarks/steps_to_adherence.py --out runs/s2a/base --every 500 --max 5000 -- \\
        --preset cclddg --data runs/demo/cache
    python benchmarks/steps_to_adherence.py --tiny      # 2 blocks of 2 steps on a tiny run: what CI runs
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from cclddg.cli import main as cclddg
from cclddg.conditioning.prompts import PromptConditioner
from cclddg.encoders import load_embedder
from cclddg.evaluation.generated import evaluate_model
from cclddg.pipeline import load_generator, run_text_prior
from cclddg.run_folder import list_checkpoints
from cclddg.training.trackers import read_log

TINY = ["--preset", "fast", "--img_size", "16", "--n_channels_unet", "8", "--ch_mults", "1,2", "--is_attn", "0,0",
        "--n_channels_disc", "8", "--ch_mults_disc", "1,2", "--is_attn_disc", "0,0", "--batch_size", "4",
        "--z_dim", "4", "--cond_map_size", "0", "--data", "shapes:16", "--data_size", "32"]


def adherence(run: Path, n: int, text_prior: str) -> float:
    """The mean share of named attributes right over n random requests (text for an embedding run, else labels)."""
    model, cfg = load_generator(run)
    conditioner = None
    if cfg.encoder:
        embedder = load_embedder(cfg.encoder)
        conditioner = PromptConditioner(embedder, run_text_prior(run, cfg, embedder.dim, text_prior=text_prior))
    return evaluate_model(model, cfg, n, progress=False, conditioner=conditioner)["mean_acc"]


def seconds_per_step(run: Path, first: int, last: int, batch: int) -> float:
    """Median seconds per step over the log records of steps first..last (each a mean over the steps since the
    record before it)."""
    rates = [r["samples_per_s"] for r in read_log(run) if first <= r["step"] <= last and "samples_per_s" in r]
    return batch / statistics.median(rates)


def main() -> None:
    argv = sys.argv[1:]
    flags = argv[argv.index("--") + 1:] if "--" in argv else []
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="the run folder (resumed when it holds the run)")
    p.add_argument("--every", type=int, default=500, help="steps per block")
    p.add_argument("--max", type=int, default=5000, help="steps at most")
    p.add_argument("--n", type=int, default=300, help="requests per evaluation")
    p.add_argument("--target", type=float, default=0.99)
    p.add_argument("--text_prior", default="retrieval")
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            args.out, args.every, args.max, args.n, flags = f"{tmp}/run", 2, 4, 8, TINY
        if not args.out:
            p.error("give --out RUN, the flags of cclddg train after --, or --tiny")
        out = Path(args.out)
        record = out.with_name(out.name + ".adherence.json")
        rows = json.loads(record.read_text()) if record.is_file() else []
        reached = None
        for steps in range(args.every, args.max + 1, args.every):
            if not any(r["steps"] == steps for r in rows):
                resume = ["--resume"] if list_checkpoints(out) else []
                assert cclddg(["train", "--out", str(out), *flags, *resume, "--n_batches", str(steps),
                               "--save_models_every", str(args.every), "--log_images_every", str(args.every),
                               "--log_every", str(min(10, args.every)), "--no_progress"]) == 0
                batch = json.loads((out / "config.json").read_text())["batch_size"]
                rows.append({"steps": steps, "adherence": adherence(out, args.n, args.text_prior),
                             "seconds_per_step": seconds_per_step(out, steps - args.every + 1, steps, batch)})
                record.write_text(json.dumps(rows, indent=2))
            row = next(r for r in rows if r["steps"] == steps)
            print(f"{steps:6d} steps: {100 * row['adherence']:5.1f}% right, {row['seconds_per_step']:.3f} s/step",
                  flush=True)
            if reached is None and row["adherence"] >= args.target:
                reached = steps
                break
        print(f"steps to {100 * args.target:.0f}%: {reached if reached else f'not within {args.max}'}")


if __name__ == "__main__":
    main()
