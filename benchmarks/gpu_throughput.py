"""GPU figures of the `cclddg` preset: training samples/s at 128 and 256 px (latents 4x16x16 and 4x32x32) in fp32
and bf16, with and without torch.compile and channels_last; sampling latency of 1 and 16 images; peak GPU memory.

One training step is the DDGAN step of the trainer's objective functions (objectives/ddgan.py): D on real and fake
pairs with lazy R1 at its real rate, then G through D, Adam on both, on random latents of the right shape (the
autoencoder and the embedder never run in training: the cache holds their outputs). Sampling is
pipeline.sample (T steps, classifier-free guidance 2, batched) without decoding. Medians of timed blocks after
warm-up; every variant in the same run, so ratios are comparable.

    python benchmarks/gpu_throughput.py                      # on the GPU (cuda:0); says so and exits without one
    python benchmarks/gpu_throughput.py --tiny               # tiny nets, a few steps: on the CPU if there is no GPU
    python benchmarks/gpu_throughput.py --sizes 128 --batch 64 --json gpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import statistics
import time

import torch

from cclddg import diffusion
from cclddg.objectives import ddgan
from cclddg.objectives.base import sample_steps
from cclddg.config import PRESETS, TrainConfig
from cclddg.pipeline import SamplingConfig, sample
from cclddg.training.trainer import build_nets

EMBED_DIM = 512  # the pretrained CLOOB ViT-B/16's width


def nets(size: int, tiny: bool, device: torch.device):
    """The cclddg preset's generator and discriminator for `size` px through KL-f8 (4 latent channels, /8)."""
    values = {k: v for k, v in PRESETS["cclddg"].items() if k != "needs_latents"}
    values.update(img_size=size, latent_channels=4, latent_factor=8, cond="embedding", encoder="cloob-tiny:-")
    if tiny:
        values.update(n_channels_unet=8, n_channels_disc=8, n_cond_channels=8, n_z_channels=8, z_dim=4,
                      cond_map_size=0)
    cfg = TrainConfig.from_dict(values)
    gen, disc = build_nets(cfg, EMBED_DIM)
    return cfg, gen.to(device), disc.to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, steps: int, repeats: int, device: torch.device) -> float:
    """Median seconds per call over `repeats` blocks of `steps` calls (after one warm-up block)."""
    blocks = []
    for i in range(repeats + 1):
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        sync(device)
        if i:
            blocks.append((time.perf_counter() - start) / steps)
    return statistics.median(blocks)


def train_variant(size: int, batch: int, dtype: torch.dtype, compiled: bool, channels_last: bool, args,
                  device: torch.device) -> dict:
    cfg, gen, disc = nets(size, args.tiny, device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    gen, disc = gen.to(memory_format=fmt), disc.to(memory_format=fmt)
    opt_g = torch.optim.Adam(gen.parameters(), lr=cfg.lr_gen, betas=cfg.adam_betas)
    opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.lr_disc, betas=cfg.adam_betas)
    run_gen = torch.compile(gen) if compiled else gen  # D keeps eager mode: R1 differentiates it twice
    schedule = diffusion.make_schedule(cfg.schedule, cfg.n_steps, cfg.beta_min, cfg.beta_max).to(device)
    latent = size // 8
    x0 = torch.randn(batch, 4, latent, latent, device=device).to(memory_format=fmt)
    cond = torch.nn.functional.normalize(torch.randn(batch, EMBED_DIM, device=device), dim=-1)
    autocast = (functools.partial(torch.autocast, device.type, dtype=dtype) if dtype != torch.float32
                else contextlib.nullcontext)
    step = itertools.count()

    def train_step() -> None:
        k = next(step)
        t = sample_steps(batch, cfg.n_steps, device)
        x_prev, x_t = diffusion.q_pair(schedule, x0, t)
        z = torch.randn(batch, cfg.z_dim, device=device)
        with autocast():
            x0_pred = run_gen(x_t, t, cond, z)
            fake = ddgan.fake_step(schedule, cfg.step_kind, x_t, x0_pred, t)
            loss_d, _ = ddgan.discriminator_loss(disc, x_prev, fake, x_t, t, cond,
                                                      ddgan.r1_weight(k, cfg.r1_gamma, cfg.lazy_reg))
        loss_d.backward()
        opt_d.step()
        opt_d.zero_grad(set_to_none=True)
        disc.requires_grad_(False)
        with autocast():
            loss_g, _ = ddgan.generator_loss(disc, fake, x_t, t, cond, x0_pred, x0, cfg.recon_loss_scale)
        loss_g.backward()
        disc.requires_grad_(True)
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = timed(train_step, args.steps, args.repeats, device)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"size": size, "dtype": str(dtype).removeprefix("torch."), "compile": compiled,
            "channels_last": channels_last, "samples_per_s": batch / seconds, "ms_per_step": 1000 * seconds,
            "peak_gib": peak}


def sampling_latency(size: int, n: int, args, device: torch.device) -> dict:
    cfg, gen, _ = nets(size, args.tiny, device)
    gen.eval()
    config = SamplingConfig.of(cfg)
    cond = torch.nn.functional.normalize(torch.randn(n, EMBED_DIM, device=device), dim=-1)
    rng = torch.Generator(device=device).manual_seed(0)
    seconds = timed(lambda: sample(gen, config, n, cond=cond, guidance=2.0, rng=rng, device=device, space=_NoDecode()),
                    args.steps, args.repeats, device)
    return {"size": size, "images": n, "ms": 1000 * seconds, "steps": cfg.n_steps}


class _NoDecode:
    """Stands for the autoencoder: latents out as they are (decoding is the autoencoder's cost, not the
    generator's; benchmarks/latent_sampling.py measures it)."""

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny nets and a few steps (CPU without a GPU)")
    parser.add_argument("--sizes", default="128,256", help="image sizes in px (default 128,256)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no_compile", action="store_true", help="skip the torch.compile variants")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    if torch.cuda.is_available():
        device = torch.device("cuda:0")
    elif args.tiny:
        device = torch.device("cpu")
    else:
        print("gpu_throughput: no CUDA device here; nothing to measure (--tiny runs the code path on the CPU)")
        return
    if args.tiny:
        args.sizes, args.batch, args.steps, args.repeats, args.no_compile = "32", 2, 2, 1, True
    sizes = [int(s) for s in args.sizes.split(",")]
    dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cpu" or torch.cuda.is_bf16_supported() else [])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"gpu_throughput on {name}, torch {torch.__version__}, batch {args.batch}, cclddg preset (T=4, lazy R1)")
    train = []
    compiles = (False,) if args.no_compile else (False, True)
    for size, dtype, compiled, channels_last in itertools.product(sizes, dtypes, compiles, (False, True)):
        row = train_variant(size, args.batch, dtype, compiled, channels_last, args, device)
        train.append(row)
        base = next(r for r in train if r["size"] == size and r["dtype"] == "float32" and not r["compile"]
                    and not r["channels_last"])
        print(f"  train {size:4d}px {row['dtype']:8s} compile={int(compiled)} channels_last={int(channels_last)}: "
              f"{row['samples_per_s']:8.1f} samples/s  {row['ms_per_step']:7.1f} ms/step  "
              f"x{row['samples_per_s'] / base['samples_per_s']:.2f} vs fp32  peak {row['peak_gib']:.2f} GiB")
    samples = [sampling_latency(size, n, args, device) for size in sizes for n in (1, 16)]
    for row in samples:
        print(f"  sample {row['size']:4d}px {row['images']:2d} image(s), T={row['steps']}, guidance 2: "
              f"{row['ms']:7.1f} ms ({row['ms'] / row['images']:.1f} ms/image)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "train": train, "sample": samples}, f, indent=2)


if __name__ == "__main__":
    main()
