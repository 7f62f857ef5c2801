"""Training throughput of the ddgan, seed and diffusion presets at the same network sizes.

What it measures
----------------
Samples per second (and ms per optimisation step) of one training step of

- ``ddgan``     (the default preset: posterior fake step, Adam, lazy R1 every 15 steps, EMA),
- ``seed``      (the seed project's recipe: renoise fake step, AdamW, R1 on every step,
                 reconstruction loss, EMA off = plain copy),
- ``diffusion`` (the DDPM baseline: epsilon prediction, one generator forward/backward, no D),

all with the SAME widths (generator and discriminator sizes, image size, batch size; see
``--help``). Only the sizes are overridden; everything else comes from the preset. The seed
preset also sets its own ``injection`` (add), ``z_dim`` (8), ``n_z_channels`` (16) and
``n_cond_channels`` (256, which doubles D's parameters at these widths), so a fourth variant,
``seed:ddgan_arch``, is the seed recipe with the ddgan preset's values of those four knobs: the
gap ddgan -> seed:ddgan_arch is the recipe (R1 every step, renoise, recon loss, AdamW), the gap
seed:ddgan_arch -> seed is the architecture knobs. ``--variants`` picks the list.

It runs the real code path: ``cclddg.run_config.resolve(preset, overrides)`` and
``cclddg.training.trainer.Trainer(cfg, <tempdir>, progress=False)``; one timed step is
``trainer.train_step()`` (the D and G updates, the learning-rate schedulers, the EMA update and
``trainer.step += 1``), exactly what ``Trainer.run`` does per step minus data loading, logging,
image grids and checkpoints. Because ``trainer.step`` advances, lazy R1 happens at its real rate; a
timed block is a multiple of ``lazy_reg`` steps (15) so every block of the ddgan preset holds the
same number of R1 steps.

Batches come from ``trainer.batch(step)`` but are made before timing (a pool that is cycled, which
stands in for ``trainer.batch`` during the steps), so the step figures are compute only. Making a
batch (rendering ``shapes``) is timed on its own as a separate interleaved item, and the table's
last column adds it back (samples/s incl. data).

Method: warm-up steps for every variant first; then ``--repeats`` rounds, each timing one block of
``--steps`` steps of every variant in turn (ddgan, seed, ..., data, ddgan, seed, ...), so a
drift in machine load hits all variants alike; the median block time per variant is reported.
Ratios are taken between medians of the same run.

How to run
----------
    python benchmarks/train_throughput.py                 # the real measurement (~2-3 min, 2 cores)
    python benchmarks/train_throughput.py --quick         # tiny sizes, a few seconds: smoke check
    python benchmarks/train_throughput.py --tiny          # 2 steps a block, 1 round: what CI runs
    python benchmarks/train_throughput.py --threads 2 --json train_throughput.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

VARIANTS = ("ddgan", "seed", "seed:ddgan_arch", "diffusion")
# Architecture knobs the seed preset sets differently from ddgan (not widths); ":ddgan_arch" aligns them.
ARCH_KEYS = ("injection", "z_dim", "n_z_channels", "n_cond_channels")

# Tiny runs 1 thread: at these sizes a second thread only waits for the first, and much longer on a busy machine.
DEFAULTS = {"full": dict(img_size=32, batch_size=32, n_channels=32, steps=15, repeats=5, warmup=5, threads=2),
            "quick": dict(img_size=16, batch_size=4, n_channels=8, steps=15, repeats=2, warmup=2, threads=2),
            "tiny": dict(img_size=16, batch_size=2, n_channels=8, steps=2, repeats=1, warmup=1, threads=1)}


def mode(args: argparse.Namespace) -> str:
    return "tiny" if args.tiny else "quick" if args.quick else "full"


def mode_note(args: argparse.Namespace) -> str:
    """' (quick)' or ' (tiny)' after the settings line; nothing for the full run."""
    return "" if mode(args) == "full" else f" ({mode(args)})"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes and few repeats (a few seconds), to check the script works")
    p.add_argument("--tiny", action="store_true",
                   help="quick's sizes at batch 2, one round of 2-step blocks, 1 thread (what CI runs)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default 2; tiny 1)")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    p.add_argument("--img_size", type=int, default=None, help="image side (default 32; quick 16)")
    p.add_argument("--batch_size", type=int, default=None, help="batch size (default 32; quick 4)")
    p.add_argument("--n_channels", type=int, default=None,
                   help="base width of the generator UNet AND the discriminator (default 32; quick 8)")
    p.add_argument("--steps", type=int, default=None,
                   help="steps per timed block; keep it a multiple of 15 (ddgan's lazy_reg) (default 15)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5; quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per variant (default 5; quick 2)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma-separated PRESET or PRESET:ddgan_arch (= that preset with the ddgan preset's "
                        f"{', '.join(ARCH_KEYS)}); ratios are against the first")
    args = p.parse_args(argv)
    for k, v in DEFAULTS[mode(args)].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.variants = [s.strip() for s in args.variants.split(",") if s.strip()]
    if not args.variants:
        p.error("--variants is empty")
    for name in ("img_size", "batch_size", "n_channels", "steps", "repeats", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    return args


def size_overrides(args: argparse.Namespace) -> dict:
    """The widths every preset gets: the only thing overridden besides threads."""
    return dict(img_size=args.img_size, batch_size=args.batch_size, threads=args.threads,
                n_channels_unet=args.n_channels, ch_mults=(1, 2, 2), is_attn=(False, False, False), n_blocks=1,
                n_channels_disc=args.n_channels, ch_mults_disc=(1, 2, 2), is_attn_disc=(False, False, False),
                n_blocks_disc=1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Variant:
    """One preset's Trainer plus a pool of ready batches; `block(n)` times n real training steps."""

    def __init__(self, name: str, cfg, root: Path, pool: int):
        from cclddg.training.trainer import Trainer

        self.name = name
        self.cfg = cfg
        self.trainer = Trainer(cfg, root / name.replace(":", "_"), progress=False)
        self.make_batch = self.trainer.batch
        self.batches = [self.make_batch(s) for s in range(pool)]
        self.trainer.batch = self.pooled
        self.times: list[float] = []

    def pooled(self, step: int, micro: int = 0, drop: bool = True):
        """`Trainer.batch`'s stand-in during the timed steps: a batch made before timing."""
        return self.batches[step % len(self.batches)]

    def one_step(self) -> None:
        self.trainer.train_step()

    def block(self, n: int) -> float:
        device = self.trainer.device
        sync(device)
        tic = time.perf_counter()
        for _ in range(n):
            self.one_step()
        sync(device)
        return time.perf_counter() - tic

    def describe(self) -> dict:
        from cclddg.models import count_parameters

        c = self.cfg
        tr = self.trainer
        return {
            "objective": c.objective, "step_kind": c.step_kind if c.objective == "ddgan" else None,
            "optimizer": c.optimizer, "r1_every": (c.lazy_reg if c.r1_gamma > 0 else None)
            if c.objective == "ddgan" else None, "recon_loss_scale": c.recon_loss_scale, "ema_decay": c.ema_decay,
            **{k: getattr(c, k) for k in ARCH_KEYS},
            "gen_params": count_parameters(tr.accelerator.unwrap_model(tr.gen)),
            "disc_params": count_parameters(tr.accelerator.unwrap_model(tr.disc)) if tr.disc is not None else 0,
        }


class DataVariant:
    """Making a batch with Trainer.batch (the shapes renderer), timed like a training block."""

    name = "data"

    def __init__(self, make_batch):
        self.make_batch = make_batch
        self.next_step = 10_000  # fresh indices, not the pooled ones
        self.times: list[float] = []

    def block(self, n: int) -> float:
        tic = time.perf_counter()
        for _ in range(n):
            self.make_batch(self.next_step)
            self.next_step += 1
        return time.perf_counter() - tic


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    from cclddg.config import PRESETS as KNOWN
    from cclddg.run_config import resolve

    base = size_overrides(args)
    ddgan_arch = {k: getattr(resolve("ddgan", base), k) for k in ARCH_KEYS}
    cfgs = {}
    for spec in args.variants:
        preset, _, suffix = spec.partition(":")
        if preset not in KNOWN or suffix not in ("", "ddgan_arch"):
            sys.exit(f"bad variant {spec!r}: write PRESET or PRESET:ddgan_arch, PRESET one of {', '.join(KNOWN)}")
        overrides = dict(base)
        if suffix:
            overrides.update(ddgan_arch)
        cfgs[spec] = resolve(preset, overrides)
    for k in {c.lazy_reg for c in cfgs.values() if c.objective == "ddgan" and c.r1_gamma > 0}:
        if args.steps % k:
            print(f"warning: --steps {args.steps} is not a multiple of lazy_reg {k}; timed blocks will hold "
                  "unequal numbers of R1 steps", file=sys.stderr)

    with tempfile.TemporaryDirectory(prefix="cclddg_bench_") as tmp:
        pool = args.steps
        variants = [Variant(name, cfg, Path(tmp), pool) for name, cfg in cfgs.items()]
        data = DataVariant(variants[0].make_batch)

        t_start = time.perf_counter()
        for v in variants:
            for _ in range(args.warmup):
                v.one_step()
        data.block(2)
        for _ in range(args.repeats):  # interleaved: A, B, C, ..., data, A, B, C, ..., data, ...
            for v in [*variants, data]:
                v.times.append(v.block(args.steps))
        elapsed = time.perf_counter() - t_start

    b = args.batch_size
    data_ms = statistics.median(data.times) / args.steps * 1e3
    rows = []
    for v in variants:
        ms = statistics.median(v.times) / args.steps * 1e3
        rows.append({"variant": v.name, "ms_per_step": ms, "samples_per_s": b / ms * 1e3,
                     "samples_per_s_with_data": b / (ms + data_ms) * 1e3,
                     "spread_pct": 100 * (max(v.times) - min(v.times)) / statistics.median(v.times),
                     "block_seconds": v.times, **v.describe()})
    ref = rows[0]
    for r in rows:
        r["ratio_vs_" + ref["variant"]] = r["samples_per_s"] / ref["samples_per_s"]

    print(f"train_throughput: torch {torch.__version__}, {args.threads} thread(s), device "
          f"{variants[0].trainer.device}, {args.img_size}x{args.img_size} shapes, batch {b}, "
          f"UNet/D width {args.n_channels} x (1,2,2), n_blocks 1, is_attn all False (UNet mid attention on)"
          f"{mode_note(args)}")
    print(f"median of {args.repeats} interleaved blocks of {args.steps} steps each (after {args.warmup} warm-up "
          f"steps); whole run {elapsed:.1f} s; step times exclude data ({data_ms:.2f} ms/batch, last column adds it)")
    print()
    head = f"{'variant':<16} {'samples/s':>10} {'ms/step':>9} {'ratio vs ' + ref['variant']:>15} " \
           f"{'spread':>7} {'samples/s+data':>15}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['variant']:<16} {r['samples_per_s']:>10.1f} {r['ms_per_step']:>9.2f} "
              f"{r['ratio_vs_' + ref['variant']]:>15.3f} {r['spread_pct']:>6.1f}% "
              f"{r['samples_per_s_with_data']:>15.1f}")
    print()
    print("recipes (spread = (max-min)/median of the block times):")
    for r in rows:
        what = f"{r['objective']}"
        if r["objective"] == "ddgan":
            what += f", {r['step_kind']} fake step, R1 every {r['r1_every']} step(s), recon {r['recon_loss_scale']:g}"
        print(f"  {r['variant']:<16} {what}; {r['optimizer']}, ema {r['ema_decay']:g}; injection {r['injection']}, "
              f"z_dim {r['z_dim']}, n_cond_channels {r['n_cond_channels']}; "
              f"G {r['gen_params'] / 1e6:.3f}M params, D {r['disc_params'] / 1e6:.3f}M")

    result = {"benchmark": "train_throughput", "torch": torch.__version__, "python": platform.python_version(),
              "machine": platform.machine(), "threads": args.threads, "quick": args.quick, "tiny": args.tiny,
              "settings": {k: getattr(args, k) for k in ("img_size", "batch_size", "n_channels", "steps", "repeats",
                                                           "warmup", "variants")},
              "data_ms_per_batch": data_ms, "data_block_seconds": data.times, "elapsed_s": elapsed, "rows": rows}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str))
        print(f"\nwrote {args.json}")
    return result


if __name__ == "__main__":
    main()
