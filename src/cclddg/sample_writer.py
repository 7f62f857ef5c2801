"""Writing many samples: each batch goes into a grid canvas (8-bit) and into one PNG per image as it is made, so
memory does not grow with the number of samples and an interrupted job keeps every image it wrote.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from PIL import Image
from tqdm.auto import tqdm

from cclddg import preemption
from cclddg.data.images import GridCanvas, save_image_atomic, tensor_to_array
from cclddg.errors import SamplingInterrupted


@dataclass
class SampleJob:
    """One guidance scale's share of a `cclddg sample` request: `count` images (conditions `cond`, or None) whose
    i-th lands in grid cell `cell(i)`."""

    guidance: float
    count: int
    cond: Any
    cell: Callable[[int], int]


def run_sample_jobs(jobs: list[SampleJob], make_batches: Callable[[SampleJob], Iterable[Any]], nrow: int, size: int,
                    grid_path: Path | None, singles: Path | None, progress: bool) -> None:
    """Sample every job in batches; each batch goes into the grid canvas (uint8) and, one file each, into
    --singles as it is made, so memory does not grow with --n and Ctrl-C keeps every single written."""
    total = sum(job.count for job in jobs)
    canvas = GridCanvas(total, nrow, size, size) if grid_path else None  # a too-large grid is refused here, first
    if grid_path is not None:
        grid_path.parent.mkdir(parents=True, exist_ok=True)
    if singles is not None:
        singles.mkdir(parents=True, exist_ok=True)
    width = max(5, len(str(total - 1)))
    bar = tqdm(total=total, desc="sample", unit="img", delay=2, disable=not progress)
    done = 0
    try:
        for job in jobs:
            index = 0
            for batch in make_batches(job):
                tiles = tensor_to_array(batch)
                for k, tile in enumerate(tiles):
                    cell = job.cell(index + k)
                    if canvas is not None:
                        canvas.put(cell, tile[None])
                    if singles is not None:
                        save_image_atomic(Image.fromarray(tile, "RGB"), singles / f"{cell:0{width}d}.png")
                index += len(tiles)
                done += len(tiles)
                bar.update(len(tiles))
    except KeyboardInterrupt as exc:
        bar.close()
        how, code = preemption.how_stopped(exc)
        kept = f"; the {done} singles made are in {singles}" if singles is not None and done else ""
        grid = f"; the grid {grid_path} was not written" if canvas is not None else ""
        raise SamplingInterrupted(f"{how} after {done} of {total} images{kept}{grid}", code) from None
    bar.close()
    written = []
    if canvas is not None:
        save_image_atomic(canvas.image(), grid_path)
        written.append(str(grid_path))
    if singles is not None:
        written.append(f"{singles}/ ({total} images)")
    print("wrote " + ", ".join(written))
