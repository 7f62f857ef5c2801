"""Resident memory of a long training run: does it grow?

What it measures
----------------
One real ``cclddg train`` run of a tiny DDGAN (16x16 shapes, widths 8, batch 4) as a subprocess, for
``--n_batches`` steps (default 10,000), with grids and checkpoints inside the run as a real run has them
(every ``--every`` steps, default 1,000), a log record every 100 steps, and the default trackers (log.jsonl,
and TensorBoard when it is installed). Each record of ``RUN/log.jsonl``
holds the trainer's resident memory (``rss_mb``, from /proc/self/statm at that step).

The baseline is the same run's resident memory at step ``--baseline`` (default 1,000: imports done, every
code path (R1, grids, checkpoints) taken at least once); the figure is the ratio of the resident memory at
the last step to it (1.00 = no growth; the issue's bound is 1.05). The peak over the steps after the
baseline is printed too.

How to run
----------
    python benchmarks/memory_growth.py                       # 10,000 steps, ~4 min on 2 cores
    python benchmarks/memory_growth.py --n_batches 2000 --baseline 200 --every 200   # smoke check, ~1 min
    python benchmarks/memory_growth.py --json memory_growth.json
    python benchmarks/memory_growth.py --tiny     # 20 steps, a record, grid and checkpoint every 10: what CI runs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cclddg.training.trackers import read_log

TINY = ("--img_size", "16", "--n_channels_unet", "8", "--ch_mults", "1,2", "--is_attn", "0,0",
        "--n_channels_disc", "8", "--ch_mults_disc", "1,2", "--is_attn_disc", "0,0", "--batch_size", "4",
        "--z_dim", "4", "--n_z_channels", "8", "--n_cond_channels", "8", "--no_progress")
# mode -> defaults; tiny logs every 10 steps and runs 1 thread (a second only waits at these sizes).
DEFAULTS = {"full": dict(n_batches=10_000, baseline=1_000, every=1_000, threads=2, log_every=100),
            "tiny": dict(n_batches=20, baseline=10, every=10, threads=1, log_every=10)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="20 steps with everything every 10, 1 thread (what CI runs)")
    p.add_argument("--n_batches", type=int, default=None, help="training steps (default 10,000; tiny 20)")
    p.add_argument("--baseline", type=int, default=None,
                   help="the step whose memory is the baseline (default 1,000; tiny 10)")
    p.add_argument("--every", type=int, default=None,
                   help="steps between grids and checkpoints (default 1,000; tiny 10)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default 2; tiny 1)")
    p.add_argument("--keep", type=Path, default=None, help="write the run folder here (kept) instead of a temp dir")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    for k, v in DEFAULTS["tiny" if args.tiny else "full"].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.baseline % args.log_every or args.n_batches % args.log_every:
        p.error(f"--baseline and --n_batches must be multiples of {args.log_every} (the log interval)")
    if not 0 < args.baseline < args.n_batches:
        p.error("--baseline must be between 0 and --n_batches")
    if args.keep is not None and args.keep.exists() and any(args.keep.iterdir()):
        p.error(f"--keep {args.keep} is not empty")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cclddg_mem_") as tmp:
        run = (args.keep if args.keep is not None else Path(tmp)) / "run"
        cmd = [sys.executable, "-m", "cclddg.cli", "train", "--out", str(run), *TINY, "--n_batches",
               str(args.n_batches), "--log_every", str(args.log_every), "--log_images_every", str(args.every),
               "--save_models_every", str(args.every), "--threads", str(args.threads)]
        print(f"memory_growth: {shlex.join(cmd[1:])}", flush=True)
        tic = time.perf_counter()
        proc = subprocess.run(cmd, env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True)
        wall = time.perf_counter() - tic
        if proc.returncode != 0:
            print(f"FAILED (exit {proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr)
            sys.exit(1)
        rss = {r["step"]: r["rss_mb"] for r in read_log(run) if r.get("rss_mb") is not None}

    base, last = rss[args.baseline], rss[args.n_batches]
    peak = max(v for s, v in rss.items() if s >= args.baseline)
    print(f"\n{'step':>7} {'resident MiB':>13}")
    marks = sorted({args.log_every, args.baseline, *range(args.every, args.n_batches + 1, args.every), args.n_batches})
    for step in marks:
        print(f"{step:>7} {rss[step]:>13.1f}")
    print(f"\nresident memory at step {args.n_batches:,} / at step {args.baseline:,}: {last / base:.3f} "
          f"({last:.1f} / {base:.1f} MiB); peak after step {args.baseline:,}: {peak:.1f} MiB ({peak / base:.3f}); "
          f"{args.n_batches:,} steps in {wall:.0f} s")
    result = {"benchmark": "memory_growth", "python": platform.python_version(), "machine": platform.machine(),
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "rss_mb": rss, "baseline_mb": base, "last_mb": last, "peak_mb": peak, "ratio": last / base,
              "peak_ratio": peak / base, "wall_s": wall}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
