"""What each CPU speed-up of the training step is worth, switched on one at a time in one run.

What it measures
----------------
Seconds per `Trainer.train_step` of `--preset seed` at the seed README's sizes (128 px through KL-f8: 4x16x16
latents, 64 generator channels, z 16, T=8; CLOOB-sized 512-d conditions) or of `--preset cclddg` (the demo's
sizes), on a latent cache made by random-weight encoders of those sizes, in four variants of the same trainer:

- ``before``        glibc's default malloc (freed blocks over 128 KiB go back to the system), torch's default
                    per-tensor Adam/AdamW loop on the CPU and oneDNN for every convolution;
- ``keep memory``   freed memory kept in the process (`cpu.keep_freed_memory`, glibc's mallopt);
- ``+ fused Adam``  also the fused optimizer kernel (`training/optimisation.make_optimizer`);
- ``+ GEMM convs``  also wide convolutions over tiny maps as one matrix product (`models.blocks.Conv2d`): what
                    the library does.

Denormals are flushed in all four (the Trainer does it). Variants alternate within each of
`--repeats` rounds (`--steps` steps each); medians, and ratios to ``before``. `--profile` prints the operators
that take the most time in the last variant (torch.profiler).

    python benchmarks/cpu_step.py                      # seed preset, batch 8 (~2 min on 2 cores)
    python benchmarks/cpu_step.py --batch 32
    python benchmarks/cpu_step.py --preset cclddg --batch 64 --profile
    python benchmarks/cpu_step.py --tiny               # tiny widths, one round: what CI runs
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from cache_vs_onthefly import TINY_TRAIN, random_models

from cclddg.cpu import keep_freed_memory
from cclddg.data.latent_cache import encode_dataset
from cclddg.data.sources import open_source
from cclddg.encoders import load_embedder
from cclddg.latents import load_latent_space
from cclddg.models import blocks
from cclddg.run_config import resolve
from cclddg.training.trainer import Trainer

# The seed README's sizes (through KL-f8 and the CLOOB ViT-B/16) and the cclddg preset's (the demo's models).
MODELS = {"seed": "full-size", "cclddg": "demo"}
OVERRIDES = {"seed": dict(z_dim=16, n_channels_unet=64, n_steps=8, cond="embedding", lr_gen=1e-4, lr_disc=1e-4),
             "cclddg": dict(text_prior="retrieval")}  # the step alone: no learned text prior to train first
TINY = dict(n_channels_unet=32, n_channels_disc=32, z_dim=4)  # the seed's four levels on 8x8 latents: 1x1 at the bottom


def per_tensor_optimizers(trainer: Trainer) -> dict[str, torch.optim.Optimizer]:
    """torch's default CPU optimizers (a loop over tensors) for the trainer's parameters, as `make_optimizer`
    made them before issue 17."""
    kind = torch.optim.AdamW if trainer.cfg.optimizer == "adamw" else torch.optim.Adam
    return {name: kind(part.opt.param_groups[0]["params"], lr=part.lr, betas=trainer.cfg.adam_betas,
                       weight_decay=trainer.cfg.weight_decay, foreach=False)
            for name, part in (("opt_g", trainer.opt_g), ("opt_d", trainer.opt_d))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=tuple(MODELS), default="seed")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=2, help="steps per variant and round")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--tiny", action="store_true", help="tiny models, batch 2, one round, 1 thread: what CI runs")
    args = p.parse_args()
    if args.tiny:
        args.batch, args.steps, args.repeats, args.threads = 2, 1, 1, 1
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ae, encoder, size = random_models(root, "demo" if args.tiny else MODELS[args.preset], args.tiny)
        encode_dataset(open_source(f"shapes:{size}", size, seed=0, length=args.batch), f"shapes:{size}", 0,
                       args.batch, size, load_latent_space(ae), load_embedder(encoder), root / "cache",
                       progress=False)
        tiny = (TINY if args.preset == "seed" else TINY_TRAIN) if args.tiny else {}
        over = {**OVERRIDES[args.preset], **tiny, "data": str(root / "cache"), "batch_size": args.batch,
                "n_batches": 10**6, "tensorboard": False}
        trainer = Trainer(resolve(args.preset, over), root / "run", progress=False)
        made = trainer.batch(0)
        trainer.batch = lambda *a, **k: made
        fused = {"opt_g": trainer.opt_g.opt, "opt_d": trainer.opt_d.opt}
        per_tensor = per_tensor_optimizers(trainer)
        gemm = blocks.GEMM_MIN_WEIGHTS
        variants = {"before": (False, per_tensor, 2**62), "keep memory": (True, per_tensor, 2**62),
                    "+ fused Adam": (True, fused, 2**62), "+ GEMM convs": (True, fused, gemm)}

        def use(name: str) -> None:
            keep, optimizers, blocks.GEMM_MIN_WEIGHTS = variants[name]
            keep_freed_memory(keep)
            trainer.opt_g.opt, trainer.opt_d.opt = optimizers["opt_g"], optimizers["opt_d"]

        times: dict[str, list[float]] = {name: [] for name in variants}
        for name in variants:  # warm-up (and the optimizers' state)
            use(name)
            trainer.train_step()
        for _ in range(args.repeats):
            for name in variants:
                use(name)
                start = time.perf_counter()
                for _ in range(args.steps):
                    trainer.train_step()
                times[name].append((time.perf_counter() - start) / args.steps)
        if args.profile:
            from torch.profiler import profile

            with profile() as prof:
                trainer.train_step()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    med = {name: statistics.median(v) for name, v in times.items()}
    cfg = trainer.cfg
    print(f"{args.preset} preset{' (tiny)' if args.tiny else ''}: batch {args.batch}, {cfg.latent_channels}x"
          f"{cfg.img_size // cfg.latent_factor}^2 latents, {args.threads} threads, medians of {args.repeats} "
          f"rounds of {args.steps} steps")
    for name, value in med.items():
        print(f"  {name:13s} {value:7.3f} s/step   {med['before'] / value:5.2f}x before")


if __name__ == "__main__":
    main()
