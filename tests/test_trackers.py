"""The run's trackers on real files: log.jsonl, TensorBoard event files and an offline W&B run, fresh and resumed."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cclddg.training.trackers import JsonlTracker, open_trackers, read_log


def grid(color: tuple[int, int, int] = (200, 30, 40)) -> Image.Image:
    """A small two-colour image, as the trainer's sample grids are PIL images."""
    image = Image.new("RGB", (24, 16), color)
    image.paste((10, 220, 90), (0, 0, 12, 16))
    return image


def log_steps(run: Path, steps: range, offset: float = 0.0, resume_step: int | None = None, **kwargs) -> list[str]:
    """Open the trackers, log loss_d = step + offset for each step (and one image), close; their names."""
    trackers = open_trackers(run, {"lr": 1e-4}, resume_step, **kwargs)
    for step in steps:
        trackers.log_scalars({"loss_d": step + offset, "lr_g": 1e-7}, step=step)
    trackers.log_images({"samples": grid()}, step=steps[-1])
    trackers.close()
    return trackers.names


def tensorboard_scalars(run: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of every event TensorBoard would show, in order (a step twice shows up twice)."""
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def of_run(folder: Path, run_id: str) -> bool:
    """W&B names an offline run's folder offline-run-DATE_TIME-ID (with -1, -2 ... when the second is taken)."""
    return re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{run_id}(-\d+)?", folder.name) is not None


def test_jsonl_round_trip_keeps_small_numbers_and_writes_non_finite_as_null(tmp_path):
    tracker = JsonlTracker(tmp_path)
    tracker.log_scalars({"loss_d": 0.123456789, "lr_g": 1.5e-7, "d_real": float("nan"), "r1": float("inf")}, 3)
    tracker.log_scalars({"loss_d": 2}, 4)
    tracker.close()
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 3, "loss_d": 0.123457, "lr_g": 1.5e-7, "d_real": None, "r1": None},
        {"step": 4, "loss_d": 2.0}]
    assert "NaN" not in lines[0] and "Infinity" not in lines[0]
    assert read_log(tmp_path) == [json.loads(line) for line in lines]


def test_resume_drops_records_after_the_checkpoint_and_a_half_written_line(tmp_path):
    tracker = JsonlTracker(tmp_path)
    for step in range(1, 11):
        tracker.log_scalars({"loss_d": step}, step)
    log = tmp_path / "log.jsonl"
    with open(log, "a") as f:
        f.write('{"step": 11, "loss_')  # killed mid-write
    assert [r["step"] for r in read_log(tmp_path)] == list(range(1, 11))

    tracker = JsonlTracker(tmp_path, resume_step=6)
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2, 3, 4, 5, 6]
    for step in (7, 8):
        tracker.log_scalars({"loss_d": 100 + step}, step)
    records = read_log(tmp_path)
    assert [(r["step"], r["loss_d"]) for r in records][-3:] == [(6, 6.0), (7, 107.0), (8, 108.0)]
    assert log.read_text().endswith("\n") and len(log.read_text().splitlines()) == 8
    assert not list(tmp_path.glob(".*tmp"))  # the atomic rewrite left no temporary file


def test_a_new_run_only_mends_a_half_written_last_line(tmp_path):
    (tmp_path / "log.jsonl").write_text('{"step": 1, "loss_d": 1.0}\n{"step": 2, "lo')
    tracker = JsonlTracker(tmp_path)
    tracker.log_scalars({"loss_d": 3.0}, 3)
    assert read_log(tmp_path) == [{"step": 1, "loss_d": 1.0}, {"step": 3, "loss_d": 3.0}]


def test_tensorboard_events_read_back_and_resume_purges_later_steps(tmp_path):
    assert log_steps(tmp_path, range(1, 11)) == ["jsonl", "tensorboard"]
    assert tensorboard_scalars(tmp_path, "loss_d") == [(s, float(s)) for s in range(1, 11)]
    assert tensorboard_scalars(tmp_path, "lr_g")[4] == (5, pytest.approx(1e-7))
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    image = events.Images("samples")[-1]
    assert image.step == 10 and (image.width, image.height) == (24, 16)

    log_steps(tmp_path, range(7, 13), offset=100.0, resume_step=6)
    # Without the purge the killed run's steps 7..10 would show up beside the new ones.
    values = tensorboard_scalars(tmp_path, "loss_d")
    assert values == [(s, float(s)) for s in range(1, 7)] + [(s, 100.0 + s) for s in range(7, 13)]


def test_tensorboard_keeps_non_finite_values(tmp_path):
    trackers = open_trackers(tmp_path, {}, None)
    trackers.log_scalars({"loss_g": float("nan")}, step=1)
    trackers.close()
    [(step, value)] = tensorboard_scalars(tmp_path, "loss_g")
    assert step == 1 and math.isnan(value)
    assert read_log(tmp_path) == [{"step": 1, "loss_g": None}]


def test_tensorboard_can_be_turned_off(tmp_path):
    assert log_steps(tmp_path, range(1, 3), tensorboard=False, wandb_project="None") == ["jsonl"]
    assert not (tmp_path / "tensorboard").exists()
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2]


def wandb_file(path: Path, last: bytes, timeout: float = 20.0) -> bytes:
    """The offline run file, once it holds `last`: W&B's service process may still be writing it for a moment
    after `run.finish()` returns (seen under load), so wait for it a bounded time."""
    import time

    deadline = time.monotonic() + timeout
    data = path.read_bytes()
    while last not in data and time.monotonic() < deadline:
        time.sleep(0.2)
        data = path.read_bytes()
    return data


def test_wandb_offline_run_resumes_the_same_run_id(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    names = log_steps(tmp_path, range(1, 6), tensorboard=False, wandb_project="cclddg-test")
    assert names == ["jsonl", "wandb"]
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    assert len(run_id) == 8 and run_id.isalnum()
    folders = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(folders) == 1 and of_run(folders[0], run_id)
    data = wandb_file(folders[0] / f"run-{run_id}.wandb", b"samples")
    assert b"loss_d" in data and b"lr_g" in data and b"samples" in data
    images = list((folders[0] / "files" / "media" / "images").glob("samples_5_*.png"))
    assert len(images) == 1 and Image.open(images[0]).size == (24, 16)

    log_steps(tmp_path, range(4, 8), offset=100.0, resume_step=3, tensorboard=False, wandb_project="cclddg-test")
    assert (tmp_path / "wandb_run_id").read_text().strip() == run_id
    folders = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and all(of_run(f, run_id) for f in folders)
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2, 3, 4, 5, 6, 7]


def test_a_run_started_afresh_gets_a_new_wandb_run_id(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log_steps(tmp_path, range(1, 3), tensorboard=False, wandb_project="cclddg-test")
    first = (tmp_path / "wandb_run_id").read_text()
    log_steps(tmp_path, range(1, 3), tensorboard=False, wandb_project="cclddg-test")  # no resume_step
    assert (tmp_path / "wandb_run_id").read_text() != first
