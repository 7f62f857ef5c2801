"""Writing a file so that a reader never sees half of it: a temporary file beside it, renamed over it.

Free of torch, so `cclddg plot` and the trackers can use it without importing the models.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it over `path`. A failed write (a full disk)
    leaves `path` as it was and no temporary file behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
