"""Training steps/s from the latent cache vs encoding every batch on the fly (same run, same models).

What it measures
----------------
One `Trainer` of the `cclddg` preset (latent DDGAN, CLOOB-conditioned, 16x16x4 latents) runs its real
`train_step` in two ways, with the models of `--models` (random init: the cost does not depend on the
weights; `--ae`/`--encoder` use trained demo ones):

- ``demo``       64x64 shapes, the own autoencoder (factor 4) and the own CLOOB (MiniLM text tower);
- ``full-size``  128x128 shapes, latent diffusion's KL-f8 (84 M parameters, factor 8) and the pretrained
                 CLOOB ViT-B/16 architecture (images at 224 px, 12-layer text transformer).

The two ways:

- ``cache``       batches read from a memory-mapped latent cache (`cclddg encode`, built first, not timed);
- ``on the fly``  every batch rendered from the source, encoded by the autoencoder and embedded (image AND
                  caption) by the embedder with `latent_cache.encode_batch`, then the same optimisation step.

Both read the same examples at each step (`Trainer.example_indices`) and condition them the same way
(`conditioning.embedding.training_condition`, then the CFG drop). Rounds alternate the two (a drift in machine load
hits both alike); the ratio of the medians is printed.

    python benchmarks/cache_vs_onthefly.py                      # ~2 min on 2 cores
    python benchmarks/cache_vs_onthefly.py --models full-size   # ~4 min
    python benchmarks/cache_vs_onthefly.py --ae runs/demo/ae --encoder cloob-tiny:runs/demo/cloob
    python benchmarks/cache_vs_onthefly.py --quick
    python benchmarks/cache_vs_onthefly.py --tiny     # tiny models at 16 px, seconds: what CI runs
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cclddg.conditioning.base import drop as drop_to_null
from cclddg.conditioning.embedding import training_condition
from cclddg.data.latent_cache import encode_batch, encode_dataset
from cclddg.data.sources import open_dataset, open_source
from cclddg.encoders import load_embedder
from cclddg.latents import load_latent_space
from cclddg.run_config import resolve
from cclddg.training.trainer import Trainer

# --tiny: the demo's models at 16 px (own autoencoder of factor 2, 8x8x4 latents) and a generator to match.
TINY_TRAIN = dict(n_channels_unet=8, ch_mults=(1, 2), is_attn=(False, False), n_channels_disc=8,
                  ch_mults_disc=(1, 2), is_attn_disc=(False, False), batch_size=4, z_dim=4, n_z_channels=8,
                  n_cond_channels=8, cond_map_size=0, tensorboard=False)


def random_models(root: Path, models: str, tiny: bool) -> tuple[str, str, int]:
    """Random-init autoencoder and embedder specs (saved in `root`) and the image size for `models`."""
    torch.manual_seed(0)
    if models == "full-size":
        from diffusers import AutoencoderKL

        from cclddg.encoders.cloob_pretrained import (
            VIT_B16,
            PretrainedCLOOB,
            write_converted,
        )
        from cclddg.latents.pretrained import kl_f8_config

        AutoencoderKL.from_config(kl_f8_config()).save_pretrained(root / "kl-f8")
        write_converted(root / "cloob.safetensors", PretrainedCLOOB(VIT_B16))
        return f"kl-f8:{root / 'kl-f8'}", f"cloob-vit-b16:{root / 'cloob.safetensors'}", 128
    from cclddg.encoders.own_cloob import CLOOBModel
    from cclddg.latents.own_ae import build_autoencoder

    if tiny:
        build_autoencoder((8, 16), 4).save_pretrained(root / "ae")
        CLOOBModel(dim=16, image_size=16, widths=(8, 16)).save_pretrained(root / "cloob")
        return f"own:{root / 'ae'}", f"cloob-tiny:{root / 'cloob'}", 16
    build_autoencoder((16, 32, 64), 4).save_pretrained(root / "ae")
    CLOOBModel(dim=256, image_size=32, widths=(32, 64, 128)).save_pretrained(root / "cloob")
    return f"own:{root / 'ae'}", f"cloob-tiny:{root / 'cloob'}", 64


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """--models, --ae, --encoder: the models a benchmark runs (`chosen_models`)."""
    p.add_argument("--models", choices=("demo", "full-size"), default="demo")
    p.add_argument("--ae", help="own autoencoder run (default: a random init of --models)")
    p.add_argument("--encoder", help="embedder spec (default: a random init of --models)")


def chosen_models(root: Path, args: argparse.Namespace) -> tuple[str, str, int]:
    """`random_models` of --models, with --ae and --encoder in their place where given."""
    ae, encoder, size = random_models(root, args.models, args.tiny)
    return f"own:{Path(args.ae).resolve()}" if args.ae else ae, args.encoder or encoder, size


def onthefly_batches(trainer: Trainer, data, embedder):
    """A stand-in for `Trainer.batch` that renders, encodes and embeds the step's examples (the cache's
    work), then conditions them as `TrainingData.batch` does."""
    cfg = trainer.cfg

    def batch(step: int, micro: int = 0, drop: bool = True):
        images, _, captions = data.get_batch(trainer.example_indices(step, micro))
        found = encode_batch(images, captions, trainer.inputs.space, embedder)
        cond = training_condition(found["image_emb"], found["text_emb"], cfg.pct_text,
                                               cfg.pseudo_text_xi, random=drop)
        return found["latents"], drop_to_null(cond, cfg.pct_zeros) if drop else cond
    return batch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_flags(p)
    p.add_argument("--steps", type=int, default=None, help="steps per round (default 10; quick and tiny 2)")
    p.add_argument("--repeats", type=int, default=None, help="rounds (default 3; quick and tiny 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default 2; tiny 1)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--tiny", action="store_true", help="the quick run on tiny demo models at 16 px, 1 thread (CI)")
    args = p.parse_args()
    if args.tiny and args.models == "full-size":
        p.error("--tiny runs the demo models; drop --models full-size")
    quick = args.quick or args.tiny
    steps = args.steps or (2 if quick else 3 if args.models == "full-size" else 10)
    repeats = args.repeats or (1 if quick else 3)
    threads = args.threads or (1 if args.tiny else 2)
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ae, encoder, size = chosen_models(root, args)
        space = load_latent_space(ae)
        embedder = load_embedder(encoder)
        n = 16 if args.tiny else 64 if quick or args.models == "full-size" else 2048
        source = open_source(f"shapes:{size}", size, seed=0, length=n)
        encode_dataset(source, f"shapes:{size}", 0, n, size, space, embedder, root / "cache", progress=False)
        cfg = resolve("cclddg", {"data": str(root / "cache"), "n_batches": 10**6, "text_prior": "retrieval",
                                 **(TINY_TRAIN if args.tiny else {})})
        trainer = Trainer(cfg, root / "run", progress=False)
        batches = {"cache": trainer.batch,
                   "on the fly": onthefly_batches(trainer, open_dataset(f"shapes:{size}", size, seed=0, length=n),
                                                  embedder)}
        times: dict[str, list[float]] = {name: [] for name in batches}
        trainer.train_step()  # warm-up
        for _ in range(repeats):
            for name, batch in batches.items():
                trainer.batch = batch
                start = time.perf_counter()
                for _ in range(steps):
                    trainer.train_step()
                times[name].append(steps / (time.perf_counter() - start))
    rate = {k: statistics.median(v) for k, v in times.items()}
    print(f"cclddg preset, {args.models} models{' (tiny)' if args.tiny else ''}, batch {cfg.batch_size}, "
          f"{size}x{size} -> {cfg.latent_channels}x{size // cfg.latent_factor}^2 latents, {threads} threads, "
          f"{repeats} rounds of {steps} steps")
    for name, v in rate.items():
        print(f"  {name:11s} {v:7.2f} steps/s")
    print(f"ratio cache / on the fly: {rate['cache'] / rate['on the fly']:.1f}x")


if __name__ == "__main__":
    main()
