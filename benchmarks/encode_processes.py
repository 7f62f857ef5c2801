"""`cclddg encode` in one process with T threads against `accelerate launch` with P processes of T/P threads each
(the same cores), and what a cache costs on disk: the figures to plan a CC12M-sized encode on paper.

What it measures
----------------
The real command line, run as subprocesses, on `--n` shapes images (`--workers 0`: shapes render in the encoding
process, so no reader process competes for the cores):

- ``1 proc``  ``python -m cclddg.cli encode --threads T ...``
- ``P proc``  ``accelerate launch --num_processes P -m cclddg.cli encode --threads T/P ...`` (each process
              encodes its part into CACHE/part-R-of-P, rank 0 writes cache.json)

with the models of `--models` (random init: the cost does not depend on the weights; `--ae`/`--encoder` use trained
ones):

- ``demo``       64x64 images, the demo's own autoencoder (factor 4) and own CLOOB;
- ``full-size``  latent diffusion's KL-f8 (84 M parameters) and the pretrained CLOOB ViT-B/16 architecture (images
                 resized to 224 px for it, captions through its 12-layer text tower), at `--img_size` (256: CC12M's
                 usual size; the seed trained at 128).

Each run is timed from process start to exit (imports and accelerate's start-up included), so examples/s is what a
user sees; `--n` large enough makes the start-up small. The latent scale is given (`--scale 1`): measuring it
encodes the source's first 512 images on rank 0 while the other ranks wait, a fixed cost that is nothing at CC12M's
size but all of a 128-image run (`--measure_scale` times it too). Rounds
alternate the two configurations (a drift in machine load hits both alike); medians are printed with their ratio,
and the cache's bytes per example as GB per million examples.

    python benchmarks/encode_processes.py                            # demo models, 4,000 images (~3 min)
    python benchmarks/encode_processes.py --models full-size --n 192  # KL-f8 + ViT-B/16 at 256 px (~6 min)
    python benchmarks/encode_processes.py --tiny                     # 16 px tiny models, 2 x 1 thread: what CI runs
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cache_vs_onthefly import add_model_flags, chosen_models

MILLION = 1_000_000


def encode_command(processes: int, threads: int, flags: list[str]) -> list[str]:
    encode = ["-m", "cclddg.cli", "encode", *flags, "--threads", str(threads)]
    if processes == 1:
        return [sys.executable, *encode]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *encode]


def timed_encode(processes: int, threads: int, flags: list[str], out: Path) -> float:
    """Seconds of one encode into a new `out`, process start to exit (HF_HOME beside it: no user's accelerate
    config applies)."""
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads), "HF_HOME": str(out.parent / "hf")}
    start = time.perf_counter()
    found = subprocess.run(encode_command(processes, threads, [*flags, "--out", str(out)]), capture_output=True,
                           text=True, env=env)
    seconds = time.perf_counter() - start
    if found.returncode != 0:
        raise SystemExit(f"encode with {processes} process(es) failed:\n{found.stderr[-2000:]}")
    if not (out / "cache.json").is_file():
        raise SystemExit(f"encode with {processes} process(es) wrote no {out}/cache.json")
    return seconds


def bytes_per_example(cache: Path, n: int) -> float:
    files = [p for p in cache.rglob("*") if p.is_file() and p.name != "cache.json"]
    return sum(p.stat().st_size for p in files) / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_flags(p)
    p.add_argument("--img_size", type=int, default=None, help="default: 64 (demo), 256 (full-size)")
    p.add_argument("--n", type=int, default=None, help="images encoded per run (default 4000; full-size 192)")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="threads in all (default: the CPU count)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--measure_scale", action="store_true", help="let rank 0 measure the latent scale on the first "
                   "512 images while the other ranks wait (default: the scale given, so only encoding is timed)")
    p.add_argument("--tiny", action="store_true", help="16 px tiny models, 16 images, 2 threads, one round (CI)")
    args = p.parse_args()
    threads = 2 if args.tiny else args.threads or os.cpu_count() or 1
    if args.processes < 2:
        p.error("--processes must be 2 or more (one process is the baseline)")
    if threads % args.processes:
        p.error(f"--threads {threads} does not split into {args.processes} processes")
    full = args.models == "full-size"
    n = 16 if args.tiny else args.n or (192 if full else 4000)
    repeats = 1 if args.tiny else args.repeats
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ae, encoder, size = chosen_models(root, args)
        size = args.img_size or (256 if full else size)
        flags = ["--data", f"shapes:{size}", "--n", str(n), "--autoencoder", ae, "--encoder", encoder,
                 "--workers", "0", "--batch_size", "32" if full else "256", "--no_progress"]
        if not args.measure_scale:
            flags += ["--scale", "1.0"]
        configs = {"1 proc": (1, threads), f"{args.processes} proc": (args.processes, threads // args.processes)}
        seconds: dict[str, list[float]] = {name: [] for name in configs}
        for _ in range(repeats):
            for name, (processes, each) in configs.items():
                seconds[name].append(timed_encode(processes, each, flags, root / name.replace(" ", "-")))
        per_example = bytes_per_example(root / "1-proc", n)
    print(f"encode {n} shapes at {size} px with {ae.split(':')[0]} + {encoder.split(':')[0]} ({args.models}), "
          f"{threads} threads in all, {repeats} round(s), process start to exit:")
    rates = {}
    for name, (processes, each) in configs.items():
        median = statistics.median(seconds[name])
        rates[name] = n / median
        print(f"  {name} x {each} thread(s): {median:.1f} s, {rates[name]:.1f} examples/s "
              f"({rates[name] / processes:.2f} per process)  rounds: {[round(s, 1) for s in seconds[name]]}")
    first, second = rates.values()
    print(f"  {args.processes} processes / 1 process: {second / first:.2f}x")
    print(f"cache on disk: {per_example / 1024:.1f} KiB per example, {per_example * MILLION / 1e9:.1f} GB per million "
          f"examples; one million examples at {max(rates.values()):.1f} examples/s take "
          f"{MILLION / max(rates.values()) / 3600:.0f} hours here")


if __name__ == "__main__":
    main()
