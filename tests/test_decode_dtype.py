"""Decoding in bfloat16 where the CPU computes it natively: the decoder alone is cast (encoding, and so every cache,
stays float32), images come back float32 and near float32's; `cclddg sample` and the web page decode in bf16 by
default only on such a CPU, and the library (`pipeline.sample`, `CCLDDGPipeline`, evaluations) in float32 unless
told."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from cclddg.cli import main
from cclddg.cpu import fast_decode_dtype, native_bf16
from cclddg.data.sources import open_dataset
from cclddg.latents import load_latent_space
from cclddg.model_folder import CCLDDGPipeline
from cclddg.serve import load_pipeline


def psnr(a: torch.Tensor, b: torch.Tensor, peak: float = 2.0) -> float:
    mse = (a.double() - b.double()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * np.log10(peak**2 / mse)


def test_a_space_decoding_in_bf16_casts_only_its_decoder_and_stays_near_float32(tiny_runs):
    spec = f"own:{tiny_runs / 'ae'}"
    fp32, bf16 = load_latent_space(spec), load_latent_space(spec, decode_dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.vae.decoder.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in bf16.vae.encoder.parameters()} == {torch.float32}
    images = open_dataset("shapes:16", 16, seed=0, length=8).get_batch(range(8))[0]
    latents = fp32.encode(images)
    assert torch.equal(bf16.encode(images), latents)  # caches encoded by either are the same
    a, b = fp32.decode(latents), bf16.decode(latents)
    assert b.dtype == torch.float32 and b.shape == a.shape
    assert not torch.equal(a, b)  # it ran in bf16
    assert psnr(b, a) > 35


def test_the_default_decode_dtype_is_bf16_only_on_a_cpu_with_native_bf16():
    assert fast_decode_dtype("cpu") == (torch.bfloat16 if native_bf16() else torch.float32)
    assert fast_decode_dtype("cuda") == torch.float32  # a GPU user picks the pipeline's torch_dtype


def sampled(run, tmp_path, *flags: str) -> np.ndarray:
    out = tmp_path / f"{'-'.join(flags) or 'default'}.png"
    assert main(["sample", "--checkpoint", str(run), "--prompt", "a red circle", "--n", "4", "-o", str(out),
                 "--no_progress", *flags]) == 0
    return np.asarray(Image.open(out), dtype=np.float64)


def test_cclddg_sample_decodes_in_the_dtype_asked_and_auto_is_the_fast_one(tiny_runs, tmp_path):
    run = tiny_runs / "text"
    fp32, bf16 = sampled(run, tmp_path, "--decode_dtype", "float32"), sampled(run, tmp_path, "--decode_dtype",
                                                                               "bfloat16")
    auto = sampled(run, tmp_path)
    assert np.array_equal(auto, bf16 if fast_decode_dtype("cpu") == torch.bfloat16 else fp32)
    assert psnr(torch.from_numpy(bf16), torch.from_numpy(fp32), peak=255.0) > 30


def test_the_web_page_loads_its_pipeline_decoding_in_the_fast_dtype_and_python_stays_float32(tiny_models):
    assert {p.dtype for p in load_pipeline(tiny_models["text"]).vae.decoder.parameters()} == {fast_decode_dtype("cpu")}
    plain = CCLDDGPipeline.from_pretrained(tiny_models["text"])
    assert {p.dtype for p in plain.vae.decoder.parameters()} == {torch.float32}  # diffusers' default: as saved
    ask = dict(prompt="a red circle", num_images_per_prompt=2, output_type="pt")
    a = plain(generator=torch.Generator().manual_seed(1), **ask).images
    served = load_pipeline(tiny_models["text"], torch.bfloat16)  # as on a CPU with native bf16, on any CPU
    assert {p.dtype for p in served.vae.decoder.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in served.vae.post_quant_conv.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in served.vae.encoder.parameters()} == {torch.float32}
    b = served(generator=torch.Generator().manual_seed(1), **ask).images
    assert not torch.equal(a, b) and psnr(a, b, peak=1.0) > 35


def test_library_sampling_and_evaluation_decode_in_float32_unless_told(tiny_runs):
    from cclddg.pipeline import load_generator, run_latent_space, sample

    model, cfg = load_generator(tiny_runs / "text")
    cond = torch.zeros(2, model.config.cond_dim)
    a = sample(model, cfg, 2, cond=cond, rng=torch.Generator().manual_seed(0))
    fp32 = run_latent_space(cfg.autoencoder, cfg.latent_scale, "cpu", torch.float32)
    b = sample(model, cfg, 2, cond=cond, rng=torch.Generator().manual_seed(0), space=fp32)
    assert torch.equal(a, b)  # the default is float32, whatever this CPU computes natively
    c = sample(model, cfg, 2, cond=cond, rng=torch.Generator().manual_seed(0), decode_dtype=torch.bfloat16)
    assert not torch.equal(a, c) and psnr(a, c) > 35
