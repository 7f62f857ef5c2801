"""A run folder as sampling reads it: `checkpoints/step_N/` (each with its `train_config.json`) and
`checkpoints/latest`, the name of the newest complete one. Writing them is `training/checkpoint.py`'s; reading
them lives here, below sampling, so that `pipeline.py` never imports the trainer."""

from __future__ import annotations

from pathlib import Path

from cclddg.config import TrainConfig
from cclddg.errors import UserError
from cclddg.storage import read_config_json

CONFIG_FILE = "train_config.json"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint folder from a run folder (its latest checkpoint) or a checkpoint folder itself."""
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist")
    if (path / CONFIG_FILE).is_file():
        return path
    latest = path / "checkpoints" / "latest"
    if latest.is_file():
        ckpt = path / "checkpoints" / latest.read_text().strip()
        if (ckpt / CONFIG_FILE).is_file():
            return ckpt
    found = list_checkpoints(path)
    if found:
        return found[-1]
    raise UserError(f"{path} is neither a run folder with checkpoints, a checkpoint folder nor a model folder "
                    f"(no {CONFIG_FILE}, no model_index.json found); point --checkpoint at a run made by "
                    "`cclddg train` or a folder made by `cclddg export`")


def load_config(folder: Path) -> TrainConfig:
    return read_config_json(folder / CONFIG_FILE, TrainConfig, "checkpoint config")
