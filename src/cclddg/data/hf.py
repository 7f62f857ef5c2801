"""`hf:NAME_OR_PATH[:split]`: a Hugging Face dataset through the `datasets` library.

Local folders (`save_to_disk` output, or a folder `load_dataset` understands, e.g. an imagefolder) work
offline; hub names need the network, or a copy in the local `datasets` cache. Images are read as stored
bytes and decoded by our own preprocessing, so a bad image is skipped and counted like any other.
The seed's datasets are aliases with their captions: `celebA` (huggan/CelebA-faces, "A photo of a
face") and `imagewoof` (johnowhitaker/imagewoof2-320, "A photo of a {breed}"); `celebA:PATH` and
`imagewoof:PATH` read a local copy of them with the same captions.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from cclddg.data.records import Record
from cclddg.errors import UserError, first_line

CAPTION_COLUMNS = ("text", "caption", "captions", "prompt", "sentence")
IMAGEWOOF_BREEDS = ("Shih-Tzu", "Rhodesian ridgeback", "Beagle", "English foxhound", "Border terrier",
                    "Australian terrier", "Golden retriever", "Old English sheepdog", "Samoyed", "Dingo")
ALIASES: dict[str, str] = {"celeba": "huggan/CelebA-faces", "imagewoof": "johnowhitaker/imagewoof2-320"}


def _celeba_caption(row: dict) -> str:
    return "A photo of a face"


def _imagewoof_caption(row: dict) -> str:
    label = row.get("label")
    if not isinstance(label, int) or not 0 <= label < len(IMAGEWOOF_BREEDS):
        return "A photo of a dog"
    return f"A photo of a {IMAGEWOOF_BREEDS[label]}"


ALIAS_CAPTIONS: dict[str, Callable[[dict], str]] = {"celeba": _celeba_caption, "imagewoof": _imagewoof_caption}


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _load(name: str, alias: str | None = None):
    """A Dataset or DatasetDict from a local save_to_disk folder, a local data folder, or the hub."""
    try:
        import datasets
    except ImportError:
        raise UserError("hf: sources need the datasets library: pip install 'cclddg[hf]' (or pip install datasets)") from None
    path = Path(name).expanduser()
    local = path.exists()
    try:
        if local and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
            return datasets.load_from_disk(str(path))
        return datasets.load_dataset(str(path) if local else name)
    except ConnectionError as exc:
        why = "this machine is offline (HF_HUB_OFFLINE is set)" if _offline() else f"the hub could not be reached ({exc})"
        use = f"{'celebA' if alias == 'celeba' else alias}:DIR" if alias else "hf:DIR"
        raise UserError(f"hf:{name} is a hub dataset and {why}; on a machine with a network run "
                        f"datasets.load_dataset('{name}').save_to_disk('DIR'), copy DIR here and use {use}") from None
    except FileNotFoundError as exc:
        what = "the folder holds no data files datasets can read" if local else "it is neither a local folder nor a hub dataset"
        raise UserError(f"hf:{name}: {what} ({first_line(exc)})") from None
    except Exception as exc:  # datasets raises many kinds (DatasetNotFoundError, ValueError ...); one line each
        raise UserError(f"hf:{name} could not be loaded: {type(exc).__name__}: {first_line(exc)}") from None


def _pick_split(loaded, name: str, split: str | None):
    import datasets

    if isinstance(loaded, datasets.Dataset):
        if split:
            raise UserError(f"hf:{name} is a single dataset without splits; drop ':{split}'")
        return loaded
    splits = list(loaded.keys())
    if split is None:
        split = "train" if "train" in splits else (splits[0] if len(splits) == 1 else None)
        if split is None:
            raise UserError(f"hf:{name} has splits {', '.join(splits)}; choose one, e.g. hf:{name}:{splits[0]}")
    if split not in splits:
        raise UserError(f"hf:{name} has no split {split!r}; it has {', '.join(splits)}")
    return loaded[split]


class HFSource:
    """One split of a Hugging Face dataset; its image column is read undecoded."""

    def __init__(self, name: str, split: str | None = None, alias: str | None = None) -> None:
        import datasets

        self.name, self.alias = name, alias
        table = _pick_split(_load(name, alias), name, split)
        image_columns = [c for c, f in table.features.items() if isinstance(f, datasets.Image)]
        if not image_columns:
            raise UserError(f"hf:{name} has no image column (columns: {', '.join(table.column_names)})")
        self.image_column = image_columns[0]
        self.table = table.cast_column(self.image_column, datasets.Image(decode=False))
        self.caption_column = next((c for c in CAPTION_COLUMNS if c in table.column_names), None)
        self.caption_fn = ALIAS_CAPTIONS.get(alias or "")
        if len(self.table) == 0:
            raise UserError(f"hf:{name} ({split or 'its split'}) is empty")

    def __len__(self) -> int:
        return len(self.table)

    def describe(self) -> str:
        return f"hf:{self.name} ({len(self):,} rows)"

    def record(self, index: int) -> Record:
        row = self.table[int(index)]
        key = f"{self.name} row {index}"
        image = row[self.image_column]
        data = None
        if isinstance(image, dict):
            data = image.get("bytes")
            if data is None and image.get("path"):
                try:
                    data = Path(image["path"]).read_bytes()
                except OSError as exc:
                    return Record(key, None, "", error=f"could not read {image['path']}: {exc.strerror or exc}")
        if self.caption_fn is not None:
            caption: str | bytes | None = self.caption_fn(row)
        elif self.caption_column is not None:
            caption = row[self.caption_column]
            if isinstance(caption, list):  # several captions per image: the first
                caption = caption[0] if caption else ""
            caption = caption if isinstance(caption, (str, bytes)) or caption is None else str(caption)
        else:
            caption = ""
        return Record(key, data, caption)
