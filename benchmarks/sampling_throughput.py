"""Sampling throughput: few-step DDGAN vs DDPM-1000 and DDIM-50, and batched vs separate CFG.

What it measures
----------------
Images per second of the library's samplers on UNets of the same widths (random init: the cost
does not depend on training), all with classifier-free guidance on (guidance 3, one shapes
conditioning label vector from ``cclddg.data.shapes.attrs_to_label`` for the whole batch):

- ``ddgan-4``          ``cclddg.samplers.sample_ddgan`` with the ddgan preset's schedule (vp, T=4)
                       and its generator (``build_nets`` of the resolved ddgan config, with z);
- ``ddgan-4 sep-cfg``  the same with ``Guided(batched=False)``: two forwards of B instead of one of 2B;
- ``ddim-50``          ``cclddg.samplers.sample_ddim(steps=50)`` on a
                       ``linear`` schedule with T=1000 and the diffusion preset's UNet (no z);
- ``ddpm-1000``        ``sample_ddpm``, ancestral over all 1000 steps.

DDPM-1000 is too slow to run whole every repeat, so by default it is EXTRAPOLATED: the real
``sample_ddpm`` loop runs until the model has been called ``--ddpm_slice`` times (a wrapper
around the UNet stops the loop with an exception at the next call), i.e. the first K steps
``t = 1000..1001-K`` including their ``ddpm_step`` updates, and that time is scaled by
``1000 / K``. Every DDPM step does the same work whatever ``t`` is, so this is the per-step cost
times T; the one-off set-up (initial noise, moving the schedule) is scaled too, which overstates
it slightly (it is microseconds against a UNet forward). ``--ddpm_full`` also times one whole
1000-step run after the interleaved rounds, to check the extrapolation.

Ratios printed: ddgan-4 vs ddpm-1000, ddgan-4 vs ddim-50 (images/s over images/s), and CFG batched
vs separate on ddgan-4. The table also gives the time per UNet call (one forward of 2B images
with batched CFG, of B with separate CFG), so the per-call cost of the two UNets can be compared.

Method: one warm-up call of every variant (the slow ones cut short), then ``--repeats`` rounds,
each timing every variant once in turn (ddgan-4, ddgan-4 sep-cfg, ddim-50, ddpm-1000 slice,
ddgan-4, ...), so a drift in machine load hits them alike; medians per variant are reported and
the ratios use medians of the same run.

How to run
----------
    python benchmarks/sampling_throughput.py                # the real measurement (~2-3 min, 2 cores;
                                                            # --repeats 3 if that is too long)
    python benchmarks/sampling_throughput.py --quick        # tiny sizes, a few seconds: smoke check
    python benchmarks/sampling_throughput.py --tiny         # batch 1, one round, 1 thread: what CI runs
    python benchmarks/sampling_throughput.py --threads 2 --json sampling_throughput.json --ddpm_full
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

GUIDANCE_ATTRS = {"color": "red", "shape": "circle", "size": "large", "position": "center", "background": "blue"}
# Tiny runs 1 thread: at these sizes a second thread only waits for the first, and much longer on a busy machine.
DEFAULTS = {"full": dict(batch=64, img_size=32, n_channels=32, repeats=5, ddpm_slice=20, threads=2),
            "quick": dict(batch=4, img_size=16, n_channels=8, repeats=2, ddpm_slice=5, threads=2),
            "tiny": dict(batch=1, img_size=16, n_channels=8, repeats=1, ddpm_slice=1, threads=1)}


def mode(args: argparse.Namespace) -> str:
    return "tiny" if args.tiny else "quick" if args.quick else "full"


def mode_note(args: argparse.Namespace) -> str:
    """' (quick)' or ' (tiny)' after the settings line; nothing for the full run."""
    return "" if mode(args) == "full" else f" ({mode(args)})"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes and few repeats (a few seconds), to check the script works")
    p.add_argument("--tiny", action="store_true", help="quick's sizes at batch 1, one round, 1 thread (what CI runs)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default 2; tiny 1)")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    p.add_argument("--batch", type=int, default=None, help="images per sampling call (default 64; quick 4)")
    p.add_argument("--img_size", type=int, default=None, help="image side (default 32; quick 16)")
    p.add_argument("--n_channels", type=int, default=None, help="UNet base width (default 32; quick 8)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5; quick 2)")
    p.add_argument("--ddpm_slice", type=int, default=None,
                   help="DDPM steps actually run per repeat, scaled to 1000 (default 20; quick 5)")
    p.add_argument("--ddpm_full", action="store_true", help="also time one whole DDPM-1000 run, to check the scaling")
    p.add_argument("--ddim_steps", type=int, default=50, help="DDIM sampling steps (default 50)")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (default 3; not 0 or 1, "
                   "which skip the unconditional forward)")
    args = p.parse_args(argv)
    for k, v in DEFAULTS[mode(args)].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    for name in ("batch", "img_size", "n_channels", "repeats", "ddpm_slice", "ddim_steps", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.guidance in (0.0, 1.0):
        p.error("--guidance 0 or 1 turns guidance off (one forward per step); use e.g. 3")
    return args


class _Stop(Exception):
    pass


class StopAfter:
    """Calls the model `limit` times, then raises _Stop: cuts a real sampling loop short."""

    def __init__(self, model: torch.nn.Module, limit: int):
        self.model, self.limit, self.calls = model, limit, 0

    def __call__(self, *args, **kwargs):
        if self.calls >= self.limit:
            raise _Stop
        self.calls += 1
        return self.model(*args, **kwargs)


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    tic = time.perf_counter()
    try:
        fn()
    except _Stop:
        pass
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - tic


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    from cclddg.data.shapes import attrs_to_label
    from cclddg.diffusion import make_schedule
    from cclddg.models import count_parameters
    from cclddg.samplers import Guided, randn, sample_ddgan, sample_ddim, sample_ddpm
    from cclddg.run_config import resolve
    from cclddg.training.trainer import build_nets

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = dict(img_size=args.img_size, n_channels_unet=args.n_channels, ch_mults=(1, 2, 2),
                 is_attn=(False, False, False), n_blocks=1)
    cfg_g, cfg_d = resolve("ddgan", sizes), resolve("diffusion", sizes)
    torch.manual_seed(0)
    gen = build_nets(cfg_g)[0].to(device).eval()
    eps_net = build_nets(cfg_d)[0].to(device).eval()
    sched_g = make_schedule(cfg_g.schedule, cfg_g.n_steps, cfg_g.beta_min, cfg_g.beta_max).to(device)
    sched_d = make_schedule("linear", 1000).to(device)
    b = args.batch
    shape = (b, 3, args.img_size, args.img_size)
    cond = torch.from_numpy(attrs_to_label(GUIDANCE_ATTRS)).to(device).unsqueeze(0).repeat(b, 1)
    T, K, S = sched_d.n_steps, min(args.ddpm_slice, sched_d.n_steps), args.ddim_steps

    def rng() -> torch.Generator:
        return torch.Generator(device=device).manual_seed(0)

    def ddgan(batched: bool):
        def run():
            g = rng()
            return sample_ddgan(Guided(gen, cond, args.guidance, batched=batched), randn(shape, g, device), sched_g,
                                rng=g, step_kind=cfg_g.step_kind, z_dim=cfg_g.z_dim)
        return run

    def ddim(model=eps_net):
        g = rng()
        return sample_ddim(Guided(model, cond, args.guidance), randn(shape, g, device), sched_d, steps=S, rng=g)

    def ddpm(model=eps_net):
        g = rng()
        return sample_ddpm(Guided(model, cond, args.guidance), randn(shape, g, device), sched_d, rng=g)

    # name -> (callable timed each round, factor from measured seconds to seconds per full batch,
    #          UNet calls per full batch, images per UNet call)
    variants = {
        f"ddgan-{cfg_g.n_steps}": (ddgan(True), 1.0, cfg_g.n_steps, 2 * b),
        f"ddgan-{cfg_g.n_steps} sep-cfg": (ddgan(False), 1.0, 2 * cfg_g.n_steps, b),
        f"ddim-{S}": (ddim, 1.0, S, 2 * b),
        f"ddpm-{T}": (lambda: ddpm(StopAfter(eps_net, K)), T / K, T, 2 * b),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}

    t_start = time.perf_counter()
    timed(ddgan(True), device)  # warm-up: every code path once, the slow ones cut short
    timed(ddgan(False), device)
    timed(lambda: ddim(StopAfter(eps_net, 3)), device)
    timed(lambda: ddpm(StopAfter(eps_net, 3)), device)
    for _ in range(args.repeats):  # interleaved rounds: A, B, C, D, A, B, C, D, ...
        for name, (fn, _, _, _) in variants.items():
            times[name].append(timed(fn, device))
    full = timed(ddpm, device) if args.ddpm_full else None
    elapsed = time.perf_counter() - t_start

    rows = {}
    for name, (_, scale, calls, per_call) in variants.items():
        sec = statistics.median(times[name]) * scale
        rows[name] = {"variant": name, "seconds_per_batch": sec, "images_per_s": b / sec, "unet_calls": calls,
                      "images_per_call": per_call, "ms_per_call": sec / calls * 1e3,
                      "spread_pct": 100 * (max(times[name]) - min(times[name])) / statistics.median(times[name]),
                      "measured_seconds": times[name], "scale": scale}
    g4, g4s, dd, dp = (rows[n] for n in variants)
    ratios = {
        f"{g4['variant']} vs {dp['variant']}": g4["images_per_s"] / dp["images_per_s"],
        f"{g4['variant']} vs {dd['variant']}": g4["images_per_s"] / dd["images_per_s"],
        f"{dd['variant']} vs {dp['variant']}": dd["images_per_s"] / dp["images_per_s"],
        "cfg batched vs separate (ddgan)": g4["images_per_s"] / g4s["images_per_s"],
    }

    print(f"sampling_throughput: torch {torch.__version__}, {args.threads} thread(s), device {device}, "
          f"{args.img_size}x{args.img_size}, batch {b}, UNet width {args.n_channels} x (1,2,2), n_blocks 1, "
          f"is_attn all False (mid attention on), guidance {args.guidance:g}{mode_note(args)}")
    print(f"UNets: ddgan G {count_parameters(gen) / 1e6:.3f}M params (z_dim {cfg_g.z_dim}), "
          f"diffusion eps-net {count_parameters(eps_net) / 1e6:.3f}M params; schedules: "
          f"{sched_g.kind} T={sched_g.n_steps} / {sched_d.kind} T={T}")
    print(f"median of {args.repeats} interleaved rounds after one warm-up; whole run {elapsed:.1f} s. "
          f"{dp['variant']} is EXTRAPOLATED: its first {K} steps timed, x{T / K:g}")
    print()
    head = f"{'variant':<20} {'images/s':>10} {'s/batch':>9} {'UNet calls':>10} {'imgs/call':>9} " \
           f"{'ms/call':>9} {'spread':>7}"
    print(head)
    print("-" * len(head))
    for r in rows.values():
        print(f"{r['variant']:<20} {r['images_per_s']:>10.3f} {r['seconds_per_batch']:>9.3f} {r['unet_calls']:>10} "
              f"{r['images_per_call']:>9} {r['ms_per_call']:>9.2f} {r['spread_pct']:>6.1f}%")
    if full is not None:
        print(f"{dp['variant'] + ' 1 whole':<20} {b / full:>10.3f} {full:>9.3f} {T:>10} {2 * b:>9} "
              f"{full / T * 1e3:>9.2f}   (extrapolated / whole = {dp['seconds_per_batch'] / full:.3f})")
    print()
    print("ratios (images/s over images/s, same run):")
    for k, v in ratios.items():
        print(f"  {k:<34} {v:10.2f}x")

    result = {"benchmark": "sampling_throughput", "torch": torch.__version__, "python": platform.python_version(),
              "machine": platform.machine(), "device": str(device), "threads": args.threads, "quick": args.quick,
              "tiny": args.tiny,
              "settings": {k: getattr(args, k) for k in ("batch", "img_size", "n_channels", "repeats", "ddpm_slice",
                                                           "ddim_steps", "guidance")},
              "gen_params": count_parameters(gen), "eps_net_params": count_parameters(eps_net),
              "elapsed_s": elapsed, "rows": list(rows.values()), "ratios": ratios,
              "ddpm_whole_seconds": full}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"\nwrote {args.json}")
    return result


if __name__ == "__main__":
    main()
