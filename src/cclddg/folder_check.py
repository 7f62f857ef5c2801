"""What an exported model folder may hold, checked before anything in it loads (`check_model_folder`).

A model folder comes from elsewhere (a download, a colleague, a disk that filled up during a copy), and diffusers'
loader trusts it: it imports the module model_index.json names, falls back to a pickle `.bin` for a missing
safetensors file and reports a truncated file many lines deep. So the CLI, `cclddg serve` and
`CCLDDGPipeline.from_pretrained` check first, and say in one line, naming the component and the file:
every component is one a cclddg model has, of the class it must be; weights are whole safetensors files and no
pickle lies anywhere; nothing links outside the folder; every JSON file parses to an object with the keys
sampling reads.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cclddg import conditioning, objectives
from cclddg.encoders.sentence import FILES as SENTENCE_FILES
from cclddg.errors import UserError
from cclddg.storage import WEIGHTS_FILE as WEIGHTS
from cclddg.storage import pickled_format, read_json_object

PIPELINE_CLASS = "CCLDDGPipeline"
INDEX_FILE = "model_index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
MAX_HEADER = 100 * 2**20  # a safetensors header larger than this is not one (the format's own limit)
EXPORT_AGAIN = "export the model again (cclddg export RUN OUT) or copy the folder whole"


@dataclass(frozen=True)
class Component:
    """A component of a model folder: the (library, class) pairs model_index.json may name for it, its config
    file, the safetensors files it needs, and the config keys sampling reads."""

    classes: tuple[tuple[str, str], ...]
    config: str = "config.json"
    weights: tuple[str, ...] = (WEIGHTS,)
    keys: tuple[str, ...] = ()
    required: bool = False
    choices: tuple[tuple[str, Callable[[], tuple[str, ...]]], ...] = ()  # keys whose value is one of these names


COMPONENTS: dict[str, Component] = {
    "unet": Component((("cclddg.models.unet", "UNet"),), required=True),
    "scheduler": Component((("cclddg.scheduler", "CCLDDGScheduler"),), config="scheduler_config.json", weights=(),
                           keys=("objective", "schedule", "n_steps"), required=True,
                           choices=(("objective", objectives.names),)),
    "vae": Component((("diffusers", "AutoencoderKL"), ("diffusers", "AutoencoderTiny")), keys=("scaling_factor",)),
    "embedder": Component((("cclddg.encoders.component", "EmbedderModel"),), weights=(), keys=("kind",)),
    "prior": Component((("cclddg.priors.flow", "FlowPrior"),)),
}
INDEX_KEYS = ("cond", "img_size")  # what sampling reads from model_index.json without a default
# The embedder's files, by its kind (encoders/component.py); with a sentence encoder also sentence/SENTENCE_FILES.
EMBEDDER_FILES = {"cloob-tiny": ("cloob/config.json", f"cloob/{WEIGHTS}"), "cloob-vit-b16": ("cloob.safetensors",)}


def check_model_folder(folder: str | Path) -> dict:
    """model_index.json of a model folder whose every file was checked (module docstring); anything wrong is a
    `UserError` naming the component and the file."""
    folder = Path(folder)
    _check_links_and_pickles(folder)
    index = read_json(folder / INDEX_FILE, "model_index.json")
    if index.get("_class_name") != PIPELINE_CLASS:
        raise UserError(f"{folder / INDEX_FILE} names the pipeline {index.get('_class_name')!r}, not "
                        f"{PIPELINE_CLASS}: not a cclddg model folder")
    for key in INDEX_KEYS:
        if key not in index:
            raise UserError(f"{folder / INDEX_FILE} has no {key!r}: the folder is incomplete; {EXPORT_AGAIN}")
    _check_choice(folder / INDEX_FILE, index, "cond", conditioning.names)
    if not (isinstance(index["img_size"], int) and 0 < index["img_size"] <= 4096):
        raise UserError(f"{folder / INDEX_FILE}: img_size {index['img_size']!r} is not a size in pixels")
    for name, value in index.items():
        if name.startswith("_") or name in COMPONENTS or not isinstance(value, (list, tuple)):
            continue
        raise UserError(f"{folder / INDEX_FILE} names a component {name!r} ({_named(value)}) that a cclddg model "
                        "does not have; a model folder's code is never loaded")
    for name, part in COMPONENTS.items():
        _check_component(folder, index, name, part)
    if conditioning.get(index["cond"]).uses_encoder and not present(index.get("embedder")):
        raise UserError(f"{folder / INDEX_FILE}: a model prompted by embeddings has no embedder; {EXPORT_AGAIN}")
    stats = folder / "embedding_stats.safetensors"
    if stats.exists():
        check_safetensors(stats, "the text prior's statistics")
    return index


def read_json(path: Path, what: str) -> dict:
    """A JSON object from a model folder; missing, unreadable or not an object is one line."""
    if not path.exists() and not path.is_symlink():
        raise UserError(f"{path} ({what}) is missing: the model folder is incomplete; {EXPORT_AGAIN}")
    return read_json_object(path, what, EXPORT_AGAIN)


def check_safetensors(path: Path, what: str) -> None:
    """A whole safetensors file: its header parses and its tensors' bytes are all there (reads the header only)."""
    if not path.is_file():  # (a pickle in its place was refused by name before: _check_links_and_pickles)
        raise UserError(f"{path} ({what}) is missing: the model folder is incomplete; {EXPORT_AGAIN}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if pickled_format(head):
            raise UserError(f"{path} ({what}) holds a pickle (torch.save), not safetensors; cclddg never loads "
                            f"pickles from a model folder: {EXPORT_AGAIN}")
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < length <= min(MAX_HEADER, size - 8):
            raise UserError(f"{path} ({what}) is not a safetensors file (truncated or damaged: {size} bytes); "
                            f"{EXPORT_AGAIN}")
        try:
            header = json.loads(f.read(length))
            end = max([int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"], default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise UserError(f"{path} ({what}) has a damaged safetensors header; {EXPORT_AGAIN}") from None
    if 8 + length + end > size:
        raise UserError(f"{path} ({what}) is truncated ({size} of {8 + length + end} bytes); {EXPORT_AGAIN}")


def _check_component(folder: Path, index: dict, name: str, part: Component) -> None:
    value = index.get(name)
    if not present(value):
        if part.required:
            raise UserError(f"{folder / INDEX_FILE} has no {name}: the folder is incomplete; {EXPORT_AGAIN}")
        return
    named = tuple(value) if isinstance(value, (list, tuple)) and len(value) == 2 else None
    if named not in part.classes:
        allowed = " or ".join(f"{lib}.{cls}" for lib, cls in part.classes)
        raise UserError(f"{folder / INDEX_FILE} names {_named(value)} as the {name}; a cclddg model's {name} is "
                        f"{allowed} (a model folder's code is never loaded)")
    what = f"the {name}'s config"
    config = read_json(folder / name / part.config, what)
    if config.get("_class_name") != named[1]:
        raise UserError(f"{folder / name / part.config} ({what}) is of class {config.get('_class_name')!r}, not "
                        f"{named[1]}; {EXPORT_AGAIN}")
    for key in part.keys:
        if key not in config:
            raise UserError(f"{folder / name / part.config} ({what}) has no {key!r}; {EXPORT_AGAIN}")
    for key, names in part.choices:
        _check_choice(folder / name / part.config, config, key, names)
    files = part.weights
    if name == "embedder":
        files = EMBEDDER_FILES.get(config["kind"])
        if files is None:
            raise UserError(f"{folder / name / part.config}: unknown embedder kind {config['kind']!r} (one of "
                            f"{', '.join(EMBEDDER_FILES)})")
        if (folder / name / "sentence").exists():
            files = (*files, *(f"sentence/{f}" for f in SENTENCE_FILES))
    for file in files:
        path = folder / name / file
        if file.endswith(".safetensors"):
            check_safetensors(path, f"the {name}'s weights")
        else:
            read_json(path, f"the {name}'s {file}")


def _check_choice(path: Path, config: dict, key: str, names: Callable[[], tuple[str, ...]]) -> None:
    if not (isinstance(config[key], str) and config[key] in names()):
        raise UserError(f"{path}: {key} {config[key]!r} is not one of {', '.join(names())}")


def _check_links_and_pickles(folder: Path) -> None:
    root = folder.resolve()
    for where, dirs, files in os.walk(folder):
        for entry in (*dirs, *files):
            path = Path(where) / entry
            if path.is_symlink() and not path.resolve().is_relative_to(root):
                raise UserError(f"{path} links outside the model folder (to {path.resolve()}); a model folder is "
                                f"self-contained: {EXPORT_AGAIN}")
            if entry in files and path.suffix in PICKLE_SUFFIXES:
                raise UserError(f"{path} is a pickle; cclddg model folders hold safetensors only and never load a "
                                f"pickle: remove it, or {EXPORT_AGAIN}")


def present(value) -> bool:
    """A component model_index.json names (diffusers writes [null, null] for an absent optional one)."""
    return value is not None and not (isinstance(value, (list, tuple)) and all(v is None for v in value))


def _named(value) -> str:
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return f"{value[0]}.{value[1]}"
    return repr(value)[:80]
