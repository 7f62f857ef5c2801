"""`cclddg train | train-cloob | train-ae | train-prior | encode | sample | eval | demo | embedding-stats | plot |
export | serve`: the command line.

Flags keep the seed project's names (`--z_dim --n_channels_unet --batch_size --n_batches ...`), so its
README command is valid. Every bad input ends in one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, Sequence

from cclddg import conditioning, objectives
from cclddg.atomic import write_text_atomic
from cclddg.config import (
    DERIVED_FIELDS,
    PRECISIONS,
    PRESETS,
    PRIOR_SOURCES,
    TEXT_PRIORS,
    TrainConfig,
)
from cclddg.data.sources import SOURCES_HELP, with_font
from cclddg.errors import OneLineWarning, SamplingInterrupted, TrainingError, UserError
from cclddg.options import (
    ANY,
    AT_LEAST_1,
    BELOW_1,
    FRACTION,
    GUIDANCE,
    NON_NEGATIVE,
    SEEDS,
    THREADS,
    Range,
    field_kind,
    parse_number,
)
from cclddg.paths import distinct_outputs, output_folder, undone_if_failed
from cclddg.preemption import handle_stop_signals, how_stopped

EXIT_USAGE = 2
EXIT_FAILED = 1


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line that points at --help."""

    def error(self, message: str) -> None:  # type: ignore[override]
        # "argument --lr: must be > 0" reads as the checks of options.py do: "--lr must be > 0"
        message = re.sub(r"^argument (-\S+?)(?:/\S+)?: (must|expected)", r"\1 \2", message)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def number_list(kind: type, example: str, rng: Range = ANY):
    """An argparse type: numbers of `kind` (finite, in `rng`) separated by commas (or spaces), at least one."""
    name = "integers" if kind is int else "numbers"
    one = parse_number(kind, rng)

    def parse(text: str) -> tuple:
        parts = list_items(text)
        if parts is None:
            raise argparse.ArgumentTypeError(f"expected {name} separated by commas, e.g. {example}; got {text!r}")
        try:
            return tuple(one(v) for v in parts)
        except argparse.ArgumentTypeError as exc:
            raise argparse.ArgumentTypeError(f"{exc} (in {text!r})" if len(parts) > 1 else str(exc)) from None

    return parse


def list_items(text: str) -> list[str] | None:
    """The items of a comma (or space) separated list; None for an empty list or an empty item ("1,,2", "1,2,")."""
    parts = [p.strip() for p in text.split(",")] if "," in text else text.split()
    return parts if parts and all(parts) else None


def guidance_scales(text: str) -> tuple[float, ...]:
    """--cfg: one guidance scale or a comma list of them."""
    return number_list(float, "3 or 1,2,3", GUIDANCE)(text)


def bool_list(text: str) -> tuple[bool, ...]:
    table = {"1": True, "true": True, "t": True, "0": False, "false": False, "f": False}
    try:
        return tuple(table[v.lower()] for v in list_items(text) or ["empty"])
    except KeyError:
        raise argparse.ArgumentTypeError(f"expected flags like 0,0,1 or False,False,True; got {text!r}")


def parse_bool(text: str) -> bool:
    table = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
    if text.lower() not in table:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return table[text.lower()]


def number_pair(rng: Range):
    """An argparse type: two numbers in `rng`, like 0.5,0.9."""
    def parse(text: str) -> tuple[float, float]:
        values = number_list(float, "0.5,0.9", rng)(text)
        if len(values) != 2:
            raise argparse.ArgumentTypeError(f"expected two numbers like 0.5,0.9; got {text!r}")
        return values

    return parse


def optional_str(text: str) -> str | None:
    return None if text in ("", "None", "none") else text


# Every option that names a path says which kind in its metavar (shown in --help; tests/test_bad_input.py tries
# each kind with a missing path, a file, a folder and an unwritable place).
PATH_METAVARS = ("FILE", "RUN", "OUT_FILE", "OUT_FOLDER", "DATA", "ENCODER", "AUTOENCODER")


def add_font_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--font", default=None, metavar="FILE", help="colour emoji font for --data emoji (default: Noto Color Emoji)")


def add_data_flags(p: argparse.ArgumentParser) -> None:
    """Flags of the data sources that are not part of a run's recipe."""
    add_font_flag(p)
    p.add_argument("--workers", type=parse_number(int, Range(0, 256)), default=None,
                   help="processes that read and decode images (default: 2, at most the CPU count)")


def resolve_workers(workers: int | None, spec) -> int:
    """--workers, or the default: none for the rendered shapes, DEFAULT_WORKERS for files."""
    from cclddg.data.sources import DEFAULT_WORKERS

    if workers is not None:  # its range is checked as the flag is parsed
        return workers
    return 0 if spec.procedural else DEFAULT_WORKERS


def config_flag_type(config_cls: type, f) -> Callable[[str], Any]:
    """The argparse type of a config field's flag: numbers are checked against the config's RANGES as parsed."""
    kind, _ = field_kind(str(f.type))
    if kind == "bool":
        return parse_bool
    if kind in ("int", "float"):
        return parse_number(int if kind == "int" else float, config_cls.RANGES[f.name])
    if kind == "tuple-int":
        return number_list(int, "16,32,64", config_cls.RANGES[f.name])
    return str


def add_train_args(p: argparse.ArgumentParser) -> None:
    """Every TrainConfig field as a flag defaulting to None: the preset fills what is not given."""
    p.add_argument("--preset", default="ddgan", help=f"recipe to start from: {', '.join(PRESETS)} (default ddgan)")
    p.add_argument("--out", default="runs/latest", metavar="OUT_FOLDER", help="run folder (default runs/latest)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    p.add_argument("--dataset", dest="data", default=None, help="the seed's name for --data")
    special: dict[str, dict[str, Any]] = {
        "ch_mults": dict(type=number_list(int, "1,2,2", TrainConfig.RANGES["ch_mults"])),
        "ch_mults_disc": dict(type=number_list(int, "1,2,2", TrainConfig.RANGES["ch_mults_disc"])),
        "is_attn": dict(type=bool_list), "is_attn_disc": dict(type=bool_list),
        "adam_betas": dict(type=number_pair(TrainConfig.RANGES["adam_betas"])), "wandb_project": dict(type=optional_str),
        "objective": dict(choices=objectives.names()), "cond": dict(choices=conditioning.names()),
        "encoder": dict(type=str, metavar="ENCODER"),
        "cache_dir": dict(type=str, metavar="OUT_FOLDER"), "autoencoder": dict(type=str, metavar="AUTOENCODER"),
        "mixed_precision": dict(choices=PRECISIONS), "text_prior": dict(choices=TEXT_PRIORS),
    }
    aliases = {"n_cond_channels": ["--n_cloob_channels_unet"], "n_cond_channels_disc": ["--n_cloob_channels_disc"]}
    helps = {"encoder": "conditioning embedder for --cond embedding, e.g. cloob-tiny:runs/cloob",
             "pct_text": "fraction of examples conditioned on their caption's text embedding (else the image's)",
             "pseudo_text_xi": "LAFITE pseudo-text: noise of this relative size added to the image embeddings the "
                               "generator is trained on (0: off)",
             "text_prior": TEXT_PRIOR_HELP,
             "prior_k": "neighbours the retrieval prior draws from",
             "prior_guidance": "the learned prior's guidance (--text_prior flow): > 1 follows the text more closely",
             "prior_guidance_start": "the flow time in [0, 1) from which the learned prior is guided (default 0)",
             "prior_steps": "--text_prior flow: steps of the learned prior, trained before the generator (default 3000)",
             "use_cloob_unet": "the generator sees the conditioning (true/false)",
             "use_cloob_disc": "the discriminator sees the conditioning (true/false)",
             "data_size": "examples in the dataset whose embeddings are cached (embedding runs)",
             "cache_dir": "where dataset embeddings are cached (default ~/.cache/cclddg or $CCLDDG_CACHE)",
             "autoencoder": "latent space: pixels, own:RUN (cclddg train-ae), kl-f8:PATH or taesd:PATH",
             "flip": "train on horizontally flipped latents half of the time (cache made with --flip)",
             "batch_size": "examples per process and micro-batch; the global batch is batch_size x processes x "
                           "grad_accum",
             "grad_accum": "micro-batches per optimizer step (a larger global batch in the same memory)",
             "mixed_precision": "no, fp16 (with loss scaling) or bf16: activations in 16 bits, weights in fp32",
             "channels_last": "NHWC memory layout (faster convolutions on recent GPUs)",
             "compile": "torch.compile the generator (and the discriminator when --r1_gamma is 0)",
             "deterministic": "deterministic kernels (exact reruns on GPUs; slower)",
             "skip_nonfinite": "skip a step whose loss or gradient is not finite instead of stopping",
             "lr_warmup": "steps of linear learning-rate warmup (default 0)",
             "lr_decay": "the step where a cosine decay of both learning rates reaches 0, whatever --n_batches "
                         "(default 0: constant)",
             "kid_every": "embedding runs: log KID on the run's own features every this many steps (default 0: off)",
             "kid_n": "images of each set per training-time KID (default 256)",
             "tensorboard": "also log to RUN/tensorboard when tensorboard is installed (default true)",
             "wandb_project": "log to this Weights & Biases project (None: off)"}
    for f in fields(TrainConfig):
        if f.name in ("preset", "extra", *DERIVED_FIELDS):  # the data decides those (run_config)
            continue
        kwargs = special.get(f.name)
        if kwargs is None:
            kwargs = dict(type=config_flag_type(TrainConfig, f))
        if f.name == "data":
            p.add_argument("--data", dest="data", default=None, metavar="DATA",
                           help=f"data source ({SOURCES_HELP}) or a latent cache folder from `cclddg encode`")
            add_font_flag(p)
            continue
        p.add_argument(f"--{f.name}", *aliases.get(f.name, []), dest=f.name, default=None, help=helps.get(f.name),
                       **kwargs)


def cmd_train(args: argparse.Namespace) -> int:
    from cclddg.priors import flow_prior_path
    from cclddg.run_config import train_config
    from cclddg.run_folder import list_checkpoints
    from cclddg.training.trainer import Trainer

    out = output_folder(args.out, "--out")
    names = {f.name for f in fields(TrainConfig)} - {"preset", "extra", *DERIVED_FIELDS}
    cfg = train_config(args.preset, {k: v for k, v in vars(args).items() if k in names}, out, args.resume, args.font)
    resume = f"cclddg train --out {out} --resume"
    with undone_if_failed(out, lambda: bool(list_checkpoints(out) or list_checkpoints(flow_prior_path(out)))):
        try:
            trainer = Trainer(cfg, out, resume=args.resume, progress=not args.no_progress)
        except KeyboardInterrupt as exc:  # while it encoded the data (shards kept) or trained the text prior
            prior = list_checkpoints(flow_prior_path(out))
            if not prior:
                raise
            raise stopped(exc, "while training the run's text prior", prior[-1], resume) from None
        try:
            run_or_interrupted(trainer, resume)
        finally:
            trainer.close()
    if trainer.rank == 0:
        print(f"done: {trainer.step} steps; run folder {out}; latest checkpoint {trainer.last_checkpoint}")
    return 0


def run_small_trainer(args: argparse.Namespace, config_cls: type, trainer_cls: type, command: str) -> dict:
    """`train-cloob` / `train-ae`: flags over the run's saved config (on --resume), run, Ctrl-C saves.

    Returns the trainer's final report (`Stopped` when interrupted: the message said how to resume)."""
    from cclddg.run_config import small_run_config
    from cclddg.run_folder import list_checkpoints

    out = output_folder(args.out, "--out")
    cfg = small_run_config(config_cls, vars(args), out, args.resume, args.font, command)
    with undone_if_failed(out, lambda: bool(list_checkpoints(out))):
        trainer = trainer_cls(cfg, out, resume=args.resume, progress=not args.no_progress)
        report = run_or_interrupted(trainer, f"cclddg {command} --out {out} --resume")
    print(json.dumps(report, indent=2))
    return report


class Stopped(Exception):
    """A command was interrupted (Ctrl-C) or stopped by a signal after keeping its work, and said so in one line;
    `main` exits with `code`."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


def stopped(exc: KeyboardInterrupt, where: str, saved: Path, resume_command: str, say: bool = True) -> Stopped:
    """The one line of an interruption that kept its work (`say`: this process reports for the run), and the
    `Stopped` that ends the command with the interruption's exit code."""
    how, code = how_stopped(exc)
    if say:
        print(f"{how} {where}; saved {saved}; continue with: {resume_command}", file=sys.stderr)
    return Stopped(code)


def run_or_interrupted(trainer, resume_command: str) -> dict:
    """`trainer.run()`'s report; Ctrl-C or a stop signal after a checkpoint says in one line how to continue (the
    main process, for all of them) and raises `Stopped`."""
    try:
        return trainer.run()
    except KeyboardInterrupt as exc:
        if trainer.last_checkpoint is None:
            raise
        raise stopped(exc, f"at step {trainer.step}", trainer.last_checkpoint, resume_command,
                      say=trainer.is_main) from None


def cmd_train_cloob(args: argparse.Namespace) -> int:
    from cclddg.config import CLOOBTrainConfig
    from cclddg.training.cloob_trainer import CLOOBTrainer

    run_small_trainer(args, CLOOBTrainConfig, CLOOBTrainer, "train-cloob")
    print(f"done; use it with --encoder cloob-tiny:{args.out}")
    return 0


def cmd_train_prior(args: argparse.Namespace) -> int:
    """The learned text prior of an embedding run, in RUN/prior (training/prior_trainer.py)."""
    from cclddg.config import PriorTrainConfig
    from cclddg.priors import flow_prior_path
    from cclddg.run_config import small_run_config
    from cclddg.run_folder import load_config, resolve_checkpoint
    from cclddg.training.data import run_embedding_pairs
    from cclddg.training.prior_trainer import PriorTrainer, prior_finished

    run = Path(args.run)
    cfg = load_config(resolve_checkpoint(run))
    kind = conditioning.get(cfg.cond)
    if not kind.uses_encoder:
        raise UserError(f"{run} is {kind.described}, not on embeddings: it takes no text prompts, so it "
                        "needs no text prior")
    out = flow_prior_path(run)
    if prior_finished(run):
        raise UserError(f"{run} already has a learned prior ({out}); delete that folder to train another")
    if out.exists() and not args.resume:
        raise UserError(f"{out} holds an unfinished prior; continue it with: cclddg train-prior {run} --resume")
    flags = {**vars(args), "data": cfg.data}
    prior_cfg = small_run_config(PriorTrainConfig, flags, out, args.resume, None, "train-prior")
    pairs = run_embedding_pairs(cfg, run, progress=not args.no_progress)
    trainer = PriorTrainer(prior_cfg, out, pairs, resume=args.resume, progress=not args.no_progress)
    report = run_or_interrupted(trainer, f"cclddg train-prior {run} --resume")
    print(json.dumps(report, indent=2))
    print(f"done; sample with it: cclddg sample --checkpoint {run} --text_prior flow --prompt \"...\"")
    return 0


def cmd_train_ae(args: argparse.Namespace) -> int:
    from cclddg.config import AETrainConfig
    from cclddg.training.ae_trainer import AETrainer

    run_small_trainer(args, AETrainConfig, AETrainer, "train-ae")
    print(f"done; use it with --autoencoder own:{args.out}")
    return 0


def add_small_trainer_args(p: argparse.ArgumentParser, config_cls: type, default_out: str,
                           helps: dict[str, str]) -> None:
    """--out/--resume/--no_progress and one flag per config field (defaults shown from the dataclass)."""
    p.add_argument("--out", default=default_out, metavar="OUT_FOLDER", help=f"run folder (default {default_out})")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    p.add_argument("--dataset", dest="data", default=None, help="the seed's name for --data")
    add_font_flag(p)
    for f in fields(config_cls):
        p.add_argument(f"--{f.name}", type=config_flag_type(config_cls, f), default=None,
                       help=helps.get(f.name, f"default {f.default}"))


def add_train_cloob_args(p: argparse.ArgumentParser) -> None:
    from cclddg.config import CLOOBTrainConfig

    helps = {"text_tower": "minilm (frozen pretrained sentence encoder + trained head) or bpe (from scratch)",
             "text_head": "minilm tower: mlp or linear (a trained head) or locked (none: the sentence encoder's own "
                          "space is the joint space, so paraphrases keep their meaning; default mlp)",
             "center_text": "with --text_head locked: subtract the training captions' mean sentence feature (a fixed "
                            "map that spreads the captions apart; default false)",
             "dim": "embedding width (default 0: 384, the sentence encoder's, with --text_head locked; else 256)",
             "train_size": "number of training examples (embedded once)", "inv_tau": "InfoLOOB inverse temperature",
             "scale_hopfield": "Hopfield retrieval inverse temperature", "eval_size": "held-out images for zero-shot eval",
             "text_hidden": "hidden width of the MLP head over sentence features (0: a linear head)"}
    add_small_trainer_args(p, CLOOBTrainConfig, "runs/cloob", helps)


def add_train_ae_args(p: argparse.ArgumentParser) -> None:
    from cclddg.config import AETrainConfig

    helps = {"widths": "channels per level; the downsampling factor is 2**(levels-1) (default 16,32,64: 4)",
             "crop": "train on random crops of this size (0: whole images; default 32)",
             "train_size": "training images (rendered or read once)", "eval_size": "held-out images for the PSNR report",
             "kl_weight": "weight of the KL term (default 1e-6, as latent diffusion)",
             "adv_weight": "weight of the patch-adversarial term (default 0: off)",
             "adv_start": "step the adversarial term starts at", "mse_weight": "weight of the MSE term beside L1",
             "sample_posterior": "reconstruct from a posterior sample instead of its mean (default false)"}
    add_small_trainer_args(p, AETrainConfig, "runs/ae", helps)


DECODE_DTYPES = ("auto", "float32", "bfloat16")


def add_decode_dtype_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--decode_dtype", choices=DECODE_DTYPES, default="auto",
                        help="the autoencoder's decoding precision (default auto: bfloat16 on a CPU with native bf16, "
                        "where KL-f8 decodes ~2x faster; float32 elsewhere)")


def decode_dtype_of(args: argparse.Namespace):
    """--decode_dtype as a torch dtype (auto: `cpu.fast_decode_dtype`, bfloat16 on a CPU with native bf16)."""
    import torch

    from cclddg.cpu import fast_decode_dtype

    return fast_decode_dtype("cpu") if args.decode_dtype == "auto" else getattr(torch, args.decode_dtype)


SAMPLER_HELP = ("the sampler of a model that has several: a diffusion model's ddim (the default, over --steps, 50 "
                "unless given) or ddpm (every step); a DDGAN samples in its own T steps")
TEXT_PRIOR_HELP = ("how text prompts are mapped for a generator trained on image embeddings: none, gap (the "
                   "modality-gap shift), retrieval (one of the prior_k nearest training image embeddings), posterior "
                   "(a training image embedding drawn from the calibrated softmax over all of them) or flow (a sample "
                   "of the learned prior, cclddg train-prior)")


def add_train_prior_args(p: argparse.ArgumentParser) -> None:
    from cclddg.config import PriorTrainConfig

    p.add_argument("run", metavar="RUN", help="run folder of an embedding-conditioned `cclddg train`")
    p.add_argument("--resume", action="store_true", help="continue the prior in RUN/prior from its last checkpoint")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    helps = {"source": "captions (each image embedding given its caption's text embedding) or pseudo-text (LAFITE "
                       "noise on the image embedding itself: no captions needed); default captions",
             "pseudo_text_xi": "pseudo-text's relative noise (default 1.3)",
             "text_noise": "--source captions: relative noise on the captions' embeddings, so that captions that "
                           "mean the same share their images (default 0.3)",
             "width": "hidden width (default 0: twice the embedding width, at least 64)",
             "cond_drop": "conditions dropped in training, for the prior's own guidance (default 0.1)",
             "eval_size": "examples held out for the report's loss (default 1000)",
             "mixed_precision": "no or bf16 (autocast, fp32 weights: ~3x a step on a CPU with native bf16; default no)"}
    for f in fields(PriorTrainConfig):
        if f.name in ("data", "workers"):
            continue
        kwargs: dict[str, Any] = {"choices": PRIOR_SOURCES} if f.name == "source" else \
            {"type": config_flag_type(PriorTrainConfig, f)}
        p.add_argument(f"--{f.name}", default=None, help=helps.get(f.name, f"default {f.default}"), **kwargs)


def add_text_prior_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text_prior", choices=TEXT_PRIORS, default=None, help=TEXT_PRIOR_HELP + "; default: the run's")
    p.add_argument("--prior_k", type=parse_number(int, AT_LEAST_1), default=None, help="neighbours the retrieval prior draws from (default: the run's)")
    p.add_argument("--prior_guidance", type=parse_number(float, GUIDANCE), default=None,
                   help="the learned prior's guidance: > 1 follows the text more closely, with less variety "
                        "(default: the run's)")
    p.add_argument("--prior_guidance_start", type=parse_number(float, BELOW_1), default=None,
                   help="the flow time in [0, 1) the learned prior's guidance starts at (default: the run's)")


def prior_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The text prior flags of sample/eval, by their config names (None: not given)."""
    return {name: getattr(args, name) for name in ("text_prior", "prior_k", "prior_guidance", "prior_guidance_start")}


def check_sample_outputs(args: argparse.Namespace) -> tuple[Path | None, Path | None]:
    """-o and --singles, checked before the model loads (the folders are made when sampling starts)."""
    from cclddg.paths import IMAGE_SUFFIXES, output_file

    if not (args.output or args.singles):
        raise UserError("nothing to write: give -o/--output GRID.png and/or --singles FOLDER")
    grid = output_file(args.output, "-o", IMAGE_SUFFIXES) if args.output else None
    singles = output_folder(args.singles, "--singles") if args.singles else None
    distinct_outputs({"-o": grid}, {"--singles": singles})
    return grid, singles


def sample_prompted(args: argparse.Namespace, cfgs: tuple[float, ...], n: int, grid: Path | None,
                    singles: Path | None) -> int:
    """Rows: prompts and/or images; columns: n samples for each guidance scale (same noise per column group)."""
    import torch

    from cclddg.conditioning.base import Request
    from cclddg.pipeline import SamplingConfig, load_prompted, read_image, sample_batches
    from cclddg.sample_writer import SampleJob, run_sample_jobs

    images = [read_image(p) for p in args.image or []]  # unreadable images stop us before the model loads
    model, cfg, prompts = load_prompted(args.checkpoint, ema=not args.no_ema, encoder=args.encoder,
                                        **prior_flags(args))
    SamplingConfig.of(cfg).sampler(args.sampler, args.steps)  # one it cannot sample with: one line, now
    request = Request(prompts=tuple(args.prompt or ()), images=tuple(images), image_weight=args.image_weight,
                      negative_prompt=args.negative_prompt)
    cond, negative = conditioning.get(cfg.cond).conditions(request, n, args.seed, lambda: prompts)  # batch by batch
    cols = len(cfgs) * n

    def cell_of(gi: int) -> Callable[[int], int]:
        return lambda j: (j // n) * cols + gi * n + j % n  # row j // n, guidance gi, sample j % n

    def batches(job: SampleJob):  # every guidance scale from the same noise
        return sample_batches(model, cfg, len(job.cond), cond=job.cond, batch_size=args.batch_size,
                              rng=torch.Generator().manual_seed(args.seed), guidance=job.guidance,
                              sampler=args.sampler, steps=args.steps, uncond=negative,
                              decode_dtype=decode_dtype_of(args))

    jobs = [SampleJob(g, len(cond), cond, cell_of(gi)) for gi, g in enumerate(cfgs)]
    run_sample_jobs(jobs, batches, cols, cfg.img_size, grid, singles, not args.no_progress)
    return 0


def check_prompt_flags(args: argparse.Namespace) -> None:
    """An empty --prompt or --negative_prompt is named by its flag (the embedder's own check cannot know it)."""
    given = [("--prompt", p) for p in args.prompt or []]
    if args.negative_prompt is not None:
        given.append(("--negative_prompt", args.negative_prompt))
    for flag, text in given:
        if not "".join(ch for ch in text if ch.isprintable()).strip():
            drop = ", or drop it" if flag == "--negative_prompt" else ""
            raise UserError(f"{flag} is empty; give some words (e.g. {flag} \"a red circle\"){drop}")


def sample_grid_shape(args: argparse.Namespace, n: int, cfgs: tuple[float, ...]) -> tuple[int, int]:
    """(images, columns) of `cclddg sample`'s grid: prompt/image rows x n per guidance scale, or n label samples
    (a square, --nrow, or one column per scale)."""
    if args.prompt or args.image:
        return max(len(args.prompt or []), len(args.image or [])) * n * len(cfgs), len(cfgs) * n
    if len(cfgs) == 1:
        return n, args.nrow or max(1, int(round(n ** 0.5)))
    return n * len(cfgs), len(cfgs)


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from cclddg.conditioning.base import CLI_NAMES, Request
    from cclddg.data.images import GridCanvas
    from cclddg.data.shapes import parse_attrs
    from cclddg.pipeline import SamplingConfig, image_size_of, load_generator, sample_batches
    from cclddg.sample_writer import SampleJob, run_sample_jobs

    grid, singles = check_sample_outputs(args)
    cfgs = args.cfg or (1.0,)
    prompted = bool(args.prompt or args.image)
    if args.negative_prompt is not None and not prompted:
        raise UserError("--negative_prompt needs --prompt or --image")
    check_prompt_flags(args)
    n = args.n or (4 if prompted else 16)
    if grid is not None:  # a grid too large for one image is refused before anything loads
        size = image_size_of(args.checkpoint)
        GridCanvas.check(*sample_grid_shape(args, n, cfgs), size, size)
    if prompted:
        return sample_prompted(args, cfgs, n, grid, singles)
    model, cfg = load_generator(args.checkpoint, ema=not args.no_ema)
    SamplingConfig.of(cfg).sampler(args.sampler, args.steps)  # one it cannot sample with: one line, now
    kind = conditioning.get(cfg.cond)
    request = Request(attrs=() if args.attrs is None else (parse_attrs(args.attrs),))
    kind.check_request(request, CLI_NAMES)
    cond, _ = kind.conditions(request, n, args.seed, conditioner=None)  # one row, sliced batch by batch
    if args.cfg and cond is None:
        raise UserError(f"this model is {kind.described}: --cfg has nothing to guide; drop it" if not kind.conditional
                        else f"--cfg guides towards a request: {kind.how_to_ask(CLI_NAMES)}, or drop --cfg")
    nrow = sample_grid_shape(args, n, cfgs)[1]
    if len(cfgs) == 1:
        jobs = [SampleJob(cfgs[0], n, cond, lambda j: j)]
    else:  # a guidance sweep: one column per scale, one row per sample
        jobs = [SampleJob(g, n, cond, lambda j, gi=gi: j * len(cfgs) + gi) for gi, g in enumerate(cfgs)]

    def batches(job: SampleJob):
        rng = torch.Generator().manual_seed(args.seed)  # the same noise for every guidance scale
        return sample_batches(model, cfg, job.count, cond=job.cond, batch_size=args.batch_size, rng=rng,
                              guidance=job.guidance, sampler=args.sampler, steps=args.steps,
                              decode_dtype=decode_dtype_of(args))

    run_sample_jobs(jobs, batches, nrow, cfg.img_size, grid, singles, not args.no_progress)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from cclddg.encoders import load_embedder
    from cclddg.evaluation.generated import evaluate_model, real_clip_score
    from cclddg.paths import output_file

    output = output_file(args.output, "-o", (".json",)) if args.output else None
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.data and not args.checkpoint:
        from cclddg.data.sources import open_dataset
        from cclddg.evaluation.shapes_eval import score

        data = open_dataset(args.data, 32, seed=args.seed)
        samples = [data.sample(i) for i in range(args.n)]
        report = score([s.image for s in samples], [s.attrs for s in samples])
        report.update({"source": args.data})
        if args.encoder:  # how well the embedder reads this data: zero-shot by prompts, and the CLOOB score
            from cclddg.evaluation.zero_shot import zero_shot_report

            embedder = load_embedder(args.encoder)
            report["cloob_score_real"] = real_clip_score(embedder, args.n, data.size)
            report.update(zero_shot_report(embedder, args.n, data.size))
    else:
        from cclddg.conditioning.prompts import PromptConditioner
        from cclddg.pipeline import SamplingConfig, load_fitting_embedder, load_generator, run_text_prior

        model, cfg = load_generator(args.checkpoint, ema=not args.no_ema)
        sampler, steps = SamplingConfig.of(cfg).sampler(args.sampler, args.steps)  # one it can't: a line, now
        conditioner = None
        if conditioning.get(cfg.cond).uses_encoder:
            embedder = load_fitting_embedder(args.encoder or cfg.encoder, model)
            conditioner = PromptConditioner(embedder, run_text_prior(args.checkpoint, cfg, embedder.dim,
                                                                     **prior_flags(args)))
        elif args.prompts != "text":
            raise UserError(f"--prompts {args.prompts} needs a run trained on embeddings (--encoder)")
        if args.metrics:  # the distribution metrics against real images (evaluation/fidelity.py)
            from cclddg.evaluation.fidelity import load_features, parse_metrics
            from cclddg.evaluation.generated import evaluate_fidelity

            metrics = parse_metrics(args.metrics)
            features = load_features(args.features, (lambda: conditioner.embedder) if conditioner else None)
            data = args.data or getattr(cfg, "data", None)
            if not data:
                raise UserError("--metrics compares with real images: give --data SOURCE (a model folder does not "
                                "name its training data)")
            report = evaluate_fidelity(model, cfg, data, args.n, features, metrics=metrics, guidance=args.cfg,
                                       sampler=args.sampler, n_sample_steps=args.steps, seed=args.seed,
                                       batch_size=args.batch_size, conditioner=conditioner)
        else:
            report = evaluate_model(model, cfg, args.n, guidance=args.cfg, sampler=args.sampler,
                                    n_sample_steps=args.steps, seed=args.seed, batch_size=args.batch_size,
                                    conditioner=conditioner, prompts=args.prompts)
        if args.variety:
            from cclddg.evaluation.generated import evaluate_variety

            report["variety"] = evaluate_variety(model, cfg, args.variety_n, requests_per_group=args.variety_requests,
                                                 guidance=args.cfg, seed=args.seed, batch_size=args.batch_size,
                                                 conditioner=conditioner)
        if conditioner is not None and not args.metrics:
            report["cloob_score_real"] = real_clip_score(conditioner.embedder, min(args.n, 500), cfg.img_size)
        report.update({"checkpoint": str(args.checkpoint), "cfg": args.cfg, "sampler": sampler, "steps": steps})
    report = {k: v for k, v in report.items() if not isinstance(v, list)}
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(output, text + "\n")
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    """Encode a dataset once into a latent cache (latents + embeddings), resuming a partial one."""
    import time

    import torch

    from cclddg.data.latent_cache import META_FILE, encode_dataset, shards_done
    from cclddg.data.parallel_encode import encode_in_parts
    from cclddg.data.sources import open_source, parse_data_spec
    from cclddg.encoders import load_embedder
    from cclddg.latents import load_latent_space

    if args.threads:
        torch.set_num_threads(args.threads)
    data = with_font(args.data, args.font)
    spec = parse_data_spec(data)
    if spec.procedural and args.n is None:
        raise UserError("--data shapes is endless: give --n, the number of examples to encode")
    img_size = spec.size or args.img_size or 64
    out = output_folder(args.out, "--out")
    was_complete = (out / META_FILE).is_file()
    rank, world, barrier, device = encode_processes(args.device)
    source = open_source(spec, img_size, seed=args.seed, length=args.n)
    space = load_latent_space(args.autoencoder, device)
    embedder = load_embedder(args.encoder, device) if args.encoder else None
    options = dict(flip=args.flip, shard_size=args.shard_size, batch_size=args.batch_size, scale=args.scale,
                   progress=not args.no_progress and rank == 0, workers=resolve_workers(args.workers, spec),
                   crop=args.crop)
    start = time.perf_counter()
    try:
        if world > 1:  # each process its part of the source, one cache.json (data/parallel_encode.py)
            encode_in_parts(source, data, args.seed, args.n, img_size, space, embedder, out, rank=rank,
                            world=world, barrier=barrier, **options)
        else:
            with undone_if_failed(out, lambda: shards_done(out) > 0):
                encode_dataset(source, data, args.seed, args.n, img_size, space, embedder, out, **options)
    except KeyboardInterrupt as exc:
        how, code = how_stopped(exc)
        if rank == 0:
            kept = f"{shards_done(out)} finished shards" if world == 1 else "every part's finished shards"
            print(f"{how}; {kept} are kept in {out}; rerun the same command to resume", file=sys.stderr)
        return code
    if rank != 0:
        return 0
    meta = json.loads((out / META_FILE).read_text())
    if was_complete:
        print(f"{out} is already complete ({meta['count']} examples); nothing to do")
        return 0
    emb = f", {meta['embed_dim']}-dim embeddings" if meta["embed_dim"] else ", no embeddings"
    print(f"encoded {meta['count']} examples into {out}: latents {tuple(meta['latent_shape'])} float16, "
          f"scale {meta['scale']:.5g}{emb}{', flipped too' if meta['flip'] else ''}, {len(meta['shards'])} shards, "
          f"{time.perf_counter() - start:.1f} s")
    if meta["skipped"]["skipped"]:
        from cclddg.data.preprocess import SkipLog

        print(SkipLog.from_dict(meta["skipped"]).summary(named=3))
    return 0


def encode_processes(device: str) -> tuple[int, int, Callable[[], None], str]:
    """(rank, processes, a barrier, this process's device) of `cclddg encode`: one process, or several started by
    accelerate launch / torchrun (WORLD_SIZE), each on its own GPU when --device names CUDA."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, lambda: None, device
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not device.startswith("cuda") or not torch.cuda.is_available())
    return state.process_index, state.num_processes, state.wait_for_everyone, \
        str(state.device) if device.startswith("cuda") else device


def cmd_demo(args: argparse.Namespace) -> int:
    from cclddg.demo import Demo

    output_folder(args.out, "--out")
    demo = Demo(args.out, quick=args.quick, gen_minutes=args.minutes, progress=not args.no_progress,
                threads=args.threads, data=args.data, gen_steps=args.steps)
    try:
        demo.run()
    except KeyboardInterrupt as exc:
        how, code = how_stopped(exc)
        print(f"{how}; finished stages are kept in {args.out}; run the same command again to resume",
              file=sys.stderr)
        return code
    return 0


def cmd_embedding_stats(args: argparse.Namespace) -> int:
    """Measure the text priors' statistics (modality gap, image bank) into a run trained without them."""
    from cclddg.encoders import load_embedder
    from cclddg.priors.stats import measure_stats, stats_path
    from cclddg.run_folder import load_config, resolve_checkpoint

    cfg = load_config(resolve_checkpoint(Path(args.run)))
    kind = conditioning.get(cfg.cond)
    if not kind.uses_encoder:
        raise UserError(f"{args.run} is {kind.described}, not on embeddings: it takes no text prompts")
    embedder = load_embedder(args.encoder or cfg.encoder)
    stats = measure_stats(embedder, args.data or cfg.data, cfg.img_size, args.n, cfg.seed, not args.no_progress)
    path = stats_path(Path(args.run))
    stats.save(path)
    print(f"wrote {path}: {stats.describe()}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """A run as one self-contained model folder (diffusers' layout; model_folder.py)."""
    from cclddg.model_folder import export_run

    out = output_folder(args.out, "OUT")
    folder = export_run(Path(args.run), out, ema=not args.no_ema, guidance_scale=args.guidance)
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    print(f"wrote {folder} ({size / 2**20:.1f} MiB): CCLDDGPipeline.from_pretrained({str(folder)!r}), "
          f"or cclddg sample --checkpoint {folder}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """A local web page to prompt a model (serve.py); Ctrl-C stops it."""

    from cclddg import cpu
    from cclddg.serve import READ_TIMEOUT, check_address, load_pipeline, serve

    check_address(args.host, args.port)  # a bad --host or a taken --port, before the model loads
    cpu.tune_cpu(args.threads)  # threads, denormals and freed memory
    pipe = load_pipeline(args.model, decode_dtype_of(args))
    try:
        serve(pipe, Path(args.model).name, args.host, args.port, read_timeout=args.read_timeout or READ_TIMEOUT,
              ready=lambda url: print(f"serving {args.model} on {url} (Ctrl-C stops)", flush=True))
    except KeyboardInterrupt as exc:
        print(f"cclddg serve: {how_stopped(exc)[0]}; the server is closed", file=sys.stderr)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from cclddg.paths import output_file
    from cclddg.training.plot import plot_run

    output = output_file(args.output, "-o", (".png",)) if args.output else None
    out = plot_run(Path(args.run), output, smooth=args.smooth)
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="cclddg", description="CLOOB-conditioned latent denoising diffusion GANs")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    train = sub.add_parser("train", help="train a DDGAN or a DDPM")
    add_train_args(train)
    train.set_defaults(func=cmd_train)

    tc = sub.add_parser("train-cloob", help="train our own CLOOB (image + text towers) on captioned data")
    add_train_cloob_args(tc)
    tc.set_defaults(func=cmd_train_cloob)

    tp = sub.add_parser("train-prior", help="train the learned text prior of an embedding run (RUN/prior): text "
                        "embedding -> a sample of the image embeddings that fit it")
    add_train_prior_args(tp)
    tp.set_defaults(func=cmd_train_prior)

    ta = sub.add_parser("train-ae", help="train a small KL autoencoder (a latent space: --autoencoder own:RUN)")
    add_train_ae_args(ta)
    ta.set_defaults(func=cmd_train_ae)

    smp = sub.add_parser("sample", help="sample images from a trained run or model folder")
    smp.add_argument("--checkpoint", required=True, metavar="RUN", help="run folder, checkpoint folder, or model folder (cclddg export)")
    smp.add_argument("-o", "--output", metavar="OUT_FILE", help="grid PNG to write")
    smp.add_argument("--singles", metavar="OUT_FOLDER", help="folder for one PNG per image")
    smp.add_argument("--n", type=parse_number(int, AT_LEAST_1), default=None,
                     help="images (label runs, default 16) or images per prompt and guidance scale (default 4)")
    smp.add_argument("--nrow", type=parse_number(int, NON_NEGATIVE), default=0, help="images per grid row (default: square)")
    smp.add_argument("--seed", type=parse_number(int, SEEDS), default=0, help="same seed, same images")
    smp.add_argument("--cfg", type=guidance_scales, default=None,
                     help="classifier-free guidance scale (1 = none); a list like 1,2,3 sweeps across columns")
    smp.add_argument("--attrs", help="labels to ask for, e.g. color=red,shape=circle,position=top left")
    smp.add_argument("--prompt", action="append", help="text prompt (repeat for more rows)")
    smp.add_argument("--image", action="append", metavar="FILE", help="image prompt: variations of it (repeat for more rows)")
    smp.add_argument("--image_weight", type=parse_number(float, FRACTION), default=0.5,
                     help="with --prompt and --image together: the image's share of the mixed embedding")
    smp.add_argument("--negative_prompt", help="guide away from this prompt instead of the null embedding")
    smp.add_argument("--encoder", metavar="ENCODER", help="embedder spec if the run's own has moved (it must be the same model)")
    add_text_prior_flags(smp)
    smp.add_argument("--sampler", metavar="NAME", help=SAMPLER_HELP)
    smp.add_argument("--steps", type=parse_number(int, Range(1, 100_000)), help="DDIM steps for diffusion models (default 50)")
    smp.add_argument("--batch_size", type=parse_number(int, Range(1, 1 << 16)), default=64)
    add_decode_dtype_flag(smp)
    smp.add_argument("--no_ema", action="store_true", help="use the raw generator weights, not the EMA")
    smp.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    smp.set_defaults(func=cmd_sample)

    ev = sub.add_parser("eval", help="score samples of a shapes model (or real shapes) with the analyzer")
    ev.add_argument("--checkpoint", metavar="RUN", help="run folder, checkpoint folder, or model folder (cclddg export)")
    ev.add_argument("--data", metavar="DATA", help="without --checkpoint: score real data instead, e.g. shapes:32; "
                    "with --metrics: the real images to compare with (default: the run's data, if procedural)")
    ev.add_argument("--metrics", metavar="LIST", help="distribution metrics against --data's images: fid,kid,pr "
                    "(precision, recall, density, coverage); --n images of each")
    ev.add_argument("--features", default="own", metavar="SPEC",
                    help="features of --metrics: own (the run's embedder; default), an encoder spec, or "
                         "inception:PATH (clean-fid's inception-2015-12-05.pt)")
    ev.add_argument("--n", type=parse_number(int, Range(1, 1_000_000)), default=500,
                    help="samples to score (default 500; at most 10^6: eval keeps one reading per sample)")
    ev.add_argument("--seed", type=parse_number(int, SEEDS), default=0)
    ev.add_argument("--cfg", type=parse_number(float, GUIDANCE), default=1.0)
    ev.add_argument("--sampler", metavar="NAME", help=SAMPLER_HELP)
    ev.add_argument("--steps", type=parse_number(int, Range(1, 100_000)))
    ev.add_argument("--batch_size", type=parse_number(int, Range(1, 1 << 16)), default=100)
    ev.add_argument("--threads", type=parse_number(int, THREADS), default=0)
    ev.add_argument("--no_ema", action="store_true", help="score the raw generator weights, not the EMA")
    ev.add_argument("--prompts", choices=("text", "paraphrase", "image"), default="text",
                    help="embedding runs: ask with text prompts in the captions' wording, paraphrased (words no "
                         "caption uses), or with held-out images (default text)")
    ev.add_argument("--variety", action="store_true",
                    help="also measure variety: what requests naming 1-3 attributes leave open (entropy, total "
                         "variation and distinct combinations against the data's) and what z adds")
    ev.add_argument("--variety_n", type=parse_number(int, Range(2, 100_000)), default=32,
                    help="samples per variety request (default 32)")
    ev.add_argument("--variety_requests", type=parse_number(int, AT_LEAST_1), default=8,
                    help="variety requests per number of named attributes (default 8)")
    ev.add_argument("--encoder", metavar="ENCODER", help="embedder for the CLOOB score (default: the run's own)")
    add_text_prior_flags(ev)
    ev.add_argument("-o", "--output", metavar="OUT_FILE", help="also write the report as JSON here")
    ev.set_defaults(func=cmd_eval)

    demo = sub.add_parser("demo", help="offline, from nothing to a prompt grid: autoencoder, CLOOB, cache, text prior, "
                          "latent DDGAN, samples, eval, report (~23 min on 2 CPU cores)")
    demo.add_argument("--out", default="runs/demo", metavar="OUT_FOLDER", help="demo folder (default runs/demo); rerun to resume")
    demo.add_argument("--quick", action="store_true", help="a few minutes, lower quality (the CI smoke test)")
    demo.add_argument("--data", "--dataset", dest="data", default="shapes", choices=("shapes", "emoji"),
                      help="shapes (default) or emoji (every emoji of Noto Color Emoji, named)")
    demo.add_argument("--steps", type=parse_number(int, AT_LEAST_1), default=None, help="the generator's training steps (default 3000)")
    demo.add_argument("--minutes", type=parse_number(float, Range(0, low_open=True)), default=None,
                      help="also stop the generator after this many minutes (default: no time budget)")
    demo.add_argument("--threads", type=parse_number(int, THREADS), default=0, help="torch threads (default: all cores)")
    demo.add_argument("--no_progress", action="store_true", help="hide the progress bars")
    demo.set_defaults(func=cmd_demo)

    enc = sub.add_parser("encode", help="encode a dataset once into a latent cache (latents + embeddings)")
    enc.add_argument("--data", "--dataset", dest="data", default="shapes", metavar="DATA",
                     help=f"data source (default shapes): {SOURCES_HELP}")
    enc.add_argument("--img_size", type=parse_number(int, Range(1, 8192)), default=None, help="image size when --data has none (default 64)")
    enc.add_argument("--n", type=parse_number(int, AT_LEAST_1), default=None,
                     help="good examples to encode, from the start of the source (default: all; shapes: required)")
    add_data_flags(enc)
    enc.add_argument("--crop", default="center", choices=("center", "random"),
                     help="square crop after resizing the shorter side (default center)")
    enc.add_argument("--seed", type=parse_number(int, SEEDS), default=0, help="the data source's seed")
    enc.add_argument("--autoencoder", required=True, metavar="AUTOENCODER", help="latent space: pixels, own:RUN, kl-f8:PATH or taesd:PATH")
    enc.add_argument("--encoder", metavar="ENCODER", help="embedder for image and caption embeddings, e.g. cloob-tiny:runs/cloob")
    enc.add_argument("--out", required=True, metavar="OUT_FOLDER", help="cache folder (new, or a partial one to finish)")
    enc.add_argument("--flip", action="store_true", help="also store the latents of horizontally flipped images")
    enc.add_argument("--shard_size", type=parse_number(int, Range(1, 10_000_000)), default=5000, help="examples per shard (default 5000)")
    enc.add_argument("--batch_size", type=parse_number(int, Range(1, 1 << 16)), default=256, help="images per encoder call (default 256)")
    enc.add_argument("--scale", type=parse_number(float, Range(0, 1000, low_open=True)), default=None,
                     help="latent scale factor (default: measured on the first 512 images)")
    enc.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (default cpu)")
    enc.add_argument("--threads", type=parse_number(int, THREADS), default=0, help="CPU threads for torch (default: torch's choice)")
    enc.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    enc.set_defaults(func=cmd_encode)

    es = sub.add_parser("embedding-stats", help="measure the text priors' statistics (mean image and text "
                        "embedding, image bank) into an embedding run that lacks them")
    es.add_argument("run", metavar="RUN", help="run folder of an embedding-conditioned `cclddg train`")
    es.add_argument("--data", metavar="DATA", help="a latent cache or a captioned data source to measure on (default: the run's data; "
                    "for a run trained without captions, the embedder's own data)")
    es.add_argument("--n", type=parse_number(int, AT_LEAST_1), default=5000, help="examples of a data source to embed (default 5000)")
    es.add_argument("--encoder", metavar="ENCODER", help="embedder spec if the run's own has moved (it must be the same model)")
    es.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    es.set_defaults(func=cmd_embedding_stats)

    ex = sub.add_parser("export", help="write a run as one model folder that samples anywhere (diffusers layout: "
                        "CCLDDGPipeline.from_pretrained)")
    ex.add_argument("run", metavar="RUN", help="run folder of cclddg train (its latest checkpoint)")
    ex.add_argument("out", metavar="OUT_FOLDER", help="the model folder to write (new or empty)")
    ex.add_argument("--no_ema", action="store_true", help="export the raw generator instead of its EMA")
    ex.add_argument("--guidance", type=parse_number(float, GUIDANCE), default=1.0,
                    help="the model's default guidance scale (default 1)")
    ex.set_defaults(func=cmd_export)

    sv = sub.add_parser("serve", help="a local web page to prompt a model (a model folder or a run)")
    sv.add_argument("model", metavar="RUN", help="a model folder from cclddg export, or a run folder")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=parse_number(int, Range(0, 65535)), default=7860,
                    help="port (default 7860; 0: any free one)")
    sv.add_argument("--read_timeout", type=parse_number(float, Range(0.1, 3600)), default=None, metavar="S",
                    help="seconds a client has to send its request (default 10)")
    sv.add_argument("--threads", type=parse_number(int, THREADS), default=0, help="CPU threads (0: torch's default)")
    add_decode_dtype_flag(sv)
    sv.set_defaults(func=cmd_serve)

    plot = sub.add_parser("plot", help="draw a run's log.jsonl (losses, D outputs, R1, grad norms, lr, ...) as a PNG")
    plot.add_argument("run", metavar="RUN", help="run folder of cclddg train (it has a log.jsonl)")
    plot.add_argument("-o", "--output", metavar="OUT_FILE", help="PNG to write (default RUN/plot.png)")
    plot.add_argument("--smooth", type=parse_number(float, BELOW_1), default=0.9,
                      help="EMA factor of the smoothed line, in [0, 1): 0 = raw values (default 0.9)")
    plot.set_defaults(func=cmd_plot)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # a usage error (one line already printed) or --help
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.command == "eval" and not (args.checkpoint or args.data):
        parser.exit(EXIT_USAGE, "cclddg eval: error: give --checkpoint RUN or --data shapes:SIZE\n")
    handle_stop_signals()  # SIGTERM/SIGUSR1 (a scheduler's preemption) stop like Ctrl-C, after a training step
    show = warnings.showwarning
    warnings.showwarning = _one_line_warnings(show, args.command)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"cclddg {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SamplingInterrupted as exc:  # Ctrl-C while sampling: the message says what was kept
        print(f"cclddg {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except Stopped as exc:  # the line saying what was kept is printed
        return exc.code
    except KeyboardInterrupt as exc:  # commands that keep nothing half-made: nothing more to say
        how, code = how_stopped(exc)
        print(f"cclddg {args.command}: {how}; nothing was written half-way", file=sys.stderr)
        return code
    except TrainingError as exc:
        print(f"cclddg {args.command}: stopped: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        warnings.showwarning = show


def _one_line_warnings(show, command: str):
    """Our warnings (a skipped bad file, a damaged checkpoint passed over) are one line each, without the
    library's source line under it."""
    def showwarning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, OneLineWarning):
            print(f"cclddg {command}: warning: {message}", file=file or sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)

    return showwarning


if __name__ == "__main__":
    sys.exit(main())
