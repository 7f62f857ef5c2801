"""`cclddg serve MODEL_OR_RUN`: a local web page to prompt a model.

One small page (serve_page.html: HTML, CSS and script inline, nothing fetched from the internet) and three
routes on Python's own HTTP server:

    GET  /             the page
    GET  /info         what the model takes (prompts or labels, its default guidance, its image size)
    POST /generate     JSON settings -> {"image": PNG data URL of the grid, "settings": ..., "seconds": ...}
                       or {"error": one line} with status 400; the server keeps serving whatever a request holds

The grid is rows of prompts (or label requests) x images per prompt, or x guidance scales for a sweep; its PNG
carries the settings that made it (a "cclddg" text chunk), and the page shows them beside the download link.
Requests are sampled one at a time in one long-lived thread (the model uses every core; the page still loads
meanwhile), and the server binds to localhost by default.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import queue
import threading
import time
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from cclddg.data.images import make_grid
from cclddg.data.shapes import COLORS, POSITIONS, SHAPES
from cclddg.errors import UserError
from cclddg.model_folder import CCLDDGPipeline
from cclddg.options import FRACTION, GUIDANCE, SEEDS, Range, number_problem
from cclddg.pipeline import is_model_folder

MAX_PROMPTS = 16
MAX_IMAGES_PER_PROMPT = 16
MAX_GUIDANCES = 8
MAX_BODY = 20 * 2**20  # a request with an image prompt: 20 MiB of JSON at most
MAX_IMAGE_SIDE = 4096


def load_pipeline(path: str | Path) -> CCLDDGPipeline:
    """A model folder, or a run's latest checkpoint as the pipeline its export would be."""
    return CCLDDGPipeline.from_pretrained(path) if is_model_folder(path) else CCLDDGPipeline.from_run(path)


class Generator:
    """The model behind the page: checks a request's settings and makes its grid."""

    def __init__(self, pipe: CCLDDGPipeline, name: str):
        self.pipe, self.name = pipe, name
        self.jobs: queue.Queue[tuple[dict[str, Any], Future]] = queue.Queue()

    def work(self, stop: threading.Event | None = None) -> None:
        """Sample each request as it comes, in this thread, until `stop` is set (or Ctrl-C). Run it in the thread
        that loaded the model: a second thread running torch starts a second CPU thread pool, and on these
        machines the two halved the speed (measured: 0.08 s -> 0.15 s for 4 images)."""
        while stop is None or not stop.is_set():
            try:
                settings, future = self.jobs.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                future.set_result(self._sample(settings))
            except BaseException as exc:  # the request's error, for its handler to report
                future.set_exception(exc)

    def info(self) -> dict[str, Any]:
        c = self.pipe.config
        info = {"name": self.name, "cond": c.cond, "img_size": c.img_size, "guidance": c.guidance_scale,
                "text_prior": c.text_prior, "limits": {"prompts": MAX_PROMPTS, "n": MAX_IMAGES_PER_PROMPT,
                                                        "guidances": MAX_GUIDANCES}}
        if c.cond == "labels":
            info["attrs"] = {"color": list(COLORS), "shape": list(SHAPES), "position": list(POSITIONS)}
        return info

    def generate(self, request: dict[str, Any]) -> dict[str, Any]:
        settings = self.settings(request)
        start = time.perf_counter()
        future: Future = Future()
        self.jobs.put((settings, future))
        columns = future.result()
        if len(columns) == 1:
            images, ncol = columns[0], settings["n"]
        else:  # row r, sample i, guidance g -> one row per (prompt, sample), one column per guidance
            images = torch.stack(columns, dim=1).reshape(-1, *columns[0].shape[1:])
            ncol = len(columns)
        rows = len(images) // ncol
        grid = make_grid(images * 2 - 1, nrow=ncol)
        shown = {k: v for k, v in settings.items() if k != "image"}
        shown["image"] = "given" if settings["image"] is not None else None
        shown["model"] = self.name
        return {"image": png_data_url(grid, shown), "settings": shown, "rows": rows, "columns": ncol,
                "seconds": round(time.perf_counter() - start, 3)}

    def _sample(self, settings: dict[str, Any]) -> list[torch.Tensor]:
        """One batch of images per guidance scale (a sweep: the same seed, so columns differ only by guidance)."""
        columns = []
        for guidance in settings["guidance"]:
            kwargs = dict(guidance_scale=guidance, num_images_per_prompt=settings["n"], output_type="pt",
                          generator=torch.Generator().manual_seed(settings["seed"]))
            if self.pipe.config.cond == "embedding":
                kwargs.update(prompt=settings["prompts"] or None, negative_prompt=settings["negative_prompt"],
                              image=settings["image"], image_weight=settings["image_weight"])
            elif self.pipe.config.cond == "labels":
                kwargs.update(attrs=settings["attrs"])
            columns.append(self.pipe(**kwargs).images)
        return columns

    def settings(self, request: dict[str, Any]) -> dict[str, Any]:
        """The request's settings, checked (a bad value is one line the page shows)."""
        if not isinstance(request, dict):
            raise UserError("the request must be a JSON object")
        cond = self.pipe.config.cond
        prompts = [p.strip() for p in _list(request.get("prompts"), "prompts") if isinstance(p, str) and p.strip()]
        if len(prompts) > MAX_PROMPTS:
            raise UserError(f"at most {MAX_PROMPTS} prompts at once, got {len(prompts)}")
        image = _image(request.get("image"))
        attrs = None
        if cond == "embedding" and not prompts and image is None:
            raise UserError("type a prompt (one per line) or choose an image")
        if cond == "labels":
            attrs = [_attrs(a) for a in _list(request.get("attrs"), "attrs")] or [{}]
            if len(attrs) > MAX_PROMPTS:
                raise UserError(f"at most {MAX_PROMPTS} requests at once, got {len(attrs)}")
        scales = _list(request.get("guidance", [self.pipe.config.guidance_scale]), "guidance")
        guidance = [float(_number(g, "guidance", GUIDANCE)) for g in scales]
        if not guidance or len(guidance) > MAX_GUIDANCES:
            raise UserError(f"give 1 to {MAX_GUIDANCES} guidance scales")
        negative = request.get("negative_prompt")
        negative = negative.strip() if isinstance(negative, str) and negative.strip() else None
        return {"prompts": prompts, "negative_prompt": negative, "image": image, "attrs": attrs,
                "image_weight": float(_number(request.get("image_weight", 0.5), "image weight", FRACTION)),
                "guidance": guidance, "seed": _number(request.get("seed", 0), "seed", SEEDS, integer=True),
                "n": _number(request.get("n", 4), "images per prompt", Range(1, MAX_IMAGES_PER_PROMPT), integer=True)}


def _list(value: Any, name: str) -> list:
    if value is None:
        return []
    if isinstance(value, (str, int, float, dict)):
        return [value]
    if isinstance(value, list):
        return value
    raise UserError(f"{name} must be a list")


def _number(value: Any, name: str, rng: Range, integer: bool = False) -> Any:
    """`value` if it is a finite number (an integer when `integer`) in `rng`: the command line's check
    (options.number_problem), named as the page names the field."""
    problem = number_problem(value, rng, integer)
    if problem:
        raise UserError(f"{name} {problem}")
    return value


def _attrs(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise UserError("each label request is an object like {\"color\": \"red\"}")
    known = {"color": COLORS, "shape": SHAPES, "position": POSITIONS}
    out = {}
    for key, item in value.items():
        if item in (None, "", "any"):
            continue
        if key not in known or item not in known[key]:
            raise UserError(f"unknown label {key}={str(item)[:40]!r}")
        out[key] = item
    return out


def _image(value: Any) -> Image.Image | None:
    """A data URL (or bare base64) of an image file -> a PIL image; anything else is one line."""
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise UserError("the image must be sent as a data URL")
    data = value.split(",", 1)[1] if value.startswith("data:") else value
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise UserError("the image could not be decoded (not base64)") from None
    try:
        with Image.open(io.BytesIO(raw)) as image:
            if max(image.size) > MAX_IMAGE_SIDE:
                raise UserError(f"the image is {image.size[0]}x{image.size[1]}; give one at most {MAX_IMAGE_SIDE} px a side")
            image.draft("RGB", (1024, 1024))
            return image.convert("RGB")
    except UserError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise UserError("the image is not a readable PNG or JPEG") from None


def png_data_url(image: Image.Image, settings: dict[str, Any]) -> str:
    """The image as a PNG data URL with its settings in a text chunk."""
    info = PngImagePlugin.PngInfo()
    info.add_text("cclddg", json.dumps(settings))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def page() -> bytes:
    return resources.files("cclddg").joinpath("serve_page.html").read_bytes()


def make_handler(generator: Generator) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "cclddg"
        disable_nagle_algorithm = True  # headers and body go out at once: no 40 ms delayed-ACK stall per request

        def log_message(self, format: str, *args: Any) -> None:  # quiet: the page reports its own errors
            pass

        def _send(self, status: int, body: bytes, kind: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, value: dict[str, Any]) -> None:
            self._send(status, json.dumps(value).encode(), "application/json")

        def do_GET(self) -> None:
            if self.path in ("/", "/index.html"):
                self._send(200, page(), "text/html; charset=utf-8")
            elif self.path == "/info":
                self._json(200, generator.info())
            else:
                self._json(404, {"error": f"no page {self.path[:80]}"})

        def do_POST(self) -> None:
            if self.path != "/generate":
                self._json(404, {"error": f"no route {self.path[:80]}"})
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
                if not 0 < length <= MAX_BODY:
                    raise UserError(f"the request must hold 1 byte to {MAX_BODY // 2**20} MiB of JSON")
                try:
                    request = json.loads(self.rfile.read(length))
                except (json.JSONDecodeError, UnicodeDecodeError):
                    raise UserError("the request is not JSON") from None
                self._json(200, generator.generate(request))
            except UserError as exc:
                self._json(400, {"error": str(exc)})
            except Exception as exc:  # never stop the server: say what failed, keep serving
                self._json(500, {"error": f"internal error ({type(exc).__name__}: {str(exc)[:200]})"})

    return Handler


def make_server(generator: Generator, host: str = "127.0.0.1", port: int = 7860) -> ThreadingHTTPServer:
    """The server (not yet serving: call serve_forever; `generator.work()` samples); port 0 picks a free one
    (`server.server_port`)."""
    try:
        return ThreadingHTTPServer((host, port), make_handler(generator))
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port") from None


def serve(pipe: CCLDDGPipeline, name: str, host: str = "127.0.0.1", port: int = 7860,
          ready: Callable[[str], None] = print) -> None:
    """Serve the page until Ctrl-C: HTTP in a background thread, sampling in this one (`Generator.work`)."""
    generator = Generator(pipe, name)
    server = make_server(generator, host, port)
    ready(f"http://{host}:{server.server_port}/")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        generator.work()
    finally:
        server.shutdown()
        server.server_close()
