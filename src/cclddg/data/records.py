"""What every data source hands to the one preprocessing path: raw records.

A source only *reads*: it turns its storage (files, a Hugging Face dataset, tar shards, a font) into
`Record`s. Decoding, the bad-file checks, resizing and cropping happen in one place for all of them
(`cclddg.data.preprocess`), and splitting the work across processes and workers in another
(`cclddg.data.stream`). Two kinds of source:

- a *map* source has a length and random access (`record(i)`): folders, HF datasets, emoji, shapes;
- a *stream* source has only an ordered list of shards and reads them front to back
  (`records(shards)`): webdataset tar files, local or remote.

A source of local files may also say what it was read from (`fingerprint()`, `files_fingerprint`): a latent
cache records it and refuses to serve a source that changed since.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image


@dataclass
class Record:
    """One example as stored.

    `key` names it in warnings (a file path, `shard.tar:member`, `row 17`). `image` is the encoded file's
    bytes or an already-decoded PIL image; `caption` is text, or bytes still to be decoded as UTF-8.
    `error` says why the stored example cannot be used at all (e.g. an unreadable tar member): such a
    record is skipped and counted, never decoded. `labels` are optional per-example class labels (shapes).
    """

    key: str
    image: bytes | Image.Image | None
    caption: str | bytes | None = ""
    error: str | None = None
    labels: np.ndarray | None = None


@runtime_checkable
class MapSource(Protocol):
    """A finite source with random access."""

    def __len__(self) -> int: ...

    def record(self, index: int) -> Record: ...

    def describe(self) -> str: ...


@runtime_checkable
class StreamSource(Protocol):
    """A source read shard by shard, front to back (no length known in advance)."""

    shards: Sequence[str]

    def records(self, shards: Sequence[str]) -> Iterator[Record]: ...

    def describe(self) -> str: ...


def files_fingerprint(paths: Sequence[str | Path]) -> dict:
    """A cheap fingerprint of local files: how many, their bytes, and a digest of every name, size and
    modification time (a file added, removed, replaced or rewritten changes it; reading none of them)."""
    h, total = hashlib.sha1(), 0
    for path in paths:
        st = os.stat(path)
        total += st.st_size
        h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return {"files": len(paths), "bytes": total, "digest": h.hexdigest()}
