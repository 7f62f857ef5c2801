"""Writing a file so that a reader never sees half of it: a temporary file beside it, renamed over it.

Free of torch, so `cclddg plot` and the trackers can use it without importing the models.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: Path, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside `path` (unique per process; `suffix` keeps a format-giving extension) for the block
    to write; renamed over `path` when the block succeeds. A failed write (a full disk) leaves `path` as it was and
    no temporary file behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through `atomic_path`."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
