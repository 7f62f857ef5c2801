"""`cclddg serve` under careless and hostile traffic, over real sockets to a real server process: slow and stalled
clients, bursts, oversized bodies and images, other content types and other sites, malformed requests, clients
that leave early. Each is answered (or cut off) in bounded time and memory, with no traceback on the console."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

READ_TIMEOUT = 1.0
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def server(tiny_models):
    """`cclddg serve` on the tiny text model; yields (port, process)."""
    proc = subprocess.Popen([sys.executable, "-m", "cclddg", "serve", str(tiny_models["text"]), "--port", "0",
                             "--threads", "1", "--read_timeout", str(READ_TIMEOUT)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    line = proc.stdout.readline()
    assert " on http://127.0.0.1:" in line, line + proc.stderr.read()
    yield int(line.split(":")[-1].split("/")[0]), proc
    proc.terminate()
    _, stderr = proc.communicate(timeout=30)
    noise = [l for l in stderr.splitlines() if "Traceback" in l or "Error" in l]
    assert noise == [], stderr[-3000:]  # no client, however rude, put a traceback on the console


def raw(port: int, data: bytes, wait: float = 30) -> tuple[int, dict]:
    """Send bytes as they are; (status, JSON body) of the answer, (0, {}) when the server closed without one."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    if not answer:
        return 0, {}
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), (json.loads(body) if body else {})


def post(port: int, body: bytes, kind: str = "application/json", extra: str = "", length: str | None = None,
         host: str | None = None) -> tuple[int, dict]:
    length = str(len(body)) if length is None else length
    head = (f"POST /generate HTTP/1.1\r\nHost: {host or f'127.0.0.1:{port}'}\r\nContent-Type: {kind}\r\n"
            f"Content-Length: {length}\r\n{extra}Connection: close\r\n\r\n")
    return raw(port, head.encode() + body)


GOOD = json.dumps({"prompts": ["a red circle"], "n": 1, "seed": 0}).encode()


def image_url(image: Image.Image, fmt: str = "PNG", **options) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def png_claiming(width: int, height: int) -> str:
    """A tiny PNG whose header claims width x height (a decompression bomb's signature)."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = 8 + 4  # signature, then the IHDR chunk's length
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr:ihdr + 17])))
    return "data:image/png;base64," + base64.b64encode(bytes(data)).decode()


def status_of(proc: subprocess.Popen, key: str) -> int:
    for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def test_a_good_request_is_answered(server):
    port, _ = server
    status, body = post(port, GOOD)
    assert status == 200 and body["image"].startswith("data:image/png;base64,")


@pytest.mark.parametrize("kind", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                                  ""])
def test_only_json_requests_generate(server, kind):
    """A page on another site can POST these to localhost without asking the browser; they are refused."""
    status, body = post(server[0], GOOD, kind=kind)
    assert status == 415 and "application/json" in body["error"]


@pytest.mark.parametrize("extra,host", [("Origin: http://evil.example\r\n", None),
                                        ("Sec-Fetch-Site: cross-site\r\n", None),
                                        ("", "evil.example:7860")])  # DNS rebinding: a name that resolves here
def test_other_sites_are_refused(server, extra, host):
    status, body = post(server[0], GOOD, extra=extra, host=host)
    assert status == 403 and "refused" in body["error"] or "not to this machine" in body["error"]


@pytest.mark.parametrize("length,status,words", [("abc", 400, "not a number"), (str(10**9), 413, "at most 20 MiB"),
                                                 ("0", 400, "empty"), ("-5", 400, "empty")])
def test_a_bad_content_length_is_a_400_class_answer_at_once(server, length, status, words):
    start = time.monotonic()
    got, body = post(server[0], b"", length=length)
    assert (got, words in body["error"]) == (status, True), body
    assert time.monotonic() - start < READ_TIMEOUT  # answered without waiting for a body


@pytest.mark.parametrize("body,words", [(b"[" * 100_000, "nested too deeply"), (b'{"prompts": ', "not JSON"),
                                        (b"\xff\xfe", "not JSON"), (b"[1, 2]", "JSON object")])
def test_a_malformed_body_is_a_400(server, body, words):
    status, answer = post(server[0], body)
    assert status == 400 and words in answer["error"], answer


@pytest.mark.parametrize("image,words", [(png_claiming(20000, 20000), "too many pixels"),
                                         (png_claiming(5000, 300), "at most 4096 px"),
                                         ("data:image/png;base64,iVBORw0KGgo=", "not a readable PNG or JPEG")])
def test_an_image_too_large_is_refused_before_decoding_and_named(server, image, words):
    status, answer = post(server[0], json.dumps({"image": image, "n": 1}).encode())
    assert status == 400 and words in answer["error"], answer


def test_a_client_that_stalls_is_cut_off_and_holds_no_thread(server):
    port, proc = server
    start = time.monotonic()
    status, body = post(port, b'{"prompts":', length="100")  # announces 100 bytes, sends 11
    assert status == 408 and time.monotonic() - start < READ_TIMEOUT + 5, body
    stalled = [socket.create_connection(("127.0.0.1", port)) for _ in range(150)]  # connect, send nothing
    try:
        time.sleep(0.5)
        assert status_of(proc, "Threads") < 100  # at most 64 connections get a thread; the rest are closed
    finally:
        for sock in stalled:
            sock.close()
    time.sleep(READ_TIMEOUT + 0.5)
    assert post(port, GOOD)[0] == 200  # the stalled ones were cut off: the page works again


def test_clients_that_leave_early_print_nothing(server):
    port, _ = server
    for _ in range(30):
        with socket.create_connection(("127.0.0.1", port)) as sock:
            head = f"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n" \
                   f"Content-Length: {len(GOOD)}\r\n\r\n"
            sock.sendall(head.encode() + GOOD)  # then gone before the answer
    time.sleep(2)
    assert post(port, GOOD)[0] == 200  # (the fixture checks the console stayed quiet)


def test_a_burst_of_big_image_requests_is_bounded(server):
    """20 requests at once, each a 4096x4096 image: at most MAX_PENDING are taken, the others told the server is
    busy, and the server's peak memory stays bounded."""
    port, proc = server
    noise = np.random.default_rng(0).integers(0, 256, (4096, 4096, 3), dtype=np.uint8)
    body = json.dumps({"image": image_url(Image.fromarray(noise), "JPEG", quality=40), "n": 1}).encode()
    assert len(body) < 20 * 2**20
    before = status_of(proc, "VmRSS")
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(post(port, body)[0])) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 20 and set(results) <= {200, 503} and results.count(503) >= 10, results
    peak = status_of(proc, "VmHWM")
    print(f"burst: {results.count(200)} served, {results.count(503)} busy; RSS {before / 1024:.0f} MiB before, "
          f"peak {peak / 1024:.0f} MiB")
    assert peak - before < 1024 * 1024  # KiB: less than 1 GiB over what the model takes
    assert post(port, GOOD)[0] == 200
