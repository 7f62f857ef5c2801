"""Webdataset tar shards (local, `file://`, `http(s)://` or `pipe:CMD`) as a stream source.

A webdataset shard is a plain tar whose members are grouped into samples by key: the member's path up to
the first dot of its basename (`000123.jpg` + `000123.txt` is sample `000123`), written contiguously. We
read the tars ourselves with `tarfile` in stream mode instead of using the `webdataset` library, so that
every bad member, truncated download or non-tar file becomes one counted error `Record` instead of an
exception that ends a long run: a broken shard costs its remaining samples, never the training.
"""

from __future__ import annotations

import http.client
import io
import lzma
import os
import signal
import subprocess
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

from braceexpand import braceexpand

from cclddg.data.records import Record, files_fingerprint
from cclddg.errors import UserError

CC12M_PATTERN = ("https://huggingface.co/datasets/laion/conceptual-captions-12m-webdataset/resolve/main/"
                 "data/{00000..01200}.tar")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSIONS = ("txt",)
HTTP_TIMEOUT_S = 60.0
REST_OF_SHARD = "<rest of shard>"

_WANTED = IMAGE_EXTENSIONS + CAPTION_EXTENSIONS
_REMOTE_PREFIXES = ("http://", "https://", "pipe:")
_HF_HOSTS = ("huggingface.co", "hf.co")
# What reading a damaged, truncated, wrongly compressed or dropped stream can raise: all of it is bad data.
_STREAM_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError, http.client.HTTPException)


def expand_pattern(pattern: str) -> list[str]:
    """`data/{00000..01200}.tar` -> the 1201 paths (zero padding kept); `a.tar::b/{0..3}.tar` joins several."""
    shards: list[str] = []
    for part in pattern.split("::"):
        part = part.strip()
        if not part:
            continue
        try:
            shards += [s for s in braceexpand(part) if s]
        except ValueError as e:
            raise UserError(f"webdataset pattern {pattern!r}: {_one_line(e)}") from None
    if not shards:
        raise UserError(f"webdataset pattern {pattern!r} names no shards; give e.g. 'data/{{00000..01200}}.tar'")
    return shards


def open_shard(url: str) -> BinaryIO:
    """A readable byte stream of one shard; failing to reach it is the user's to mend, so it is a UserError."""
    if url.startswith("pipe:"):
        return _PipeStream(url[len("pipe:"):])  # type: ignore[return-value]
    if url.startswith(("http://", "https://")):
        return _open_http(url)
    path = _local_path(url)
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise UserError(f"webdataset shard {path} does not exist") from None
    except OSError as e:
        raise UserError(f"cannot open webdataset shard {path}: {_one_line(e)}") from None


def iter_tar_records(url: str) -> Iterator[Record]:
    """The samples of one shard, front to back; bad data becomes error Records, never an exception."""
    stream = open_shard(url)
    try:
        yield from _read_shard(url, stream)
    finally:
        stream.close()


class WebDatasetSource:
    """A StreamSource over webdataset tar shards named by a brace pattern."""

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self.shards: list[str] = expand_pattern(pattern)
        # A typo in a local pattern should fail now, not hours in when the reader reaches that shard.
        missing = [s for s in self.shards
                   if not s.startswith(_REMOTE_PREFIXES) and not os.path.isfile(_local_path(s))]
        if missing and len(self.shards) == 1:
            raise UserError(f"webdataset shard {_local_path(missing[0])} does not exist")
        if missing:
            raise UserError(f"{len(missing)} of {len(self.shards)} webdataset shards of {pattern!r} do not exist "
                            f"(the first: {_local_path(missing[0])})")

    def fingerprint(self) -> dict | None:
        """The local shards' names, sizes and times (a latent cache checks it); None for remote shards."""
        if any(s.startswith(_REMOTE_PREFIXES) for s in self.shards):
            return None
        return files_fingerprint([_local_path(s) for s in self.shards])

    def records(self, shards: Sequence[str]) -> Iterator[Record]:
        """The given shards (a worker's share of `self.shards`) in order. A shard that cannot be opened stops
        the run if it is the first (the pattern or the network is wrong); later ones are skipped and counted
        (one unreachable shard of 1,200 should not end a long run)."""
        for k, shard in enumerate(shards):
            try:
                yield from iter_tar_records(shard)
            except UserError as exc:
                if k == 0:
                    raise
                yield Record(f"{shard}:{REST_OF_SHARD}", None, None, error=f"could not open the shard: {exc}")

    def describe(self) -> str:
        n = len(self.shards)
        return f"webdataset: {n} shard{'s' if n != 1 else ''} ({self.pattern})"


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _why(e: BaseException) -> str:
    """tarfile's terse reason, plus the likely cause when the data simply stops."""
    reason = _one_line(e)
    if reason in ("empty header", "truncated header", "unexpected end of data", "empty file"):
        return f"{reason} (the shard ends early: a truncated download?)"
    return reason


def _local_path(url: str) -> str:
    return urllib.parse.unquote(url[len("file://"):]) if url.startswith("file://") else url


def _hf_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _open_http(url: str) -> BinaryIO:
    """GET a shard; the response is read as it arrives (the tar reader never seeks)."""
    offline_hint = ("download the shards (e.g. with `huggingface-cli download` or curl) and pass a local pattern "
                    "such as 'shards/{00000..01200}.tar'")
    host = (urllib.parse.urlparse(url).hostname or "").lower()
    if _hf_offline() and any(host == h or host.endswith("." + h) for h in _HF_HOSTS):
        raise UserError(f"HF_HUB_OFFLINE is set, so webdataset shard {url} is not fetched; {offline_hint}")
    try:
        return urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S)
    except urllib.error.HTTPError as e:
        reason = f"HTTP {e.code} {e.reason}"
    except urllib.error.URLError as e:
        reason = _one_line(e.reason) if isinstance(e.reason, BaseException) else str(e.reason)
    except (OSError, http.client.HTTPException, ValueError) as e:
        reason = _one_line(e)
    where = "HF_HUB_OFFLINE is set; " if _hf_offline() else ""
    raise UserError(f"could not fetch webdataset shard {url} ({reason}); {where}without network access, "
                    f"{offline_hint}")


class _PipeStream(io.RawIOBase):
    """stdout of a `pipe:CMD` shell command (like webdataset's gopen); closing it reaps the process."""

    def __init__(self, cmd: str) -> None:
        self.cmd = cmd
        try:
            # Its own process group, so that abandoning the shard stops the whole pipeline, not just the shell.
            self.proc = subprocess.Popen(cmd, shell=True, stdout=subprocess.PIPE, start_new_session=True)
        except OSError as e:
            raise UserError(f"cannot run webdataset shard command pipe:{cmd}: {_one_line(e)}") from None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        return self.proc.stdout.readinto(buffer)  # type: ignore[union-attr]

    def finish(self, max_bytes: int = 1 << 24) -> int:
        """Drain and wait, so that a writer cut off after a complete tar does not count as failed (SIGPIPE).
        0 when a command that goes on writing past `max_bytes` of trailing output is abandoned instead."""
        drained = 0
        while chunk := self.proc.stdout.read(1 << 16):  # type: ignore[union-attr]
            drained += len(chunk)
            if drained > max_bytes:
                return 0
        return self.proc.wait()

    def close(self) -> None:
        if not self.closed:
            self.proc.stdout.close()  # type: ignore[union-attr]
            if self.proc.poll() is None:  # abandoned early: the rest of its output is not wanted
                self._signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._signal(signal.SIGKILL)
                    self.proc.wait()
        super().close()

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass


class _WatchedTarInfo(tarfile.TarInfo):
    """Remembers why header reading stopped: tarfile ends *silently* on a truncated or garbled header after
    the first, and only an all-zero block (EOFHeaderError) is a real end of archive."""

    @classmethod
    def fromtarfile(cls, tf: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tf)
        except tarfile.HeaderError as e:
            tf._cclddg_header_error = e  # type: ignore[attr-defined]
            raise


@dataclass
class _Sample:
    key: str
    data: dict[str, bytes] = field(default_factory=dict)
    error: str | None = None

    def record(self, shard: str) -> Record:
        key = f"{shard}:{self.key}"
        if self.error is not None:
            return Record(key=key, image=None, caption=None, error=self.error)
        image = next((self.data[ext] for ext in IMAGE_EXTENSIONS if ext in self.data), None)
        if image is None:
            return Record(key=key, image=None, caption=None,
                          error=f"no image ({'/'.join(IMAGE_EXTENSIONS)}) in the sample")
        caption = next((self.data[ext] for ext in CAPTION_EXTENSIONS if ext in self.data), b"")
        return Record(key=key, image=image, caption=caption)


def _split_name(name: str) -> tuple[str, str] | None:
    """`dir/000123.seg.png` -> ("dir/000123", "seg.png"); None for members that belong to no sample
    (no dot, webdataset's `__meta__` files, macOS `._*` resource forks)."""
    head, _, base = name.rpartition("/")
    if base.startswith(("__", ".")) or "." not in base:
        return None
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


def _read_shard(shard: str, stream: BinaryIO) -> Iterator[Record]:
    count = 0  # samples yielded so far

    def broken(reason: str) -> Record:
        return Record(key=f"{shard}:{REST_OF_SHARD}", image=None, caption=None,
                      error=f"unreadable tar shard after {count} sample{'' if count == 1 else 's'}: {reason}")

    try:
        tf = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_WatchedTarInfo)
    except _STREAM_ERRORS as e:
        reason = _why(e)
        if isinstance(stream, _PipeStream) and (status := stream.finish()) != 0:
            reason += f" (the pipe command exited with status {status})"
        yield Record(key=f"{shard}:{REST_OF_SHARD}", image=None, caption=None,
                     error=f"not a readable tar shard: {reason}")
        return

    sample: _Sample | None = None
    while True:
        try:
            info = tf.next()
        except _STREAM_ERRORS as e:  # the sample being collected may be incomplete: it goes with the rest
            yield broken(_why(e))
            return
        tf.members = []  # stream mode keeps every TarInfo otherwise: memory grows with the shard
        if info is None:
            header_error = getattr(tf, "_cclddg_header_error", None)
            if header_error is not None and not isinstance(header_error, tarfile.EOFHeaderError):
                yield broken(_why(header_error) if not isinstance(header_error, tarfile.InvalidHeaderError)
                             else f"{_one_line(header_error)} where a member or the end-of-archive marker belongs")
                return
            break
        if info.isdir():
            continue
        parts = _split_name(info.name)
        if parts is None:
            continue
        key, ext = parts
        if sample is None or key != sample.key:
            if sample is not None:
                yield sample.record(shard)
                count += 1
            sample = _Sample(key)
        if ext not in _WANTED or ext in sample.data or sample.error is not None:
            continue
        if not info.isfile():  # a (sym)link or device: the stream itself is fine, this sample is not
            sample.error = f"unreadable tar member: {info.name} is not a regular file"
            continue
        try:
            member = tf.extractfile(info)
            if member is None:
                raise tarfile.ExtractError("no data")
            sample.data[ext] = member.read()
        except _STREAM_ERRORS as e:  # in stream mode a failed read leaves no way to find the next header
            yield Record(key=f"{shard}:{sample.key}", image=None, caption=None,
                         error=f"unreadable tar member: {info.name}: {_why(e)}")
            return

    if sample is not None:
        yield sample.record(shard)
        count += 1
    if isinstance(stream, _PipeStream) and (status := stream.finish()) != 0:
        yield broken(f"the pipe command exited with status {status}")
