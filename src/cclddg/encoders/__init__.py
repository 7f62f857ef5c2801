"""Conditioning embedders, chosen everywhere with one spec string (`--encoder`).

    cloob-vit-b16:PATH       the pretrained CLOOB ViT-B/16 (cloob-training .pkl, or its converted .safetensors)
    cloob-tiny:RUN_DIR       our own CLOOB from `cclddg train-cloob`
    open_clip:MODEL:PATH     an OpenCLIP model (needs a full open-clip-torch install with torchvision)
    model:FOLDER             the embedder of an exported model folder (`cclddg export`)
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from cclddg.encoders.base import Embedder
from cclddg.errors import UserError

KINDS = ("cloob-vit-b16", "cloob-tiny", "open_clip", "model")
EXAMPLES = "e.g. --encoder cloob-tiny:runs/cloob or --encoder cloob-vit-b16:cloob_laion_400m_vit_b_16_32_epochs.pkl"


def parse_encoder_spec(spec: str) -> tuple[str, str, str | None]:
    """`kind:PATH` or `open_clip:MODEL:PATH` -> (kind, path, model name or None)."""
    kind, sep, rest = (spec or "").partition(":")
    if kind not in KINDS or not sep or not rest:
        raise UserError(f"--encoder {spec!r} is not valid: give KIND:PATH with KIND one of {', '.join(KINDS)} ({EXAMPLES})")
    if kind == "open_clip":
        model, sep, path = rest.partition(":")
        if not sep or not model or not path:
            raise UserError(f"--encoder {spec!r}: open_clip needs open_clip:MODEL:PATH, e.g. open_clip:ViT-B-32:weights.pt")
        return kind, path, model
    return kind, rest, None


def absolute_spec(spec: str) -> str:
    """The same spec with its path made absolute, so a run folder can be used from anywhere."""
    kind, path, model = parse_encoder_spec(spec)
    path = str(Path(path).expanduser().resolve())
    return f"{kind}:{model}:{path}" if model else f"{kind}:{path}"


def load_embedder(spec: str, device: str | torch.device = "cpu") -> Embedder:
    """The embedder behind a spec, frozen, in eval mode, on `device`; `embedder.spec` and `.fingerprint` set."""
    kind, path, model_name = parse_encoder_spec(spec)
    if not Path(path).exists():
        raise UserError(f"--encoder {spec!r}: {path} does not exist")
    if kind == "cloob-vit-b16":
        from cclddg.encoders.cloob_pretrained import load_pretrained_cloob

        embedder = load_pretrained_cloob(path, device=device)
    elif kind == "cloob-tiny":
        from cclddg.encoders.own_cloob import load_own_cloob

        embedder = load_own_cloob(path, device=device)
    elif kind == "model":
        from cclddg.encoders.component import EmbedderModel

        if not (Path(path) / "embedder" / "config.json").is_file():
            raise UserError(f"--encoder {spec!r}: {path} is not an exported model folder with an embedder")
        embedder = EmbedderModel.from_pretrained(Path(path) / "embedder").embedder.to(device)
    else:
        from cclddg.encoders.open_clip_embedder import load_open_clip

        embedder = load_open_clip(model_name, path, device=device)
    embedder.spec = spec
    embedder.fingerprint = weights_fingerprint(path)
    return embedder.eval().requires_grad_(False)


def weights_fingerprint(path: str | Path) -> str:
    """A cheap identity of the weights behind `path` (names, sizes, mtimes of its files) for cache keys."""
    path = Path(path).resolve()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json", ".pkl", ".pt", ".bin", ".ckpt"))
    h = hashlib.sha1()
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(path.parent) if f != path else f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


def default_cache_dir() -> Path:
    base = os.environ.get("CCLDDG_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "cclddg")
    return Path(base).expanduser()


__all__ = ["Embedder", "KINDS", "absolute_spec", "default_cache_dir", "load_embedder", "parse_encoder_spec"]
