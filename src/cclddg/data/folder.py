"""`folder:PATH`: image files found recursively, captioned the way people already lay them out.

A caption comes from, in this order: a row of a `metadata.jsonl` / `metadata.csv` (`file_name`, `text`;
Hugging Face's imagefolder layout: `file_name` is relative to the metadata file's folder), a same-name
`.txt` beside the image (`cat.jpg` + `cat.txt`), or nothing (the empty caption: image-embedding
conditioning only). Files and folders whose names start with "." are ignored.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from cclddg.data.records import Record, files_fingerprint
from cclddg.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
CAPTION_COLUMNS = ("text", "caption")


def _metadata_rows(path: Path) -> list[dict]:
    """The rows of one metadata file; a malformed file is the user's to fix, so it stops the run at once."""
    try:
        if path.suffix == ".jsonl":
            rows = []
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise UserError(f"{path} line {n} is not JSON ({exc.msg}); fix or remove that line") from None
            return rows
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; save it as UTF-8") from None
    except OSError as exc:
        raise UserError(f"could not read {path}: {exc.strerror or exc}") from None


def _metadata_captions(metadata: list[Path]) -> dict[Path, str]:
    """file -> caption from the metadata files of a folder (the .jsonl ones first, each kind in path order)."""
    captions: dict[Path, str] = {}
    for name in METADATA_FILES:
        for meta in sorted(p for p in metadata if p.name == name):
            for n, row in enumerate(_metadata_rows(meta), 1):
                if not isinstance(row, dict) or "file_name" not in row:
                    raise UserError(f"{meta} row {n} has no file_name; each row needs file_name and text")
                column = next((c for c in CAPTION_COLUMNS if c in row), None)
                text = row.get(column) if column else ""
                captions[(meta.parent / str(row["file_name"])).resolve()] = "" if text is None else str(text)
    return captions


class FolderSource:
    """Every image file under a folder, in path order."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()
        if not self.root.exists():
            raise UserError(f"folder {self.root} does not exist")
        if not self.root.is_dir():
            raise UserError(f"{self.root} is a file, not a folder; give the folder that holds the images")
        visible = sorted(p for p in self.root.rglob("*")  # one walk of the tree for images and captions
                         if p.is_file() and not any(part.startswith(".") for part in p.relative_to(self.root).parts))
        self.files = [p for p in visible if p.suffix.lower() in IMAGE_SUFFIXES]
        if not self.files:
            raise UserError(f"no image files ({', '.join(s[1:] for s in IMAGE_SUFFIXES)}) under {self.root}")
        self.caption_files = [p for p in visible if p.name in METADATA_FILES or p.suffix == ".txt"]
        self.captions = _metadata_captions([p for p in self.caption_files if p.name in METADATA_FILES])

    def __len__(self) -> int:
        return len(self.files)

    def describe(self) -> str:
        return f"folder {self.root} ({len(self.files):,} image files)"

    def fingerprint(self) -> dict:
        """The images, captions and metadata files this source reads (a latent cache checks it)."""
        return files_fingerprint([*self.files, *self.caption_files])

    def record(self, index: int) -> Record:
        path = self.files[index]
        key = str(path.relative_to(self.root))
        caption: str | bytes = self.captions.get(path.resolve(), "")
        try:
            if path.resolve() not in self.captions and path.with_suffix(".txt").is_file():
                caption = path.with_suffix(".txt").read_bytes()
            return Record(key, path.read_bytes(), caption)
        except OSError as exc:
            return Record(key, None, "", error=f"could not read the file: {exc.strerror or exc}")
