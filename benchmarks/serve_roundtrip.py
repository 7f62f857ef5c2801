"""What the web page adds on top of the pipeline: the time of `pipe(...)` for one request against the round trip
of the same request typed into `cclddg serve`'s page in headless Chromium (click -> grid shown), and over plain
HTTP. Medians after one warm-up; the ratio is what matters (these machines are noisy).

    python benchmarks/serve_roundtrip.py MODEL_OR_RUN [--n 4] [--repeats 5] [--screenshot docs/images/serve.png]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import threading
import time
import urllib.request

import torch

from cclddg.serve import load_pipeline, make_server

PROMPT = "a red circle in the top left"


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a model folder (cclddg export) or a run folder")
    parser.add_argument("--n", type=int, default=4, help="images of the one prompt (default 4)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--screenshot", help="also save a screenshot of the page with its grid here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    pipe = load_pipeline(args.model)
    guidance = pipe.config.guidance_scale

    def call() -> None:
        pipe(prompt=PROMPT, num_images_per_prompt=args.n, guidance_scale=guidance,
             generator=torch.Generator().manual_seed(0))

    t_pipe = timed(call, args.repeats)
    server = make_server(pipe, "model", port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/"
    body = json.dumps({"prompts": [PROMPT], "n": args.n, "seed": 0, "guidance": [guidance]}).encode()

    def http() -> None:
        request = urllib.request.Request(url + "generate", body, {"Content-Type": "application/json"})
        assert "image" in json.loads(urllib.request.urlopen(request).read())

    t_http = timed(http, args.repeats)
    t_page = float("nan")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium:
        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1100, "height": 720})
            page.goto(url)
            page.wait_for_selector("body[data-ready=true]")
            page.fill("#prompts", PROMPT)
            page.fill("#n", str(args.n))

            def click() -> None:
                page.evaluate("document.getElementById('result').removeAttribute('src')")
                page.click("#generate")
                page.wait_for_function("document.getElementById('result').complete && "
                                       "document.getElementById('result').naturalWidth > 0")

            t_page = timed(click, args.repeats)
            if args.screenshot:
                page.fill("#prompts", "a red circle in the top left\na small blue square at the bottom\n"
                                      "a large yellow triangle in the center")
                click()
                page.screenshot(path=args.screenshot)
            browser.close()
    server.shutdown()
    print(f"{args.model}: {args.n} images of one prompt, guidance {guidance}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}")
    print(f"  pipe(...)                  {t_pipe:.3f} s")
    print(f"  POST /generate (HTTP)      {t_http:.3f} s  ({t_http / t_pipe:.2f}x the pipeline)")
    print(f"  the page in Chromium       {t_page:.3f} s  ({t_page / t_pipe:.2f}x the pipeline)")


if __name__ == "__main__":
    main()
