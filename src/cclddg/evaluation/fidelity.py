"""The field's distribution metrics between generated and real images: FID and KID (torchmetrics) and
precision / recall / density / coverage (prdc: Kynkäänniemi et al.'s k-NN manifolds and Naeem et al.'s
density and coverage), on the features of a named extractor.

Features (`--features`):

    own             the run's own embedder's image tower (its CLOOB): the default, offline
    ENCODER_SPEC    any embedder spec (`cloob-vit-b16:PATH`, `cloob-tiny:RUN`, ...)
    inception:PATH  the standard FID Inception network as a TorchScript file (clean-fid's and StyleGAN2-ADA's
                    `inception-2015-12-05.pt`): the figures compare with papers when it is that file

Both image sets take one path, as clean-fid recommends: generated images are quantised to uint8 like real
files, then each extractor resizes them its own way (Inception: PIL bicubic per channel in float to 299 px,
clean-fid's "clean" resize; an embedder: its own preprocessing). Real features are computed once per
(source, size, features, N, seed) and cached.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from cclddg.atomic import atomic_path
from cclddg.data.images import tensor_to_array, uint8_to_unit
from cclddg.errors import UserError, first_line

METRICS = ("fid", "kid", "pr")
INCEPTION_SIZE = 299
INCEPTION_DIM = 2048
KID_SUBSET = 1000  # KID's subset size (the standard), or half the images when fewer than 2,000
PR_K = 5  # the k of the k-NN manifolds (prdc's and Kynkäänniemi et al.'s default is 3-5)
PR_MAX = 20_000  # prdc holds N x N distances: 4.5 GiB at this N


# ---- features -------------------------------------------------------------------------------------------
class Features:
    """uint8 (B, 3, H, W) images -> (B, dim) float64 features; `name` says what they are beside every figure."""

    name: str
    dim: int
    fingerprint: str  # what real features cached for it depend on

    def __call__(self, images: Tensor) -> Tensor:
        raise NotImplementedError


class EmbedderFeatures(Features):
    """An embedder's image embeddings (unit vectors) as features."""

    def __init__(self, embedder, name: str):
        self.embedder, self.name, self.dim = embedder, name, int(embedder.dim)
        self.fingerprint = f"{getattr(embedder, 'spec', name)}:{getattr(embedder, 'fingerprint', '')}"

    def __call__(self, images: Tensor) -> Tensor:
        return self.embedder.embed_images(uint8_to_unit(images)).cpu().double()


class InceptionFeatures(Features):
    """The FID Inception network from a TorchScript file (called as `net(x, return_features=True)` on float
    images in [0, 255] at 299 px, which is clean-fid's and StyleGAN2-ADA's convention)."""

    def __init__(self, path: Path, batch_size: int = 32):
        if not path.is_file():
            raise UserError(f"--features inception:{path}: no such file (clean-fid's inception-2015-12-05.pt)")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is the file's format
                self.net = torch.jit.load(str(path), map_location="cpu").eval()
            with torch.no_grad():
                out = self.net(torch.zeros(1, 3, INCEPTION_SIZE, INCEPTION_SIZE), return_features=True)
        except Exception as exc:  # not TorchScript, or another network's call signature
            first = first_line(exc)[:160]
            raise UserError(f"--features inception:{path} is not a TorchScript FID Inception network (clean-fid's "
                            f"inception-2015-12-05.pt, called net(x, return_features=True)): {first}") from None
        if tuple(out.shape) != (1, INCEPTION_DIM):
            raise UserError(f"--features inception:{path} gives features of shape {tuple(out.shape)[1:]}, not "
                            f"({INCEPTION_DIM},): not the FID Inception network")
        self.name, self.dim, self.batch_size = f"inception:{path}", INCEPTION_DIM, batch_size
        self.fingerprint = f"inception:{_file_digest(path)}"

    def __call__(self, images: Tensor) -> Tensor:
        with torch.no_grad():
            x = clean_resize(images, INCEPTION_SIZE)
            return torch.cat([self.net(chunk, return_features=True) for chunk in x.split(self.batch_size)]).double()


def clean_resize(images: Tensor, size: int) -> Tensor:
    """uint8 (B, 3, H, W) -> float (B, 3, size, size) in [0, 255]: PIL bicubic on each channel in float, the
    resize clean-fid calls "clean" (no aliasing, the same for real and generated images)."""
    out = np.empty((len(images), 3, size, size), np.float32)
    for i, image in enumerate(images.numpy()):
        for c in range(3):
            channel = Image.fromarray(image[c].astype(np.float32), mode="F")
            out[i, c] = np.asarray(channel.resize((size, size), Image.BICUBIC))
    return torch.from_numpy(out.clip(0, 255))


def load_features(spec: str, own: Callable[[], Any] | None = None) -> Features:
    """`--features`: "own" (the run's embedder, from `own()`), an embedder spec, or "inception:PATH"."""
    if spec == "own":
        if own is None:
            raise UserError("--features own needs a run with an embedder (an embedding run); give --features "
                            "ENCODER_SPEC or inception:PATH")
        embedder = own()
        return EmbedderFeatures(embedder, f"the run's own embedder ({getattr(embedder, 'spec', 'own')})")
    kind, _, rest = spec.partition(":")
    if kind == "inception":
        if not rest:
            raise UserError("--features inception:PATH needs the path of inception-2015-12-05.pt")
        return InceptionFeatures(Path(rest).expanduser())
    from cclddg.encoders import load_embedder

    return EmbedderFeatures(load_embedder(spec), spec)


def _file_digest(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


# ---- the metrics ----------------------------------------------------------------------------------------
def parse_metrics(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    unknown = [m for m in names if m not in METRICS]
    if not names or unknown:
        raise UserError(f"--metrics takes {', '.join(METRICS)} (comma-separated), got {text!r}")
    return names


def check_sizes(metrics: tuple[str, ...], n: int, dim: int) -> None:
    """Refuse, before any sampling, a count the metrics cannot use."""
    if "fid" in metrics and n <= dim:
        raise UserError(f"FID needs more images than the feature width for a full-rank covariance: --n {n} <= "
                        f"{dim}; give --n {dim + 1} or more, or use --metrics kid,pr")
    if "kid" in metrics and n < 2:
        raise UserError("KID needs at least 2 images per set")
    if "pr" in metrics and n <= PR_K:
        raise UserError(f"precision/recall need more than k={PR_K} images per set; give --n {PR_K + 1} or more")
    if "pr" in metrics and n > PR_MAX:
        raise UserError(f"precision/recall hold three N x N distance matrices ({3 * 4 * n * n / 2**30:.0f} GiB at --n "
                        f"{n}); give --n {PR_MAX} or less, or --metrics fid,kid")


def distribution_metrics(real: Tensor, fake: Tensor, metrics: tuple[str, ...] = METRICS) -> dict[str, float]:
    """FID, KID (mean, std over subsets) and precision/recall/density/coverage between two feature sets
    (N, D): the libraries' implementations, fed features through an identity extractor."""
    real, fake = real.double(), fake.double()
    if real.shape[1] != fake.shape[1]:
        raise UserError(f"real features are {real.shape[1]}-d and generated ones {fake.shape[1]}-d: not one extractor")
    out: dict[str, float] = {}
    if "fid" in metrics:
        from torchmetrics.image.fid import FrechetInceptionDistance

        fid = FrechetInceptionDistance(feature=_Given(real.shape[1]), input_img_size=(real.shape[1],))
        fid.update(real, real=True)
        fid.update(fake, real=False)
        out["fid"] = float(fid.compute())
    if "kid" in metrics:
        from torchmetrics.image.kid import KernelInceptionDistance

        size = min(KID_SUBSET, max(2, min(len(real), len(fake)) // 2))  # subsets smaller than the sets: a spread
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its note that it keeps the features: so do we
            kid = KernelInceptionDistance(feature=_Given(real.shape[1]), subset_size=size, subsets=100)
        kid.update(real, real=True)
        kid.update(fake, real=False)
        with torch.random.fork_rng():  # its subsets are drawn from torch's global RNG
            torch.manual_seed(0)
            mean, std = kid.compute()
        out["kid"], out["kid_std"] = float(mean), float(std)
    if "pr" in metrics:
        import joblib
        from prdc import compute_prdc

        with contextlib.redirect_stdout(io.StringIO()), joblib.parallel_config(backend="threading"):
            found = compute_prdc(real.numpy(), fake.numpy(), nearest_k=PR_K)  # (it prints the counts)
        out.update({k: float(v) for k, v in found.items()})
    return out


class _Given(torch.nn.Module):
    """The "feature extractor" of precomputed features: torchmetrics asks its width with a dummy (1, dim) input."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return x.double().reshape(len(x), self.dim)


# ---- real features, cached --------------------------------------------------------------------------------
def _features_path(key: dict[str, Any], cache_dir: Path) -> Path:
    name = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir / f"real-features-{name}.npy"


def load_cached_features(key: dict[str, Any], cache_dir: Path) -> Tensor | None:
    """The real features stored for `key` (source, size, features, N, seed), or None (a damaged file is removed)."""
    path = _features_path(key, cache_dir)
    if path.is_file():
        try:
            return torch.from_numpy(np.load(path))
        except (OSError, ValueError):
            path.unlink(missing_ok=True)  # a damaged cache file is computed again
    return None


def store_cached_features(key: dict[str, Any], features: Tensor, cache_dir: Path) -> None:
    """Store real features for `key`, atomically (a user scores many checkpoints against one reference set)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(_features_path(key, cache_dir)) as tmp, open(tmp, "wb") as f:
        np.save(f, features.numpy())


def cached_real_features(key: dict[str, Any], compute: Callable[[], Tensor], cache_dir: Path) -> Tensor:
    """Real features for `key`: read from cache_dir, or computed and stored."""
    found = load_cached_features(key, cache_dir)
    if found is None:
        found = compute()
        store_cached_features(key, found, cache_dir)
    return found


def quantize(images: Tensor) -> Tensor:
    """Images in [-1, 1] -> uint8 (B, 3, H, W), the pixels a saved sample gets (data.images.tensor_to_array, what
    `cclddg sample` writes): generated images take the real files' path."""
    return torch.from_numpy(tensor_to_array(images)).permute(0, 3, 1, 2)


def batched_features(features: Features, images: Iterable[Tensor]) -> Tensor:
    """Features of uint8 image batches, concatenated."""
    return torch.cat([features(batch) for batch in images])


def features_cache_dir() -> Path:
    """Where real features are cached: beside the embedding caches (~/.cache/cclddg or $CCLDDG_CACHE)."""
    from cclddg.encoders import default_cache_dir

    return Path(default_cache_dir()).expanduser() / "features"
