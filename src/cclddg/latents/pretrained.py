"""Pretrained autoencoders read from local files: latent diffusion's KL-f8 VAE and TAESD.

Nothing is fetched: the KL-f8 architecture ships with the package (`kl_f8_config.json`), and
TAESD and diffusers folders carry their own `config.json`. Torch checkpoints are read with
`torch.load(weights_only=True)`, so no code pickled in a file ever runs. Every state dict is
checked key by key before loading, so a wrong file is a one-line error naming the keys, not a
model with random weights.

KL-f8 sources (`load_kl_f8`):
  - latent diffusion's `model.ckpt` or the unzipped folder holding it (Lightning: `state_dict` with
    `encoder.*`, `decoder.*`, `quant_conv.*`, `post_quant_conv.*`; the training loss's `loss.*` is
    dropped; Lightning's pickled ModelCheckpoint callback is read as an inert stand-in), or a whole
    LDM/Stable Diffusion checkpoint whose VAE keys start with `first_stage_model.`; converted with
    diffusers' own LDM-to-diffusers converter;
  - a diffusers folder (`config.json` + `diffusion_pytorch_model.safetensors`), or a pipeline
    folder with such a `vae/`;
  - a `.safetensors` file with diffusers or LDM keys (told apart by the keys).
A checkpoint file is built with the shipped KL-f8 config unless `config` is given or a diffusers
`config.json` sits beside it (for an autoencoder of another size); a folder uses its own config.json
unless `config` is given. Weights are loaded as float32 whatever their stored dtype.
"""

from __future__ import annotations

import json
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cclddg.errors import UserError
from cclddg.latents.vae import DiffusersVAE
from cclddg.storage import pickled_format, read_json_object

KL_F8_CONFIG = Path(__file__).with_name("kl_f8_config.json")
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin")
LDM_PREFIXES = ("first_stage_model.", "vae.")  # the VAE's keys inside a whole LDM/SD checkpoint
DIFFUSERS_MARKERS = ("down_blocks.", "up_blocks.", "mid_block.")  # only diffusers names contain these

# Lightning bookkeeping that some LDM/SD checkpoints pickle next to the weights (the callback is a
# dict key in old Lightning; numpy scalars hold its scores). They are read as inert stand-ins.
BOOKKEEPING_GLOBALS = frozenset({
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.dtype",
})


def kl_f8_config() -> dict[str, Any]:
    """The diffusers `AutoencoderKL` config of latent diffusion's KL-f8 (ch 128, ch_mult 1,2,4,4, z 4)."""
    return json.loads(KL_F8_CONFIG.read_text())


def load_kl_f8(path: str | Path, config: dict[str, Any] | None = None) -> DiffusersVAE:
    """The KL-f8 VAE from a `model.ckpt`, a `.safetensors` file or a diffusers (pipeline) folder."""
    from diffusers import AutoencoderKL

    path = _existing(path, "kl-f8")
    if path.is_dir():
        if (path / "model.ckpt").is_file() and _weights_file(path) is None:  # an unzipped LDM kl-f8 folder
            path = path / "model.ckpt"
        elif (folder := _model_folder(path)) is not None:
            return DiffusersVAE(_load_folder(folder, AutoencoderKL, config))
        else:
            raise UserError(f"{path} holds neither a diffusers autoencoder (config.json + "
                            f"{WEIGHT_FILES[0]}, or vae/ with them) nor a model.ckpt; give one of those")
    state = _read_state_dict(path)
    cfg = config or _config_beside(path) or kl_f8_config()
    _check_class(cfg, AutoencoderKL, path)
    vae_keys = [k for k in state if k.startswith(LDM_PREFIXES)]
    if vae_keys:  # a whole LDM/SD model: keep its first stage only
        state = {k.split(".", 1)[1]: state[k] for k in vae_keys}
    else:
        state = {k: v for k, v in state.items() if not k.startswith("loss.")}
    if any(marker in k for k in state for marker in DIFFUSERS_MARKERS):
        weights, unused = state, []
    else:
        weights, unused = _convert_ldm(state, cfg, path)
    return DiffusersVAE(_build(AutoencoderKL, cfg, weights, str(path), unused))


def load_taesd(path: str | Path) -> DiffusersVAE:
    """TAESD (`diffusers.AutoencoderTiny`) from a diffusers folder, or a pipeline folder with `vae/`."""
    from diffusers import AutoencoderTiny

    path = _existing(path, "taesd")
    folder = _model_folder(path) if path.is_dir() else None
    if folder is None:
        raise UserError(f"taesd:{path} must be a diffusers AutoencoderTiny folder with config.json and "
                        f"{WEIGHT_FILES[0]} (e.g. a download of madebyollin/taesd)")
    return DiffusersVAE(_load_folder(folder, AutoencoderTiny, None))


# ---- reading files ---------------------------------------------------------------------------------
def _existing(path: str | Path, kind: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"{kind}:{path} does not exist; give the path of a local autoencoder")
    return path


def _model_folder(path: Path) -> Path | None:
    """`path` if it is a diffusers model folder, its `vae/` if it is a pipeline folder, else None."""
    for folder in (path, path / "vae"):
        if (folder / "config.json").is_file():
            return folder
    return None


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, "a diffusers config", "give the folder diffusers' save_pretrained wrote")


def _config_beside(path: Path) -> dict[str, Any] | None:
    beside = path.with_name("config.json")
    return _read_json(beside) if beside.is_file() else None


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    """Tensors by name from a `.safetensors` file or a torch checkpoint (its `state_dict` if it has one)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state: Any = load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for damaged headers
            raise UserError(f"{path} is not a readable .safetensors file: {' '.join(str(e).split())}") from None
    else:
        state = _torch_load(path)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise UserError(f"{path} holds no state dict of named tensors; is it an autoencoder checkpoint?")
    return state


class _Inert:
    """Stands in for a bookkeeping object while unpickling: accepts any arguments and state, runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def _torch_load(path: Path) -> Any:
    """`torch.load` that runs no pickled code; Lightning bookkeeping objects become `_Inert`.

    The zip format lists every global up front; the legacy format names one per failed attempt, so the load is
    retried, allowing one more bookkeeping global each time, until it succeeds or meets code."""
    allowed: list[str] = []
    _check_format(path)
    for _ in range(64):  # far more globals than any checkpoint's bookkeeping
        try:
            with warnings.catch_warnings(), torch.serialization.safe_globals([(_Inert, n) for n in allowed]):
                warnings.simplefilter("ignore")  # torch's advice would print above our one line
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            message = str(e)
        except Exception as e:  # torch raises RuntimeError, EOFError, zipfile errors... for damaged files
            raise UserError(f"{path} is not a readable torch checkpoint: {_load_failure(path, e)}") from None
        try:
            needed = [n for n in torch.serialization.get_unsafe_globals_in_checkpoint(path) if n not in allowed]
        except Exception:  # the legacy (pre-zip) format cannot be scanned; the error names the next global
            needed = [n for n in re.findall(r"GLOBAL (\S+) (?:was not an allowed global|whose module)", message)
                      if n not in allowed]
        if not needed:
            raise UserError(f"{path} is not a readable torch checkpoint: {_unpickler_reason(message)}")
        if any(name.startswith("torch.") and not _resolves(name) for name in needed):  # a name cut by truncation
            raise UserError(f"{path} is not a readable torch checkpoint: it ends early (truncated or damaged?)")
        code = [name for name in needed if name not in BOOKKEEPING_GLOBALS]
        if code:
            raise UserError(f"{path} cannot be read safely: unpickling it would run code ({_few(code)}); "
                            "convert its state_dict to .safetensors where you trust the file")
        allowed += needed
    raise UserError(f"{path} cannot be read safely: it names too many globals for a weights file")


def _check_format(path: Path) -> None:
    """A file that is no torch.save checkpoint at all (text, a plain pickle.dump) is named as what it is."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise UserError(f"could not read {path}: {exc.strerror or exc}") from None
    if not head:
        raise UserError(f"{path} is not a readable torch checkpoint: the file is empty (0 bytes)")
    kind = pickled_format(head)
    if kind == "zip" or kind == "pickle 2":  # torch.save's format, or its legacy one
        return
    if kind is None:
        raise UserError(f"{path} is not a torch checkpoint (neither torch.save's zip nor a pickle: it begins "
                        f"{head!r}); give the .ckpt/.pt file the model was saved as, or a .safetensors file")
    raise UserError(f"{path} is a plain Python pickle (protocol {head[1]}), not a torch.save checkpoint; cclddg "
                    "never unpickles one (it could run code): save the weights with torch.save or as .safetensors")


def _resolves(name: str) -> bool:
    """Whether a dotted global names something torch has (torch's own globals are loaded by weights_only)."""
    import importlib

    module, _, attr = name.rpartition(".")
    try:
        return hasattr(importlib.import_module(module), attr)
    except ImportError:
        return False


def _load_failure(path: Path, error: Exception) -> str:
    """Why a checkpoint could not be read, in one whole sentence (torch's messages run on, or are empty)."""
    if path.is_file() and path.stat().st_size == 0:
        return "the file is empty (0 bytes)"
    text = " ".join(str(error).split())
    sentence = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0] if text else ""
    return f"{sentence or type(error).__name__} (truncated or damaged?)"


def _unpickler_reason(message: str) -> str:
    """The one informative sentence of torch's long weights_only error, without its advice to turn the safety off."""
    reason = message.partition("WeightsUnpickler error:")[2].partition("Check the documentation")[0]
    text = " ".join((reason or message).split())
    sentence = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0]
    if "weights_only" in sentence:  # torch's advice, not the reason
        return "the pickle holds something other than tensors and plain values"
    return sentence


# ---- converting and loading ------------------------------------------------------------------------
def _convert_ldm(state: dict[str, Tensor], config: dict[str, Any], path: Path) -> tuple[dict[str, Tensor], list[str]]:
    """LDM-named weights -> diffusers names with diffusers' converter; also the LDM keys it did not use.

    The converter silently skips keys it does not know, so it is first run on shape-only meta
    tensors to learn which input key each output came from (outputs are the inputs or views of them).
    """
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    probe = {k: torch.empty(v.shape, device="meta") for k, v in state.items()}
    source = {id(t): k for k, t in probe.items()}
    try:
        used = {source.get(id(t if t._base is None else t._base))
                for t in convert_ldm_vae_checkpoint(probe, config).values()}
        weights = convert_ldm_vae_checkpoint(dict(state), config)
    except (KeyError, IndexError, TypeError, AttributeError) as e:
        raise UserError(f"{path}: diffusers cannot convert this checkpoint ({type(e).__name__}: {e}); "
                        "is it a KL autoencoder of latent diffusion?") from None
    return weights, [k for k in state if k not in used]


def _build(cls: type, config: dict[str, Any], weights: dict[str, Tensor], source: str,
           unused: list[str]) -> nn.Module:
    """`cls(config)` holding exactly `weights`: any missing, unexpected or misshapen key is a UserError.

    The model is built on the meta device and the weights assigned, so no time goes into a random
    initialisation that would be overwritten (the real KL-f8 has 84M parameters).
    """
    hint = ("is this a KL-f8 checkpoint? for an autoencoder of another size put its diffusers config.json "
            "beside the file" if cls.__name__ == "AutoencoderKL" else "is this a TAESD (AutoencoderTiny) folder?")
    try:
        with torch.device("meta"):
            model = cls.from_config(config)
    except Exception as e:
        raise UserError(f"{source}: cannot build a {cls.__name__} from its config ({e})") from None
    expected = model.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = unused + [k for k in weights if k not in expected]
    if missing or unexpected:
        parts = [f"{_count(missing, 'key')} missing ({_few(missing)})"] if missing else []
        parts += [f"{len(unexpected)} unexpected ({_few(unexpected)})"] if unexpected else []
        raise UserError(f"{source}: {' and '.join(parts)}; {hint}")
    wrong = [f"{k} {tuple(weights[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if weights[k].shape != v.shape]
    if wrong:
        raise UserError(f"{source}: {_count(wrong, 'weight')} of another shape than the model's "
                        f"({_few(wrong)}); {hint}")
    model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True, assign=True)
    return model


def _load_folder(folder: Path, cls: type, config: dict[str, Any] | None) -> nn.Module:
    """A diffusers model folder (`config.json` + weights) as `cls`, checked like a checkpoint."""
    cfg = config or _read_json(folder / "config.json")
    _check_class(cfg, cls, folder)
    weights_file = _weights_file(folder)
    if weights_file is None:
        raise UserError(f"{folder} has config.json but no weights ({WEIGHT_FILES[0]}); "
                        "copy the weights file next to config.json")
    return _build(cls, cfg, _read_state_dict(weights_file), str(weights_file), [])


def _count(items: list[str], noun: str) -> str:
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"


def _check_class(config: dict[str, Any], cls: type, path: Path) -> None:
    """A config written for another diffusers class would build a wrong model: say which flag fits."""
    named = config.get("_class_name")
    if named and named != cls.__name__:
        kind = {"AutoencoderKL": "kl-f8", "AutoencoderTiny": "taesd"}.get(named)
        use = f"; use --autoencoder {kind}:{path}" if kind else ""
        raise UserError(f"the config.json of {path} describes a {named}, not a {cls.__name__}{use}")


def _weights_file(folder: Path) -> Path | None:
    return next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)


def _few(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (", ..." if len(items) > n else "")
