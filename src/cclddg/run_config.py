"""The one resolution step of a training run's config: flags + preset + a latent cache's metadata + a resumed
run's config.json -> a validated, frozen `TrainConfig`. (A run that encodes its own source learns the cache's
facts only once it is encoded: `with_cache` is that last part.)

This is where settings meet the file system (caches, data sources, encoder and autoencoder specs), so it sits
above data, encoders and latents; `config.py` below it is only the dataclass and the presets.
"""

from __future__ import annotations

from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

from cclddg import conditioning, objectives
from cclddg.config import (
    OPTIMIZERS,
    PRECISIONS,
    PRESETS,
    STEP_KINDS,
    TEXT_PRIORS,
    TrainConfig,
)
from cclddg.data.latent_cache import is_cache_spec, read_cache_meta
from cclddg.data.shapes import format_holdout
from cclddg.data.sources import parse_data_spec, with_font
from cclddg.diffusion import SCHEDULE_KINDS
from cclddg.encoders import absolute_spec
from cclddg.errors import UserError
from cclddg.latents import absolute_autoencoder_spec, parse_autoencoder_spec
from cclddg.models.blocks import INJECTIONS, check_bool_tuple
from cclddg.options import check_fields
from cclddg.storage import read_config_json


def train_config(preset: str, flags: dict[str, Any], out: Path, resume: bool, font: str | None = None) -> TrainConfig:
    """`cclddg train`'s config: the preset and the flags given (None = not given), or on --resume the run's own
    config.json with the flags on top (the trainer checks that only resumable settings changed).

    `--encoder` implies `--cond embedding`; encoder, autoencoder and latent cache paths are made absolute, so the
    run folder says where its models and data are from anywhere (and the same command, relative paths and all,
    resumes it from anywhere)."""
    given = {k: v for k, v in flags.items() if v is not None}
    if font:
        given["data"] = with_font(given.get("data") or "shapes", font)
    if given.get("encoder"):
        given["encoder"] = absolute_spec(given["encoder"])
        given.setdefault("cond", "embedding")
    if given.get("autoencoder"):
        given["autoencoder"] = absolute_autoencoder_spec(given["autoencoder"])
    if given.get("data") and is_cache_spec(given["data"]):  # the run records a cache by its absolute path
        given["data"] = str(Path(given["data"]).expanduser().resolve())
    if resume and (out / "config.json").is_file():
        saved = asdict(read_config_json(out / "config.json", TrainConfig, "run config"))
        cfg = TrainConfig.from_dict({**saved, **given})
        validate(cfg)
        return cfg
    return resolve(preset, given)


def small_run_config(config_cls: type, flags: dict[str, Any], out: Path, resume: bool, font: str | None,
                     command: str) -> Any:
    """`train-cloob` / `train-ae`: the flags given over the defaults, or over the run's config.json on --resume."""
    names = {f.name for f in fields(config_cls)}
    values: dict[str, Any] = {}
    if resume and (out / "config.json").is_file():
        values = asdict(read_config_json(out / "config.json", config_cls, f"{command} config"))
    values.update({k: v for k, v in flags.items() if k in names and v is not None})
    if font:
        values["data"] = with_font(values.get("data", "shapes"), font)
    return config_cls.from_dict(values)


def resolve(preset: str, overrides: dict[str, Any]) -> TrainConfig:
    """The preset's values, then the user's flags (those not None) on top, then validation."""
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    values: dict[str, Any] = {"preset": preset, **PRESETS[preset]}
    needs_latents = values.pop("needs_latents", False)
    values.update(given)
    if is_cache_spec(values.get("data", "shapes")):
        values.update(cache_values(values, given))
    else:
        values.update(source_values(values, given))
    if not is_cache_spec(values.get("data", "shapes")) and needs_latents and values.get("autoencoder", "pixels") == "pixels":
        raise UserError(f"--preset {preset} trains in a latent space: give --autoencoder (e.g. own:runs/ae) "
                        "or a latent cache as --data (made by `cclddg encode`)")
    cfg = TrainConfig.from_dict(values)
    validate(cfg)
    return cfg


def source_values(values: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """Run settings a data source fixes: `shapes:64` the image size; a real source (finite, unlabelled)
    uses all its examples unless --data_size is given, and cannot give --cond labels."""
    data = values.get("data", "shapes")
    spec = parse_data_spec(data)
    out: dict[str, Any] = {}
    if spec.size is not None:
        if "img_size" in given and given["img_size"] != spec.size:
            raise UserError(f"--data {data} gives {spec.size}px images but --img_size is {given['img_size']}; "
                            "drop one of them")
        out["img_size"] = spec.size
    out["holdout"] = format_holdout(spec.holdout)
    if not spec.procedural and "data_size" not in given:
        out["data_size"] = 0
    conditioning.get(values.get("cond", "labels")).check_source(data, spec.procedural)
    return out


def cache_values(values: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """The run settings a latent cache fixes (latent space, sizes, scale, encoder), read from its cache.json;
    flags that contradict it are errors. (Whether the cache can give the run's conditioning is checked when
    the trainer opens it.)"""
    path = Path(values["data"]).expanduser().resolve()
    meta = read_cache_meta(path, autoencoder=given.get("autoencoder"), encoder=given.get("encoder"))
    img_size = int(meta["img_size"])
    if "img_size" in given and given["img_size"] != img_size:
        raise UserError(f"--img_size {given['img_size']} but the cache {path} holds {img_size}px images; drop --img_size")
    out = {"data": str(path), "autoencoder": meta["autoencoder"], "img_size": img_size, **cache_facts(meta)}
    if conditioning.get(values.get("cond", "labels")).uses_encoder:
        out["encoder"] = meta["encoder"]
    return out


def cache_facts(meta: dict[str, Any]) -> dict[str, Any]:
    """What a latent cache decides about a run (config.DERIVED_FIELDS and the number of examples), from its
    cache.json."""
    img_size, (channels, latent, _) = int(meta["img_size"]), meta["latent_shape"]
    return {"latent_channels": int(channels), "latent_factor": img_size // int(latent),
            "latent_scale": float(meta["scale"]), "data_size": int(meta["count"]),
            "holdout": format_holdout(parse_data_spec(str(meta["data"])).holdout)}


def with_cache(cfg: TrainConfig, meta: dict[str, Any]) -> TrainConfig:
    """The last part of resolution, for a run that encodes its own source into a latent cache when it starts:
    the config with what the cache decides (`cache_facts`), validated. The trainer takes this config and
    nothing changes it afterwards."""
    settled = replace(cfg, **cache_facts(meta))
    validate(settled)
    return settled


def _choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise UserError(f"--{name} {value!r} is not valid; choose one of {', '.join(map(str, choices))}")


def validate(cfg: TrainConfig) -> None:
    """Reject impossible settings before a model is built or a file is written."""
    _choice("step_kind", cfg.step_kind, STEP_KINDS)
    _choice("schedule", cfg.schedule, SCHEDULE_KINDS)
    _choice("injection", cfg.injection, INJECTIONS)
    _choice("optimizer", cfg.optimizer, OPTIMIZERS)
    _choice("mixed_precision", cfg.mixed_precision, PRECISIONS)
    check_fields(cfg)
    _choice("text_prior", cfg.text_prior, TEXT_PRIORS)
    objective = objectives.get(cfg.objective)  # an unknown name is one line
    conditioning.get(cfg.cond).check_config(cfg)
    if cfg.data_size == 0 and not is_cache_spec(cfg.data):
        if parse_data_spec(cfg.data).procedural:
            raise UserError("--data_size 0 (all of the source) is for a finite source; shapes are endless: "
                            "give --data_size N")
    check_bool_tuple("--is_attn", cfg.is_attn, len(cfg.ch_mults), "--ch_mults")  # the models' own check, run early
    check_bool_tuple("--is_attn_disc", cfg.is_attn_disc, len(cfg.ch_mults_disc), "--ch_mults_disc")
    parse_autoencoder_spec(cfg.autoencoder)
    for flag, mults in (("ch_mults", cfg.ch_mults), ("ch_mults_disc", cfg.ch_mults_disc)):
        factor = 2 ** (len(mults) - 1) * cfg.latent_factor
        if cfg.img_size % factor:
            where = f" (x{cfg.latent_factor} by the autoencoder)" if cfg.latent_factor > 1 else ""
            raise UserError(f"--img_size {cfg.img_size} is not divisible by {factor}, the downsampling of "
                            f"{len(mults)} levels in --{flag}{where}; use a multiple of {factor} or fewer levels")
    objective.check(cfg)
