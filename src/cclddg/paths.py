"""Paths the user gives, checked before any work starts: a command that would fail to write its result after
minutes of sampling or training fails at once instead, in one line that names the flag.

Output checks make the missing parent folders (empty folders block nothing) and write and delete a probe file, so
a place the user cannot write to (permissions, a read-only disk, /proc) is found even when running as root.
"""

from __future__ import annotations

import os
from pathlib import Path

from cclddg.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def _make_folder(folder: Path, flag: str, path: Path) -> None:
    """Create `folder` (and its parents), or say in one line why it cannot be."""
    for parent in (folder, *folder.parents):
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{flag} {path}: {parent} is a file, not a folder")
            break
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{flag} {path}: cannot create the folder {folder} ({_reason(exc)})") from None


def _probe(folder: Path, flag: str, path: Path) -> None:
    """Write and delete a small file in `folder`: the one test of writability that also holds for root."""
    probe = folder / f".cclddg-probe-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"{flag} {path}: cannot write into {folder} ({_reason(exc)})") from None


def output_file(path: str | Path, flag: str, suffixes: tuple[str, ...]) -> Path:
    """A file the command will write (replacing one of the same kind): the right extension, not a folder, in a
    folder that exists (made) and can be written."""
    path = Path(path).expanduser()
    if path.suffix.lower() not in suffixes:
        raise UserError(f"{flag} {path}: give a file ending in {' or '.join(suffixes)}")
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; give a file name inside it, e.g. {path / ('out' + suffixes[0])}")
    _make_folder(path.parent, flag, path)
    _probe(path.parent, flag, path)
    return path


def output_folder(path: str | Path, flag: str) -> Path:
    """A folder the command will write into: made if missing, not a file, writable."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file; give a folder")
    _make_folder(path, flag, path)
    _probe(path, flag, path)
    return path


def input_file(path: str | Path, flag: str) -> Path:
    """A file the command will read: it exists and is a file."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"{flag} {path} does not exist")
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; give a file")
    return path


def input_folder(path: str | Path, flag: str) -> Path:
    """A folder the command will read: it exists and is a folder."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"{flag} {path} does not exist")
    if not path.is_dir():
        raise UserError(f"{flag} {path} is a file; give a folder")
    return path
