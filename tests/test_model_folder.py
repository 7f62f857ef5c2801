"""A trained model as one folder (`cclddg export`), CCLDDGPipeline, and the CLI on such a folder, end to end on
tiny models trained here."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cclddg import CCLDDGPipeline
from cclddg.cli import main
from cclddg.errors import UserError
from cclddg.model_folder import export_run

PROMPT = "a red circle in the top left"


def test_the_folder_has_diffusers_layout_no_pickles_and_no_paths(tiny_runs, tiny_models):
    folder = tiny_models["text"]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "CCLDDGPipeline"
    assert index["unet"] == ["cclddg.models.unet", "UNet"] and index["scheduler"] == ["cclddg.scheduler", "CCLDDGScheduler"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"] and index["embedder"] == ["cclddg.encoders.component",
                                                                                    "EmbedderModel"]
    assert index["prior"] == ["cclddg.priors.flow", "FlowPrior"] and (folder / "prior" / "config.json").is_file()
    assert index["cond"] == "embedding" and index["text_prior"] == "flow" and index["guidance_scale"] == 2.0
    run_config = json.loads((tiny_runs / "text" / "config.json").read_text())
    vae_config = json.loads((folder / "vae" / "config.json").read_text())
    assert vae_config["scaling_factor"] == run_config["latent_scale"]  # the latent scale travels with the autoencoder
    assert (folder / "embedding_stats.safetensors").is_file()
    assert (folder / "embedder" / "sentence" / "model.safetensors").is_file()  # the frozen text encoder too
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".pt", ".pkl", ".bin", ".ckpt")]
    for path in files:
        if path.suffix == ".json":
            text = path.read_text()
            assert str(tiny_runs) not in text and "/tmp" not in text, path
    labels = json.loads((tiny_models["labels"] / "model_index.json").read_text())
    assert labels["cond"] == "labels" and labels["vae"] == [None, None] and labels["embedder"] == [None, None]
    assert labels["prior"] == [None, None]


def test_a_moved_folder_samples_the_runs_images_bit_for_bit(tiny_runs, tiny_models):
    pipe = CCLDDGPipeline.from_pretrained(tiny_models["text"])
    got = pipe(prompt=[PROMPT, "a blue square"], num_images_per_prompt=3, guidance_scale=2.0, output_type="pt",
               generator=torch.Generator().manual_seed(5)).images
    run = CCLDDGPipeline.from_run(tiny_runs / "text")
    want = run(prompt=[PROMPT, "a blue square"], num_images_per_prompt=3, guidance_scale=2.0, output_type="pt",
               generator=torch.Generator().manual_seed(5)).images
    assert got.shape == (6, 3, 16, 16) and torch.equal(got, want)
    again = pipe(prompt=[PROMPT, "a blue square"], num_images_per_prompt=3, guidance_scale=2.0, output_type="pt",
                 generator=torch.Generator().manual_seed(5)).images
    other = pipe(prompt=[PROMPT, "a blue square"], num_images_per_prompt=3, guidance_scale=2.0, output_type="pt",
                 generator=torch.Generator().manual_seed(6)).images
    assert torch.equal(got, again) and not torch.equal(got, other)


def test_the_cli_samples_a_folder_as_it_samples_the_run(tiny_runs, tiny_models, tmp_path):
    for name, request in (("text", ["--prompt", PROMPT, "--cfg", "2"]), ("labels", ["--attrs", "color=red", "--cfg", "2"])):
        assert main(["sample", "--checkpoint", str(tiny_runs / name), *request, "--n", "4", "-o", str(tmp_path / "run.png"),
                     "--no_progress"]) == 0
        assert main(["sample", "--checkpoint", str(tiny_models[name]), *request, "--n", "4",
                     "-o", str(tmp_path / "folder.png"), "--no_progress"]) == 0
        run, folder = (np.asarray(Image.open(tmp_path / f)) for f in ("run.png", "folder.png"))
        assert run.shape == folder.shape and np.array_equal(run, folder), name


def test_output_types_image_prompts_and_labels(tiny_models):
    pipe = CCLDDGPipeline.from_pretrained(tiny_models["text"])
    seed = torch.Generator().manual_seed(0)
    pil = pipe(prompt=PROMPT, num_images_per_prompt=2, generator=seed).images
    assert len(pil) == 2 and all(isinstance(i, Image.Image) and i.size == (16, 16) for i in pil)
    array = pipe(prompt=PROMPT, negative_prompt="a blue square", output_type="np").images
    assert array.shape == (1, 16, 16, 3) and 0 <= array.min() and array.max() <= 1
    varied = pipe(image=pil[0], image_weight=1.0, num_images_per_prompt=2, output_type="pt").images
    mixed = pipe(prompt=PROMPT, image=[pil[0]], image_weight=0.5, output_type="pt").images
    assert varied.shape == (2, 3, 16, 16) and mixed.shape == (1, 3, 16, 16)
    labels = CCLDDGPipeline.from_pretrained(tiny_models["labels"])
    grid = labels(attrs=["color=red,shape=circle", {"color": "blue"}], num_images_per_prompt=2, output_type="pt").images
    assert grid.shape == (4, 3, 16, 16)
    assert labels(output_type="pt").images.shape == (1, 3, 16, 16)  # no request: the unconditional null label


def test_eval_scores_a_folder_as_it_scores_the_run(tiny_runs, tiny_models, tmp_path):
    reports = {}
    for where in ("run", "folder"):
        path = tiny_runs / "labels" if where == "run" else tiny_models["labels"]
        assert main(["eval", "--checkpoint", str(path), "--n", "8", "--cfg", "2", "-o", str(tmp_path / f"{where}.json")]) == 0
        reports[where] = json.loads((tmp_path / f"{where}.json").read_text())
    assert {k: v for k, v in reports["run"].items() if k != "checkpoint"} == \
        {k: v for k, v in reports["folder"].items() if k != "checkpoint"}


@pytest.mark.filterwarnings("ignore:`torch_dtype` is deprecated")  # diffusers >= 0.36 also takes dtype=
def test_half_precision_and_devices(tiny_models):
    pipe = CCLDDGPipeline.from_pretrained(tiny_models["text"], torch_dtype=torch.bfloat16).to("cpu")
    assert pipe.unet.dtype == torch.bfloat16 and pipe.vae.dtype == torch.bfloat16
    images = pipe(prompt=PROMPT, num_images_per_prompt=2, output_type="pt").images
    assert images.dtype == torch.float32 and torch.isfinite(images).all()


@pytest.mark.parametrize("kwargs, message", [
    (dict(), "give a prompt or an image"),
    (dict(prompt=PROMPT, num_inference_steps=10), "samples in the 4 steps"),
    (dict(prompt=PROMPT, output_type="latent"), "output_type"),
    (dict(prompt=PROMPT, guidance_scale=float("nan")), "guidance_scale"),
    (dict(prompt=PROMPT, num_images_per_prompt=0), "num_images_per_prompt"),
    (dict(prompt=PROMPT, attrs="color=red"), "attrs= .* is not for it; give a prompt or an image"),
    (dict(prompt="\x00\x01"), "prompt"),
    (dict(image=3), "an image prompt is"),
])
def test_bad_calls_are_one_line(tiny_models, kwargs, message):
    pipe = CCLDDGPipeline.from_pretrained(tiny_models["text"])
    with pytest.raises(UserError, match=message):
        pipe(**kwargs)


def test_export_refuses_a_used_folder_and_leaves_nothing_half_made(tiny_runs, tmp_path):
    used = tmp_path / "used"
    used.mkdir()
    (used / "mine.txt").write_text("keep")
    assert main(["export", str(tiny_runs / "labels"), str(used)]) == 2
    assert [p.name for p in used.iterdir()] == ["mine.txt"]
    with pytest.raises(UserError, match="does not exist"):
        export_run(tmp_path / "nothing", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))
    with pytest.raises(UserError, match="not a cclddg model folder"):
        CCLDDGPipeline.from_pretrained(tiny_runs / "labels")


def test_an_export_killed_half_way_leaves_nothing_the_next_one_keeps(tiny_runs, tmp_path):
    """SIGKILL while the folder is written: the hidden temporary folder is removed by the next export of OUT, and
    the model folder gets the user's usual permissions (not mkdtemp's private 0700)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "model"
    proc = subprocess.Popen([sys.executable, "-m", "cclddg", "export", str(tiny_runs / "text"), str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not any(p.is_file() for p in tmp_path.glob(".model.tmp-*/**/*")):
        assert proc.poll() is None and time.monotonic() < deadline, "the export did not start writing"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert list(tmp_path.glob(".model.tmp-*")) and not out.exists()
    assert main(["export", str(tiny_runs / "text"), str(out)]) == 0
    assert not list(tmp_path.glob(".model.tmp-*"))
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask
