"""Checkpoints that are never half-written and never pickles of code.

Layout of one checkpoint (a folder, written under a temporary name and renamed when complete):

    checkpoints/step_000500/
        generator/  generator_ema/  discriminator/   config.json + diffusion_pytorch_model.safetensors
        training_state.pt     optimizers, schedulers, loss scalers, step, data position, every rank's RNG states
                              (tensors and numbers only: loaded with weights_only)
        train_config.json     the resolved TrainConfig
    checkpoints/latest        the name of the newest complete checkpoint
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from cclddg.atomic import write_text_atomic
from cclddg.config import TrainConfig
from cclddg.errors import UserError
from cclddg.run_folder import CONFIG_FILE, list_checkpoints
from cclddg.storage import read_config_json, safetensors_os_errors

STATE_FILE = "training_state.pt"
KEEP_LAST = 2


def prepare_run_folder(out: Path, cfg: Any, resume: bool, resumable: set[str], command: str,
                       write: bool = True) -> dict[str, tuple[Any, Any]]:
    """The run folder of every trainer (`train`, `train-cloob`, `train-ae`): create it with its config.json, or
    check that the run being resumed has the same config except the `resumable` fields. Returns the resumable
    settings that changed, {name: (old, new)} (written to config.json when `write`).

    `write=False` only checks, so slow setup (an embedding cache) never runs for an --out it would refuse."""
    config_path = out / "config.json"
    what = "run config" if command == "train" else f"{command} config"
    if resume:
        if not config_path.is_file():
            kind = "" if command == "train" else f"{command} "
            raise UserError(f"--resume: {out} holds no {kind}run (no config.json); start it without --resume")
        old = json.loads(read_config_json(config_path, type(cfg), what).to_json())
        new = json.loads(cfg.to_json())
        clash = [k for k in new if k not in resumable and new[k] != old.get(k)]
        if clash:
            details = ", ".join(f"{k}: run has {old.get(k)!r}, flags give {new[k]!r}" for k in clash[:4])
            raise UserError(f"cannot resume {out} with a different config ({details}); "
                            "drop those flags or start a new --out")
        changed = {k: (old.get(k), new[k]) for k in new if new[k] != old.get(k)}
        if changed and write:
            write_text_atomic(config_path, cfg.to_json())
        return changed
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the run")
    if out.exists() and any(out.iterdir()):
        if _holds_run(out, type(cfg), what):
            raise UserError(f"{out} holds another run; pass --resume to continue it or choose a new --out")
        raise UserError(f"{out} is not empty (and holds no cclddg run); choose a new or empty --out folder")
    if write:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(config_path, cfg.to_json())
    return {}


def _holds_run(out: Path, config_cls: type, what: str) -> bool:
    """Whether `out` holds a run of this kind (a config.json this cclddg reads as one)."""
    try:
        read_config_json(out / "config.json", config_cls, what)
    except UserError:
        return False
    return True


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


def save_checkpoint(run_dir: Path, step: int, models: dict[str, torch.nn.Module], state: dict[str, Any],
                    cfg: TrainConfig, keep_last: int = KEEP_LAST) -> Path:
    """Write one complete checkpoint folder atomically; keep the newest `keep_last`."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{final.name}"
    for leftover in root.glob(".tmp-*"):  # from a process killed while it saved or deleted: never complete
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        tmp.mkdir()
        for name, model in models.items():
            with safetensors_os_errors():
                model.save_pretrained(tmp / name, safe_serialization=True)
        buffer = io.BytesIO()  # serialised in memory: torch.save reports a failed write without its cause
        torch.save(state, buffer)
        (tmp / STATE_FILE).write_bytes(buffer.getbuffer())
        (tmp / CONFIG_FILE).write_text(cfg.to_json())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_text_atomic(root / "latest", final.name)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        doomed = old.with_name(f".tmp-del-{old.name}")  # renamed first: never a half-deleted "complete" one
        os.replace(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    return final


def capture_rng() -> dict[str, Any]:
    """This process's RNG states (torch, CUDA, numpy's and Python's global ones) as tensors and plain numbers."""
    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate(),
                             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_state(folder: Path) -> dict[str, Any]:
    """The training state, loaded without running pickled code."""
    path = folder / STATE_FILE
    if not path.is_file():
        raise UserError(f"checkpoint {folder} has no {STATE_FILE}; it cannot be resumed")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"could not read {path}: it is damaged ({type(exc).__name__})") from exc


def read_run_config(path: Path) -> TrainConfig:
    """A run folder's config.json."""
    return read_config_json(path, TrainConfig, "run config")


def clean_leftovers(run_dir: Path) -> list[Path]:
    """Remove what a killed process left half-made in a run folder: checkpoints being written (`.tmp-step_*`) or
    deleted (`.tmp-del-step_*`), and temporary files of atomic writes (`.NAME.PID.tmp*`). Returns them."""
    removed = []
    for folder in (run_dir, run_dir / "checkpoints"):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if path.is_dir() and path.name.startswith(".tmp-"):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
            elif path.is_file() and re.fullmatch(r"\..+\.\d+\.tmp(\..*)?", path.name):
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def checkpoints_newest_first(run_dir: Path) -> list[Path]:
    """The checkpoints a resume may start from: the one `latest` names first, then the others newest first."""
    found = list_checkpoints(run_dir)[::-1]
    latest = run_dir / "checkpoints" / "latest"
    if latest.is_file():
        named = run_dir / "checkpoints" / latest.read_text().strip()
        if named in found:
            found.remove(named)
            found.insert(0, named)
    return found
