"""`cclddg plot RUN`: a real log written by the tracker drawn into a PNG, and the bad inputs giving one line."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from cclddg.cli import main
from cclddg.errors import UserError
from cclddg.training.plot import collect_series, ema, group_panels, plot_run
from cclddg.training.trackers import JsonlTracker, read_log


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """The real console entry point in a subprocess, to see the exit code and stderr as a user does."""
    return subprocess.run([sys.executable, "-m", "cclddg.cli", *args], capture_output=True, text=True, timeout=300)


def write_run(run: Path, steps: int = 200) -> Path:
    """A run folder whose log.jsonl has what the trainer logs: losses, D outputs, a sparse R1, lr, memory."""
    tracker = JsonlTracker(run)
    for step in range(1, steps + 1):
        values = {"loss_d": 1.4 * math.exp(-step / 80) + 0.1 * math.sin(step), "loss_g": 0.7 + 0.05 * math.cos(step),
                  "d_real": 0.5 + 0.2 * math.sin(step / 9), "d_fake": -0.3 + 0.1 * math.cos(step / 7),
                  "grad_norm_g": 10 * math.exp(-step / 50) + 0.1, "lr_g": 1e-4 * min(1.0, step / 50),
                  "samples_per_s": 900 + 30 * math.sin(step), "rss_mb": 1500 + step}
        if step % 15 == 0:
            values["r1"] = 0.02 + 0.01 * math.sin(step)
        tracker.log_scalars(values, step)
    tracker.close()
    return run


def distinct_colours(path: Path) -> int:
    image = Image.open(path).convert("RGB")
    return len(image.getcolors(maxcolors=1 << 20) or [])


def test_plot_command_writes_a_png_with_curves(tmp_path, capsys):
    run = write_run(tmp_path / "myrun")
    assert main(["plot", str(run)]) == 0
    png = run / "plot.png"
    assert capsys.readouterr().out.strip() == f"wrote {png}"
    with Image.open(png) as image:
        assert image.format == "PNG"
        width, height = image.size
    assert 800 <= width <= 2000 and 600 <= height <= 2500  # two columns of four panels
    assert distinct_colours(png) > 200  # curves, faint raw lines and text, not a blank canvas
    assert not list(run.glob(".*tmp"))


def test_plot_output_flag_and_smoothing(tmp_path, capsys):
    run = write_run(tmp_path / "run", steps=60)
    out = tmp_path / "figures" / "curves.png"
    assert main(["plot", str(run), "-o", str(out), "--smooth", "0"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    assert out.is_file() and not (run / "plot.png").exists()
    assert distinct_colours(out) > 100


def test_series_skip_nulls_and_sparse_keys_keep_their_own_steps(tmp_path):
    run = write_run(tmp_path / "run", steps=45)
    tracker = JsonlTracker(run)
    tracker.log_scalars({"loss_d": float("nan"), "loss_g": 0.5, "tokens": 7}, 46)
    series = collect_series(read_log(run))
    assert series["r1"][0] == [15, 30, 45]
    assert series["loss_d"][0][-1] == 45 and series["loss_g"][0][-1] == 46  # the null loss_d is skipped
    panels = {title: keys for title, keys, _, _ in group_panels(list(series))}
    assert panels["losses"] == ["loss_d", "loss_g"] and panels["R1 penalty"] == ["r1"]
    assert panels["discriminator outputs"] == ["d_real", "d_fake"] and panels["memory (MB)"] == ["rss_mb"]
    assert panels["gradient norms"] == ["grad_norm_g"] and panels["learning rates"] == ["lr_g"]
    assert panels["other"] == ["tokens"]
    assert [smoothed for title, _, _, smoothed in group_panels(["loss_d", "lr_g", "rss_mb"])] == [True, False, False]


def test_ema_is_debiased():
    assert ema([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])  # not pulled towards 0 at the start
    assert ema([0.0, 10.0], 0.5) == pytest.approx([0.0, 5 / 0.75])
    assert ema([1.0, 5.0], 0.0) == [1.0, 5.0]


def test_a_log_without_numbers_is_a_user_error(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text('{"step": 1, "loss_d": null}\n{"step": 2, "loss')
    with pytest.raises(UserError, match="no numeric records"):
        plot_run(run)
    assert not (run / "plot.png").exists()


def test_plot_errors_are_one_line_and_exit_code_2(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["plot", str(empty)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no log.jsonl" in err and "cclddg train" in err

    assert main(["plot", str(write_run(tmp_path / "run", steps=5)), "--smooth", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--smooth" in err

    result = run_cli("plot", str(tmp_path / "missing"))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "is not a folder" in result.stderr
