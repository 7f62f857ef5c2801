"""`cclddg demo`: from nothing to a prompt grid, offline, on the built-in 64x64 shapes (or `--data emoji`).

Stages (each one resumes or is skipped when the demo is run again after an interruption):

    1. ae       train the small KL autoencoder (`train-ae`)          -> OUT/ae/      (report.json: PSNR)
    2. cloob    train our own CLOOB (`train-cloob`)                  -> OUT/cloob/   (zero_shot.json)
                (1 and 2 side by side, one process and half the threads each, on two or more cores)
    3. encode   latents + image/caption embeddings, once (`encode`)  -> OUT/cache/
    4. train    the CLOOB-conditioned latent DDGAN, T=4 (`train --preset cclddg --data OUT/cache`, lr 1e-3,
                bf16 autocast where the CPU computes bf16 natively), after its learned text prior -> OUT/gen/
    5. sample   a grid of text prompts with a guidance sweep        -> OUT/prompts.png (shapes: paraphrases.png,
                and variety.png: prompts that leave attributes open, 16 samples each)
    6. eval     shapes: text prompts naming colour, shape and position, in the captions' wording and
                paraphrased, and the variety of what prompts leave open; emoji: held-out emoji names,
                the samples' CLOOB score and caption retrieval vs the real images' -> OUT/eval.json
    7. report   figures, timings and pictures                         -> OUT/report.md

`--quick` shrinks every stage (a few minutes, lower quality): the smoke test CI runs.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from cclddg.atomic import write_text_atomic
from cclddg.cpu import native_bf16, tune_cpu
from cclddg.errors import UserError

PROMPTS = ("a red circle in the top left", "a small blue square at the bottom", "a large yellow triangle in the center",
           "a green circle on the right", "a purple square in the top right", "a white triangle on the left")
# the same requests in words no caption uses (evaluation/zero_shot.py's paraphrases)
PARAPHRASED = ("a crimson disc in the upper left", "a tiny navy box near the bottom edge",
               "a big golden pyramid in the middle", "an emerald ball on the right-hand side",
               "a violet block up and to the right", "a snowy wedge by the left edge")
# emoji names, each followed by a paraphrase the captions never use
EMOJI_PROMPTS = ("red apple", "a shiny red apple", "dog face", "the face of a puppy", "grinning face",
                 "a happy smiling face", "flag of France", "the French flag")
DATA = ("shapes", "emoji")
# prompts naming 3, 2 and 1 attributes, for the variety grid: the background and size are never named
VARIETY_PROMPTS = ("a black triangle at the bottom", "a red circle", "a square")
VARIETY_SAMPLES = 16



def generate(model: torch.nn.Module, cfg: Any, cond: torch.Tensor, guidance: float, seed: int) -> torch.Tensor:
    """One sample per row of `cond` (in [-1, 1], on the CPU), through `pipeline.sample_batches` from one seed."""
    from cclddg.pipeline import sample_batches

    rng = torch.Generator().manual_seed(seed)
    return torch.cat(list(sample_batches(model, cfg, len(cond), cond=cond, rng=rng, guidance=guidance)))

@dataclass
class DemoSettings:
    ae_steps: int = 2400  # with the CLOOB's 2,000 side by side: both take ~7.5 min on one EPYC core
    cloob_steps: int = 2000
    cloob_size: int = 20000
    data_size: int = 20000
    gen_steps: int = 3000  # the generator's fixed length: the same model on any CPU
    gen_minutes: float = 0.0  # an optional time budget on top (0: none)
    gen_lr: float = 1e-3  # the generator's and discriminator's (README: steps to 99%)
    gen_bf16: bool = True  # train the generator in bf16 autocast where the CPU computes bf16 natively (1.3x a step)
    prior_steps: int = 0  # the learned text prior's steps, trained before the generator (0: the preset's)
    eval_n: int = 500
    guidances: tuple[float, ...] = (1.0, 2.0, 3.0)
    variety_n: int = 32  # samples per variety request (evaluation/variety.py)
    variety_requests: int = 8  # variety requests per number of named attributes
    data: str = "shapes"
    cloob_text_head: str = "mlp"


FULL = DemoSettings()
QUICK = DemoSettings(ae_steps=150, cloob_steps=150, cloob_size=2000, data_size=2000, gen_steps=100, prior_steps=100, eval_n=60,
                     guidances=(2.0,), variety_n=8, variety_requests=2)


class Demo:
    def __init__(self, out: str | Path, quick: bool = False, gen_minutes: float | None = None,
                 progress: bool = True, threads: int = 0, settings: DemoSettings | None = None,
                 data: str = "shapes", gen_steps: int | None = None) -> None:
        if data not in DATA:
            raise UserError(f"the demo runs on {' or '.join(DATA)}, not {data!r}; for other data use the commands "
                            "it runs (train-ae, train-cloob, encode, train)")
        self.out = Path(out)
        self.quick = quick
        self.settings = settings or (QUICK if quick else FULL)
        if data != self.settings.data:
            self.settings = DemoSettings(**{**self.settings.__dict__, "data": data})
        if gen_minutes is not None:
            if gen_minutes <= 0:
                raise UserError(f"--minutes must be > 0, got {gen_minutes}")
            self.settings = DemoSettings(**{**self.settings.__dict__, "gen_minutes": gen_minutes})
        if gen_steps is not None:
            if gen_steps < 1:
                raise UserError(f"--steps must be >= 1, got {gen_steps}")
            self.settings = DemoSettings(**{**self.settings.__dict__, "gen_steps": gen_steps})
        self.progress = progress
        self.threads = threads
        self._check_out()
        self.times: dict[str, float] = self._read_json("times.json") or {}

    # ---- bookkeeping ----------------------------------------------------------------------------------
    def _check_out(self) -> None:
        plan = self.out / "demo.json"
        wanted = {"quick": self.quick, **{k: list(v) if isinstance(v, tuple) else v
                                          for k, v in self.settings.__dict__.items()}}
        if plan.is_file():
            found = {**wanted, **json.loads(plan.read_text())}  # settings added since the plan was written: any
            if found != wanted:
                raise UserError(f"{self.out} holds a demo run with other settings ({found.get('quick') and 'quick' or 'full'}); "
                                "run the same command again to resume it, or choose a new --out")
            return
        if self.out.exists() and any(self.out.iterdir()):
            raise UserError(f"{self.out} is not empty and holds no demo; choose a new or empty --out")
        self.out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(plan, json.dumps(wanted, indent=2))

    def _read_json(self, name: str) -> Any:
        path = self.out / name
        return json.loads(path.read_text()) if path.is_file() else None

    def _write_json(self, name: str, value: Any) -> None:
        write_text_atomic(self.out / name, json.dumps(value, indent=2))

    def _stage(self, name: str, done: Callable[[], bool], work: Callable[[], None]) -> None:
        """Run `work` unless `done()`; its wall time is added to times.json (resumed stages add up)."""
        if done():
            print(f"[demo] {name}: done before, skipped")
            return
        print(f"[demo] {name} ...", flush=True)
        start = time.perf_counter()
        try:
            work()
        finally:
            self.times[name] = round(self.times.get(name, 0.0) + time.perf_counter() - start, 1)
            self._write_json("times.json", self.times)

    def _side_by_side(self, stages: dict[str, Callable[[], bool]]) -> None:
        """Independent stages (methods named `train_<stage>`) at once, each in its own process with half the threads:
        the small networks of the autoencoder and the CLOOB run as fast a step on one core as on two, so side by side
        they take the time of one. One core (or `--threads 1`): one after the other, as `_stage` runs them."""
        todo = [name for name, done in stages.items() if not done()]
        threads = self.threads or torch.get_num_threads()
        if len(todo) < 2 or threads < 2:
            for name, done in stages.items():
                self._stage(name, done, getattr(self, f"train_{name}"))
            return
        group = "+".join(todo)
        each = threads // 2
        print(f"[demo] {' and '.join(todo)} side by side, {each} thread{'s' if each > 1 else ''} each ...", flush=True)
        start = time.perf_counter()
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch thread pools
        procs = {name: context.Process(target=_stage_in_child, name=f"demo-{name}", daemon=False,
                                       args=(self.out, self.quick, self.settings, name, i, each, self.progress))
                 for i, name in enumerate(todo)}
        for proc in procs.values():
            proc.start()
        alone = self.times.get("side_by_side", {})
        try:
            waiting = dict(procs)
            while waiting:
                for name, proc in list(waiting.items()):
                    proc.join(timeout=0.5)
                    if proc.exitcode is not None:
                        alone[name] = round(alone.get(name, 0.0) + time.perf_counter() - start, 1)
                        del waiting[name]
        except KeyboardInterrupt:  # Ctrl-C reaches the children too; a signal sent to this process alone is passed on
            for proc in procs.values():
                if proc.is_alive():
                    proc.terminate()  # SIGTERM: the child's trainer saves the step it reached and exits
            for proc in procs.values():
                proc.join()
            raise
        finally:
            self.times[group] = round(self.times.get(group, 0.0) + time.perf_counter() - start, 1)
            self.times["side_by_side"] = alone
            self._write_json("times.json", self.times)
        failed = [name for name, proc in procs.items() if proc.exitcode != 0]
        if failed:
            raise UserError(f"the demo's {' and '.join(failed)} stage failed (its message is above); run the same "
                            "command again to resume")

    # ---- the stages -------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        tune_cpu(self.threads)  # threads, denormals and freed memory (cpu.py)
        out = self.out
        self._side_by_side({"ae": lambda: (out / "ae" / "report.json").is_file(),
                            "cloob": lambda: (out / "cloob" / "zero_shot.json").is_file()})
        self._stage("encode", lambda: (out / "cache" / "cache.json").is_file(), self.encode)
        self._stage("train", lambda: (out / "gen" / "done").is_file(), self.train_generator)
        self._stage("sample", lambda: (out / "prompts.png").is_file(), self.sample_grid)
        if self.shapes:
            self._stage("sample_paraphrased", lambda: (out / "paraphrases.png").is_file(),
                        lambda: self.sample_grid(PARAPHRASED, "paraphrases.png"))
            self._stage("sample_variety", lambda: (out / "variety.png").is_file(), self.sample_variety)
        self._stage("eval", lambda: (out / "eval.json").is_file(), self.evaluate)
        self._stage("export", lambda: (out / "model" / "model_index.json").is_file(), self.export)
        report = self.write_report()
        print(f"[demo] done in {self.total_seconds() / 60:.1f} min: {out / 'report.md'}")
        return report

    def train_ae(self) -> None:
        from cclddg.config import AETrainConfig
        from cclddg.training.ae_trainer import AETrainer

        folder = self.out / "ae"
        cfg = AETrainConfig(data=self.spec, img_size=64, n_batches=self.settings.ae_steps,
                            train_size=min(20000, self.settings.data_size), eval_size=200 if self.quick else 500)
        print(json.dumps(AETrainer(cfg, folder, resume=folder.exists(), progress=self.progress).run()))

    def train_cloob(self) -> None:
        from cclddg.config import CLOOBTrainConfig
        from cclddg.training.cloob_trainer import CLOOBTrainer

        folder = self.out / "cloob"
        s = self.settings
        data = "shapes" if self.shapes else self.spec  # shapes: rendered at 32 px, not 64 px scaled down
        cfg = CLOOBTrainConfig(data=data, img_size=32, train_size=s.cloob_size, n_batches=s.cloob_steps,
                               batch_size=min(256, s.cloob_size), eval_size=200 if self.quick else 1000,
                               text_head=s.cloob_text_head)
        report = CLOOBTrainer(cfg, folder, resume=folder.exists(), progress=self.progress).run()
        print(json.dumps(report["zero_shot"] if "zero_shot" in report else report)[:400])

    def encode(self) -> None:
        from cclddg.data.latent_cache import encode_dataset
        from cclddg.data.sources import open_source
        from cclddg.encoders import load_embedder
        from cclddg.latents import load_latent_space

        n = self.settings.data_size
        space = load_latent_space(f"own:{(self.out / 'ae').resolve()}")
        embedder = load_embedder(f"cloob-tiny:{(self.out / 'cloob').resolve()}")
        source = open_source(self.spec, 64, seed=0, length=n)
        encode_dataset(source, self.spec, 0, n if self.shapes else None, 64, space, embedder, self.out / "cache",
                       shard_size=5000, progress=self.progress, workers=0 if self.shapes else 2)

    def train_generator(self) -> None:
        from cclddg.run_config import resolve
        from cclddg.training.trainer import Trainer

        folder = self.out / "gen"
        resume = (folder / "config.json").is_file()
        overrides: dict[str, Any] = {"data": str((self.out / "cache").resolve()),
                                     "n_batches": self.settings.gen_steps, "max_minutes": self.settings.gen_minutes,
                                     "threads": self.threads, "lr_gen": self.settings.gen_lr,
                                     "lr_disc": self.settings.gen_lr}
        if self.settings.gen_bf16 and native_bf16() and not torch.cuda.is_available():
            overrides["mixed_precision"] = "bf16"
        if self.settings.prior_steps:
            overrides["prior_steps"] = self.settings.prior_steps
        if self.quick:
            overrides.update(log_images_every=100, save_models_every=100)
        if resume and self.settings.gen_minutes:  # a resumed run gets the rest of the time budget, not a new one
            spent = self.times.get("train", 0.0) / 60
            overrides["max_minutes"] = max(0.05, self.settings.gen_minutes - spent)
        cfg = resolve("cclddg", overrides)
        trainer = Trainer(cfg, folder, resume=resume, progress=self.progress)
        trainer.run()
        (folder / "done").write_text(f"{trainer.step}\n")

    def sample_grid(self, prompts: tuple[str, ...] | None = None, name: str = "prompts.png") -> None:
        from cclddg.data.images import make_grid, save_image_atomic
        from cclddg.pipeline import load_prompted

        model, cfg, conditioner = load_prompted(self.out / "gen")
        prompts = prompts or self.prompts
        n, guidances = 4, self.settings.guidances
        cond = conditioner(list(prompts), n=n, seed=0)
        per = [generate(model, cfg, cond, g, seed=0).view(len(prompts), n, 3, 64, 64) for g in guidances]
        grid = torch.stack(per, dim=1).flatten(0, 2)  # rows: prompts; columns: n samples per guidance
        save_image_atomic(make_grid(grid, nrow=n * len(guidances)), self.out / name)

    def sample_variety(self) -> None:
        """Prompts that leave attributes open (rows), VARIETY_SAMPLES samples each at guidance 1: what the prior and
        the generator make of what a prompt does not say."""
        from cclddg.data.images import make_grid, save_image_atomic
        from cclddg.pipeline import load_prompted

        model, cfg, conditioner = load_prompted(self.out / "gen")
        cond = conditioner(list(VARIETY_PROMPTS), n=VARIETY_SAMPLES, seed=0)
        images = generate(model, cfg, cond, 1.0, seed=0)
        save_image_atomic(make_grid(images, nrow=VARIETY_SAMPLES), self.out / "variety.png")

    @property
    def shapes(self) -> bool:
        return self.settings.data == "shapes"

    @property
    def spec(self) -> str:
        return "shapes:64" if self.shapes else self.settings.data

    @property
    def prompts(self) -> tuple[str, ...]:
        return PROMPTS if self.shapes else EMOJI_PROMPTS

    def evaluate(self) -> None:
        if not self.shapes:
            return self.evaluate_named()
        from cclddg.conditioning.prompts import PromptConditioner
        from cclddg.encoders import load_embedder
        from cclddg.evaluation.generated import evaluate_model, evaluate_variety, real_clip_score
        from cclddg.pipeline import load_generator, run_text_prior

        model, cfg = load_generator(self.out / "gen")
        embedder = load_embedder(cfg.encoder)
        conditioner = PromptConditioner(embedder, run_text_prior(self.out / "gen", cfg, embedder.dim))
        results: dict[str, Any] = {"text_prior": cfg.text_prior, "pct_text": cfg.pct_text,
                                   "pseudo_text_xi": cfg.pseudo_text_xi}
        for kind in ("text", "paraphrase"):
            for g in self.settings.guidances:
                start = time.perf_counter()
                report = evaluate_model(model, cfg, self.settings.eval_n, guidance=g, conditioner=conditioner, prompts=kind,
                                        progress=self.progress)
                report = {k: v for k, v in report.items() if not isinstance(v, list)}
                report["seconds"] = round(time.perf_counter() - start, 1)
                results[str(g) if kind == "text" else f"paraphrase {g}"] = report
        results["cloob_score_real"] = real_clip_score(embedder, min(self.settings.eval_n, 500), 64)
        start = time.perf_counter()
        s = self.settings
        results["variety"] = evaluate_variety(model, cfg, s.variety_n, requests_per_group=s.variety_requests,
                                              guidance=1.0, conditioner=conditioner, progress=self.progress)
        results["variety"]["seconds"] = round(time.perf_counter() - start, 1)
        self._write_json("eval.json", results)

    @torch.no_grad()
    def evaluate_named(self) -> None:
        """Real captioned data: one sample per held-out caption; the samples' CLOOB score and caption
        retrieval (does a sample find its own prompt among all the captions?) next to the real images'."""
        from cclddg.data.images import uint8_to_unit
        from cclddg.data.sources import load_held_out
        from cclddg.evaluation.retrieval import retrieval_report
        from cclddg.pipeline import load_prompted

        images, captions = load_held_out(self.spec, 64, self.settings.eval_n, 0)
        model, cfg, conditioner = load_prompted(self.out / "gen")
        embedder = conditioner.embedder
        results: dict[str, Any] = {"real": retrieval_report(embedder, uint8_to_unit(images), captions)}
        for g in self.settings.guidances:
            start = time.perf_counter()
            samples = torch.cat([generate(model, cfg, conditioner(captions[i:i + 100], seed=i), g, seed=i)
                                 for i in range(0, len(captions), 100)])
            results[str(g)] = {**retrieval_report(embedder, samples, captions),
                               "seconds": round(time.perf_counter() - start, 1)}
        self._write_json("eval.json", results)

    def export(self) -> None:
        """The generator as one model folder (model_folder.py): `cclddg serve OUT/model`, or copy it anywhere."""
        from cclddg.model_folder import export_run

        export_run(self.out / "gen", self.out / "model", guidance_scale=1.0)  # its best in the eval (README)

    # ---- the report -------------------------------------------------------------------------------------
    def total_seconds(self) -> float:
        """The demo's wall time: its stages and side-by-side groups (not their members again)."""
        return sum(v for v in self.times.values() if isinstance(v, (int, float)))

    def write_report(self) -> dict[str, Any]:
        ae = json.loads((self.out / "ae" / "report.json").read_text())
        zero_shot = json.loads((self.out / "cloob" / "zero_shot.json").read_text())
        evals = self._read_json("eval.json")
        steps = int((self.out / "gen" / "done").read_text())
        minutes = {k: round(v / 60, 2) for k, v in self.times.items() if isinstance(v, (int, float))}
        side_by_side = {k: round(v / 60, 2) for k, v in self.times.get("side_by_side", {}).items()}
        report = {"quick": self.quick, "minutes_total": round(self.total_seconds() / 60, 1), "minutes": minutes,
                  "minutes_side_by_side": side_by_side, "ae_psnr_held_out": ae["psnr_held_out"],
                  "latent_scale": ae["scale"], "generator_steps": steps, "eval": evals,
                  "cloob_zero_shot": zero_shot.get("zero_shot") if self.shapes else zero_shot}
        self._write_json("report.json", report)
        lines = [f"# cclddg demo{' (quick)' if self.quick else ''}", "",
                 f"Total wall time: **{report['minutes_total']} min** "
                 f"({', '.join(f'{k} {v} min' for k, v in minutes.items())})"
                 + (f"; side by side, each in its own process: {', '.join(f'{k} {v} min' for k, v in side_by_side.items())}"
                    if side_by_side else "") + ".", "",
                 f"- Autoencoder: held-out PSNR **{ae['psnr_held_out']:.2f} dB**, latents {ae['latent_channels']}x"
                 f"{64 // ae['factor']}x{64 // ae['factor']}, scale factor {ae['scale']:.4g} (measured).",
                 f"- Own CLOOB on held-out images: {self._cloob_line(zero_shot)}.",
                 f"- Generator: {steps} steps of the latent DDGAN (T=4).", ""]
        lines += self._eval_lines(evals)
        if self.shapes and "variety" in evals:
            from cclddg.evaluation.variety import variety_table, z_line

            v = evals["variety"]
            lines += ["", f"Variety at guidance 1 ({v['requests_per_group']} requests per row group naming 1, 2 or 3 "
                      f"attributes, {v['n']} samples each, text prior {v.get('text_prior')}): per attribute the "
                      "prompt leaves open, the entropy of the analyzer's readings relative to the data's (H) and "
                      "the total-variation distance of the pooled readings to the data's (TV); real images drawn "
                      "for the same requests are the finite-sample reference.", ""]
            lines += variety_table(v) + ["", z_line(v["z"])]
        lines += ["", f"The model as one folder: `{self.out / 'model'}` (`cclddg serve` it, or "
                  "`CCLDDGPipeline.from_pretrained` it)."]
        scales = ", ".join(f"{g:g}" for g in self.settings.guidances)
        lines += ["", f"Prompts (rows) x guidance {scales} (4 samples each):", "", "![prompts](prompts.png)", "",
                  "Prompts: " + "; ".join(self.prompts), ""]
        if (self.out / "variety.png").is_file():
            lines += [f"Prompts that leave attributes open, {VARIETY_SAMPLES} samples each (guidance 1):", "",
                      "![variety](variety.png)", "", "Prompts: " + "; ".join(VARIETY_PROMPTS), ""]
        if (self.out / "paraphrases.png").is_file():
            lines += ["The same requests in words no caption uses:", "", "![paraphrased prompts](paraphrases.png)", "",
                      "Prompts: " + "; ".join(PARAPHRASED), ""]
        write_text_atomic(self.out / "report.md", "\n".join(lines))
        return report


    def _cloob_line(self, zero_shot: dict) -> str:
        if self.shapes:
            reference = {k: v for k, v in zero_shot.get("text_only_reference", {}).items() if k != "encoder"}
            return (f"zero-shot in the captions' wording {_fmt(zero_shot.get('zero_shot', {}))}; paraphrased "
                    f"{_fmt(zero_shot.get('zero_shot_paraphrased', {}))} (text-only reference of its sentence encoder: "
                    f"{_fmt(reference)})")
        return (f"image -> own caption among {zero_shot.get('distinct_captions')}: top-1 {zero_shot.get('top1')}%, "
                f"top-5 {zero_shot.get('top5')}% (chance {zero_shot.get('chance_top1')}%)")

    def _eval_lines(self, evals: dict) -> list[str]:
        rows = [(g, r) for g, r in evals.items() if isinstance(r, dict) and g not in ("real", "variety")]
        if self.shapes:
            lines = ["| prompts | guidance | colour | shape | position | validity | CLOOB score |",
                     "|---|---|---|---|---|---|---|"]
            for g, r in rows:
                kind, _, scale = g.rpartition(" ")
                lines.append(f"| {'paraphrased' if kind else 'captions' + chr(39) + ' wording'} | {scale} | "
                             f"{_pct(r, 'color')} | {_pct(r, 'shape')} | {_pct(r, 'position')} | "
                             f"{_pct(r, 'validity')} | {r.get('cloob_score', float('nan')):.3f} |")
            trained = (f"trained with --pct_text {evals.get('pct_text')} --pseudo_text_xi {evals.get('pseudo_text_xi')}, "
                       f"text prior {evals.get('text_prior')}") if "text_prior" in evals else ""
            return lines + ["", f"Samples per row: {self.settings.eval_n}, text prompts naming colour, shape and "
                            f"position, 4 generator calls each; generator {trained}. Real images' CLOOB score: "
                            f"{evals.get('cloob_score_real', float('nan')):.3f}."]
        real = evals["real"]
        lines = ["| images | CLOOB score | finds its caption: top-1 | top-5 |", "|---|---|---|---|",
                 f"| real held-out | {real['cloob_score']:.3f} | {real['top1']}% | {real['top5']}% |"]
        lines += [f"| samples, guidance {g} | {r['cloob_score']:.3f} | {r['top1']}% | {r['top5']}% |" for g, r in rows]
        return lines + ["", f"One sample per held-out emoji name ({real['n']} names, 4 generator calls each); "
                        f"retrieval among {real['distinct_captions']} names (chance {real['chance_top1']}%)."]


def _stage_in_child(out: Path, quick: bool, settings: DemoSettings, name: str, position: int, threads: int,
                    progress: bool) -> None:
    """One stage of `Demo._side_by_side` in a spawned process: its own threads and progress-bar line; a user error
    is one line and exit code 2, a stop signal saves the trainer's step (exit 143), as `cclddg` itself does."""
    from cclddg.preemption import handle_stop_signals, how_stopped

    os.environ["TQDM_POSITION"] = str(position)  # tqdm >= 4.66 reads its defaults from TQDM_* variables
    handle_stop_signals()
    try:
        demo = Demo(out, quick=quick, progress=progress, threads=threads, settings=settings, data=settings.data)
        tune_cpu(threads)
        getattr(demo, f"train_{name}")()
    except UserError as exc:
        print(f"error ({name}): {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as exc:
        sys.exit(how_stopped(exc)[1])


def _pct(report: dict, key: str) -> str:
    value = report.get(key if key == "validity" else f"{key}_acc")
    return "-" if value is None else f"{100 * float(value):.1f}"


def _fmt(values: dict) -> str:
    return ", ".join(f"{k} {float(v):.1f}%" for k, v in values.items()) or "-"
