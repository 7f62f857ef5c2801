"""Webdataset shards as a stream source: real shards (written by webdataset's TarWriter) read back exactly,
from paths, file:// and http:// URLs and pipes; damaged shards become counted error records, never
exceptions; unreachable shards are refused with one clear line."""

from __future__ import annotations

import functools
import http.server
import io
import os
import tarfile
import threading
import time
from pathlib import Path

import pytest
import webdataset as wds

from cclddg.data.records import StreamSource
from cclddg.data.webdataset import (
    CC12M_PATTERN,
    REST_OF_SHARD,
    WebDatasetSource,
    expand_pattern,
    iter_tar_records,
    open_shard,
)
from cclddg.errors import UserError


def image_bytes(i: int) -> bytes:
    """Distinct stand-ins for encoded images: the source only carries bytes, decoding happens elsewhere."""
    return bytes((i * 7 + j) % 256 for j in range(700 + 13 * i))


def write_shard(path: Path, samples: list[dict]) -> Path:
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)
    return path


def plain_samples(n: int, first: int = 0) -> list[dict]:
    return [{"__key__": f"{i:06d}", "jpg": image_bytes(i), "txt": f"caption {i}".encode(), "json": b'{"w": 1}'}
            for i in range(first, first + n)]


def summary(records) -> list[tuple]:
    return [(r.key, r.image, r.caption, r.error) for r in records]


def expected(shard: str, samples: list[dict]) -> list[tuple]:
    return [(f"{shard}:{s['__key__']}", s["jpg"], s["txt"], None) for s in samples]


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def shard(tmp_path: Path) -> tuple[str, list[dict]]:
    samples = plain_samples(3)
    return str(write_shard(tmp_path / "000.tar", samples)), samples


def test_expand_pattern():
    assert expand_pattern("data/{000..002}.tar") == ["data/000.tar", "data/001.tar", "data/002.tar"]
    assert expand_pattern("a/{8..10}.tar::b/{00..01}.tar") == ["a/8.tar", "a/9.tar", "a/10.tar", "b/00.tar", "b/01.tar"]
    assert expand_pattern("one.tar") == ["one.tar"]
    assert len(expand_pattern("https://x.org/data/{00000..01200}.tar")) == 1201
    for bad in ("", " :: ", "data/{000..002.tar"):
        with pytest.raises(UserError):
            expand_pattern(bad)


def test_records_exact(shard):
    path, samples = shard
    assert summary(iter_tar_records(path)) == expected(path, samples)


def test_sample_rules(tmp_path: Path):
    """First image extension in IMAGE_EXTENSIONS order wins; captions stay raw bytes (non-UTF-8 included);
    a missing caption is b""; no image is an error record; other extensions are ignored."""
    samples = [
        {"__key__": "a", "png": b"PNG", "jpg": b"JPG", "txt": b"caf\xe9 \xff"},
        {"__key__": "b", "webp": b"WEBP", "cls": b"3"},
        {"__key__": "c", "txt": b"only a caption", "json": b"{}"},
        {"__key__": "d", "jpeg": b"JPEG", "png": b"PNG", "txt": b""},
    ]
    path = str(write_shard(tmp_path / "rules.tar", samples))
    assert summary(iter_tar_records(path)) == [
        (f"{path}:a", b"JPG", b"caf\xe9 \xff", None),
        (f"{path}:b", b"WEBP", b"", None),
        (f"{path}:c", None, None, "no image (jpg/jpeg/png/webp) in the sample"),
        (f"{path}:d", b"JPEG", b"", None),
    ]


def test_grouping_and_skipped_members(tmp_path: Path):
    """Consecutive members share a sample; a key that comes back later is a new sample; directories,
    `__meta__` files, macOS `._*` files and dot-less names belong to no sample; upper-case extensions count."""
    path = tmp_path / "hand.tar"
    with tarfile.open(path, "w") as tar:
        dir_info = tarfile.TarInfo("sub")
        dir_info.type = tarfile.DIRTYPE
        tar.addfile(dir_info)
        add_member(tar, "__index__.json", b"{}")
        add_member(tar, "sub/._x.jpg", b"resource fork")
        add_member(tar, "sub/x.JPG", b"X")
        add_member(tar, "sub/x.txt", b"x caption")
        add_member(tar, "README", b"no dot")
        add_member(tar, "sub/y.jpg", b"Y")
        add_member(tar, "sub/x.jpg", b"X again")
    p = str(path)
    assert summary(iter_tar_records(p)) == [
        (f"{p}:sub/x", b"X", b"x caption", None),
        (f"{p}:sub/y", b"Y", b"", None),
        (f"{p}:sub/x", b"X again", b"", None),
    ]


def test_link_member_is_one_bad_sample(tmp_path: Path):
    path = tmp_path / "link.tar"
    with tarfile.open(path, "w") as tar:
        link = tarfile.TarInfo("000.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "elsewhere.jpg"
        tar.addfile(link)
        add_member(tar, "000.txt", b"cap 0")
        add_member(tar, "001.jpg", b"IMG1")
    p = str(path)
    assert summary(iter_tar_records(p)) == [
        (f"{p}:000", None, None, "unreadable tar member: 000.jpg is not a regular file"),
        (f"{p}:001", b"IMG1", b"", None),
    ]


def test_source(tmp_path: Path):
    first, second = plain_samples(2), plain_samples(3, first=2)
    write_shard(tmp_path / "000.tar", first)
    write_shard(tmp_path / "001.tar", second)
    source = WebDatasetSource(f"{tmp_path}/{{000..001}}.tar")
    assert isinstance(source, StreamSource)
    assert source.shards == [f"{tmp_path}/000.tar", f"{tmp_path}/001.tar"]
    assert source.describe() == f"webdataset: 2 shards ({tmp_path}/{{000..001}}.tar)"
    assert summary(source.records(source.shards)) == (expected(source.shards[0], first)
                                                      + expected(source.shards[1], second))
    assert summary(source.records(source.shards[1:])) == expected(source.shards[1], second)
    assert WebDatasetSource(f"{tmp_path}/000.tar").describe() == f"webdataset: 1 shard ({tmp_path}/000.tar)"


def test_missing_local_shards(tmp_path: Path, shard):
    with pytest.raises(UserError, match=r"3 of 4 webdataset shards .* do not exist \(the first: .*001\.tar\)"):
        WebDatasetSource(f"{tmp_path}/{{000..003}}.tar")
    with pytest.raises(UserError, match="does not exist"):
        WebDatasetSource(f"file://{tmp_path}/nope.tar")
    with pytest.raises(UserError, match=r"webdataset shard .*nope\.tar does not exist"):
        open_shard(str(tmp_path / "nope.tar"))
    # Remote shards cannot be checked up front; they fail when read.
    assert len(WebDatasetSource("http://127.0.0.1:9/{0..1}.tar::pipe:cat x.tar").shards) == 3


def test_truncated_in_a_member(tmp_path: Path, shard):
    path, samples = shard
    data = Path(path).read_bytes()
    third_jpg = [m for m in tarfile.open(path) if m.name == "000002.jpg"][0]
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[:third_jpg.offset_data + 100])
    records = list(iter_tar_records(str(cut)))
    assert summary(records[:2]) == expected(str(cut), samples[:2])
    assert len(records) == 3 and records[2].key == f"{cut}:000002" and records[2].image is None
    assert records[2].error.startswith("unreadable tar member: 000002.jpg: unexpected end of data")


def test_truncated_anywhere(tmp_path: Path, shard):
    """Wherever the download stops, the good samples before the cut come through and exactly one error
    record follows; nothing raises. Only cuts inside the end-of-archive marker's zero blocks read clean."""
    path, samples = shard
    data = Path(path).read_bytes()
    full = expected(str(tmp_path / "cut.tar"), samples)
    end_marker = max(m.offset_data + -(-m.size // 512) * 512 for m in tarfile.open(path))
    cut = tmp_path / "cut.tar"
    for stop in list(range(0, end_marker + 512, 97)) + [end_marker - 1, end_marker + 511]:
        cut.write_bytes(data[:stop])
        records = summary(iter_tar_records(str(cut)))
        good, bad = records[:-1], records[-1]
        assert good == full[:len(good)], stop
        assert bad[3] is not None and bad[1] is None, stop
        assert all(r[3] is None for r in good), stop
    for stop in (end_marker + 512, end_marker + 1024, len(data)):
        cut.write_bytes(data[:stop])
        assert summary(iter_tar_records(str(cut))) == full, stop


def test_damaged_header_mid_shard(tmp_path: Path, shard):
    path, samples = shard
    data = bytearray(Path(path).read_bytes())
    second = [m for m in tarfile.open(path) if m.name == "000001.jpg"][0]
    data[second.offset + 100] ^= 0xFF  # a bad checksum where sample 1 starts
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bytes(data))
    records = list(iter_tar_records(str(bad)))
    # Sample 0 was still being collected (its members could have continued) when the stream broke.
    assert [(r.key, r.error is not None) for r in records] == [(f"{bad}:{REST_OF_SHARD}", True)]
    assert records[0].error.startswith("unreadable tar shard after 0 samples:")


def test_not_a_tar(tmp_path: Path):
    for name, content in (("text.tar", b"hello, I am not a tar\n" * 100), ("empty.tar", b""),
                          ("zeros.gz", b"\x1f\x8b\x08" + bytes(1000))):
        path = tmp_path / name
        path.write_bytes(content)
        records = list(iter_tar_records(str(path)))
        assert len(records) == 1, name
        assert records[0].key == f"{path}:{REST_OF_SHARD}" and records[0].image is None
        assert records[0].error.startswith("not a readable tar shard: "), records[0].error


def test_empty_tar_has_no_records(tmp_path: Path):
    assert list(iter_tar_records(str(write_shard(tmp_path / "none.tar", [])))) == []


def test_compressed_shard(tmp_path: Path):
    samples = plain_samples(2)
    path = str(write_shard(tmp_path / "000.tar.gz", samples))
    assert summary(iter_tar_records(path)) == expected(path, samples)


def test_file_url(shard):
    path, samples = shard
    url = f"file://{path}"
    assert summary(iter_tar_records(url)) == expected(url, samples)
    assert WebDatasetSource(url).shards == [url]


def test_pipe(tmp_path: Path, shard):
    path, samples = shard
    url = f"pipe:cat {path}"
    assert summary(iter_tar_records(url)) == expected(url, samples)
    # A command that fails after a complete tar: its samples count, and so does its failure.
    failing = f"pipe:cat {path} {tmp_path}/missing.tar 2>/dev/null"
    records = list(iter_tar_records(failing))
    assert summary(records[:3]) == expected(failing, samples)
    assert len(records) == 4 and "exited with status 1" in records[3].error
    records = list(iter_tar_records(f"pipe:cat {tmp_path}/missing.tar 2>/dev/null"))
    assert len(records) == 1 and "not a readable tar shard" in records[0].error and "status 1" in records[0].error
    # Abandoning a pipe half way neither hangs nor leaves its processes behind.
    records = iter_tar_records(f"pipe:cat {path}; sleep 30")
    next(records)
    records.close()
    stream = open_shard(f"pipe:cat {path}; sleep 30")
    assert stream.read(10) == Path(path).read_bytes()[:10]
    stream.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and group_alive(stream.proc.pid):
        time.sleep(0.05)
    assert not group_alive(stream.proc.pid)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass


@pytest.fixture
def http_root(tmp_path: Path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(QuietHandler, directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def test_http(tmp_path: Path, http_root: str, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # only Hugging Face URLs are held back by it
    first, second = plain_samples(2), plain_samples(2, first=2)
    write_shard(tmp_path / "000.tar", first)
    write_shard(tmp_path / "001.tar", second)
    source = WebDatasetSource(f"{http_root}/{{000..001}}.tar")
    assert summary(source.records(source.shards)) == (expected(source.shards[0], first)
                                                      + expected(source.shards[1], second))
    with pytest.raises(UserError, match="HTTP 404"):
        list(iter_tar_records(f"{http_root}/002.tar"))


def test_unreachable_url(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(UserError) as info:
        list(iter_tar_records("http://127.0.0.1:9/x.tar"))
    message = str(info.value)
    assert "\n" not in message
    assert "could not fetch webdataset shard http://127.0.0.1:9/x.tar" in message
    assert "download the shards" in message and "local pattern" in message


def test_hf_offline_is_respected(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    url = expand_pattern(CC12M_PATTERN)[0]
    assert url.endswith("/data/00000.tar") and len(expand_pattern(CC12M_PATTERN)) == 1201
    with pytest.raises(UserError, match="HF_HUB_OFFLINE is set.*download the shards"):
        open_shard(url)
