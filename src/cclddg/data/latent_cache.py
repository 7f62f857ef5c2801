"""The encode-once latent cache: every example's latent, image embedding and caption embedding on disk.

Training from the cache never runs the autoencoder or the embedder, which dominate the cost of a
small generator's step. Layout (a folder):

    CACHE/cache.json       metadata, written last (atomically) once every shard is done
    CACHE/progress.json    while encoding: the key and the scale measured at the start
    CACHE/shard_00000/     latents.npy (n,C,h,w) float16 [+ latents_flip.npy], image_emb.npy (n,D) float16
                           [+ image_emb_flip.npy], text_emb.npy (n,D) float16, labels.npy float32, captions.json

Each shard is written into `.tmp-shard_XXXXX` and renamed when complete, so an interrupted encode never
leaves a half shard that looks complete; running the same encode again skips the finished shards. A source of
local files (folder:, a local wds:) is recorded by its fingerprint (`source`: names, sizes, times): files
added, removed or rewritten since make the cache refuse, in one line, to be resumed or reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from cclddg.atomic import write_text_atomic
from cclddg.data.preprocess import SkipLog
from cclddg.data.stream import collate, iter_batches, iter_examples
from cclddg.encoders import absolute_spec
from cclddg.encoders.base import Embedder
from cclddg.errors import UserError
from cclddg.latents import absolute_autoencoder_spec
from cclddg.latents.base import LatentSpace, measure_scale
from cclddg.storage import read_json_object

FORMAT = 2
META_FILE = "cache.json"
PROGRESS_FILE = "progress.json"
SHARD_FILE = "shard.json"
SCALE_IMAGES = 512  # images the scale factor is measured on
KEY_FIELDS = ("format", "data", "seed", "limit", "img_size", "crop", "autoencoder", "autoencoder_fingerprint",
              "latent_shape", "encoder", "encoder_fingerprint", "embed_dim", "flip", "shard_size")
META_FIELDS = ("count", "scale", "has_labels", "shards", "skipped", "content_hash")
ENCODE_HINT = "make one with cclddg encode"


def shard_name(i: int) -> str:
    return f"shard_{i:05d}"


def _absolute_autoencoder(spec: str) -> str:

    return absolute_autoencoder_spec(spec)


def _absolute_encoder(spec: str) -> str:

    return absolute_spec(spec)


def _write_json_atomic(path: Path, value: Any) -> None:

    write_text_atomic(path, json.dumps(value, indent=2) + "\n")


def _read_json(path: Path) -> dict:
    return read_json_object(path, "a latent cache's metadata", f"delete {path.parent} and encode it again")


# ---- the per-batch work ---------------------------------------------------------------------------------
def embed_captions(captions: Sequence[str], embedder: Embedder) -> Tensor:
    """Text embeddings of `captions`, each distinct caption embedded once (captions repeat a lot)."""
    unique = sorted(set(captions))
    position = {c: i for i, c in enumerate(unique)}
    index = torch.tensor([position[c] for c in captions], dtype=torch.long)
    return embedder.embed_texts(unique)[index.to(embedder.device)]


@torch.no_grad()
def encode_batch(images: Tensor, captions: Sequence[str] | None, space: LatentSpace, embedder: Embedder | None,
                 flip: bool = False) -> dict[str, Tensor]:
    """What the cache stores for one batch, float32 on the models' devices: `latents` (scaled by
    `space.scale`), `image_emb`, `text_emb` (when there is an embedder; text only when captions are given)
    and `latents_flip` / `image_emb_flip` of the horizontally flipped images when `flip`."""
    out = {"latents": space.encode(images)}
    flipped = images.flip(-1) if flip else None
    if flipped is not None:
        out["latents_flip"] = space.encode(flipped)
    if embedder is not None:
        out["image_emb"] = embedder.embed_images(images)
        if flipped is not None:
            out["image_emb_flip"] = embedder.embed_images(flipped)
        if captions is not None:
            out["text_emb"] = embed_captions(captions, embedder)
    return out


# ---- writing ------------------------------------------------------------------------------------------
def cache_key(data_spec: str, seed: int, count: int | None, img_size: int, space: LatentSpace, embedder: Embedder | None,
         flip: bool, shard_size: int, crop: str = "center") -> dict[str, Any]:
    """Everything the cache's content depends on; a resumed or repeated encode must match it."""
    if not space.spec:
        raise UserError("the latent space has no spec; load it with cclddg.latents.load_latent_space")
    if embedder is not None and not getattr(embedder, "spec", ""):
        raise UserError("the embedder has no spec; load it with cclddg.encoders.load_embedder")
    return {
        "format": FORMAT, "data": data_spec, "seed": int(seed), "limit": None if count is None else int(count),
        "img_size": int(img_size), "crop": crop,
        "autoencoder": _absolute_autoencoder(space.spec), "autoencoder_fingerprint": space.fingerprint,
        "latent_shape": list(space.latent_shape(img_size)),
        "encoder": _absolute_encoder(embedder.spec) if embedder is not None else None,
        "encoder_fingerprint": embedder.fingerprint if embedder is not None else None,
        "embed_dim": int(embedder.dim) if embedder is not None else 0,
        "flip": bool(flip), "shard_size": int(shard_size),
    }


def _describe(key: dict) -> str:
    enc = key.get("encoder") or "no encoder"
    limit = key.get("limit")
    return (f"{'all' if limit is None else limit} examples of {key.get('data')} (seed {key.get('seed')}, {key.get('img_size')} px) "
            f"with {key.get('autoencoder')} and {enc}")


def _check_key(out: Path, found: dict, key: dict) -> None:
    differ = [k for k in KEY_FIELDS if found.get(k) != key[k]]
    if found.get("ranks", 1) != key.get("ranks", 1):  # encoded by several processes (data/parallel_encode.py)
        differ.append(f"processes: {found.get('ranks', 1)} then, {key.get('ranks', 1)} now")
    if differ:
        raise UserError(f"{out} holds a cache of {_describe(found)} ({', '.join(differ)} differ from this "
                        "command's); choose a new --out")


def _check_source(out: Path, found: dict, now: dict | None) -> None:
    """A cache of local files (folder:, a local wds:) is never used for files that changed since it was made."""
    then = found.get("source")
    if then is None or now is None or then == now:
        return
    what = "rewritten" if (then["files"], then["bytes"]) == (now["files"], now["bytes"]) else \
        f"{now['files']:,} files, {now['bytes'] / 2**20:.1f} MiB now; {then['files']:,} files, " \
        f"{then['bytes'] / 2**20:.1f} MiB then"
    raise UserError(f"{found.get('data')} changed since the cache {out} was encoded from it ({what}); to encode it "
                    f"again remove the cache (rm -r {out}) and rerun")


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def shard_sha256(folder: Path) -> str:
    """One hash over a shard's files (names and bytes), in name order."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.iterdir() if p.is_file()):
        h.update(f"{f.name}:{_file_sha256(f)}\n".encode())
    return h.hexdigest()


def content_hash(shard_hashes: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(shard_hashes).encode()).hexdigest()


def _shard_count(folder: Path) -> int | None:
    """Examples in a finished shard, or None when it is unreadable."""
    try:
        return int(np.load(folder / "latents.npy", mmap_mode="r").shape[0])
    except (OSError, ValueError):
        return None


def measure_scale_of(source, img_size: int, space: LatentSpace, batch_size: int, workers: int, crop: str) -> float:
    """The scale factor, on the first SCALE_IMAGES good examples (pixel space keeps 1: images in [-1, 1])."""
    if space.spec == "pixels":
        return 1.0

    batches = iter_batches(source, img_size, batch_size, workers=workers, limit=SCALE_IMAGES, crop=crop,
                           skips=SkipLog(warn=False))
    return measure_scale(space, torch.cat([b.images for b in batches]))


class _ShardWriter:
    """One shard's arrays, filled batch by batch through memory maps (a shard of large pixel images never
    has to fit in memory), in the folder `tmp` that the caller renames once `close` returns."""

    def __init__(self, tmp: Path, capacity: int) -> None:
        self.tmp, self.capacity, self.n = tmp, capacity, 0
        self.files: dict[str, np.memmap] = {}
        self.labels: list[np.ndarray] = []
        self.captions: list[str] = []

    def add(self, encoded: dict[str, Tensor], labels: Tensor | None, captions: list[str]) -> None:
        k = len(captions)
        for name, value in encoded.items():
            if name not in self.files:
                self.files[name] = np.lib.format.open_memmap(self.tmp / f"{name}.npy", mode="w+", dtype=np.float16,
                                                             shape=(self.capacity, *value.shape[1:]))
            self.files[name][self.n:self.n + k] = value.cpu().to(torch.float16).numpy()
        if labels is not None:
            self.labels.append(labels.numpy().astype(np.float32))
        self.captions += captions
        self.n += k

    def close(self, embedder: Embedder | None, info: dict) -> None:
        for name, array in self.files.items():
            array.flush()
            if self.n < self.capacity:  # the last shard of a stream: keep the filled part only
                np.save(self.tmp / f"{name}.part.npy", array[:self.n])
                del array
                os.replace(self.tmp / f"{name}.part.npy", self.tmp / f"{name}.npy")
        self.files.clear()
        if embedder is not None:  # distinct captions of the whole shard, embedded once
            np.save(self.tmp / "text_emb.npy", embed_captions(self.captions, embedder).cpu().to(torch.float16).numpy())
        if self.labels:
            if sum(len(x) for x in self.labels) != self.n:
                raise UserError("the data source gave labels for only some examples")
            np.save(self.tmp / "labels.npy", np.concatenate(self.labels))
        (self.tmp / "captions.json").write_text(json.dumps(self.captions))
        (self.tmp / SHARD_FILE).write_text(json.dumps({**info, "count": self.n}))


def write_progress(out: Path, key: dict, scale: float, source: dict | None) -> None:
    """The record of an encode under way: its key, the scale measured at the start and the source's fingerprint."""
    _write_json_atomic(out / PROGRESS_FILE, {**key, "scale": scale, "source": source})


def read_progress(out: Path) -> dict:
    return _read_json(out / PROGRESS_FILE)


def prepare_folder(out: Path, key: dict, scale: float | None, source: dict | None = None) -> dict | None:
    """Check `out` against `key` and the source's fingerprint: the progress record to resume from, {} for a fresh
    cache, None when complete."""
    if (out / META_FILE).is_file():
        meta = _read_json(out / META_FILE)
        _check_key(out, meta, key)
        _check_source(out, meta, source)
        if scale is not None and meta.get("scale") != float(scale):
            raise UserError(f"{out} holds a cache encoded with scale {meta.get('scale')}, not --scale {scale}; "
                            "choose a new --out")
        return None
    if (out / PROGRESS_FILE).is_file():
        progress = _read_json(out / PROGRESS_FILE)
        _check_key(out, progress, key)
        _check_source(out, progress, source)
        if scale is not None and progress.get("scale") != float(scale):
            raise UserError(f"{out} holds a partial cache with scale {progress.get('scale')}, not --scale {scale}; "
                            "rerun without --scale to finish it, or choose a new --out")
        return progress
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} is not empty and holds no latent cache; choose a new --out")
    return {}


def _finished_shards(out: Path) -> list[dict]:
    """The shard.json of each finished shard, in order, up to the first missing or damaged one."""
    infos = []
    while True:
        folder = out / shard_name(len(infos))
        try:
            info = json.loads((folder / SHARD_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            return infos
        if _shard_count(folder) != info.get("count"):
            return infos
        infos.append(info)


def encode_dataset(source, data_spec: str, seed: int, count: int | None, img_size: int, space: LatentSpace,
                   embedder: Embedder | None, out: Path, flip: bool = False, shard_size: int = 5000,
                   batch_size: int = 256, scale: float | None = None, progress: bool = True, workers: int = 0,
                   crop: str = "center") -> Path:
    """Encode the first `count` good examples of `source` (all of them when None) into the cache folder
    `out`, resuming a partial one there. A complete cache with the same key is left as it is; any other
    content in `out` is refused. Bad examples are skipped, counted per shard and summed in cache.json."""
    out = Path(out)
    for name, value in (("count", count or 1), ("shard_size", shard_size), ("batch_size", batch_size)):
        if value < 1:
            raise UserError(f"--{'n' if name == 'count' else name} must be >= 1, got {value}")
    if scale is not None and not scale > 0:
        raise UserError(f"--scale must be > 0, got {scale}")
    key = cache_key(data_spec, seed, count, img_size, space, embedder, flip, shard_size, crop)
    source_files = source.fingerprint() if callable(getattr(source, "fingerprint", None)) else None
    state = prepare_folder(out, key, scale, source_files)
    if state is None:
        return out
    if state:
        cache_scale = float(state["scale"])
    else:
        cache_scale = float(scale) if scale is not None else measure_scale_of(source, img_size, space, batch_size,
                                                                              workers, crop)
        out.mkdir(parents=True, exist_ok=True)
        write_progress(out, key, cache_scale, source_files)
    _remove_unfinished_shards(out)  # from a killed run: never complete
    done = _finished_shards(out)
    for stale in out.glob("shard_*"):  # damaged shards, or shards after a damaged one: encoded again
        if not stale.name < shard_name(len(done)):
            shutil.rmtree(stale)
    encoded = sum(d["count"] for d in done)
    if not (done and done[-1].get("end")) and (count is None or encoded < count):
        total = count if count is not None else (len(source) if hasattr(source, "__len__") else None)
        bar = tqdm(total=total, initial=encoded, desc="encoding", unit="img", disable=not progress)
        try:
            _encode_shards(out, source, img_size, space.with_scale(cache_scale), embedder, flip, shard_size,
                           batch_size, workers, crop, done, None if count is None else count - encoded, bar)
        except BaseException:  # stopped: the finished shards stay, no unfinished one is left behind
            _remove_unfinished_shards(out)
            raise
        finally:
            bar.close()
    return _finish(out, key, cache_scale, source_files)


def _remove_unfinished_shards(out: Path) -> None:
    """Remove the `.tmp-shard_*` folders of shards that were never completed (and so never renamed)."""
    for leftover in out.glob(".tmp-shard_*"):
        shutil.rmtree(leftover, ignore_errors=True)


def _encode_shards(out: Path, source, img_size: int, space: LatentSpace, embedder: Embedder | None, flip: bool,
                   shard_size: int, batch_size: int, workers: int, crop: str, done: list[dict], remaining: int | None,
                   bar) -> None:
    """Fill shards from where the finished ones stopped until the source (or `remaining`) runs out.

    A shard's shard.json records where in the source it starts and stops (`stop`: after its last good
    example, so a resumed encode starts there) and the bad examples skipped on the way to its examples. A shard
    is filled in `.tmp-shard_XXXXX`, renamed when complete; `encode_dataset` removes an unfinished one."""

    skips = SkipLog()
    start = done[-1]["stop"] if done else 0
    examples = iter_examples(source, img_size, workers=workers, skips=skips, limit=remaining, start=start, crop=crop)
    index, finished = len(done), False
    while not finished:
        final, tmp = out / shard_name(index), out / f".tmp-{shard_name(index)}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        writer, before, named = _ShardWriter(tmp, shard_size), dict(skips.counts), len(skips.examples)
        last = start - 1
        while writer.n < shard_size:
            batch = [e for _, e in zip(range(min(batch_size, shard_size - writer.n)), examples)]
            if not batch:
                finished = True
                break
            found = collate(batch)
            writer.add(encode_batch(found.images, None, space, embedder, flip), found.labels, found.captions)
            last = found.positions[-1]
            bar.update(len(batch))
        skipped = {k: v - before.get(k, 0) for k, v in skips.counts.items() if v - before.get(k, 0)}
        if writer.n == 0:  # the source ended at a shard boundary: the previous shard is the last, and
            shutil.rmtree(tmp)  # the bad examples after it are its own
            previous = out / shard_name(index - 1) / SHARD_FILE
            info = json.loads(previous.read_text())
            merged = {k: info["skipped"].get(k, 0) + skipped.get(k, 0) for k in {*info["skipped"], *skipped}}
            _write_json_atomic(previous, {**info, "skipped": merged, "end": True,
                                          "first_skipped": info["first_skipped"] + [list(e) for e in skips.examples[named:]]})
            return
        finished = finished or (remaining is not None and writer.n >= remaining)
        writer.close(embedder, {"start": start, "stop": last + 1, "skipped": skipped,
                                "first_skipped": [list(e) for e in skips.examples[named:]], "end": finished})
        os.replace(tmp, final)
        if remaining is not None:
            remaining -= writer.n
        start, index = last + 1, index + 1


def _finish(out: Path, key: dict, scale: float, source: dict | None = None) -> Path:
    """Hash the shards, sum their skipped examples and write cache.json: from now on the cache is complete."""
    shards, has_labels, skips = [], [], SkipLog(warn=False)
    for info in _finished_shards(out):
        folder = out / shard_name(len(shards))
        shards.append({"name": folder.name, "count": int(info["count"]), "sha256": shard_sha256(folder)})
        has_labels.append((folder / "labels.npy").is_file())
        skips.merge({"good": info["count"], "by_kind": info.get("skipped", {}), "first": info.get("first_skipped", [])})
    if any(has_labels) and not all(has_labels):
        raise UserError(f"{out}: the data source gave labels for some shards only")
    return write_meta(out, key, scale, shards, all(has_labels), skips, source)


def write_meta(out: Path, key: dict, scale: float, shards: list[dict], has_labels: bool, skips: SkipLog,
               source: dict | None) -> Path:
    """cache.json, written last and atomically (the cache is complete from then on), and the progress record gone.
    `shards`: each {"name" (a folder under `out`), "count", "sha256"}, in reading order."""
    if not shards:
        raise UserError(f"{out}: no examples were encoded")
    meta = {**key, "count": sum(s["count"] for s in shards), "scale": scale, "has_labels": has_labels,
            "shards": shards, "skipped": skips.as_dict(), "content_hash": content_hash([s["sha256"] for s in shards]),
            "source": source}
    _write_json_atomic(out / META_FILE, meta)
    (out / PROGRESS_FILE).unlink(missing_ok=True)
    return out


def shards_done(out: Path) -> int:
    """Finished shards in a (possibly partial) cache folder."""
    return sum(1 for p in Path(out).glob("shard_*") if p.is_dir())


# ---- reading ------------------------------------------------------------------------------------------
def is_cache_spec(data: str) -> bool:
    """A data spec that names a folder is a latent cache (sources are names like `shapes:64` or `folder:PATH`);
    an unfinished one is refused, with what to run, when it is read (`read_cache_meta`)."""
    return Path(data).expanduser().is_dir()


def read_cache_meta(path: Path, autoencoder: str | None = None, encoder: str | None = None) -> dict[str, Any]:
    """A complete cache's metadata, checked (format, fields, and the autoencoder/encoder specs if given);
    reads cache.json only, so run settings can be taken from a cache without opening its shards."""
    meta_path = path / META_FILE
    if not meta_path.is_file():
        progress = path / PROGRESS_FILE
        if progress.is_file():
            info = _read_json(progress)
            limit = info.get("limit")
            of = f" of {-(-int(limit) // max(1, int(info.get('shard_size', 1))))}" if limit else ""
            raise UserError(f"{path} is incomplete ({shards_done(path)}{of} shards); "
                            "run the same `cclddg encode` command again to finish it")
        what = "does not exist" if not path.exists() else "is not a latent cache (no cache.json)"
        raise UserError(f"{path} {what}; {ENCODE_HINT}")
    meta: dict[str, Any] = _read_json(meta_path)
    if meta.get("format") != FORMAT:
        raise UserError(f"{path} is a latent cache of format {meta.get('format')}; this version reads "
                        f"format {FORMAT}: encode it again with cclddg encode")
    missing = [k for k in (*KEY_FIELDS, *META_FIELDS) if k not in meta]
    if missing:
        raise UserError(f"{meta_path} lacks {', '.join(missing)}; the cache is damaged: encode it again")
    if autoencoder is not None and _absolute_autoencoder(autoencoder) != meta["autoencoder"]:
        raise UserError(f"{path} was encoded with --autoencoder {meta['autoencoder']}, not "
                        f"{_absolute_autoencoder(autoencoder)}; use that autoencoder or encode a new cache")
    if encoder is not None:
        wanted = _absolute_encoder(encoder)
        if meta["encoder"] is None:
            raise UserError(f"{path} holds no embeddings (encoded without --encoder), but {wanted} was "
                            "asked for; encode a new cache with --encoder")
        if wanted != meta["encoder"]:
            raise UserError(f"{path} was encoded with --encoder {meta['encoder']}, not {wanted}; "
                            "use that encoder or encode a new cache")
    return meta


class LatentCache:
    """A complete cache, memory-mapped: batches are gathered from the shards without loading them whole."""

    def __init__(self, path: str | Path, autoencoder: str | None = None, encoder: str | None = None) -> None:
        self.path = Path(path)
        self.meta: dict[str, Any] = read_cache_meta(self.path, autoencoder, encoder)
        self._arrays: list[dict[str, np.ndarray]] = []
        self._captions: list[list[str]] = []
        counts = []
        for shard in self.meta["shards"]:
            arrays, captions = self._open_shard(shard)
            self._arrays.append(arrays)
            self._captions.append(captions)
            counts.append(int(shard["count"]))
        if sum(counts) != self.meta["count"]:
            raise UserError(f"{self.path}: its shards hold {sum(counts)} examples, not {self.meta['count']}; "
                            "the cache is damaged: encode it again")
        self._starts = np.cumsum([0, *counts])[:-1]

    def check_flip(self, flip: bool) -> None:
        """Refuse a run with --flip that this cache cannot give (what a run's condition needs, its kind checks)."""
        if flip and not self.has_flip:
            raise UserError(f"{self.path} has no flipped latents; encode it with --flip or drop --flip")

    def _open_shard(self, shard: dict) -> tuple[dict[str, np.ndarray], list[str]]:
        folder = self.path / shard["name"]
        n = int(shard["count"])
        if not folder.is_dir():
            raise UserError(f"{folder} is missing; the cache is damaged: encode it again")
        names = ["latents"]
        if self.has_flip:
            names.append("latents_flip")
        if self.embed_dim:
            names += ["image_emb", "text_emb"] + (["image_emb_flip"] if self.has_flip else [])
        if self.has_labels:
            names.append("labels")
        arrays = {}
        for name in names:
            path = folder / f"{name}.npy"
            try:
                arrays[name] = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise UserError(f"{path} is missing or damaged ({type(exc).__name__}); encode the cache again") from exc
            expected = {"latents": tuple(self.meta["latent_shape"]), "latents_flip": tuple(self.meta["latent_shape"]),
                        "labels": arrays[name].shape[1:]}.get(name, (self.embed_dim,))
            if arrays[name].shape != (n, *expected):
                raise UserError(f"{path} holds shape {arrays[name].shape}, expected {(n, *expected)}; "
                                "the cache is damaged: encode it again")
        captions = json.loads((folder / "captions.json").read_text()) if (folder / "captions.json").is_file() else None
        if not isinstance(captions, list) or len(captions) != n:
            raise UserError(f"{folder / 'captions.json'} is missing or does not hold {n} captions; "
                            "the cache is damaged: encode it again")
        return arrays, captions

    # ---- properties ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.meta["count"])

    @property
    def channels(self) -> int:
        return int(self.meta["latent_shape"][0])

    @property
    def latent_size(self) -> int:
        return int(self.meta["latent_shape"][-1])

    @property
    def img_size(self) -> int:
        return int(self.meta["img_size"])

    @property
    def scale(self) -> float:
        return float(self.meta["scale"])

    @property
    def embed_dim(self) -> int:
        return int(self.meta["embed_dim"])

    @property
    def autoencoder(self) -> str:
        return str(self.meta["autoencoder"])

    @property
    def encoder(self) -> str | None:
        return self.meta["encoder"]

    @property
    def has_flip(self) -> bool:
        return bool(self.meta["flip"])

    @property
    def has_labels(self) -> bool:
        return bool(self.meta["has_labels"])

    @property
    def content_hash(self) -> str:
        return str(self.meta["content_hash"])

    # ---- reading batches ----------------------------------------------------------------------------
    def get_batch(self, indices: Sequence[int], flip: Tensor | None = None,
                  fields: Sequence[str] | None = None) -> dict[str, Any]:
        """Examples `indices` (any order, repeats allowed) as float32 tensors; `flip[i]` picks the flipped
        latent and image embedding of example i. `fields` reads only those arrays (e.g. the embeddings)."""
        idx = np.asarray(list(indices) if not isinstance(indices, (np.ndarray, Tensor)) else indices,
                         dtype=np.int64).reshape(-1)
        if idx.size == 0:
            raise UserError("get_batch needs at least one index")
        if idx.min() < 0 or idx.max() >= len(self):
            raise IndexError(f"index out of range for a cache of {len(self)} examples")
        flips = np.zeros(idx.size, dtype=bool) if flip is None else np.asarray(flip, dtype=bool).reshape(-1)
        if flips.size != idx.size:
            raise ValueError(f"flip has {flips.size} entries for {idx.size} indices")
        if flips.any() and not self.has_flip:
            raise UserError(f"{self.path} has no flipped latents; encode it with --flip to train with flips")
        shard_of = np.searchsorted(self._starts, idx, side="right") - 1
        rows = idx - self._starts[shard_of]
        shapes = {"latents": tuple(self.meta["latent_shape"])}
        if self.embed_dim:
            shapes.update(image_emb=(self.embed_dim,), text_emb=(self.embed_dim,))
        if self.has_labels:
            shapes["labels"] = self._arrays[0]["labels"].shape[1:]
        if fields is not None:
            missing = [f for f in fields if f not in shapes]
            if missing:
                raise UserError(f"{self.path} holds no {', '.join(missing)}")
            shapes = {name: shapes[name] for name in fields}
        out = {name: np.empty((idx.size, *shape), dtype=np.float32) for name, shape in shapes.items()}
        captions: list[str] = [""] * idx.size
        for s in np.unique(shard_of):
            arrays = self._arrays[s]
            for use_flip in (False, True):
                where = np.nonzero((shard_of == s) & (flips == use_flip))[0]
                if where.size == 0:
                    continue
                r = rows[where]
                order = np.argsort(r, kind="stable")  # read the memory map in ascending order
                r_sorted, w_sorted = r[order], where[order]
                for name in out:
                    source = f"{name}_flip" if use_flip and name in ("latents", "image_emb") else name
                    out[name][w_sorted] = arrays[source][r_sorted]
            for w in np.nonzero(shard_of == s)[0]:
                captions[w] = self._captions[s][rows[w]]
        batch: dict[str, Any] = {name: torch.from_numpy(value) for name, value in out.items()}
        batch["captions"] = captions
        return batch

    def captioned(self) -> Tensor:
        """(N,) bool: which examples have a caption (their text embedding then says something)."""
        return torch.tensor([bool(c.strip()) for caps in self._captions for c in caps])

    def embeddings(self) -> tuple[Tensor, Tensor, Tensor]:
        """Every example's image and text embedding (float32) and whether it has a caption (its text
        embedding then says something): what the text priors' statistics are measured on."""
        if not self.embed_dim:
            raise UserError(f"{self.path} holds no embeddings (encoded without --encoder)")
        image = torch.from_numpy(np.concatenate([a["image_emb"] for a in self._arrays]).astype(np.float32))
        text = torch.from_numpy(np.concatenate([a["text_emb"] for a in self._arrays]).astype(np.float32))
        return image, text, self.captioned()

    def verify(self) -> str:
        """Recompute every shard's hash; a damaged or edited file raises UserError. Returns the content hash."""
        hashes = []
        for shard in self.meta["shards"]:
            got = shard_sha256(self.path / shard["name"])
            if got != shard["sha256"]:
                raise UserError(f"{self.path / shard['name']} does not match its recorded hash: the cache is damaged; "
                                "encode it again")
            hashes.append(got)
        if content_hash(hashes) != self.content_hash:
            raise UserError(f"{self.path}: the content hash does not match cache.json; the cache is damaged")
        return self.content_hash
