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
import urllib.request
from pathlib import Path

import torch

from _timing import timed
from cclddg.serve import Generator, load_pipeline, make_server

PROMPT = "a red circle in the top left"


def measure_clients(url: str, args, guidance: float, times: dict[str, float], stop: threading.Event) -> None:
    """The requests, from another thread: plain HTTP, then the page in Chromium (and the screenshot)."""
    try:
        body = json.dumps({"prompts": [PROMPT], "n": args.n, "seed": 0, "guidance": [guidance]}).encode()

        def http() -> None:
            request = urllib.request.Request(url + "generate", body, {"Content-Type": "application/json"})
            assert "image" in json.loads(urllib.request.urlopen(request).read())

        times["http"] = timed(http, args.repeats)
        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        if chromium:
            from playwright.sync_api import sync_playwright

            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": 1200, "height": 760})
                page.goto(url)
                page.wait_for_selector("body[data-ready=true]")
                page.fill("#prompts", PROMPT)
                page.fill("#n", str(args.n))

                in_page: list[float] = []
                server_side: list[float] = []

                def click() -> None:
                    page.evaluate("delete document.body.dataset.roundTripMs")
                    page.click("#generate")
                    # poll slowly: a driver polling every frame keeps the browser busy on the model's cores
                    page.wait_for_function("document.body.dataset.roundTripMs !== undefined", polling=250)
                    in_page.append(float(page.get_attribute("body", "data-round-trip-ms")) / 1000)
                    server_side.append(float(page.get_attribute("body", "data-server-ms")) / 1000)

                timed(click, args.repeats)
                times["page"] = statistics.median(in_page[1:])  # the page's own clock: submit -> grid decoded
                times["page_server"] = statistics.median(server_side[1:])  # of which the server's work
                if args.screenshot:
                    page.fill("#prompts", "a red circle in the top left\na small blue square at the bottom\n"
                                          "a large yellow triangle in the center")
                    click()
                    page.evaluate("window.scrollTo(0, 0)")
                    page.screenshot(path=args.screenshot, full_page=True)
                browser.close()
    finally:
        stop.set()


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
    generator = Generator(pipe, Path(args.model).name)
    server = make_server(generator, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/"
    times: dict[str, float] = {}
    stop = threading.Event()
    client = threading.Thread(target=measure_clients, args=(url, args, guidance, times, stop))
    client.start()
    generator.work(stop)  # sampling in this thread, as `cclddg serve` does
    client.join()
    server.shutdown()
    t_http, t_page = times["http"], times.get("page", float("nan"))
    print(f"{args.model}: {args.n} images of one prompt, guidance {guidance}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}")
    print(f"  pipe(...)                  {t_pipe:.3f} s")
    print(f"  POST /generate (HTTP)      {t_http:.3f} s  ({t_http / t_pipe:.2f}x the pipeline)")
    print(f"  the page in Chromium       {t_page:.3f} s  ({t_page / t_pipe:.2f}x the pipeline; the page's own "
          f"clock, submit -> grid decoded)")
    print(f"  ... of which the server's work {times.get('page_server', float('nan')):.3f} s")


if __name__ == "__main__":
    main()
