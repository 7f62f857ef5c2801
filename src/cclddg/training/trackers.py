"""Where a training run reports its scalars and image grids: log.jsonl always, TensorBoard and W&B on request.

    RUN/log.jsonl          one JSON object per `log_scalars` call: {"step": 10, "loss_d": 0.7, ...}
    RUN/tensorboard/       TensorBoard event files (when tensorboard is installed and not turned off)
    RUN/wandb/, RUN/wandb_run_id
                           W&B's local run folders and the id a resumed run continues (with --wandb_project)

A resumed run (`resume_step`) first forgets what was logged after the checkpoint it resumes from (the steps a
killed run logged after its last save), so every tracker shows each step once.

Values: log.jsonl keeps 6 significant digits (not 6 decimals, so a learning rate of 1e-7 is not 0) and writes
a non-finite value as null (NaN is not JSON). TensorBoard and W&B get every value as is: both store NaN/inf.
"""

from __future__ import annotations

import json
import math
import secrets
from pathlib import Path
from typing import Any, Mapping, Protocol

import numpy as np
from PIL import Image

from cclddg.atomic import write_text_atomic
from cclddg.errors import UserError

LOG_FILE = "log.jsonl"
TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_run_id"
ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"  # W&B's own run ids: 8 of these


class Tracker(Protocol):
    name: str

    def log_scalars(self, values: Mapping[str, float], step: int) -> None: ...

    def log_images(self, images: Mapping[str, Image.Image], step: int) -> None: ...

    def close(self) -> None: ...


def complete_lines(text: str) -> list[str]:
    """The lines of `text` that end in a newline: the last one may be half-written by a killed process."""
    return text.split("\n")[:-1]


def parse_record(line: str) -> dict[str, Any] | None:
    """One log line as a dict, or None for a line that is not a JSON object (garbage is skipped, not fatal)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def read_log(run_dir: Path) -> list[dict[str, Any]]:
    """The records of RUN/log.jsonl, without a half-written last line or lines that are not JSON objects."""
    path = Path(run_dir) / LOG_FILE
    if not path.is_file():
        return []
    records = (parse_record(line) for line in complete_lines(path.read_text()))
    return [r for r in records if r is not None]


def json_number(value: float) -> float | None:
    """6 significant digits, or None for NaN/inf, which json.dumps would write as invalid JSON."""
    value = float(value)
    return float(f"{value:.6g}") if math.isfinite(value) else None


class JsonlTracker:
    """Always on: the plain-text record `cclddg plot` and the tests read."""

    name = "jsonl"

    def __init__(self, run_dir: Path, resume_step: int | None = None) -> None:
        self.path = Path(run_dir) / LOG_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._keep_until(resume_step)

    def _keep_until(self, resume_step: int | None) -> None:
        """Drop a half-written last line and, on resume, the records after `resume_step` (rewritten atomically)."""
        if not self.path.is_file():
            return
        text = self.path.read_text()
        lines = complete_lines(text)
        if resume_step is not None:
            lines = [line for line in lines if not _after(parse_record(line), resume_step)]
        kept = "".join(line + "\n" for line in lines)
        if kept != text:
            write_text_atomic(self.path, kept)

    def log_scalars(self, values: Mapping[str, float], step: int) -> None:
        record = {"step": int(step), **{k: json_number(v) for k, v in values.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")

    def log_images(self, images: Mapping[str, Image.Image], step: int) -> None:
        """Nothing: the trainer saves its grids as PNGs in RUN/samples/."""

    def note(self, values: Mapping[str, Any], step: int) -> None:
        """A record that is not a scalar (what a resume changed): `cclddg plot` passes over it."""
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": int(step), **values}, allow_nan=False, default=str) + "\n")

    def close(self) -> None:
        """Nothing to flush: every record is appended and closed at once."""


def _after(record: dict[str, Any] | None, resume_step: int) -> bool:
    """Whether a record was logged after the checkpoint at `resume_step` (garbage lines go too)."""
    if record is None:
        return True
    step = record.get("step")
    return not isinstance(step, (int, float)) or step > resume_step


def image_array(image: Image.Image) -> np.ndarray:
    """HWC uint8 RGB, the layout TensorBoard's add_image takes with dataformats="HWC"."""
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


class TensorBoardTracker:
    """RUN/tensorboard/; on resume the events after the checkpoint are purged (purge_step)."""

    name = "tensorboard"

    def __init__(self, run_dir: Path, resume_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        purge = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / TENSORBOARD_DIR), purge_step=purge)

    def log_scalars(self, values: Mapping[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, float(value), global_step=step)

    def log_images(self, images: Mapping[str, Image.Image], step: int) -> None:
        for key, image in images.items():
            self.writer.add_image(key, image_array(image), global_step=step, dataformats="HWC")

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def tensorboard_available() -> bool:
    """torch.utils.tensorboard imports only when the tensorboard package is installed."""
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def wandb_run_id(run_dir: Path, resume: bool) -> str:
    """The W&B run id kept in RUN/wandb_run_id: a resumed run continues the same W&B run, a new one starts one."""
    path = Path(run_dir) / WANDB_ID_FILE
    if resume and path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    run_id = "".join(secrets.choice(ID_ALPHABET) for _ in range(8))
    write_text_atomic(path, run_id + "\n")
    return run_id


class WandbTracker:
    """A W&B run whose local files live in RUN/wandb/ (works offline with WANDB_MODE=offline)."""

    name = "wandb"

    def __init__(self, run_dir: Path, project: str, config: Mapping[str, Any],
                 resume_step: int | None = None) -> None:
        try:
            import wandb
        except ImportError:
            raise UserError("--wandb_project needs the wandb package: pip install wandb (or drop the flag)") from None
        self.wandb = wandb
        self.run_id = wandb_run_id(run_dir, resume_step is not None)
        self.run = wandb.init(project=project, config=dict(config), dir=str(run_dir), id=self.run_id,
                              resume="allow")

    def log_scalars(self, values: Mapping[str, float], step: int) -> None:
        self.run.log({k: float(v) for k, v in values.items()}, step=step)

    def log_images(self, images: Mapping[str, Image.Image], step: int) -> None:
        self.run.log({k: self.wandb.Image(image) for k, image in images.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """Every active tracker behind one call (the trainer's main process holds one of these)."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.trackers]

    def log_scalars(self, values: Mapping[str, float], step: int) -> None:
        for tracker in self.trackers:
            tracker.log_scalars(values, step)

    def log_images(self, images: Mapping[str, Image.Image], step: int) -> None:
        for tracker in self.trackers:
            tracker.log_images(images, step)

    def note(self, values: Mapping[str, Any], step: int) -> None:
        """Written where text fits (log.jsonl)."""
        for tracker in self.trackers:
            if hasattr(tracker, "note"):
                tracker.note(values, step)

    def close(self) -> None:
        """Close every tracker even if one fails (then raise the first failure)."""
        errors = []
        for tracker in self.trackers:
            try:
                tracker.close()
            except Exception as exc:  # the others must still flush
                errors.append(exc)
        if errors:
            raise errors[0]

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wandb_wanted(project: str | None) -> bool:
    """The seed's flag used the string "None" for off."""
    return bool(project) and project not in ("None", "none")


def open_trackers(run_dir: Path, config: Mapping[str, Any], resume_step: int | None, tensorboard: bool = True,
                  wandb_project: str | None = None) -> Trackers:
    """log.jsonl always; TensorBoard if asked for and installed (else silently off); W&B if a project is given."""
    run_dir = Path(run_dir)
    opened = Trackers([JsonlTracker(run_dir, resume_step)])
    try:
        if tensorboard and tensorboard_available():
            opened.trackers.append(TensorBoardTracker(run_dir, resume_step))
        if wandb_project is not None and wandb_wanted(wandb_project):
            opened.trackers.append(WandbTracker(run_dir, wandb_project, config, resume_step))
    except BaseException:
        opened.close()  # a failed W&B start leaves no TensorBoard writer open
        raise
    return opened
