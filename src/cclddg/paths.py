"""Paths the user gives, checked before any work starts: a command that would fail to write its result after
minutes of sampling or training fails at once instead, in one line that names the flag.

Output checks write and delete a probe file in the nearest existing folder, so a place the user cannot write to
(permissions, a read-only disk, /proc) is found even when running as root; they create nothing else.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

from cclddg.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def _writable(folder: Path, flag: str, path: Path) -> None:
    """`folder` can be made and written into: its nearest existing ancestor is a folder we can write a file in.
    Nothing is created but a probe file, deleted at once (a refused command leaves no folder behind)."""
    existing = next(p for p in (folder, *folder.parents) if p.exists() or p == p.parent)
    if not existing.is_dir():
        raise UserError(f"{flag} {path}: {existing} is a file, not a folder")
    probe = existing / f".cclddg-probe-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"{flag} {path}: cannot write into {existing} ({_reason(exc)})") from None


def output_file(path: str | Path, flag: str, suffixes: tuple[str, ...]) -> Path:
    """A file the command will write (replacing one of the same kind): the right extension, not a folder, in a
    folder that can be made and written. The writer makes the parent folders."""
    path = Path(path).expanduser()
    if path.suffix.lower() not in suffixes:
        raise UserError(f"{flag} {path}: give a file ending in {' or '.join(suffixes)}")
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; give a file name inside it, e.g. {path / ('out' + suffixes[0])}")
    _writable(path.parent, flag, path)
    return path


def output_folder(path: str | Path, flag: str) -> Path:
    """A folder the command will write into: not a file, and makeable and writable (made by the writer)."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file; give a folder")
    _writable(path, flag, path)
    return path


def distinct_outputs(files: dict[str, Path | None], folders: dict[str, Path | None]) -> None:
    """The output files and folders of one command (flag -> path, None: not given), checked before any work: no
    two the same path, and nothing inside an output file (a file inside an output folder is fine)."""
    given = [(flag, Path(p).expanduser().resolve(), kind) for kind, outputs in (("file", files), ("folder", folders))
             for flag, p in outputs.items() if p is not None]
    for i, (flag_a, a, _) in enumerate(given):
        for flag_b, b, _ in given[i + 1:]:
            if a == b:
                raise UserError(f"{flag_a} and {flag_b} are the same path ({a}); give each its own")
    for flag, path, _ in given:
        for file_flag, file, kind in given:
            if kind == "file" and file in path.parents:
                raise UserError(f"{flag} {path} lies inside the file {file_flag} {file}; give paths side by side")


@contextlib.contextmanager
def undone_if_failed(folder: Path, kept: Callable[[], bool]) -> Iterator[None]:
    """Run a command that fills `folder`; if it was new or empty and the command fails (or is interrupted) before
    it made anything worth keeping (`kept()` is false: no checkpoint, no finished shard), leave it as it was (gone,
    or empty), so the same command can simply be run again instead of meeting "holds another run"."""
    folder = Path(folder)
    existed = folder.exists()
    fresh = not existed or (folder.is_dir() and not any(folder.iterdir()))
    try:
        yield
    except BaseException:
        if fresh and folder.is_dir() and not kept():
            if not existed:
                shutil.rmtree(folder, ignore_errors=True)
            else:
                for child in folder.iterdir():
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child, ignore_errors=True)
                    else:
                        child.unlink(missing_ok=True)
        raise
