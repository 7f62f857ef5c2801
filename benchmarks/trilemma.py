"""The few-step trilemma on this code: sample quality (FID/KID), coverage (precision/recall), adherence and speed
(network calls, seconds per image) of DDGAN T=4 (posterior step), T=4 with the seed's renoise step, T=2 and T=1,
against DDPM sampled with 1,000 ancestral steps and with DDIM-50, all trained on 32x32 pixel shapes (labels) for
the same images seen (steps x batch 32). Resumable: a finished run or row is kept in OUT.

    python benchmarks/trilemma.py --out runs/trilemma --steps 4000 --n 1000 --features cloob-tiny:runs/demo/cloob
    python benchmarks/trilemma.py --tiny         # 16 px, 3 steps, N 20: what CI runs
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from cclddg.cli import main as cclddg
from cclddg.conditioning import label_condition
from cclddg.evaluation.fidelity import load_features
from cclddg.evaluation.generated import evaluate_fidelity, evaluate_model, random_requests
from cclddg.pipeline import SamplingConfig, load_generator, sample
from cclddg.training.checkpoint import list_checkpoints

RUNS = {  # name -> the flags that make it (the rest is common); its samplers (None: the run's own)
    "ddgan_t4": (["--preset", "fast"], [(None, None)]),
    "ddgan_t4_renoise": (["--preset", "fast", "--step_kind", "renoise"], [(None, None)]),
    "ddgan_t2": (["--preset", "fast", "--n_steps", "2"], [(None, None)]),
    "ddgan_t1": (["--preset", "fast", "--n_steps", "1"], [(None, None)]),
    "ddpm": (["--preset", "standard-diffusion"], [("ddpm", None), ("ddim", 50)]),
}
WIDTHS = ["--n_channels_unet", "32", "--ch_mults", "1,2,2", "--is_attn", "0,0,0", "--n_blocks", "1",
          "--coord_channels", "true", "--cond_map_size", "8"]
TINY_WIDTHS = ["--n_channels_unet", "8", "--ch_mults", "1,2", "--is_attn", "0,0", "--n_blocks", "1",
               "--n_channels_disc", "8", "--ch_mults_disc", "1,2", "--is_attn_disc", "0,0", "--cond_map_size", "0"]


def train(out: Path, flags: list[str], common: list[str], steps: int) -> float:
    """Train (or finish) one run; returns the seconds this call trained."""
    done = list_checkpoints(out)
    if done and done[-1].name.endswith(f"{steps:07d}"):
        return 0.0
    start = time.perf_counter()
    resume = ["--resume"] if done else []
    assert cclddg(["train", "--out", str(out), *flags, *common, *resume]) == 0, f"training {out} failed"
    return time.perf_counter() - start


def speed(run: Path, sampler: str | None, steps: int | None, n: int) -> tuple[int, float]:
    """(network calls, seconds per image) of one batch of n images after a warm-up."""
    model, cfg = load_generator(run)
    cond = label_condition(random_requests(n, 0))
    calls = SamplingConfig.of(cfg).sampler(sampler, steps)[1]
    sample(model, cfg, 2, cond=cond[:2], sampler=sampler, steps=steps)
    start = time.perf_counter()
    sample(model, cfg, n, cond=cond, sampler=sampler, steps=steps, rng=torch.Generator().manual_seed(0))
    return calls, (time.perf_counter() - start) / n


def row(run: Path, sampler: str | None, steps: int | None, n: int, features, size: int, timed: int) -> dict:
    model, cfg = load_generator(run)
    found = evaluate_fidelity(model, cfg, f"shapes:{size}", n, features, sampler=sampler, n_sample_steps=steps,
                              progress=False)
    adherence = evaluate_model(model, cfg, min(n, 500), sampler=sampler, n_sample_steps=steps, progress=False)
    calls, seconds = speed(run, sampler, steps, timed)
    return {"fid": found["fid"], "kid": found["kid"], "precision": found["precision"], "recall": found["recall"],
            "floor_fid": found["floor"]["fid"], "floor_recall": found["floor"]["recall"],
            "adherence": adherence.get("mean_acc"), "calls": calls, "seconds_per_image": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/trilemma")
    parser.add_argument("--steps", type=int, default=4000, help="training steps of every run (batch 32)")
    parser.add_argument("--n", type=int, default=1000, help="images per set for the metrics")
    parser.add_argument("--features", default="cloob-tiny:runs/demo/cloob")
    parser.add_argument("--tiny", action="store_true", help="16 px, 3 steps, N 20, a tiny CLOOB: a smoke run")
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    with tempfile.TemporaryDirectory() as root:
        size, widths = 32, WIDTHS
        if args.tiny:
            args.out, args.steps, args.n, size, widths = root, 3, 20, 16, TINY_WIDTHS
            assert cclddg(["train-cloob", "--out", f"{root}/cloob", "--img_size", "16", "--widths", "8,16", "--dim",
                           "16", "--train_size", "64", "--batch_size", "16", "--eval_size", "16", "--n_batches", "2",
                           "--no_progress"]) == 0
            args.features = f"cloob-tiny:{root}/cloob"
        measure(Path(args.out), args.steps, args.n, args.features, size, widths, args.tiny)


def measure(out: Path, steps: int, n: int, features_spec: str, size: int, widths: list[str], tiny: bool) -> None:
    features = load_features(features_spec)
    common = ["--img_size", str(size), "--data", f"shapes:{size}", "--cond", "labels", "--batch_size",
              "4" if tiny else "32", "--n_batches", str(steps), *widths, "--log_every", "50",
              "--log_images_every", "100000", "--save_models_every", "100000", "--no_progress"]
    if tiny:
        common[common.index("--log_every") + 1] = "1"
    results_path = out / "trilemma.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for name, (flags, samplers) in RUNS.items():
        if tiny and name == "ddpm":  # 20 diffusion steps, DDIM 5: the same code paths in seconds
            flags, samplers = [*flags, "--n_steps", "20"], [("ddpm", None), ("ddim", 5)]
        seconds = train(out / name, flags, common, steps)
        for sampler, sampler_steps in samplers:
            key = name + (f"_{sampler}{sampler_steps or ''}" if sampler else "")
            if key not in results:
                results[key] = {**row(out / name, sampler, sampler_steps, n, features, size, 4 if tiny else 100),
                                "train_seconds": seconds}
                out.mkdir(parents=True, exist_ok=True)
                results_path.write_text(json.dumps(results, indent=2))
    print(f"32x32 shapes, labels, {steps} steps x batch 32 each, N = {n}, features {features.name}" if not tiny
          else f"tiny: {steps} steps, N = {n}")
    print("| model | FID | KID | precision | recall | attributes right (mean) | network calls | s / image |")
    print("|---|---|---|---|---|---|---|---|")
    for key, r in results.items():
        adherence = "–" if r["adherence"] is None else f"{100 * r['adherence']:.1f}%"
        print(f"| {key} | {r['fid']:.4f} | {r['kid']:.2e} | {r['precision']:.3f} | {r['recall']:.3f} | {adherence} | "
              f"{r['calls']} | {r['seconds_per_image']:.4f} |")
    first = next(iter(results.values()))
    print(f"floor (real vs real): FID {first['floor_fid']:.4f}, recall {first['floor_recall']:.3f}")


if __name__ == "__main__":
    main()
