"""Saving and loading weights and configs: safetensors written atomically, models as config.json + safetensors,
JSON configs read back with one-line errors. The bottom layer: it imports nothing of cclddg but errors and
atomic writes, so models, encoders, latents, data and training all use it without importing each other.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

import torch

from cclddg.atomic import atomic_path
from cclddg.errors import UserError, first_line

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"  # a model's weights in its folder (diffusers' name)


def pickled_format(head: bytes) -> str | None:
    """What a file's first bytes say when it holds pickled objects: "zip" (torch.save's format), "pickle N"
    (pickle protocol N: torch.save's legacy format is 2, pickle.dump writes 4 or 5), or None."""
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return f"pickle {head[1]}"
    return None


@contextlib.contextmanager
def safetensors_os_errors() -> Iterator[None]:
    """safetensors reports a failed write (a full disk) as its own SafetensorError: raise it as the OSError it
    is, with its errno, so callers handle every failed write alike."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as exc:
        found = re.search(r"os error (\d+)", str(exc))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code)) from exc


def save_tensors_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """A safetensors file written under a temporary name (unique per process) and renamed when complete."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp, safetensors_os_errors():
        save_file(tensors, str(tmp), metadata=metadata)


def load_model(cls: type, folder: Path) -> torch.nn.Module:
    """Load a config.json + safetensors model, turning a damaged or missing file into one clear line."""
    if not (folder / "config.json").is_file():
        raise UserError(f"checkpoint folder {folder} has no config.json; the checkpoint is incomplete")
    if not (folder / WEIGHTS_FILE).is_file():  # (diffusers would log its own lines above ours)
        raise UserError(f"checkpoint folder {folder} has no {WEIGHTS_FILE}; the checkpoint is incomplete")
    try:
        return cls.from_pretrained(folder, use_safetensors=True)  # never fall back to a pickle
    except UserError:
        raise
    except Exception as exc:  # safetensors/diffusers raise many types for truncated or foreign files
        first = first_line(exc)
        raise UserError(f"could not load the model in {folder}: it is missing or damaged ({first})") from exc


def read_json_object(path: Path, what: str, remedy: str) -> dict:
    """A JSON file that must hold an object (a config, a cache's or a model folder's metadata): missing,
    unreadable, not JSON (or nested past the parser's depth) or not an object is one line naming the file, what
    it is, and `remedy` (what to do about it)."""
    try:
        value = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{path} ({what}) is missing; {remedy}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise UserError(f"{path} ({what}) is not readable JSON ({type(exc).__name__}); {remedy}") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} ({what}) is not a JSON object; {remedy}")
    return value


def read_config_json(path: Path, config_cls: type, what: str = "run config") -> Any:
    """A config.json read back into `config_cls`; unreadable JSON, a list or a string where a number goes is one
    line that names the file (the keys and types are checked by `from_dict`)."""
    try:
        values = json.loads(Path(path).read_text())
    except OSError as exc:
        raise UserError(f"could not read the {what} {path}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"the {what} {path} is not valid JSON ({exc}); restore it, e.g. from a checkpoint's "
                        "train_config.json") from None
    try:
        return config_cls.from_dict(values)
    except (UserError, TypeError) as exc:
        raise UserError(f"the {what} {path} is not one cclddg wrote: {exc}") from None
