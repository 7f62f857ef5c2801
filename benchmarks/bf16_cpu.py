"""bf16 on this CPU, off and on in one run: does the CPU compute bf16 natively (AVX512-BF16 or AMX-BF16), and how
much faster, and how different, is each workload in bf16?

Workloads (random weights: the cost does not depend on them; the differences are those of random weights too):

- ``train cclddg``  the demo's generator step (`--preset cclddg`, batch 64, 16x16x4 latents of the demo-size
                    autoencoder, 256-d embeddings), `--mixed_precision bf16` (autocast, fp32 weights) vs `no`;
- ``train seed``    the seed preset's step (batch 8, 128 px as 16x16x4 KL-f8 latents, 512-d embeddings);
- ``train prior``   the learned text prior's step (`train-prior --mixed_precision bf16`: batch 512 of 256-d pairs);
- ``decode ...``    KL-f8 and TAESD decoding 4 latents at 128 and 256 px, and the demo's own autoencoder at 64 px:
                    the decoder cast to bf16 (what `cclddg sample` and `cclddg serve` run by default on a CPU with
                    native bf16, `--decode_dtype bfloat16`) vs fp32, with the PSNR of the bf16 images against the
                    fp32 ones.

Rounds alternate fp32 and bf16 (a drift in machine load hits both); the figure is the ratio of the medians,
fp32 seconds / bf16 seconds (> 1: bf16 is faster).

    python benchmarks/bf16_cpu.py               # ~6 min on 2 cores
    python benchmarks/bf16_cpu.py --tiny        # tiny sizes, one round: what CI runs
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cache_vs_onthefly import TINY_TRAIN, random_models  # noqa: E402  (the benchmarks' random demo models)

from cclddg.cpu import native_bf16, tune_cpu  # noqa: E402
from cclddg.data.latent_cache import encode_dataset  # noqa: E402
from cclddg.data.sources import open_source  # noqa: E402
from cclddg.encoders import load_embedder  # noqa: E402
from cclddg.latents import load_latent_space  # noqa: E402
from cclddg.run_config import resolve  # noqa: E402
from cclddg.training.trainer import Trainer  # noqa: E402


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR of images `a` against `b`, both in [-1, 1] (peak-to-peak 2)."""
    mse = (a.float() - b.float()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(4.0 / mse)).item()


def trainers(root: Path, preset: str, tiny: bool) -> tuple[Callable[[], object], Callable[[], object]]:
    """(fp32 step, bf16 step) of `preset` on a cache of random models' latents, the same batch every step."""
    models = "demo" if preset == "cclddg" or tiny else "full-size"
    ae, encoder, size = random_models(root / preset, models, tiny)
    batch = 2 if tiny else 64 if preset == "cclddg" else 8
    encode_dataset(open_source(f"shapes:{size}", size, seed=0, length=batch), f"shapes:{size}", 0, batch, size,
                   load_latent_space(ae), load_embedder(encoder), root / preset / "cache", progress=False)
    over = {"data": str(root / preset / "cache"), "batch_size": batch, "n_batches": 10**6, "tensorboard": False,
            "text_prior": "retrieval", **(TINY_TRAIN if tiny else {})}
    if preset == "seed":
        over.update(z_dim=4 if tiny else 16, n_steps=8, lr_gen=1e-4, lr_disc=1e-4)
    steps = []
    for precision in ("no", "bf16"):
        trainer = Trainer(resolve(preset, {**over, "mixed_precision": precision}), root / preset / precision,
                          progress=False)
        made = trainer.batch(0)
        trainer.batch = lambda *a, made=made, **k: made
        trainer.train_step()  # warm-up
        steps.append(trainer.train_step)
    return steps[0], steps[1]


def prior_trainers(root: Path, tiny: bool) -> tuple[Callable[[], object], Callable[[], object]]:
    """(fp32 step, bf16 step) of the learned text prior (`train-prior`, batch 512 of 256-d pairs, the demo's)."""
    import torch.nn.functional as F

    from cclddg.config import PriorTrainConfig
    from cclddg.priors.pairs import EmbeddingPairs
    from cclddg.training.prior_trainer import PriorTrainer

    dim, n, batch = (16, 64, 8) if tiny else (256, 4096, 512)
    generator = torch.Generator().manual_seed(0)
    pairs = EmbeddingPairs(F.normalize(torch.randn(n, dim, generator=generator), dim=-1),
                           F.normalize(torch.randn(n, dim, generator=generator), dim=-1))
    steps = []
    for precision in ("no", "bf16"):
        cfg = PriorTrainConfig(batch_size=batch, n_batches=10**6, eval_size=8, mixed_precision=precision)
        trainer = PriorTrainer(cfg, root / "prior" / precision, pairs, progress=False)
        trainer.train_step()  # warm-up
        steps.append(trainer.train_step)
    return steps[0], steps[1]


def decoders(root: Path, tiny: bool) -> dict[str, tuple[torch.nn.Module, torch.Tensor]]:
    """name -> (a decoder, its latents): KL-f8 and TAESD at 128 and 256 px, the demo's autoencoder at 64 px."""
    from diffusers import AutoencoderKL, AutoencoderTiny

    from cclddg.latents.own_ae import build_autoencoder
    from cclddg.latents.pretrained import kl_f8_config

    torch.manual_seed(0)
    small = {"block_out_channels": [8, 8, 16, 16], "norm_num_groups": 4} if tiny else {}
    kl = AutoencoderKL.from_config({**kl_f8_config(), **small})
    taesd = AutoencoderTiny() if not tiny else AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8),
                                                              decoder_block_out_channels=(8, 8, 8, 8))
    own = build_autoencoder((8, 16) if tiny else (16, 32, 64), 4)
    sizes = (32, 64) if tiny else (128, 256)
    out = {}
    for size in sizes:
        out[f"decode KL-f8 {size} px"] = (kl.eval(), torch.randn(4, 4, size // 8, size // 8))
        out[f"decode TAESD {size} px"] = (taesd.eval(), torch.randn(4, 4, size // 8, size // 8))
    factor = 2 if tiny else 4
    out["decode own 64 px"] = (own.eval(), torch.randn(4, 4, 64 // factor, 64 // factor))
    return out


def decode_pair(model: torch.nn.Module, latents: torch.Tensor) -> tuple[Callable, Callable, float]:
    """(fp32 decode, bf16 decode, PSNR of the bf16 images against the fp32 ones)."""
    import copy

    half = copy.deepcopy(model).to(torch.bfloat16)

    @torch.no_grad()
    def fp32():
        return model.decode(latents).sample.clamp(-1, 1)

    @torch.no_grad()
    def bf16():
        return half.decode(latents.to(torch.bfloat16)).sample.float().clamp(-1, 1)

    return fp32, bf16, psnr(bf16(), fp32())


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--tiny", action="store_true", help="tiny sizes, one round, 1 thread: what CI runs")
    args = p.parse_args()
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # its note on casting a whole model with .to(): that is the point here
    repeats = 1 if args.tiny else args.repeats
    tune_cpu(1 if args.tiny else args.threads)
    print(f"native bf16 on this CPU: {native_bf16()} (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    rows: list[tuple[str, float, float, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work: dict[str, tuple[Callable, Callable, str]] = {}
        for preset in ("cclddg", "seed"):
            fp32, bf16 = trainers(Path(tmp), preset, args.tiny)
            work[f"train {preset}"] = (fp32, bf16, "")
        work["train prior"] = (*prior_trainers(Path(tmp), args.tiny), "")
        for name, (model, latents) in decoders(Path(tmp), args.tiny).items():
            fp32, bf16, quality = decode_pair(model, latents)
            work[name] = (fp32, bf16, f"{quality:.1f} dB")
        for name, (fp32, bf16, quality) in work.items():
            fp32()
            bf16()  # warm-up both
            times = {"fp32": [], "bf16": []}
            for _ in range(repeats):
                times["fp32"].append(timed(fp32))
                times["bf16"].append(timed(bf16))
            rows.append((name, statistics.median(times["fp32"]), statistics.median(times["bf16"]), quality))
    print(f"| workload | fp32 s | bf16 s | fp32 / bf16 | bf16 vs fp32 (PSNR) |  ({repeats} rounds, medians)")
    print("|---|---|---|---|---|")
    for name, a, b, quality in rows:
        print(f"| {name} | {a:.4f} | {b:.4f} | {a / b:.2f}x | {quality or '–'} |")


if __name__ == "__main__":
    main()
