"""The few-step trilemma on this code: sample quality (FID/KID), coverage (precision/recall), adherence and speed
(network calls, seconds per image) of DDGAN T=4 (posterior step), T=4 with the seed's renoise step, T=2 and T=1,
against DDPM sampled with 1,000 ancestral steps and with DDIM-50. Two settings, each run of one setting trained
for the same images seen (steps x batch):

    pixels32   32x32 pixel shapes, conditioned on labels (batch 32; DDGAN: the `fast` preset)
    latents64  the demo's 64x64 shapes as 16x16x4 latents of its autoencoder, conditioned on its CLOOB's
               embeddings and asked with captions through the retrieval prior (batch 64; DDGAN: `cclddg`)

Resumable: a finished run or row is kept in OUT. Training and metrics may run beside another job (`--threads 1`);
the seconds per image are measured again, alone, by `--timing` (every row of OUT, one batch each: 100 images, 20
for DDPM-1000).

    python benchmarks/trilemma.py --setting pixels32 --steps 1200 --threads 1
    python benchmarks/trilemma.py --setting latents64 --steps 1500 --threads 1 --demo runs/demo
    python benchmarks/trilemma.py --setting pixels32 --timing      # then the table, with the times measured alone
    python benchmarks/trilemma.py --setting pixels32 --ancestral_n 300  # DDPM-1000's row on 300 images, not N
    python benchmarks/trilemma.py --tiny                            # 16 px, 3 steps, N 20: what CI runs

A DDPM-1000 row costs 1,000 network calls per image (about 1.5 hours of this CPU per 1,000 images in pixels):
`--ancestral_n` measures it on fewer images (more than the features' width, for FID). Its row then has its own
floor at that N (FID is biased up at small N; KID is not), printed beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from cclddg.cli import main as cclddg
from cclddg.conditioning.labels import label_condition
from cclddg.conditioning.prompts import PromptConditioner
from cclddg.encoders import load_embedder
from cclddg.evaluation.fidelity import load_features
from cclddg.evaluation.generated import evaluate_fidelity, evaluate_model, random_requests, request_texts
from cclddg.pipeline import SamplingConfig, load_generator, run_text_prior, sample
from cclddg.run_folder import list_checkpoints

# name -> (flags of the pixel run, flags of the latent run, its samplers: (name, steps), None = the run's own)
RUNS = {
    "ddgan_t4": (["--preset", "fast"], ["--preset", "cclddg"], [(None, None)]),
    "ddgan_t4_renoise": (["--preset", "fast", "--step_kind", "renoise"], ["--preset", "cclddg", "--step_kind",
                                                                          "renoise"], [(None, None)]),
    "ddgan_t2": (["--preset", "fast", "--n_steps", "2"], ["--preset", "cclddg", "--n_steps", "2"], [(None, None)]),
    "ddgan_t1": (["--preset", "fast", "--n_steps", "1"], ["--preset", "cclddg", "--n_steps", "1"], [(None, None)]),
    "ddpm": (["--preset", "standard-diffusion"], ["--preset", "latent-diffusion"], [("ddpm", None), ("ddim", 50)]),
}
# The generator's widths of `fast` (and of `cclddg`, whose spatial map sits at the 4x4 latent bottleneck), given
# to every run so that DDPM's network is DDGAN's generator.
WIDTHS = ["--n_channels_unet", "32", "--ch_mults", "1,2,2", "--is_attn", "0,0,0", "--n_blocks", "1",
          "--coord_channels", "true"]
TINY_WIDTHS = ["--n_channels_unet", "8", "--ch_mults", "1,2", "--is_attn", "0,0", "--n_blocks", "1",
               "--n_channels_disc", "8", "--ch_mults_disc", "1,2", "--is_attn_disc", "0,0", "--cond_map_size", "0"]
TIMED = 100  # images in the timed batch
ANCESTRAL_TIMED = 20  # images in the timed batch of a 1,000-step sampler


def train(out: Path, flags: list[str], common: list[str], steps: int) -> float:
    """Train (or finish) one run; returns the seconds this call trained. A run another process is training
    (`--train_only`, its lock file names its pid) is waited for, never trained twice at once."""
    lock = out.with_name(out.name + ".training")
    while lock.is_file() and Path(f"/proc/{lock.read_text().strip()}").exists():
        time.sleep(10)
    done = list_checkpoints(out)
    if done and done[-1].name.endswith(f"{steps:07d}"):
        return 0.0
    start = time.perf_counter()
    resume = ["--resume"] if done else []
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text(str(os.getpid()))
    try:
        assert cclddg(["train", "--out", str(out), *flags, *common, *resume]) == 0, f"training {out} failed"
    finally:
        lock.unlink(missing_ok=True)
    return time.perf_counter() - start


def conditioner_of(run: Path, cfg) -> PromptConditioner | None:
    if cfg.cond != "embedding":
        return None
    embedder = load_embedder(cfg.encoder)
    return PromptConditioner(embedder, run_text_prior(run, cfg, embedder.dim))


def timed_conditions(cfg, conditioner: PromptConditioner | None, n: int) -> torch.Tensor | None:
    """The conditions of the timed batch, made before the clock starts: random label requests, or their captions."""
    requests = random_requests(n, 0)
    if conditioner is None:
        return label_condition(requests)
    return conditioner.texts(request_texts(requests, "text", 0), torch.Generator().manual_seed(0))


def speed(run: Path, sampler: str | None, steps: int | None, n: int) -> tuple[int, float]:
    """(network calls, seconds per image) of one batch of n images (decoded, for a latent run) after a warm-up."""
    model, cfg = load_generator(run)
    cond = timed_conditions(cfg, conditioner_of(run, cfg), n)
    calls = SamplingConfig.of(cfg).sampler(sampler, steps)[1]
    sample(model, cfg, 2, cond=cond[:2], sampler=sampler, steps=steps)
    start = time.perf_counter()
    sample(model, cfg, n, cond=cond, sampler=sampler, steps=steps, rng=torch.Generator().manual_seed(0))
    return calls, (time.perf_counter() - start) / n


def row(run: Path, sampler: str | None, steps: int | None, n: int, features, data: str, timed: int) -> dict:
    model, cfg = load_generator(run)
    conditioner = conditioner_of(run, cfg)
    found = evaluate_fidelity(model, cfg, data, n, features, sampler=sampler, n_sample_steps=steps,
                              progress=False, conditioner=conditioner)
    adherence = evaluate_model(model, cfg, min(n, 500), sampler=sampler, n_sample_steps=steps, progress=False,
                               conditioner=conditioner)
    calls, seconds = speed(run, sampler, steps, timed)
    return {"fid": found["fid"], "kid": found["kid"], "precision": found["precision"], "recall": found["recall"],
            "floor_fid": found["floor"]["fid"], "floor_kid": found["floor"]["kid"],
            "floor_precision": found["floor"]["precision"], "floor_recall": found["floor"]["recall"],
            "adherence": adherence.get("mean_acc"), "calls": calls, "seconds_per_image": seconds}


def setting_flags(setting: str, demo: Path, tiny: bool) -> tuple[int, list[str], str]:
    """(image size, the flags every run of the setting shares, the real data the metrics compare with)."""
    if tiny:
        return 16, ["--img_size", "16", "--data", "shapes:16", "--cond", "labels", "--batch_size", "4",
                    *TINY_WIDTHS], "shapes:16"
    if setting == "pixels32":
        return 32, ["--img_size", "32", "--data", "shapes:32", "--cond", "labels", "--batch_size", "32", *WIDTHS,
                    "--cond_map_size", "8"], "shapes:32"
    cache = demo / "cache"
    if not (cache / "cache.json").is_file():
        raise SystemExit(f"{cache} is not a finished latent cache: run `cclddg demo --out {demo}` first")
    return 64, ["--img_size", "64", "--data", str(cache.resolve()), "--cond", "embedding", "--batch_size", "64",
                "--text_prior", "retrieval", "--pct_text", "0", "--pseudo_text_xi", "0.5", "--pct_zeros", "0.1",
                *WIDTHS, "--cond_map_size", "4"], "shapes:64"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=("pixels32", "latents64"), default="pixels32")
    parser.add_argument("--out", default=None, help="default: runs/trilemma/SETTING")
    parser.add_argument("--steps", type=int, default=1200, help="training steps of every run")
    parser.add_argument("--n", type=int, default=1000, help="images per set for the metrics")
    parser.add_argument("--features", default=None, help="default: the demo's CLOOB (cloob-tiny:DEMO/cloob)")
    parser.add_argument("--demo", default="runs/demo", help="a finished `cclddg demo` folder (its CLOOB and cache)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--ancestral_n", type=int, default=0, help="images per set for the DDPM-1000 row "
                        "(0: --n)")
    parser.add_argument("--timing", action="store_true", help="measure every row's seconds per image again, alone")
    parser.add_argument("--train_only", choices=tuple(RUNS), help="train this run only (e.g. beside the main job, "
                        "which then finds it trained); no metrics")
    parser.add_argument("--tiny", action="store_true", help="16 px, 3 steps, N 20, a tiny CLOOB: a smoke run")
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    demo = Path(args.demo)
    out = Path(args.out or f"runs/trilemma/{args.setting}")
    features = args.features or f"cloob-tiny:{demo}/cloob"
    with tempfile.TemporaryDirectory() as root:
        if args.tiny:
            out, args.steps, args.n = Path(root), 3, 20
            assert cclddg(["train-cloob", "--out", f"{root}/cloob", "--img_size", "16", "--widths", "8,16", "--dim",
                           "16", "--train_size", "64", "--batch_size", "16", "--eval_size", "16", "--n_batches", "2",
                           "--no_progress"]) == 0
            features = f"cloob-tiny:{root}/cloob"
        size, common, data = setting_flags(args.setting, demo, args.tiny)
        common += ["--n_batches", str(args.steps), "--log_every", "1" if args.tiny else "50",
                   "--log_images_every", "100000", "--save_models_every", "300", "--no_progress"]
        if args.threads:
            common += ["--threads", str(args.threads)]
        if args.train_only:
            train(out / args.train_only, run_flags(args.train_only, args.setting, args.tiny)[0], common, args.steps)
            return
        results = measure(out, args.steps, args.n, args.ancestral_n or args.n, load_features(features), common, data,
                          args.tiny, args.setting)
        if args.timing:
            retime(out, results, args.tiny)
        report(results, args.setting, args.steps, args.n, features, args.tiny)


def run_flags(name: str, setting: str, tiny: bool) -> tuple[list[str], list[tuple[str | None, int | None]]]:
    """(the flags that make run `name` in this setting, its samplers)."""
    pixel_flags, latent_flags, samplers = RUNS[name]
    flags = latent_flags if setting == "latents64" and not tiny else pixel_flags
    if tiny and name == "ddpm":  # 20 diffusion steps, DDIM 5: the same code paths in seconds
        flags, samplers = [*flags, "--n_steps", "20"], [("ddpm", None), ("ddim", 5)]
    return flags, samplers


def timed_batch(sampler: str | None, tiny: bool) -> int:
    return 4 if tiny else ANCESTRAL_TIMED if sampler == "ddpm" else TIMED


def measure(out: Path, steps: int, n: int, ancestral_n: int, features, common: list[str], data: str, tiny: bool,
            setting: str) -> dict:
    results_path = out / "trilemma.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for name in RUNS:
        flags, samplers = run_flags(name, setting, tiny)
        seconds = train(out / name, flags, common, steps)
        for sampler, sampler_steps in samplers:
            key = name + (f"_{sampler}{sampler_steps or ''}" if sampler else "")
            if key not in results:
                row_n = ancestral_n if sampler == "ddpm" else n
                results[key] = {**row(out / name, sampler, sampler_steps, row_n, features, data,
                                      timed_batch(sampler, tiny)),
                                "train_seconds": seconds, "run": name, "sampler": sampler,
                                "sampler_steps": sampler_steps, "n": row_n}
                out.mkdir(parents=True, exist_ok=True)
                write_json(results_path, results)
    return results


def retime(out: Path, results: dict, tiny: bool) -> None:
    for r in results.values():
        r["calls"], r["seconds_per_image"] = speed(out / r["run"], r["sampler"], r["sampler_steps"],
                                                   timed_batch(r["sampler"], tiny))
        r["timed_alone"] = True
    write_json(out / "trilemma.json", results)


def write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2))
    tmp.replace(path)


def report(results: dict, setting: str, steps: int, n: int, features: str, tiny: bool) -> None:
    batch = 64 if setting == "latents64" else 32
    alone = all(r.get("timed_alone") for r in results.values())
    print(f"tiny: {steps} steps, N = {n}" if tiny else
          f"{setting}: {steps} steps x batch {batch} each, features {features}, guidance 1; seconds per "
          + ("image timed alone (--timing)" if alone else "image timed in the run, beside the other jobs"))
    print("| model | N | FID | KID | precision | recall | attributes right (mean) | network calls | s / image |")
    print("|---|---|---|---|---|---|---|---|---|")
    floors = {}
    for key, r in results.items():
        row_n = r.get("n", n)
        floors.setdefault(row_n, r)
        adherence = "–" if r["adherence"] is None else f"{100 * r['adherence']:.1f}%"
        print(f"| {key} | {row_n} | {r['fid']:.4f} | {r['kid']:.2e} | {r['precision']:.3f} | {r['recall']:.3f} | "
              f"{adherence} | {r['calls']} | {r['seconds_per_image']:.4f} |")
    for row_n, r in floors.items():
        print(f"| floor (real vs real) | {row_n} | {r['floor_fid']:.4f} | {r['floor_kid']:.2e} | "
              f"{r['floor_precision']:.3f} | {r['floor_recall']:.3f} | | | |")


if __name__ == "__main__":
    main()
