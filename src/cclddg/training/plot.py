"""`cclddg plot RUN`: the curves of a run's log.jsonl in one PNG, to look at a run without TensorBoard or W&B.

One panel per kind of value (losses, D outputs, R1, gradient norms, learning rates, throughput, memory, other),
only those the log has. A noisy series is drawn raw (thin, faint) under its debiased EMA, as TensorBoard smooths;
learning rates and memory are drawn as they are.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

from cclddg.atomic import atomic_path
from cclddg.errors import UserError
from cclddg.training.trackers import LOG_FILE, read_log

Series = dict[str, tuple[list[int], list[float]]]

# (title, which keys, log y-scale, smoothed); a key goes to the first panel that takes it, "other" takes the rest.
# Learning rates and memory are not noisy: an EMA would only draw a schedule late, so they are drawn raw.
PANELS: list[tuple[str, Callable[[str], bool], bool, bool]] = [
    ("losses", lambda k: k.startswith(("loss", "recon")), False, True),
    ("discriminator outputs", lambda k: k in ("d_real", "d_fake"), False, True),
    ("R1 penalty", lambda k: k == "r1", False, True),
    ("gradient norms", lambda k: k.startswith("grad_norm"), True, True),
    ("learning rates", lambda k: k.startswith("lr"), False, False),
    ("throughput (samples/s)", lambda k: k == "samples_per_s", False, True),
    ("memory (MB)", lambda k: k == "rss_mb" or k.endswith("_mb"), False, False),
    ("KID (the run's own features)", lambda k: k == "kid", False, False),
    ("other", lambda k: True, False, True),
]


def is_number(value: Any) -> bool:
    """A finite int or float (null, NaN, inf, strings and booleans are not plotted)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def collect_series(records: list[dict[str, Any]]) -> Series:
    """key -> (steps, values) of its plottable values, in step order."""
    series: Series = {}
    for record in sorted((r for r in records if is_number(r.get("step"))), key=lambda r: r["step"]):
        for key, value in record.items():
            if key != "step" and is_number(value):
                steps, values = series.setdefault(key, ([], []))
                steps.append(int(record["step"]))
                values.append(float(value))
    return series


def group_panels(keys: list[str]) -> list[tuple[str, list[str], bool, bool]]:
    """The panels that have at least one key, in PANELS order, each with its keys in log order."""
    taken: dict[str, list[str]] = {}
    for key in keys:
        title = next(title for title, takes, _, _ in PANELS if takes(key))
        taken.setdefault(title, []).append(key)
    return [(title, taken[title], log_y, smoothed) for title, _, log_y, smoothed in PANELS if title in taken]


def ema(values: list[float], smooth: float) -> list[float]:
    """Exponential moving average, debiased (divided by 1 - smooth**n) so its start is not pulled to 0."""
    out, average = [], 0.0
    for n, value in enumerate(values, start=1):
        average = smooth * average + (1 - smooth) * value
        out.append(average / (1 - smooth ** n))
    return out


def draw_panel(ax: Any, title: str, keys: list[str], series: Series, smooth: float, log_y: bool) -> None:
    """Each key raw (thin, faint) under its smoothed line; smooth=0 draws the raw values as the line."""
    for i, key in enumerate(keys):
        steps, values = series[key]
        color = f"C{i % 10}"
        if smooth > 0:
            ax.plot(steps, values, color=color, linewidth=0.6, alpha=0.3)
        ax.plot(steps, ema(values, smooth), color=color, linewidth=1.6, label=key)
    if log_y and all(v > 0 for key in keys for v in series[key][1]):
        ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")


def save_png_atomic(figure: Any, out: Path) -> None:
    """Render beside `out`, then rename: a viewer that reloads never sees half a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        FigureCanvasAgg(figure).print_png(str(tmp))


def check_run(run_dir: Path, smooth: float) -> list[dict[str, Any]]:
    """The run's records, or a UserError that says what to point the command at."""
    if not 0 <= smooth < 1:
        raise UserError(f"--smooth must be in [0, 1) (0: no smoothing), got {smooth}")
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a folder: point cclddg plot at a run folder of cclddg train")
    if not (run_dir / LOG_FILE).is_file():
        raise UserError(f"{run_dir} has no {LOG_FILE}: point cclddg plot at a run folder of cclddg train")
    return read_log(run_dir)


def plot_run(run_dir: Path, out: Path | None = None, smooth: float = 0.9) -> Path:
    """Draw RUN/log.jsonl into one PNG (default RUN/plot.png); returns its path."""
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    series = collect_series(check_run(run_dir, smooth))
    if not series:
        raise UserError(f"{run_dir / LOG_FILE} has no numeric records yet: plot again once the run has logged")
    panels = group_panels(list(series))
    cols = 1 if len(panels) < 3 else 2
    rows = math.ceil(len(panels) / cols)
    figure = Figure(figsize=(6.5 * cols, 3.2 * rows + 0.6), dpi=100, layout="constrained")
    figure.suptitle(run_dir.resolve().name)
    axes = figure.subplots(rows, cols, squeeze=False).flatten()
    for ax, (title, keys, log_y, smoothed) in zip(axes, panels):
        draw_panel(ax, title, keys, series, smooth if smoothed else 0.0, log_y)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    out = Path(out) if out is not None else run_dir / "plot.png"
    save_png_atomic(figure, out)
    return out
