"""The seed's training iteration, step and sampler against cclddg's, side by side in one process.

What it measures
----------------
The seed (github.com/johnowhitaker/cclddg) is read at run time from a checkout the user gives (`--seed`);
nothing of it is copied into this project. From that checkout:

- its `UNet`, `Discriminator` (cclddg/core.py) and `DDG_Context` (cclddg/ddg_context.py), imported as they are;
- its flags: the argument parser of `train_cclddg.py`, given the seed README's command (`--z_dim 16
  --n_channels_unet 64 --n_steps 8 --lr_gen 1e-4 --lr_disc 1e-4`) and `--batch_size`;
- its training loop: the set-up of `train()` (networks, optimizers, loss) and the body of its `for` loop over
  batches, taken from the file's syntax tree and run as they are, except that `.cuda()` becomes `.to(device)`
  and `torch.cuda.FloatTensor(...)` becomes `torch.empty(..., device=device)` (the seed runs on CUDA only), and
  `.view(...)` becomes `.reshape(...)` (the same where a view is possible; with today's torch the gradient of
  its R1 penalty, a slice of a concatenation, is not contiguous and `.view` raises);
- its sampler: `DDG_Context.examples` (one prompt, CFG scales 0..2, per-image KL-f8 decode), run under
  `torch.no_grad()` (the seed's own call keeps the autograd graph: that would only make it slower).

The seed's encoders are cclddg's implementations of the same architectures with random weights (the cost does
not depend on the weights): latent diffusion's KL-f8 (diffusers `AutoencoderKL`, 84 M parameters) and the
CLOOB ViT-B/16 (224 px image tower, 12-layer text transformer), behind the interface the seed calls.

cclddg runs `--preset seed` with the same README flags: networks within 2% of the seed's parameters and FLOPs
(tests/test_models.py), the seed's recipe (renoise step, AdamW, R1 on every step, reconstruction loss), its
`Trainer.train_step` on batches read from a latent cache made by the same encoders (`cclddg encode`, built
first and not timed: that is the design). Its sampler is `cclddg.pipeline.sample` (T=4, guidance 2, batched
CFG, batched decode) with KL-f8, and with a TAESD-sized decoder (diffusers `AutoencoderTiny`).

Timed items (medians of `--repeats` interleaved rounds, so a drift in machine load hits both alike):

- ``iteration``  seed: one pass of its loop body (KL-f8 encode, CLOOB image + text, the step);
                 cclddg: `train_step` with the step's batch read from the cache;
- ``step``       seed: the same loop body with the encoders answered from memory (its step alone);
                 cclddg: `train_step` on a batch made before timing;
- ``sampling``   seconds per image at 128 px, T=4, CFG, decoded (on a CPU with native bf16, cclddg also with the
                 KL-f8 decoder in bf16: what `cclddg sample` does there by default).

Each side runs with its own process settings: cclddg's `cpu.tune_cpu` keeps freed memory in the process (glibc's
mallopt), the seed's script leaves glibc's defaults, so its items run with those (`--same_malloc`: with cclddg's;
its step then gains the most). Denormals are flushed for both.

How to run
----------
    git clone https://github.com/johnowhitaker/cclddg /tmp/seed-cclddg
    python benchmarks/seed_side_by_side.py --seed /tmp/seed-cclddg                # ~8 min on 2 cores
    python benchmarks/seed_side_by_side.py --seed /tmp/seed-cclddg --batches 8    # one batch size
    python benchmarks/seed_side_by_side.py --tiny      # tiny sizes, cclddg only without --seed: what CI runs
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Callable

import torch
import torch.nn.functional as F

from cclddg.cpu import keep_freed_memory, native_bf16, tune_cpu

# The seed README's training command, less its data, logging and W&B flags (and the batch size, set per run).
SEED_README_FLAGS = ["--z_dim", "16", "--n_channels_unet", "64", "--lr_gen", "0.0001", "--lr_disc", "0.0001",
                     "--n_steps", "8"]
PROMPT = "A watercolor painting of an underwater submarine"
SAMPLE_STEPS, GUIDANCE_MAX = 4, 2.0
# --tiny: small towers and networks at 64 px (8x8 latents: the seed's four levels end at 1x1).
TINY_FLAGS = ["--z_dim", "4", "--n_channels_unet", "32", "--n_steps", "4"]  # the seed's norms need 32 channels
TINY_SIZES = dict(img_size=64, n_images=4, batches=(2,), repeats=1, n_samples=2, threads=1)
FULL_SIZES = dict(img_size=128, n_images=32, batches=(8, 32), repeats=3, n_samples=8, threads=2)


# ---------------------------------------------------------------------------------------------- the seed's code

def _import_file(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _OnDevice(ast.NodeTransformer):
    """`.cuda()` -> `.to(device)`; `torch.cuda.FloatTensor(*s)` -> `torch.empty(*s, device=device)`;
    `.view(...)` -> `.reshape(...)`."""

    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        device = ast.Name("device", ast.Load())
        if isinstance(node.func, ast.Attribute) and node.func.attr == "cuda" and not node.args:
            return ast.Call(ast.Attribute(node.func.value, "to", ast.Load()), [device], [])
        if isinstance(node.func, ast.Attribute) and node.func.attr == "view":
            node.func.attr = "reshape"
        if ast.unparse(node.func) == "torch.cuda.FloatTensor":
            empty = ast.Attribute(ast.Name("torch", ast.Load()), "empty", ast.Load())
            return ast.Call(empty, node.args, [ast.keyword("device", device)])
        return node


def _compile(statements: list[ast.stmt], name: str) -> object:
    module = ast.fix_missing_locations(_OnDevice().visit(ast.Module(statements, type_ignores=[])))
    return compile(module, name, "exec")


def read_seed_script(script: Path) -> SimpleNamespace:
    """The argument parser, the set-up of `train()` and the body of its loop, from the seed's train_cclddg.py."""
    tree = ast.parse(script.read_text(), str(script))
    starts = [i for i, n in enumerate(tree.body) if "argparse.ArgumentParser" in ast.unparse(n)]
    ends = [i for i, n in enumerate(tree.body) if "parser.parse_args" in ast.unparse(n)]
    train = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "train"]
    if not (starts and ends and train):
        raise SystemExit(f"--seed: {script} is not the seed's training script (no parser or train function)")
    loop = next((i for i, n in enumerate(train[0].body) if isinstance(n, ast.For)), None)
    if loop is None:
        raise SystemExit(f"--seed: the train function of {script} has no loop over batches")
    # The set-up ends in `return` on an unknown dataset: run it as a function body that returns its locals.
    setup = ast.FunctionDef("seed_setup", ast.arguments([], [], None, [], [], None, []),
                            train[0].body[:loop] + [ast.parse("return locals()").body[0]], [], None, None)
    setup.type_params = []
    return SimpleNamespace(parser=_compile(tree.body[starts[0]:ends[0]], f"{script}:parser"),
                           setup=_compile([setup], f"{script}:train"),
                           loop_body=_compile(train[0].body[loop].body, f"{script}:loop"))


class SeedAutoencoder:
    """What the seed calls on latent diffusion's AutoencoderKL: encode(x).mode(), decode(z), device."""

    def __init__(self, vae: torch.nn.Module):
        self.vae, self.device = vae, torch.device("cpu")

    def encode(self, x: torch.Tensor):
        return self.vae.encode(x).latent_dist

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z).sample


class SeedCLOOB:
    """What the seed calls on cloob_training's model: normalize, image_encoder, text_encoder, tokenize."""

    def __init__(self, cloob):
        self.cloob = cloob
        self.image_encoder, self.text_encoder = cloob.image, cloob.text

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.cloob.pixel_mean) / self.cloob.pixel_std

    def tokenize(self, texts: list[str], truncate: bool = True) -> torch.Tensor:
        return self.cloob.tokenizer(list(texts), context_length=self.cloob.config.text.context)


class _Answered:
    """The seed's encoders answered from memory (its step alone): fixed outputs of the right shapes."""

    def __init__(self, latents: torch.Tensor, embeddings: torch.Tensor):
        self.latents, self.embeddings = latents, embeddings
        self.device = torch.device("cpu")

    def encode(self, x):
        return SimpleNamespace(mode=lambda: self.latents)

    def normalize(self, x):
        return x

    def image_encoder(self, x):
        return self.embeddings

    def text_encoder(self, ids):
        return self.embeddings

    def tokenize(self, texts, truncate=True):
        return torch.zeros(1, dtype=torch.long)


class SeedLoop:
    """The seed's networks, optimizers and loop body, one iteration per call."""

    def __init__(self, seed_root: Path, flags: list[str], images: torch.Tensor, texts: list[str],
                 vae: torch.nn.Module, cloob):
        core = _import_file(seed_root / "cclddg" / "core.py", "seed_cclddg_core")
        context = _import_file(seed_root / "cclddg" / "ddg_context.py", "seed_cclddg_ddg_context")
        script = read_seed_script(seed_root / "train_cclddg.py")
        names: dict = {"argparse": argparse}
        sys.argv, argv = ["train_cclddg.py"], sys.argv
        try:
            exec(script.parser, names)
        finally:
            sys.argv = argv
        self.args = names["parser"].parse_args(flags + ["--log_images_every", "1000000000",
                                                        "--save_models_every", "1000000000"])
        batches = [(images, texts)]
        side = cloob.config.image.image_size  # 224: the seed's T.Resize(224)
        self.ns = {"torch": torch, "nn": torch.nn, "F": F, "device": torch.device("cpu"), "args": self.args,
                   "UNet": core.UNet, "Discriminator": core.Discriminator, "DDG_Context": context.DDG_Context,
                   "get_celebA_dl": lambda batch_size, img_size: batches,
                   "scale_224": lambda x: F.interpolate(x, size=(side, side), mode="bilinear", antialias=True),
                   "tqdm": lambda it, **kw: it}
        self.real = {"ae_model": SeedAutoencoder(vae), "cloob": SeedCLOOB(cloob)}
        self.ns.update(self.real)
        torch.manual_seed(0)
        exec(script.setup, self.ns)
        self.ns.update(self.ns["seed_setup"]())
        self.loop_body, self.context = script.loop_body, context
        with torch.no_grad():
            latents = self.real["ae_model"].encode(images * 2 - 1).mode()
        self.answered = _Answered(latents, torch.randn(images.shape[0], 512))

    def iteration(self, encoders: bool = True) -> None:
        self.ns.update(self.real if encoders else {"ae_model": self.answered, "cloob": self.answered})
        self.ns["i"] = 0
        exec(self.loop_body, self.ns)

    def sample(self, n: int, img_size: int) -> None:
        """The seed's `examples` for one prompt and n images (CFG 0..2), T=4."""
        a = self.args
        context = self.context.DDG_Context(n_steps=SAMPLE_STEPS, beta_min=a.beta_min, beta_max=a.beta_max)
        with torch.no_grad():
            context.examples(self.real["ae_model"], self.ns["unet"], self.real["cloob"], n_examples=n,
                             cfg_scale_min=0, cfg_scale_max=GUIDANCE_MAX, prompts=[PROMPT], img_size=img_size,
                             z_dim=a.z_dim)


# ---------------------------------------------------------------------------------------------- cclddg's side

def encoders(root: Path, tiny: bool) -> tuple[str, str, str]:
    """Random-init KL-f8, TAESD-sized and CLOOB models saved under root, as specs."""
    from diffusers import AutoencoderKL, AutoencoderTiny

    from cclddg.encoders.cloob_pretrained import (
        VIT_B16,
        CLOOBConfig,
        ImageTowerConfig,
        PretrainedCLOOB,
        TextTowerConfig,
        write_converted,
    )
    from cclddg.latents.pretrained import kl_f8_config

    torch.manual_seed(0)
    kl, taesd, cloob = kl_f8_config(), {}, VIT_B16
    if tiny:
        kl = dict(kl, block_out_channels=[8, 8, 8, 8], norm_num_groups=4, layers_per_block=1)
        taesd = dict(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                     num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1))
        cloob = CLOOBConfig(d_embed=512, image=ImageTowerConfig(image_size=32, patch_size=16, n_layers=1, width=16,
                                                                n_heads=2),
                            text=TextTowerConfig(n_layers=1, width=16, n_heads=2))
    AutoencoderKL.from_config(kl).save_pretrained(root / "kl-f8")
    AutoencoderTiny.from_config(taesd).save_pretrained(root / "taesd")
    write_converted(root / "cloob.safetensors", PretrainedCLOOB(cloob))
    return f"kl-f8:{root / 'kl-f8'}", f"taesd:{root / 'taesd'}", f"cloob-vit-b16:{root / 'cloob.safetensors'}"


def cclddg_config_overrides(flags: list[str]) -> dict:
    """The seed README flags as cclddg overrides (the flags both command lines share), CLOOB-conditioned."""
    pairs = dict(zip(flags[::2], flags[1::2]))
    kinds = {"--z_dim": int, "--n_channels_unet": int, "--n_channels_disc": int, "--n_steps": int,
             "--lr_gen": float, "--lr_disc": float}
    return {"cond": "embedding", **{k[2:]: kinds[k](v) for k, v in pairs.items()}}


def cclddg_training(root: Path, flags: list[str], batch: int, size: int) -> dict[str, Callable[[], object]]:
    """`--preset seed` with the seed's flags on the cache in root: its iteration (batches read from the cache)
    and its step alone (on a batch made before timing)."""
    from cclddg.run_config import resolve
    from cclddg.training.trainer import Trainer

    over = dict(cclddg_config_overrides(flags), data=str(root / "cache"), batch_size=batch, img_size=size,
                n_batches=10**6, tensorboard=False)
    trainer = Trainer(resolve("seed", over), root / f"run{batch}", progress=False)
    read, made = trainer.batch, trainer.batch(0)

    def step(batches: Callable) -> None:
        trainer.batch = batches
        trainer.train_step()
    return {"cclddg iteration": functools.partial(step, read),
            "cclddg step": functools.partial(step, lambda *args, **kwargs: made)}


def as_the_seed_runs(fn: Callable[[], object], same_malloc: bool) -> Callable[[], object]:
    """fn under glibc's default malloc, as the seed's script runs (cclddg keeps freed memory: cpu.tune_cpu)."""
    def run() -> object:
        keep_freed_memory(same_malloc)
        try:
            return fn()
        finally:
            keep_freed_memory(True)
    return run


def interleaved(items: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each item: one warm-up call each, then `repeats` rounds calling each in turn."""
    for fn in items.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in items}
    for _ in range(repeats):
        for name, fn in items.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=Path, help="a checkout of github.com/johnowhitaker/cclddg (without: cclddg only)")
    p.add_argument("--batches", type=int, nargs="+", help="batch sizes (default 8 32)")
    p.add_argument("--repeats", type=int, help="interleaved rounds (default 3)")
    p.add_argument("--threads", type=int, help="torch threads (default 2; tiny 1)")
    p.add_argument("--same_malloc", action="store_true",
                   help="run the seed with cclddg's malloc settings too (default: glibc's, as its script runs)")
    p.add_argument("--tiny", action="store_true", help="tiny models at 64 px, one round: what CI runs")
    args = p.parse_args(argv)
    sizes = dict(TINY_SIZES if args.tiny else FULL_SIZES)
    sizes.update({k: v for k, v in (("batches", args.batches), ("repeats", args.repeats),
                                    ("threads", args.threads)) if v})
    flags = SEED_README_FLAGS + (TINY_FLAGS if args.tiny else [])
    if args.seed:
        for part in ("cclddg/core.py", "cclddg/ddg_context.py", "train_cclddg.py"):
            if not (args.seed / part).is_file():
                p.error(f"--seed: {args.seed / part} not found; give a checkout of github.com/johnowhitaker/cclddg")
    tune_cpu(sizes["threads"])  # for both sides (the Trainer does it too)

    from cclddg.data.latent_cache import encode_dataset
    from cclddg.data.sources import open_dataset, open_source
    from cclddg.encoders import load_embedder
    from cclddg.latents import load_latent_space
    from cclddg.pipeline import sample
    from cclddg.run_config import resolve
    from cclddg.training.trainer import build_nets

    size = sizes["img_size"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        kl_spec, taesd_spec, cloob_spec = encoders(root, args.tiny)
        kl, embedder = load_latent_space(kl_spec), load_embedder(cloob_spec)
        n = max(max(sizes["batches"]), sizes["n_images"])
        source = open_source(f"shapes:{size}", size, seed=0, length=n)
        encode_dataset(source, f"shapes:{size}", 0, n, size, kl, embedder, root / "cache", progress=False)
        images, _, captions = open_dataset(f"shapes:{size}", size, seed=0, length=n).get_batch(range(n))

        results: dict[str, dict[str, list[float]]] = {}
        seed = None
        for batch in sizes["batches"]:
            items: dict[str, Callable[[], object]] = cclddg_training(root, flags, batch, size)
            if args.seed:
                seed = SeedLoop(args.seed, flags + ["--batch_size", str(batch)], (images[:batch] + 1) / 2,
                                list(captions[:batch]), kl.vae, embedder)  # its loader's [0, 1] images
                items["seed iteration"] = as_the_seed_runs(seed.iteration, args.same_malloc)
                items["seed step"] = as_the_seed_runs(functools.partial(seed.iteration, encoders=False),
                                                      args.same_malloc)
            results[f"batch {batch}"] = interleaved(items, sizes["repeats"])

        # Sampling: the seed preset's generator at T=4 (random weights: the cost does not depend on them).
        cfg = dataclasses.replace(resolve("seed", dict(cclddg_config_overrides(flags), data=str(root / "cache"),
                                                       img_size=size)), n_steps=SAMPLE_STEPS)
        gen = build_nets(cfg, embedder.dim)[0].eval()
        taesd = load_latent_space(taesd_spec)
        k = sizes["n_samples"]

        def ours(space):
            with torch.no_grad():
                cond = embedder.embed_texts([PROMPT]).expand(k, -1)
                return sample(gen, cfg, k, cond=cond, guidance=GUIDANCE_MAX, space=space)
        items = {"cclddg sampling KL-f8": lambda: ours(kl), "cclddg sampling TAESD": lambda: ours(taesd)}
        if native_bf16():  # what `cclddg sample` decodes in by default on such a CPU (cpu.fast_decode_dtype)
            kl_bf16 = load_latent_space(kl_spec, decode_dtype=torch.bfloat16)
            items["cclddg sampling KL-f8 bf16"] = lambda: ours(kl_bf16)
        if args.seed:
            items["seed sampling KL-f8"] = as_the_seed_runs(lambda: seed.sample(k, size), args.same_malloc)
        results["sampling"] = {name: [t / k for t in times]
                               for name, times in interleaved(items, sizes["repeats"]).items()}
    report(results, sizes, args)


def report(results: dict[str, dict[str, list[float]]], sizes: dict, args: argparse.Namespace) -> None:
    med = {group: {name: statistics.median(v) for name, v in times.items()} for group, times in results.items()}
    malloc = "cclddg's" if args.same_malloc else "glibc's default"
    print(f"seed config {'(tiny) ' if args.tiny else ''}at {sizes['img_size']} px, {sizes['threads']} threads, "
          f"medians of {sizes['repeats']} interleaved rounds; seed: {args.seed or 'not given (--seed PATH)'}"
          f"{f' (with {malloc} malloc settings)' if args.seed else ''}")
    for group, m in med.items():
        unit = "s per image" if group == "sampling" else "s"
        print(f"{group}:")
        for name, value in m.items():
            print(f"  {name:27s} {value:8.3f} {unit}")
        pairs = (("iteration", "iteration"), ("step", "step"), ("sampling KL-f8", "sampling KL-f8"),
                 ("sampling KL-f8 bf16", "sampling KL-f8"))  # (cclddg's item, the seed's it compares with)
        for what, seeds in pairs:
            if f"seed {seeds}" in m and f"cclddg {what}" in m:
                print(f"  ratio seed / cclddg {what:19s} {m[f'seed {seeds}'] / m[f'cclddg {what}']:.2f}x")
        if "seed sampling KL-f8" in m:
            print(f"  ratio seed KL-f8 / cclddg TAESD    {m['seed sampling KL-f8'] / m['cclddg sampling TAESD']:.2f}x")


if __name__ == "__main__":
    main()
