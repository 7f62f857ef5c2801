"""Embedding throughput of the pretrained-CLOOB ViT-B/16 towers on this CPU.

What it measures
----------------
``cclddg.encoders.cloob_pretrained.PretrainedCLOOB(VIT_B16)`` with random weights (the cost does
not depend on the values), under ``torch.inference_mode``:

- ``image``      ``embed_images`` on a batch of 16 RGB images at 224 px (already the tower's size,
                 so preprocessing is a scale and a normalisation, no resampling);
- ``text``       ``embed_texts`` on 64 short prompts (77 tokens a row), CLIP tokenisation included;
- ``tokenizer``  tokenising the 64 prompts alone (its share of ``text``);
- ``matmul``     a same-run baseline: square float32 matmuls adding up to the FLOPs of one image
                 batch, so "% of matmul" says how close each tower gets to the machine's dense
                 matmul rate.

FLOPs are counted analytically (2 per multiply-add: the q/k/v/out and MLP linears, the two attention
products, the patch embedding and the projection; layer norms, softmax and GELU are left out).

Method: one warm-up call per item, then ``--repeats`` rounds that time every item once in turn
(so a drift in machine load hits them alike); medians are reported.

How to run
----------
    python benchmarks/embed_throughput.py                # ViT-B/16 sizes (~1.5 min on 2 idle cores)
    python benchmarks/embed_throughput.py --quick        # tiny sizes, a few seconds: smoke check
    python benchmarks/embed_throughput.py --tiny         # 1-layer towers, 16 px, batches of 2: what CI runs
    python benchmarks/embed_throughput.py --threads 2 --json embed_throughput.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from cclddg.encoders.cloob_pretrained import (
    VIT_B16,
    CLOOBConfig,
    ImageTowerConfig,
    PretrainedCLOOB,
    TextTowerConfig,
)

PROMPTS = ["a photo of a cat", "a red circle on a blue background", "an oil painting of a lighthouse at dusk",
           "a small green triangle", "a watercolour of mountains", "a dog running on the beach",
           "a bowl of fruit", "a city street at night in the rain"]
QUICK = CLOOBConfig(d_embed=64, image=ImageTowerConfig(image_size=64, patch_size=16, n_layers=2, width=128, n_heads=2),
                    text=TextTowerConfig(n_layers=2, width=128, n_heads=2))
TINY = CLOOBConfig(d_embed=16, image=ImageTowerConfig(image_size=16, patch_size=8, n_layers=1, width=32, n_heads=2),
                   text=TextTowerConfig(n_layers=1, width=32, n_heads=2))
# config -> (towers, their name, image batch, text batch, repeats, matmul side); tiny runs 1 thread.
CONFIGS = {"vit_b16": (VIT_B16, "ViT-B/16", 16, 64, 3, 2048), "quick": (QUICK, "QUICK", 16, 64, 2, 2048),
           "tiny": (TINY, "TINY", 2, 4, 1, 256)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny towers and 2 repeats, to check the script works")
    p.add_argument("--tiny", action="store_true", help="1-layer towers, batches of 2 and 4, 1 repeat, 1 thread (CI)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's; tiny 1)")
    p.add_argument("--image_batch", type=int, default=None, help="images per call (default 16; tiny 2)")
    p.add_argument("--text_batch", type=int, default=None, help="prompts per call (default 64; tiny 4)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 3; quick 2; tiny 1)")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    args.config = "tiny" if args.tiny else "quick" if args.quick else "vit_b16"
    _, _, image_batch, text_batch, repeats, _ = CONFIGS[args.config]
    defaults = dict(threads=1 if args.tiny else torch.get_num_threads(), image_batch=image_batch,
                    text_batch=text_batch, repeats=repeats)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    for name in ("threads", "image_batch", "text_batch", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    return args


def tower_flops(n_tokens: int, width: int, n_layers: int) -> float:
    """FLOPs of the transformer blocks on one sequence: 12 d^2 weights per token, 2 S^2 d attention."""
    return n_layers * (2 * n_tokens * 12 * width ** 2 + 4 * n_tokens ** 2 * width)


def image_flops(cfg: CLOOBConfig) -> float:
    c = cfg.image
    patch = 2 * c.n_patches * 3 * c.patch_size ** 2 * c.width
    return patch + tower_flops(1 + c.n_patches, c.width, c.n_layers) + 2 * c.width * cfg.d_embed


def text_flops(cfg: CLOOBConfig) -> float:
    c = cfg.text
    return tower_flops(c.context, c.width, c.n_layers) + 2 * c.width * cfg.d_embed


def matmul_job(total_flops: float, n: int = 2048) -> tuple[Callable[[], object], float]:
    """Square matmuls adding up to about `total_flops`; returns the job and its exact FLOPs."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    reps = max(1, round(total_flops / (2 * n ** 3)))

    def run() -> object:
        out = None
        for _ in range(reps):
            out = a @ b
        return out
    return run, reps * 2.0 * n ** 3


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg, label, *_, matmul_side = CONFIGS[args.config]
    t0 = time.perf_counter()
    model = PretrainedCLOOB(cfg).eval().requires_grad_(False)
    build_s = time.perf_counter() - t0
    size = cfg.image.image_size
    images = torch.rand(args.image_batch, 3, size, size) * 2 - 1
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.text_batch)]
    tokenizer = model.tokenizer
    image_batch_flops = args.image_batch * image_flops(cfg)
    matmul, matmul_flops = matmul_job(image_batch_flops, matmul_side)

    # name -> (call, items per call, FLOPs per call)
    items: dict[str, tuple[Callable[[], object], int, float]] = {
        "image": (lambda: model.embed_images(images), args.image_batch, image_batch_flops),
        "text": (lambda: model.embed_texts(prompts), args.text_batch, args.text_batch * text_flops(cfg)),
        "tokenizer": (lambda: tokenizer(prompts), args.text_batch, 0.0),
        "matmul": (matmul, 1, matmul_flops),
    }
    times: dict[str, list[float]] = {name: [] for name in items}
    with torch.inference_mode():
        for call, _, _ in items.values():
            call()
        for _ in range(args.repeats):
            for name, (call, _, _) in items.items():
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)

    median = {name: statistics.median(ts) for name, ts in times.items()}
    matmul_rate = matmul_flops / median["matmul"]
    rows = []
    for name, (_, n, flops) in items.items():
        rate = flops / median[name] if flops else 0.0
        rows.append({"item": name, "batch": n, "median_s": median[name], "items_per_s": n / median[name],
                     "gflop_per_call": flops / 1e9, "gflop_per_s": rate / 1e9,
                     "pct_of_matmul": 100 * rate / matmul_rate if flops else None})

    print(f"# CLOOB {label} embedding throughput, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {args.threads} threads, {args.repeats} repeats (median); model built in {build_s:.1f} s")
    print(f"{'item':<11} {'batch':>5} {'median s':>9} {'items/s':>9} {'GFLOP/call':>10} {'GFLOP/s':>8} {'% matmul':>8}")
    for r in rows:
        pct = f"{r['pct_of_matmul']:.0f}%" if r["pct_of_matmul"] is not None else "-"
        gflop = f"{r['gflop_per_call']:.1f}" if r["gflop_per_call"] else "-"
        rate = f"{r['gflop_per_s']:.1f}" if r["gflop_per_s"] else "-"
        print(f"{r['item']:<11} {r['batch']:>5} {r['median_s']:>9.3f} {r['items_per_s']:>9.1f} {gflop:>10} {rate:>8} {pct:>8}")
    ratio = rows[1]["items_per_s"] / rows[0]["items_per_s"]
    print(f"texts/s over images/s: {ratio:.1f}x (FLOPs per text / per image: "
          f"{text_flops(cfg) / image_flops(cfg):.2f})")
    result = {"config": args.config, "threads": args.threads, "repeats": args.repeats,
              "torch": torch.__version__, "rows": rows, "times": times}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
