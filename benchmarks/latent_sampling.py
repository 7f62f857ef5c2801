"""Latent sampling throughput: the latent DDGAN (T=4) vs latent DDPM-1000 and DDIM-50, decode included.

What it measures
----------------
Images per second from noise to 64x64 RGB pixels, with classifier-free guidance (guidance 2, one
unit embedding for the whole batch), all on the SAME UNet: the `cclddg` preset's generator on the
own autoencoder's 16x16x4 latents (`--n_channels` overrides its width). Random weights: the cost does
not depend on training. Every variant ends with the autoencoder's decode of its latents.

- ``ddgan-4``    ``cclddg.samplers.sample_ddgan`` on the preset's schedule (vp, T=4), with z;
- ``ddim-50``    ``sample_ddim(steps=50)`` on a linear T=1000 schedule;
- ``ddpm-1000``  ``sample_ddpm``: EXTRAPOLATED from its first ``--ddpm_slice`` steps
                 (every step costs the same), times 1000/slice, plus one decode.

Rounds interleave the variants (a drift in load hits them alike); medians per variant; the ratios
(DDGAN over the others, images/s) come from the same run.

    python benchmarks/latent_sampling.py              # ~1-2 min on 2 cores
    python benchmarks/latent_sampling.py --quick      # seconds: smoke check
    python benchmarks/latent_sampling.py --tiny       # 16 px through a factor-2 autoencoder, width 8: what CI runs
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from cclddg import diffusion
from cclddg.latents.own_ae import build_autoencoder
from cclddg.latents.vae import DiffusersVAE
from cclddg.samplers import Guided, sample_ddgan, sample_ddim, sample_ddpm
from cclddg.run_config import resolve
from cclddg.training.trainer import build_nets

# --tiny: 16x16 pixels through a factor-2 autoencoder (8x8x4 latents) and a UNet of width 8 whose 4x4
# bottleneck still takes the preset's spatial conditioning map; 16-d embeddings.
TINY = dict(img_size=16, latent_factor=2, n_channels_unet=8, ch_mults=(1, 2), is_attn=(False, False))


class StopAfter(torch.nn.Module):
    """Runs the wrapped model `calls` times, then stops the sampling loop (for the DDPM slice)."""

    def __init__(self, model: torch.nn.Module, calls: int) -> None:
        super().__init__()
        self.model, self.calls, self.config = model, calls, model.config

    def forward(self, *args):
        if self.calls == 0:
            raise StopIteration
        self.calls -= 1
        return self.model(*args)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--tiny", action="store_true", help="tiny sizes (TINY), batch 1, one DDPM step, 1 thread (CI)")
    p.add_argument("--batch", type=int, default=None, help="images per call (default 64; quick 4; tiny 1)")
    p.add_argument("--repeats", type=int, default=None, help="rounds (default 3; quick and tiny 1)")
    p.add_argument("--ddpm_slice", type=int, default=None,
                   help="DDPM steps run, scaled to 1000 (default 20; quick 3; tiny 1)")
    p.add_argument("--n_channels", type=int, default=None, help="UNet base width (default: the cclddg preset's)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default 2; tiny 1)")
    args = p.parse_args()
    batch = args.batch or (1 if args.tiny else 4 if args.quick else 64)
    repeats = args.repeats or (1 if args.quick or args.tiny else 3)
    ddpm_slice = args.ddpm_slice or (1 if args.tiny else 3 if args.quick else 20)
    threads = args.threads or (1 if args.tiny else 2)
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)

    overrides = {"autoencoder": "own:unused", "encoder": "cloob-tiny:unused", "latent_channels": 4, "latent_factor": 4,
                 **(TINY if args.tiny else {})}
    if args.n_channels:
        overrides["n_channels_unet"] = args.n_channels
    cfg = resolve("cclddg", overrides)
    dim = 16 if args.tiny else 256
    gen = build_nets(cfg, dim)[0].eval()
    space = DiffusersVAE(build_autoencoder((8, 16) if args.tiny else (16, 32, 64), 4))
    size = cfg.img_size // cfg.latent_factor
    shape = (batch, cfg.latent_channels, size, size)
    cond = torch.nn.functional.normalize(torch.randn(1, dim), dim=-1).expand(batch, dim)
    ddgan_sched = diffusion.make_schedule(cfg.schedule, cfg.n_steps, cfg.beta_min, cfg.beta_max)
    linear = diffusion.make_schedule("linear", 1000)

    def ddgan() -> None:
        space.decode(sample_ddgan(Guided(gen, cond, 2.0), torch.randn(shape), ddgan_sched, step_kind=cfg.step_kind,
                                  z_dim=cfg.z_dim))

    def ddim() -> None:
        space.decode(sample_ddim(Guided(gen_eps, cond, 2.0), torch.randn(shape), linear, steps=50))

    def ddpm_slice_run() -> None:
        try:
            sample_ddpm(Guided(StopAfter(gen_eps, ddpm_slice), cond, 2.0), torch.randn(shape), linear)
        except StopIteration:
            pass

    gen_eps = build_nets(resolve("latent-diffusion", {**overrides, "n_channels_unet": cfg.n_channels_unet,
                                                          "ch_mults": cfg.ch_mults, "is_attn": cfg.is_attn,
                                                          "cond": "embedding", "cond_map_size": cfg.cond_map_size,
                                                          "coord_channels": cfg.coord_channels}), dim)[0].eval()
    timings: dict[str, list[float]] = {"ddgan-4": [], "ddim-50": [], "ddpm-1000": []}
    decode = []
    with torch.no_grad():
        ddgan()  # warm-up
        for _ in range(repeats):
            for name, fn in (("ddgan-4", ddgan), ("ddim-50", ddim), ("ddpm-1000", ddpm_slice_run)):
                start = time.perf_counter()
                fn()
                timings[name].append(time.perf_counter() - start)
            start = time.perf_counter()
            space.decode(torch.randn(shape))
            decode.append(time.perf_counter() - start)
    dec = statistics.median(decode)
    seconds = {"ddgan-4": statistics.median(timings["ddgan-4"]), "ddim-50": statistics.median(timings["ddim-50"]),
               "ddpm-1000": statistics.median(timings["ddpm-1000"]) * 1000 / ddpm_slice + dec}
    ips = {k: batch / v for k, v in seconds.items()}
    n_params = sum(p.numel() for p in gen.parameters()) / 1e6
    print(f"latent {shape[1:]} -> {cfg.img_size}x{cfg.img_size} pixels, batch {batch}, guidance 2, UNet "
          f"{n_params:.2f}M params (width {cfg.n_channels_unet}), {threads} threads, {repeats} rounds; "
          f"decode {batch / dec:.0f} img/s")
    for name, v in ips.items():
        print(f"  {name:10s} {v:10.3f} images/s")
    print(f"ratio ddgan-4 / ddim-50:   {ips['ddgan-4'] / ips['ddim-50']:.1f}x")
    print(f"ratio ddgan-4 / ddpm-1000: {ips['ddgan-4'] / ips['ddpm-1000']:.0f}x (ddpm extrapolated from {ddpm_slice} steps)")


if __name__ == "__main__":
    main()
