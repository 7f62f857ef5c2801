"""`cclddg serve`: the page in a real headless Chromium (Debian's chromium, driven by playwright) against the
server the command starts on a tiny exported model."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from cclddg.data.images import make_grid
from cclddg.serve import load_pipeline

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if not CHROMIUM and not os.environ.get("CI"):  # CI installs it (.ci/run): there the test must run
    pytest.skip("needs Debian's chromium (apt-get install chromium)", allow_module_level=True)
sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright

PROMPT = "a red circle in the top left"


@pytest.fixture(scope="module")
def server(tiny_models):
    """`cclddg serve MODEL --port 0` in its own process; yields its URL."""
    process = subprocess.Popen([sys.executable, "-m", "cclddg", "serve", str(tiny_models["text"]), "--port", "0",
                                "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    line = process.stdout.readline()
    assert " on http://127.0.0.1:" in line, line + process.stderr.read()
    yield line.split(" on ")[1].split()[0]
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def page(server):
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        offline = []
        page.on("request", lambda r: offline.append(r.url) if not r.url.startswith((server, "data:")) else None)
        page.goto(server)
        page.wait_for_selector("body[data-ready=true]")
        yield page
        assert offline == []  # nothing fetched from anywhere but the server
        browser.close()


def generate(page) -> tuple[str, str]:
    """Click Generate; (the grid's data URL or '', the error shown or '')."""
    before = page.get_attribute("#result", "src") or ""
    page.evaluate("document.getElementById('error').textContent = ''")
    page.click("#generate")
    page.wait_for_function("!document.getElementById('generate').disabled")
    src = page.get_attribute("#result", "src") or ""
    return (src if src != before else ""), page.text_content("#error")


def decode(src: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))


def test_a_prompt_typed_in_the_page_gives_the_pipelines_grid(page, tiny_models):
    page.fill("#prompts", f"{PROMPT}\na blue square")
    page.fill("#seed", "3")
    page.fill("#n", "2")
    page.fill("#guidance", "2")
    src, error = generate(page)
    assert error == "" and src.startswith("data:image/png;base64,")
    grid = decode(src)
    pipe = load_pipeline(tiny_models["text"])  # as the server loads it (its decoder in bf16 where that is native)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the server's (--threads 1): another thread count may round a pixel differently
    try:
        images = pipe(prompt=[PROMPT, "a blue square"], num_images_per_prompt=2, guidance_scale=2.0,
                      output_type="pt", generator=torch.Generator().manual_seed(3)).images
    finally:
        torch.set_num_threads(threads)
    want = make_grid(images * 2 - 1, nrow=2)
    assert grid.size == want.size and np.array_equal(np.asarray(grid.convert("RGB")), np.asarray(want))
    assert np.asarray(grid).std() > 1  # not blank
    settings = json.loads(grid.text["cclddg"])  # the PNG carries the settings that made it
    assert settings["seed"] == 3 and settings["prompts"] == [PROMPT, "a blue square"] and settings["guidance"] == [2.0]
    assert page.get_attribute("#download", "download") == "cclddg-seed3.png"
    again, _ = generate(page)
    assert again == "" or again == src  # the same seed: the same image (the src did not change)
    assert page.get_attribute("#result", "src") == src


def test_a_guidance_sweep_puts_one_scale_per_column(page):
    page.fill("#prompts", PROMPT)
    page.fill("#n", "2")
    page.check("#sweep")
    page.fill("#sweep_values", "1, 2, 3")
    src, error = generate(page)
    page.uncheck("#sweep")
    assert error == ""
    assert json.loads(decode(src).text["cclddg"])["guidance"] == [1.0, 2.0, 3.0]
    assert page.text_content("#status").startswith("2 x 3 images")


@pytest.mark.parametrize("field, value, message", [
    ("#prompts", "", "type a prompt"),
    ("#seed", "-1", "seed must be in [0, 4294967295]"),
    ("#n", "100", "images per prompt must be"),
    ("#sweep_values", "1, x", "guidance must be a number"),
])
def test_bad_input_shows_a_message_and_the_server_keeps_serving(page, server, field, value, message):
    page.fill("#prompts", PROMPT)
    page.fill("#seed", "0")
    page.fill("#n", "1")
    page.check("#sweep") if field == "#sweep_values" else page.uncheck("#sweep")
    page.fill(field, value)
    src, error = generate(page)
    page.uncheck("#sweep")
    assert src == "" and message in error
    assert json.loads(urllib.request.urlopen(server + "info").read())["cond"] == "embedding"


def test_an_unreadable_image_shows_a_message(page, tmp_path):
    bad = tmp_path / "photo.png"
    bad.write_bytes(b"not an image at all")
    page.fill("#prompts", "")
    page.set_input_files("#image", str(bad))
    src, error = generate(page)
    page.set_input_files("#image", [])
    assert src == "" and "not a readable PNG or JPEG" in error


def test_an_image_prompt_makes_variations(page, tmp_path):
    path = tmp_path / "prompt.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(path)
    page.fill("#prompts", "")
    page.fill("#n", "3")
    page.set_input_files("#image", str(path))
    src, error = generate(page)
    page.set_input_files("#image", [])
    assert error == "" and decode(src).size[0] > decode(src).size[1]  # one row of 3
