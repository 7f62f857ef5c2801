"""`cclddg train | sample | eval`: the command line.

Flags keep the seed project's names (`--z_dim --n_channels_unet --batch_size --n_batches ...`), so its
README command is valid. Every bad input ends in one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any, Sequence

from cclddg.config import OBJECTIVES, PRESETS, TrainConfig, resolve, validate
from cclddg.errors import UserError

EXIT_USAGE = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line that points at --help."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.replace(" ", ",").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, e.g. 1,2,2; got {text!r}")
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer, e.g. 1,2,2")
    return values


def bool_list(text: str) -> tuple[bool, ...]:
    table = {"1": True, "true": True, "t": True, "0": False, "false": False, "f": False}
    try:
        return tuple(table[v.lower()] for v in text.replace(" ", ",").split(",") if v)
    except KeyError:
        raise argparse.ArgumentTypeError(f"expected flags like 0,0,1 or False,False,True; got {text!r}")


def parse_bool(text: str) -> bool:
    table = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
    if text.lower() not in table:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return table[text.lower()]


def float_pair(text: str) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers like 0.5,0.9; got {text!r}")
    return a, b


def optional_str(text: str) -> str | None:
    return None if text in ("", "None", "none") else text


def add_train_args(p: argparse.ArgumentParser) -> None:
    """Every TrainConfig field as a flag defaulting to None: the preset fills what is not given."""
    p.add_argument("--preset", default="ddgan", help=f"recipe to start from: {', '.join(PRESETS)} (default ddgan)")
    p.add_argument("--out", default="runs/latest", help="run folder (default runs/latest)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    p.add_argument("--dataset", dest="data", default=None, help="the seed's name for --data")
    special: dict[str, dict[str, Any]] = {
        "ch_mults": dict(type=int_list), "ch_mults_disc": dict(type=int_list),
        "is_attn": dict(type=bool_list), "is_attn_disc": dict(type=bool_list),
        "adam_betas": dict(type=float_pair), "wandb_project": dict(type=optional_str),
        "objective": dict(choices=OBJECTIVES),
    }
    for f in fields(TrainConfig):
        if f.name in ("preset", "extra"):
            continue
        kwargs = special.get(f.name)
        if kwargs is None:
            default = f.default
            kind = type(default) if default is not None else float
            kwargs = dict(type=parse_bool if kind is bool else kind)
        if f.name == "data":
            p.add_argument("--data", dest="data", default=None, help="data source: shapes or shapes:SIZE")
            continue
        p.add_argument(f"--{f.name}", default=None, **kwargs)


def cmd_train(args: argparse.Namespace) -> int:
    from cclddg.training.trainer import Trainer

    names = {f.name for f in fields(TrainConfig)} - {"preset", "extra"}
    overrides = {k: v for k, v in vars(args).items() if k in names}
    out = Path(args.out)
    if args.resume and (out / "config.json").is_file():
        # Resume from the run's own config; flags given on top must agree with it (checked by the trainer).
        saved = json.loads((out / "config.json").read_text())
        saved.update({k: v for k, v in overrides.items() if v is not None})
        cfg = TrainConfig.from_dict(saved)
        validate(cfg)
    else:
        cfg = resolve(args.preset, overrides)
    trainer = Trainer(cfg, out, resume=args.resume, progress=not args.no_progress)
    try:
        trainer.run()
    except KeyboardInterrupt:
        print(f"interrupted at step {trainer.step}; saved {trainer.last_checkpoint}; "
              f"continue with: cclddg train --out {out} --resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"done: {trainer.step} steps; run folder {out}; latest checkpoint {trainer.last_checkpoint}")
    return 0


def request_condition(attrs: str | None, n: int):
    """The label conditioning for `--attrs`, repeated n times (None when unconditional)."""
    import numpy as np
    import torch

    from cclddg.data.shapes import attrs_to_label, parse_attrs

    if attrs is None:
        return None
    label = attrs_to_label(parse_attrs(attrs))
    return torch.from_numpy(np.repeat(label[None], n, axis=0))


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from cclddg.data.images import make_grid, tensor_to_image
    from cclddg.pipeline import load_generator, sample

    model, cfg = load_generator(args.checkpoint, ema=not args.no_ema)
    if args.n < 1:
        raise UserError(f"--n must be >= 1, got {args.n}")
    if cfg.cond == "none" and args.attrs:
        raise UserError("this model is unconditional (trained with --cond none); drop --attrs")
    attrs = args.attrs if cfg.cond != "none" else None
    cond = request_condition(attrs, args.n)
    rng = torch.Generator().manual_seed(args.seed)
    images = torch.cat([
        sample(model, cfg, len(chunk), None if cond is None else cond[chunk], args.cfg, args.sampler, args.steps, rng)
        for chunk in torch.arange(args.n).split(args.batch_size)
    ])
    written = []
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        nrow = args.nrow or max(1, int(round(args.n ** 0.5)))
        make_grid(images, nrow=nrow).save(out)
        written.append(str(out))
    if args.singles:
        folder = Path(args.singles)
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            tensor_to_image(image).save(folder / f"{i:05d}.png")
        written.append(f"{folder}/ ({len(images)} images)")
    if not written:
        raise UserError("nothing to write: give -o/--output GRID.png and/or --singles FOLDER")
    print("wrote " + ", ".join(written))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from cclddg.evaluation.generated import evaluate_model

    if args.n < 1:
        raise UserError(f"--n must be >= 1, got {args.n}")
    if args.data:
        from cclddg.data.sources import open_dataset
        from cclddg.evaluation.shapes_eval import score

        data = open_dataset(args.data, 32, seed=args.seed)
        samples = [data.sample(i) for i in range(args.n)]
        report = score([s.image for s in samples], [s.attrs for s in samples])
        report.update({"source": args.data})
    else:
        from cclddg.pipeline import load_generator

        model, cfg = load_generator(args.checkpoint, ema=not args.no_ema)
        if args.threads:
            torch.set_num_threads(args.threads)
        report = evaluate_model(model, cfg, args.n, args.cfg, args.sampler, args.steps, args.seed, args.batch_size)
        if cfg.objective == "ddgan":
            sampler, steps = "ddgan", cfg.n_steps
        else:
            sampler = args.sampler or "ddim"
            steps = cfg.n_steps if sampler == "ddpm" else args.steps or 50
        report.update({"checkpoint": str(args.checkpoint), "cfg": args.cfg, "sampler": sampler, "steps": steps})
    report = {k: v for k, v in report.items() if not isinstance(v, list)}
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="cclddg", description="CLOOB-conditioned latent denoising diffusion GANs")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    train = sub.add_parser("train", help="train a DDGAN or a DDPM")
    add_train_args(train)
    train.set_defaults(func=cmd_train)

    smp = sub.add_parser("sample", help="sample images from a trained run")
    smp.add_argument("--checkpoint", required=True, help="run folder or checkpoint folder")
    smp.add_argument("-o", "--output", help="grid PNG to write")
    smp.add_argument("--singles", help="folder for one PNG per image")
    smp.add_argument("--n", type=int, default=16, help="number of images (default 16)")
    smp.add_argument("--nrow", type=int, default=0, help="images per grid row (default: square)")
    smp.add_argument("--seed", type=int, default=0, help="same seed, same images")
    smp.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale (1 = none)")
    smp.add_argument("--attrs", help="labels to ask for, e.g. color=red,shape=circle,position=top left")
    smp.add_argument("--sampler", choices=("ddpm", "ddim"), help="for diffusion models (default ddim)")
    smp.add_argument("--steps", type=int, help="DDIM steps for diffusion models (default 50)")
    smp.add_argument("--batch_size", type=int, default=64)
    smp.add_argument("--no_ema", action="store_true", help="use the raw generator weights, not the EMA")
    smp.set_defaults(func=cmd_sample)

    ev = sub.add_parser("eval", help="score samples of a shapes model (or real shapes) with the analyzer")
    ev.add_argument("--checkpoint", help="run folder or checkpoint folder")
    ev.add_argument("--data", help="score real data instead, e.g. shapes:32")
    ev.add_argument("--n", type=int, default=500)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--cfg", type=float, default=1.0)
    ev.add_argument("--sampler", choices=("ddpm", "ddim"))
    ev.add_argument("--steps", type=int)
    ev.add_argument("--batch_size", type=int, default=100)
    ev.add_argument("--threads", type=int, default=0)
    ev.add_argument("--no_ema", action="store_true", help="score the raw generator weights, not the EMA")
    ev.add_argument("-o", "--output", help="also write the report as JSON here")
    ev.set_defaults(func=cmd_eval)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from cclddg.training.trainer import TrainingError

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "eval" and not (args.checkpoint or args.data):
        parser.exit(EXIT_USAGE, "cclddg eval: error: give --checkpoint RUN or --data shapes:SIZE\n")
    try:
        return args.func(args)
    except UserError as exc:
        print(f"cclddg {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingError as exc:
        print(f"cclddg {args.command}: stopped: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
