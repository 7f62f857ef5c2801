"""Pretrained autoencoders from local files: KL-f8 (LDM ckpt, diffusers folder, safetensors) and TAESD.

Tiny models stand in for the real ones: each is built here, saved in one of the accepted formats
(the LDM format by inverting diffusers' key mapping), loaded back and compared with the original.
"""

from __future__ import annotations

import json
import re
import sys
import types
import warnings

import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderTiny
from diffusers.loaders.single_file_utils import (
    convert_ldm_vae_checkpoint,
    create_vae_diffusers_config_from_ldm,
)
from safetensors.torch import save_file

from cclddg.errors import UserError
from cclddg.latents import load_latent_space, parse_autoencoder_spec
from cclddg.latents.pretrained import kl_f8_config, load_kl_f8, load_taesd

TINY_KL = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": [8, 16],
           "layers_per_block": 1, "down_block_types": ["DownEncoderBlock2D"] * 2,
           "up_block_types": ["UpDecoderBlock2D"] * 2, "act_fn": "silu", "norm_num_groups": 4, "sample_size": 16}
TINY_TAESD = {"encoder_block_out_channels": [8, 8, 8], "decoder_block_out_channels": [8, 8, 8],
              "num_encoder_blocks": [1, 1, 1], "num_decoder_blocks": [1, 1, 1], "latent_channels": 4}
RAN: list[str] = []  # what a malicious pickle would have done


def tiny_kl(**changes) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(**{**TINY_KL, **changes}).eval()


def to_ldm(state: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL names -> latent diffusion names (the inverse of diffusers' converter)."""
    out = {}
    for key, value in state.items():
        k = re.sub(r"decoder\.up_blocks\.(\d+)\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.", key)
        k = re.sub(r"down_blocks\.(\d+)\.", r"down.\1.", k)
        k = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", k)
        k = k.replace("mid_block.attentions.0.", "mid.attn_1.")
        if ".attn_1." in k:
            for new, old in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"),
                             ("to_out.0", "proj_out")):
                k = k.replace(f".attn_1.{new}.", f".attn_1.{old}.")
            if value.ndim == 2:  # LDM's attention projections are 1x1 convolutions
                value = value[:, :, None, None]
        k = (k.replace("downsamplers.0.", "downsample.").replace("upsamplers.0.", "upsample.")
             .replace(".resnets.", ".block.").replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out"))
        out[k] = value.clone().contiguous()
    return out


def lightning_ckpt(model: AutoencoderKL, **extra) -> dict:
    """What latent diffusion's training saves: LDM names plus the loss's LPIPS/discriminator weights."""
    state = to_ldm(model.state_dict(), len(model.config.block_out_channels))
    state["loss.logvar"] = torch.zeros(())
    state["loss.discriminator.main.0.weight"] = torch.randn(4, 3, 4, 4)
    state["loss.perceptual_loss.net.slice1.0.weight"] = torch.randn(4, 3, 3, 3)
    return {"state_dict": state, "global_step": 3, **extra}


def save_ckpt(tmp_path, model: AutoencoderKL, name: str = "model.ckpt", with_config: bool = True, **extra):
    path = tmp_path / name
    torch.save(lightning_ckpt(model, **extra), path)
    if with_config:
        (tmp_path / "config.json").write_text(json.dumps(dict(model.config)))
    return path


def images(n: int = 2, size: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


def assert_same_kl(space, model: AutoencoderKL) -> None:
    x = images()
    with torch.no_grad():
        mean = model.encode(x).latent_dist.mean
        decoded = model.decode(mean).sample.clamp(-1, 1)
    assert space.factor == 2 and space.channels == 4
    torch.testing.assert_close(space.encode(x), mean * space.scale, rtol=0, atol=1e-5)
    torch.testing.assert_close(space.decode(mean * space.scale), decoded, rtol=0, atol=1e-5)


# ---- KL-f8 ---------------------------------------------------------------------------------------------
def test_ldm_ckpt_converts_to_the_same_model(tmp_path):
    model = tiny_kl()
    space = load_kl_f8(save_ckpt(tmp_path, model))
    assert list(space.vae.config.block_out_channels) == [8, 16]
    assert_same_kl(space, model)


def test_ldm_ckpt_with_config_argument_and_folder_holding_model_ckpt(tmp_path):
    model = tiny_kl()
    save_ckpt(tmp_path, model, with_config=False)
    assert_same_kl(load_kl_f8(tmp_path / "model.ckpt", config=dict(TINY_KL)), model)
    (tmp_path / "config.json").write_text(json.dumps(TINY_KL))
    assert_same_kl(load_kl_f8(tmp_path), model)  # an unzipped kl-f8 folder: model.ckpt (+ config)


def test_whole_ldm_model_checkpoint_uses_first_stage_model_keys(tmp_path):
    model = tiny_kl()
    ckpt = lightning_ckpt(model)
    state = {f"first_stage_model.{k}": v for k, v in ckpt["state_dict"].items() if not k.startswith("loss.")}
    state["model.diffusion_model.input_blocks.0.0.weight"] = torch.randn(8, 4, 3, 3)
    state["cond_stage_model.transformer.x"] = torch.randn(3)
    torch.save({"state_dict": state}, tmp_path / "sd.ckpt")
    assert_same_kl(load_kl_f8(tmp_path / "sd.ckpt", config=TINY_KL), model)


def test_latent_space_spec_end_to_end(tmp_path):
    model = tiny_kl()
    path = save_ckpt(tmp_path, model)
    space = load_latent_space(f"kl-f8:{path}", scale=0.5)
    assert space.spec == f"kl-f8:{path}" and space.scale == 0.5 and space.fingerprint
    assert space.factor == 2 ** (len(TINY_KL["block_out_channels"]) - 1) and space.channels == 4
    assert space.latent_shape(16) == (4, 8, 8)
    assert_same_kl(space, model)


def test_diffusers_folder_and_pipeline_folder(tmp_path):
    model = tiny_kl()
    model.save_pretrained(tmp_path / "vae")
    (tmp_path / "model_index.json").write_text("{}")
    assert_same_kl(load_kl_f8(tmp_path / "vae"), model)
    assert_same_kl(load_latent_space(f"kl-f8:{tmp_path}"), model)


def test_safetensors_with_diffusers_or_ldm_keys(tmp_path):
    model = tiny_kl()
    (tmp_path / "config.json").write_text(json.dumps(TINY_KL))
    save_file({k: v.clone().contiguous() for k, v in model.state_dict().items()}, tmp_path / "diffusers.safetensors")
    save_file(to_ldm(model.state_dict(), 2), tmp_path / "ldm.safetensors")
    assert_same_kl(load_kl_f8(tmp_path / "diffusers.safetensors"), model)
    assert_same_kl(load_kl_f8(tmp_path / "ldm.safetensors"), model)
    save_file({k: v.half() for k, v in model.state_dict().items()}, tmp_path / "fp16.safetensors")
    assert {p.dtype for p in load_kl_f8(tmp_path / "fp16.safetensors").parameters()} == {torch.float32}


def test_missing_key_is_named(tmp_path):
    ckpt = lightning_ckpt(tiny_kl())
    del ckpt["state_dict"]["decoder.conv_out.weight"]
    torch.save(ckpt, tmp_path / "model.ckpt")
    with pytest.raises(UserError, match=r"1 key missing \(decoder\.conv_out\.weight\); is this a KL-f8"):
        load_kl_f8(tmp_path / "model.ckpt", config=TINY_KL)


def test_unexpected_key_is_named_but_loss_keys_are_dropped(tmp_path):
    ckpt = lightning_ckpt(tiny_kl())
    ckpt["state_dict"]["encoder.extra.weight"] = torch.zeros(3)
    torch.save(ckpt, tmp_path / "model.ckpt")
    with pytest.raises(UserError, match=r"1 unexpected \(encoder\.extra\.weight\)") as err:
        load_kl_f8(tmp_path / "model.ckpt", config=TINY_KL)
    assert "loss." not in str(err.value) and "\n" not in str(err.value)


def test_checkpoint_of_another_architecture(tmp_path):
    path = save_ckpt(tmp_path, tiny_kl(latent_channels=2), with_config=False)
    with pytest.raises(UserError, match=r"weights? of another shape .*encoder\.conv_out\.weight \(4, 16, 3, 3\) "
                                        r"vs \(8, 16, 3, 3\)"):
        load_kl_f8(path, config=TINY_KL)
    with pytest.raises(UserError, match=r"keys missing .*is this a KL-f8 checkpoint"):
        load_kl_f8(path)  # the shipped KL-f8 config: 4 levels, 128+ channels


def record(message: str) -> None:
    RAN.append(message)


class Payload:
    """Unpickling it calls `record`: stands for any code a malicious checkpoint would run."""

    def __reduce__(self):
        return record, ("unpickled code ran",)


@pytest.mark.parametrize("zip_format", [True, False])
def test_pickled_code_is_refused_and_never_runs(tmp_path, zip_format):
    path = tmp_path / "model.ckpt"
    torch.save(lightning_ckpt(tiny_kl(), payload=Payload()), path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(UserError, match=r"cannot be read safely: unpickling it would run code \(.*record\)"):
        load_kl_f8(path, config=TINY_KL)
    assert RAN == []


def test_lightning_bookkeeping_is_read_inert(tmp_path, monkeypatch):
    """Old Lightning pickles its ModelCheckpoint callback (even as a dict key) beside the weights."""
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    callback = type("ModelCheckpoint", (), {"__module__": names[-1], "__init__": lambda self: RAN.append("init")})
    sys.modules[names[-1]].ModelCheckpoint = callback
    obj = callback.__new__(callback)
    obj.best_model_path = "x.ckpt"
    model = tiny_kl()
    path = save_ckpt(tmp_path, model, callbacks={callback: {"best_model_score": 0.5}}, checkpoint_callback=obj)
    monkeypatch.delitem(sys.modules, names[-1])  # the loader must not need the class
    assert_same_kl(load_kl_f8(path), model)
    assert RAN == []


def test_shipped_kl_f8_config_matches_ldm_and_the_converter():
    cfg = kl_f8_config()
    # latent diffusion's models/first_stage_models/kl-f8/config.yaml, as diffusers reads it
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    original = {"model": {"params": {"first_stage_config": {"params": {"embed_dim": 4, "ddconfig": ddconfig}}}}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        derived = create_vae_diffusers_config_from_ldm(original, {}, image_size=256)
    for key, value in derived.items():
        assert cfg[key] == value, key
    assert cfg["act_fn"] == "silu" and cfg["norm_num_groups"] == 32
    with torch.device("meta"):
        model = AutoencoderKL.from_config(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    converted = convert_ldm_vae_checkpoint(to_ldm(model.state_dict(), 4), cfg)
    assert {k: v.shape for k, v in converted.items()} == expected
    assert sum(v.numel() for v in model.parameters()) == 83_653_863


def test_bad_files_and_folders(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_kl_f8(tmp_path / "nope.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="is not a torch checkpoint .neither torch.save.s zip nor a pickle"):
        load_kl_f8(tmp_path / "junk.ckpt")
    torch.save({"state_dict": {"a": 1}}, tmp_path / "odd.ckpt")
    with pytest.raises(UserError, match="no state dict of named tensors"):
        load_kl_f8(tmp_path / "odd.ckpt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither a diffusers autoencoder"):
        load_kl_f8(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text(json.dumps(TINY_KL))
    with pytest.raises(UserError, match="has config.json but no weights"):
        load_kl_f8(tmp_path / "empty")


# ---- TAESD -------------------------------------------------------------------------------------------
def tiny_taesd() -> AutoencoderTiny:
    torch.manual_seed(0)
    return AutoencoderTiny(**TINY_TAESD).eval()


def test_taesd_folder_through_the_spec(tmp_path):
    model = tiny_taesd()
    model.save_pretrained(tmp_path / "taesd")
    space = load_latent_space(f"taesd:{tmp_path / 'taesd'}", scale=2.0)
    assert space.factor == 4 and space.channels == 4
    x = images()
    with torch.no_grad():
        raw = model.encode(x).latents  # the encoder maps [-1, 1] to TAESD's [0, 1] itself
        decoded = model.decode(raw).sample.clamp(-1, 1)
    assert raw.shape == (2, 4, 4, 4)
    torch.testing.assert_close(space.encode(x), raw * 2.0, rtol=0, atol=1e-5)
    torch.testing.assert_close(space.decode(raw * 2.0), decoded, rtol=0, atol=1e-5)


def test_taesd_errors(tmp_path):
    model = tiny_taesd()
    model.save_pretrained(tmp_path / "taesd")
    tiny_kl().save_pretrained(tmp_path / "kl")
    with pytest.raises(UserError, match="must be a diffusers AutoencoderTiny folder"):
        load_taesd(tmp_path / "taesd" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(UserError, match=r"describes a AutoencoderKL, not a AutoencoderTiny; use --autoencoder kl-f8:"):
        load_taesd(tmp_path / "kl")
    with pytest.raises(UserError, match="use --autoencoder taesd:"):
        load_kl_f8(tmp_path / "taesd")
    with pytest.raises(UserError, match="use --autoencoder taesd:"):
        load_kl_f8(tmp_path / "taesd" / "diffusion_pytorch_model.safetensors")
    (tmp_path / "taesd" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(UserError, match="has config.json but no weights"):
        load_taesd(tmp_path / "taesd")
    (tmp_path / "taesd" / "config.json").unlink()
    with pytest.raises(UserError, match="must be a diffusers AutoencoderTiny folder with config.json"):
        load_taesd(tmp_path / "taesd")


# ---- specs ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["kl-f8", "kl-f8:", "vqgan:x", "pixels:x", ":x", "taesd"])
def test_bad_specs(spec):
    with pytest.raises(UserError, match="is not valid"):
        parse_autoencoder_spec(spec)


def test_nonexistent_path(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_latent_space(f"kl-f8:{tmp_path / 'missing.ckpt'}")
    with pytest.raises(UserError, match="does not exist"):
        load_latent_space(f"taesd:{tmp_path / 'missing'}")


class _Code:
    def __reduce__(self):
        import os

        return (os.system, ("echo this must never run",))


@pytest.mark.parametrize("write,words", [
    (lambda p: torch.save({"state_dict": _Code()}, p, _use_new_zipfile_serialization=False), "would run code"),
    (lambda p: torch.save({"state_dict": _Code()}, p), "would run code"),
    (lambda p: p.write_bytes(__import__("pickle").dumps({"state_dict": {"a": 1}}, protocol=4)), "plain Python pickle"),
    (lambda p: p.write_text("a text file, not weights\n"), "neither torch.save's zip nor a pickle"),
])
def test_a_checkpoint_that_is_not_weights_says_what_it_is(tmp_path, capfd, write, words):
    path = tmp_path / "model.ckpt"
    write(path)
    with pytest.raises(UserError, match=words):
        load_kl_f8(path)
    assert "this must never run" not in capfd.readouterr().out
