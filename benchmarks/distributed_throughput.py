"""CPU data parallel (torchrun, several processes) vs one process, at the same global batch and core count.

What it measures
----------------
Training samples/s of the real command line, run as subprocesses, in two configurations:

- ``1 proc``  ``python -m cclddg.cli train --batch_size G --threads T ...``
- ``N proc``  ``python -m torch.distributed.run --standalone --nproc_per_node N -m cclddg.cli train
              --batch_size G/N --threads T/N ...`` (``--nproc``, default 2)

``--batch_size`` of ``cclddg train`` is per process, so both optimise on the same global batch G, and
both use T cores in all (default T = ``os.cpu_count()``: here 1 process x 2 threads vs 2 processes x 1
thread). The model is fixed: the ``fast`` preset on ``--data shapes:32`` (32x32), G = the preset's batch
size (32) unless ``--batch_size`` says otherwise; ``--preset``/``--data`` change it. Every run gets
``--no_progress --log_every 10 --log_images_every 100000 --save_models_every 100000 --tensorboard false``
and ``--n_batches N`` (default 300), so no image grid or checkpoint lands inside the measured steps (one
of each is written after the last step, outside the measured records).

Throughput of one run = the median of the ``samples_per_s`` field of its ``RUN/log.jsonl`` records
after the first 20 % of steps (warm-up: imports done, allocator and caches warm). The trainer logs
``samples_per_s`` as global (all processes) samples per second over the 10 steps since the last record,
so the two configurations compare directly. Wall time per run (process start to exit: imports, process
group set-up, the steps, the final grid and checkpoint) is printed beside it.

Method: ``--repeats`` rounds (default 2); each round runs the 1-process run then the N-process run, so a
drift in machine load hits both alike. The figure is the ratio N-process / 1-process of the medians over
rounds (> 1: data parallel is faster), with the per-round ratios for the spread.

How to run
----------
    python benchmarks/distributed_throughput.py                        # ~5 min on 2 cores
    python benchmarks/distributed_throughput.py --n_batches 40 --repeats 1   # smoke check, ~1 min
    python benchmarks/distributed_throughput.py --preset ddgan --data shapes:32 --batch_size 64 --keep runs/dp
    python benchmarks/distributed_throughput.py --json distributed_throughput.json
    python benchmarks/distributed_throughput.py --tiny     # 10 steps of width-8 nets on 16x16, 2 x 1 thread (gloo): CI
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cclddg.run_config import resolve
from cclddg.training.trackers import read_log

WARMUP_FRACTION = 0.2
COMMON = ("--no_progress", "--log_every", "10", "--log_images_every", "100000", "--save_models_every", "100000",
          "--tensorboard", "false")
# --tiny: the smallest run that still logs a record after the warm-up (step 10) and writes a grid and a checkpoint.
TINY = dict(data="shapes:16", batch_size=4, n_batches=10, threads=2, repeats=1,
            train_args="--n_channels_unet 8 --ch_mults 1,2 --is_attn 0,0 --n_channels_disc 8 --ch_mults_disc 1,2 "
                       "--is_attn_disc 0,0 --z_dim 4 --n_z_channels 8 --n_cond_channels 8")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="10 steps of width-8 nets on 16x16, one round (what CI runs)")
    p.add_argument("--preset", default="fast", help="training preset (default fast)")
    p.add_argument("--data", default=None, help="data source (default shapes:32, which sets 32x32 images)")
    p.add_argument("--batch_size", type=int, default=None,
                   help="GLOBAL batch G; each of the N processes gets G/N (default: the preset's batch size)")
    p.add_argument("--n_batches", "--steps", dest="n_batches", type=int, default=None,
                   help="training steps per run (default 300)")
    p.add_argument("--threads", type=int, default=None,
                   help=f"torch threads in all: T for 1 process, T/N each for N (default os.cpu_count() = "
                        f"{os.cpu_count()})")
    p.add_argument("--nproc", type=int, default=2, help="processes of the data-parallel run (default 2)")
    p.add_argument("--repeats", type=int, default=None, help="alternating rounds (default 2)")
    p.add_argument("--train_args", default=None,
                   help="more flags for both runs, one string, e.g. \"--n_channels_unet 16\"")
    p.add_argument("--keep", type=Path, default=None, help="write the run folders here (kept) instead of a temp dir")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    defaults = TINY if args.tiny else dict(data="shapes:32", n_batches=300, threads=os.cpu_count() or 1, repeats=2,
                                           train_args="")
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    for name in ("n_batches", "threads", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.nproc < 2:
        p.error("--nproc must be >= 2")
    if args.batch_size is None:
        args.batch_size = resolve(args.preset, {"data": args.data}).batch_size
    if args.batch_size % args.nproc:
        p.error(f"--batch_size {args.batch_size} (global) is not divisible by --nproc {args.nproc}")
    if args.threads % args.nproc:
        p.error(f"--threads {args.threads} is not divisible by --nproc {args.nproc}")
    if args.keep is not None and args.keep.exists() and any(args.keep.iterdir()):
        p.error(f"--keep {args.keep} is not empty")
    return args


def command(args: argparse.Namespace, out: Path, nproc: int) -> list[str]:
    train = ["-m", "cclddg.cli", "train", "--out", str(out), "--preset", args.preset, "--data", args.data,
             "--batch_size", str(args.batch_size // nproc), "--threads", str(args.threads // nproc),
             "--n_batches", str(args.n_batches), *COMMON, *shlex.split(args.train_args)]
    if nproc == 1:
        return [sys.executable, *train]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *train]


def run_once(args: argparse.Namespace, out: Path, nproc: int) -> dict:
    """Run the CLI, return its median samples/s after warm-up and its wall time; exit 1 if it fails."""
    cmd = command(args, out, nproc)
    env = dict(os.environ, HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"),
               OMP_NUM_THREADS=str(args.threads // nproc))
    tic = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - tic
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-30:])
        print(f"\nFAILED (exit {proc.returncode}): {shlex.join(cmd)}\n--- stderr (tail) ---\n{tail}", file=sys.stderr)
        sys.exit(1)
    records = [r for r in read_log(out) if isinstance(r.get("samples_per_s"), (int, float))]
    after = [r for r in records if r.get("step", 0) > WARMUP_FRACTION * args.n_batches]
    if not after:
        print(f"\nno samples_per_s records after step {WARMUP_FRACTION * args.n_batches:g} in {out / 'log.jsonl'} "
              f"({len(records)} in all); raise --n_batches", file=sys.stderr)
        sys.exit(1)
    rates = [r["samples_per_s"] for r in after]
    return {"nproc": nproc, "samples_per_s": statistics.median(rates), "wall_s": wall, "records": len(rates),
            "rates": rates, "out": str(out)}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    n = args.nproc
    labels = {1: "1 proc", n: f"{n} proc"}
    print(f"distributed_throughput: preset {args.preset}, --data {args.data}, global batch {args.batch_size}, "
          f"{args.n_batches} steps per run, {args.threads} thread(s) in all "
          f"(1 x {args.threads} threads vs {n} x {args.threads // n}), {args.repeats} round(s)"
          + (f", extra flags: {args.train_args}" if args.train_args else ""))
    print(f"throughput = median samples/s (global) of the log records after step "
          f"{int(WARMUP_FRACTION * args.n_batches)}; wall = the whole subprocess")
    print(f"  1 proc: {shlex.join(command(args, Path('A'), 1)[1:])}")
    print(f"  {n} proc: {shlex.join(command(args, Path('B'), n)[1:])}")
    print()
    head = f"{'round':>5} {'config':>8} {'samples/s':>10} {'wall s':>8} {'records':>8}"
    print(head)
    print("-" * len(head))

    results: dict[int, list[dict]] = {1: [], n: []}
    with tempfile.TemporaryDirectory(prefix="cclddg_dp_") as tmp:
        root = args.keep if args.keep is not None else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        t_start = time.perf_counter()
        for i in range(args.repeats):
            for nproc in (1, n):
                r = run_once(args, root / f"round{i}_{nproc}proc", nproc)
                results[nproc].append(r)
                print(f"{i:>5} {labels[nproc]:>8} {r['samples_per_s']:>10.1f} {r['wall_s']:>8.1f} {r['records']:>8}",
                      flush=True)
        elapsed = time.perf_counter() - t_start

    one = statistics.median(r["samples_per_s"] for r in results[1])
    many = statistics.median(r["samples_per_s"] for r in results[n])
    per_round = [b["samples_per_s"] / a["samples_per_s"] for a, b in zip(results[1], results[n])]
    wall_one = statistics.median(r["wall_s"] for r in results[1])
    wall_many = statistics.median(r["wall_s"] for r in results[n])
    print()
    print(f"median samples/s: 1 proc {one:.1f}, {n} proc {many:.1f}")
    print(f"median wall s:    1 proc {wall_one:.1f}, {n} proc {wall_many:.1f}")
    print(f"ratio {n} proc / 1 proc (samples/s): {many / one:.3f}  "
          f"(per round: {', '.join(f'{x:.3f}' for x in per_round)}); whole benchmark {elapsed:.0f} s")
    if args.keep is not None:
        print(f"runs kept in {args.keep}")

    result = {"benchmark": "distributed_throughput", "python": platform.python_version(),
              "machine": platform.machine(), "cpu_count": os.cpu_count(),
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "samples_per_s": {"1": one, str(n): many}, "wall_s": {"1": wall_one, str(n): wall_many},
              "ratio": many / one, "ratio_per_round": per_round, "elapsed_s": elapsed,
              "runs": {str(k): v for k, v in results.items()}}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"\nwrote {args.json}")
    return result


if __name__ == "__main__":
    main()
