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

Safe on a laptop: only `application/json` POSTs from the page's own origin generate (a web page elsewhere cannot
make the server work: a cross-site form or text/plain POST is refused), at most MAX_PENDING requests are
read, decoded or waiting at once (past that: 503, "busy"), at most MAX_CONNECTIONS connections are open, a
client has `read_timeout` seconds to send its request, the body and the image's size are checked before
anything is decoded, a malformed request is a 400 with one line, and a client that went away is no traceback.
"""

from __future__ import annotations

import base64
import binascii
import errno
import io
import ipaddress
import json
import queue
import socket
import threading
import time
import warnings
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from cclddg import conditioning
from cclddg.cpu import fast_decode_dtype
from cclddg.data.images import make_grid
from cclddg.data.shapes import COLORS, POSITIONS, SHAPES
from cclddg.errors import OneLineWarning, UserError
from cclddg.model_folder import CCLDDGPipeline
from cclddg.options import FRACTION, GUIDANCE, SEEDS, Range, number_problem
from cclddg.pipeline import is_model_folder

MAX_PROMPTS = 16
MAX_IMAGES_PER_PROMPT = 16
MAX_GUIDANCES = 8
MAX_BODY = 20 * 2**20  # a request with an image prompt: 20 MiB of JSON at most
MAX_IMAGE_SIDE = 4096
KEPT_IMAGE_SIDE = 1024  # a prompt image is shrunk to this on arrival: embedders see 224 px or less
MAX_PENDING = 4  # requests being read, decoded, waiting or sampled at once; more are told the server is busy
MAX_CONNECTIONS = 64  # open connections (each a thread); more are closed at once
READ_TIMEOUT = 10.0  # seconds a client has to send its request (a slow or stalled one is cut off)


def load_pipeline(path: str | Path, decode_dtype: torch.dtype | None = None) -> CCLDDGPipeline:
    """A model folder, or a run's latest checkpoint as the pipeline its export would be, its autoencoder decoding in
    `decode_dtype` (default `cpu.fast_decode_dtype`: bfloat16 on a CPU with native bf16, where decoding is most of
    what the page waits for)."""
    pipe = CCLDDGPipeline.from_pretrained(path) if is_model_folder(path) else CCLDDGPipeline.from_run(path)
    if pipe.latent_space is not None:  # casts the pipeline's own VAE decoder
        pipe.latent_space.decode_in(decode_dtype or fast_decode_dtype(pipe.device))
    return pipe


class Generator:
    """The model behind the page: checks a request's settings and makes its grid."""

    def __init__(self, pipe: CCLDDGPipeline, name: str):
        self.pipe, self.name = pipe, name
        self.kind = conditioning.get(pipe.config.cond)  # what a request may carry (its `asks`)
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
        c, kind = self.pipe.config, self.kind
        info = {"name": self.name, "cond": c.cond, "described": kind.described, "asks": list(kind.asks),
                "img_size": c.img_size, "guidance": c.guidance_scale, "text_prior": c.text_prior,
                "limits": {"prompts": MAX_PROMPTS, "n": MAX_IMAGES_PER_PROMPT, "guidances": MAX_GUIDANCES}}
        if "attrs" in kind.asks:
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
            if "prompt" in self.kind.asks:
                kwargs.update(prompt=settings["prompts"] or None, negative_prompt=settings["negative_prompt"],
                              image=settings["image"], image_weight=settings["image_weight"])
            if "attrs" in self.kind.asks:
                kwargs.update(attrs=settings["attrs"])
            columns.append(self.pipe(**kwargs).images)
        return columns

    def settings(self, request: dict[str, Any]) -> dict[str, Any]:
        """The request's settings, checked (a bad value is one line the page shows)."""
        if not isinstance(request, dict):
            raise UserError("the request must be a JSON object")
        asks = self.kind.asks
        prompts = [p.strip() for p in _list(request.get("prompts"), "prompts") if isinstance(p, str) and p.strip()]
        if len(prompts) > MAX_PROMPTS:
            raise UserError(f"at most {MAX_PROMPTS} prompts at once, got {len(prompts)}")
        image = _image(request.get("image"))
        attrs = None
        if "prompt" in asks and not prompts and image is None:
            raise UserError("type a prompt (one per line) or choose an image")
        if "attrs" in asks:
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
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw)) as image:  # reads the header only: the size is known before decoding
                if max(image.size) > MAX_IMAGE_SIDE:
                    raise UserError(f"the image is {image.size[0]}x{image.size[1]}; give one at most "
                                    f"{MAX_IMAGE_SIDE} px a side")
                image.draft("RGB", (KEPT_IMAGE_SIDE, KEPT_IMAGE_SIDE))  # JPEGs decode at a reduced size
                image = image.convert("RGB")
                image.thumbnail((KEPT_IMAGE_SIDE, KEPT_IMAGE_SIDE))  # what a waiting request holds
                return image
    except UserError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UserError(f"the image has too many pixels to decode safely; give one at most {MAX_IMAGE_SIDE} px a "
                        "side") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
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


class HTTPProblem(Exception):
    """A request the server refuses: the status and the one line the page shows."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def make_handler(generator: Generator, read_timeout: float = READ_TIMEOUT,
                 local_only: bool = True) -> type[BaseHTTPRequestHandler]:
    """The routes; `local_only` (bound to a loopback address): a request must name this machine as its Host
    (a web page whose name resolves to 127.0.0.1, DNS rebinding, is refused)."""
    slots = threading.BoundedSemaphore(MAX_PENDING)

    class Handler(BaseHTTPRequestHandler):
        server_version = "cclddg"
        disable_nagle_algorithm = True  # headers and body go out at once: no 40 ms delayed-ACK stall per request
        timeout = read_timeout  # on the socket: a client that stalls while sending is cut off

        def log_message(self, format: str, *args: Any) -> None:  # quiet: the page reports its own errors
            pass

        def handle(self) -> None:
            try:
                super().handle()
            except (ConnectionError, TimeoutError, socket.timeout):  # the client went away or stalled: nothing to say
                self.close_connection = True

        def _send(self, status: int, body: bytes, kind: str) -> None:
            try:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.send_header("X-Content-Type-Options", "nosniff")
                self.end_headers()
                self.wfile.write(body)
            except (ConnectionError, TimeoutError, socket.timeout):  # the client left before the answer
                self.close_connection = True

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
                self._check_sender()
                length = self._length()
                if not slots.acquire(blocking=False):
                    self._discard(length)  # read past the body (a chunk at a time), so the page gets the answer
                    raise HTTPProblem(503, f"busy: {MAX_PENDING} generations are already waiting; try again in a "
                                           "moment")
                try:
                    request = self._read_json(length)
                    self._json(200, generator.generate(request))
                finally:
                    slots.release()
            except HTTPProblem as exc:
                self.close_connection = True  # the body may be unread
                self._json(exc.status, {"error": str(exc)})
            except UserError as exc:
                self._json(400, {"error": str(exc)})
            except (TimeoutError, socket.timeout):
                self.close_connection = True
                self._json(408, {"error": f"the request was not sent within {read_timeout:g} s"})
            except ConnectionError:
                self.close_connection = True
            except Exception as exc:  # never stop the server: say what failed, keep serving
                self._json(500, {"error": f"internal error ({type(exc).__name__}: {str(exc)[:200]})"})

        def _check_sender(self) -> None:
            """Only the page's own JSON requests: a form or text/plain POST from another site would need no
            permission from the browser, a JSON one does (and another Origin is refused outright)."""
            kind = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if kind != "application/json":
                raise HTTPProblem(415, "send the settings as JSON (Content-Type: application/json)")
            origin, host = self.headers.get("Origin"), self.headers.get("Host") or ""
            if local_only and not is_loopback(host.rsplit(":", 1)[0].strip("[]")):
                raise HTTPProblem(403, f"the request is addressed to {host[:80]!r}, not to this machine")
            if origin is not None and origin.split("://", 1)[-1].rstrip("/") != host:
                raise HTTPProblem(403, f"requests from another site ({origin[:80]}) are refused")
            if self.headers.get("Sec-Fetch-Site") == "cross-site":
                raise HTTPProblem(403, "requests from another site are refused")

        def _length(self) -> int:
            text = self.headers.get("Content-Length")
            if text is None:
                raise HTTPProblem(411, "the request needs a Content-Length")
            try:
                length = int(text)
            except ValueError:
                raise HTTPProblem(400, f"Content-Length {text[:20]!r} is not a number of bytes") from None
            if length > MAX_BODY:
                raise HTTPProblem(413, f"the request holds {length} bytes; at most {MAX_BODY // 2**20} MiB "
                                       "(a smaller image)")
            if length < 1:
                raise HTTPProblem(400, "the request is empty; send the settings as JSON")
            return length

        def _discard(self, length: int) -> None:
            while length > 0:
                chunk = self.rfile.read(min(length, 2**16))
                if not chunk:
                    return
                length -= len(chunk)

        def _read_json(self, length: int) -> Any:
            body = self.rfile.read(length)
            if len(body) < length:
                raise HTTPProblem(400, f"the request ended after {len(body)} of {length} bytes")
            try:
                return json.loads(body.decode())
            except RecursionError:  # the parser recurses: a request nested 100,000 deep stops it
                raise UserError("the request is nested too deeply to be the page's settings") from None
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise UserError("the request is not JSON") from None

    return Handler


class BoundedServer(ThreadingHTTPServer):
    """Python's threading HTTP server with at most `max_connections` connections (threads) at once; one more is
    closed at once. Errors of a connection (a client that went away) print nothing."""

    daemon_threads = True
    request_queue_size = 128  # the listen backlog (Python's default of 5 made a burst of clients retry for seconds)

    def __init__(self, address, handler, max_connections: int = MAX_CONNECTIONS):
        self.connections = threading.BoundedSemaphore(max_connections)
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, handler)

    def process_request(self, request, client_address) -> None:
        if not self.connections.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.connections.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connections.release()

    def handle_error(self, request, client_address) -> None:
        import sys

        exc = sys.exc_info()[1]
        if not isinstance(exc, (ConnectionError, TimeoutError, socket.timeout)):
            print(f"cclddg serve: a request from {client_address[0]} failed: {type(exc).__name__}: {exc}",
                  file=sys.stderr)


def make_server(generator: Generator, host: str = "127.0.0.1", port: int = 7860,
                read_timeout: float = READ_TIMEOUT, max_connections: int = MAX_CONNECTIONS) -> ThreadingHTTPServer:
    """The server (not yet serving: call serve_forever; `generator.work()` samples); port 0 picks a free one
    (`server.server_port`). Anything but a loopback address is one warning: the network can use the model."""
    try:
        handler = make_handler(generator, read_timeout, local_only=is_loopback(host))
        server = BoundedServer((host, port), handler, max_connections)
    except OSError as exc:
        raise listen_problem(exc, host, port) from None
    if not is_loopback(host):
        warnings.warn(f"serving on {host}: anyone who can reach this machine on port {server.server_port} can "
                      "generate with the model; --host 127.0.0.1 keeps it to this machine", OneLineWarning,
                      stacklevel=2)
    return server


def check_address(host: str, port: int) -> None:
    """Fail in one line, before the model loads, when the server could not listen on host:port."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # what the HTTP server sets too
            probe.bind((host, port))
    except OSError as exc:
        raise listen_problem(exc, host, port) from None


def listen_problem(exc: OSError, host: str, port: int) -> UserError:
    if exc.errno == errno.EADDRINUSE:
        return UserError(f"port {port} on {host} is in use; choose another --port (0: any free one)")
    if isinstance(exc, socket.gaierror) or exc.errno in (errno.EADDRNOTAVAIL, errno.EINVAL, errno.EAFNOSUPPORT):
        return UserError(f"--host {host} is not an address of this machine ({exc.strerror or exc}); use 127.0.0.1 "
                         "(this machine only) or 0.0.0.0 (every network it is on)")
    if exc.errno == errno.EACCES:
        return UserError(f"no permission to listen on port {port}; choose a --port above 1023")
    return UserError(f"cannot listen on {host}:{port} ({exc.strerror or exc})")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(pipe: CCLDDGPipeline, name: str, host: str = "127.0.0.1", port: int = 7860,
          ready: Callable[[str], None] = print, read_timeout: float = READ_TIMEOUT) -> None:
    """Serve the page until Ctrl-C (or SIGTERM): HTTP in a background thread, sampling in this one
    (`Generator.work`)."""
    generator = Generator(pipe, name)
    server = make_server(generator, host, port, read_timeout)
    ready(f"http://{f'[{host}]' if ':' in host else host}:{server.server_port}/")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        generator.work()
    finally:
        server.shutdown()
        server.server_close()
