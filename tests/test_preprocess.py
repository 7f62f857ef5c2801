"""The one preprocessing path (record -> checked RGB image -> square uint8 tensor) on real image files.

Every image here is a real encoded file built in memory with Pillow; nothing is mocked.
"""

from __future__ import annotations

import io
import random
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from cclddg.data.preprocess import (
    DEFAULT_MAX_PIXELS,
    NAMED_SKIPS,
    SKIP_KINDS,
    BadDataWarning,
    BadExample,
    SkipLog,
    open_image,
    prepare,
    resize_crop,
    to_rgb,
)
from cclddg.data.records import Record

RED, GREEN, BLUE, WHITE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def close(pixel, expected, tol: int) -> bool:
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(pixel, expected, strict=True))


def kind_of(record: Record, **kwargs) -> str:
    with pytest.raises(BadExample) as info:
        prepare(record, 16, **kwargs)
    assert info.value.kind in SKIP_KINDS
    return info.value.kind


@pytest.fixture(scope="module")
def bomb_png() -> bytes:
    """A real 10000x10000 bilevel PNG (1e8 pixels > Pillow's limit) that is only a few KB on disk.

    Written chunk by chunk so the test never holds the 100 MB of decoded pixels."""
    width = height = 10_000

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    rows = b"\0" * (height * (1 + (width + 7) // 8))  # filter byte 0 + 1 bit per pixel, all black
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b""))


# --- EXIF orientation ---------------------------------------------------------------------------------------


def test_exif_orientation_6_is_applied():
    # Stored 40x20: left half red, right half blue, and a white 8x8 marker in the stored top-left corner.
    stored = Image.new("RGB", (40, 20), BLUE)
    stored.paste(RED, (0, 0, 20, 20))
    stored.paste(WHITE, (0, 0, 8, 8))
    exif = Image.Exif()
    exif[0x0112] = 6  # 0th row = visual right side, 0th column = visual top: display rotated 90 degrees clockwise
    data = encode(stored, "JPEG", exif=exif, quality=95)
    assert Image.open(io.BytesIO(data)).size == (40, 20)  # the file itself is stored unrotated

    image = to_rgb(open_image(data, DEFAULT_MAX_PIXELS))
    assert image.size == (20, 40)
    # Clockwise: stored (x, y) -> shown (19 - y, x). The stored left (red) half becomes the top half, the stored
    # top-left marker the top-right corner (a transpose, orientation 5, would put it top-left instead).
    assert close(image.getpixel((3, 12)), RED, 30)
    assert close(image.getpixel((10, 15)), RED, 30)
    assert close(image.getpixel((10, 30)), BLUE, 30)
    assert close(image.getpixel((3, 35)), BLUE, 30)
    assert close(image.getpixel((16, 3)), WHITE, 30)
    assert close(image.getpixel((3, 3)), RED, 30)
    # Pillow's own reading of the tag agrees.
    reference = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    assert np.array_equal(np.asarray(image), np.asarray(reference))

    tensor, _ = prepare(Record("rotated", data), 20)
    assert tensor.shape == (3, 20, 20)  # centre crop of the 20x40 upright image: its middle rows 10..29
    top, bottom = tensor[:, :8].float().mean(dim=(1, 2)), tensor[:, 12:].float().mean(dim=(1, 2))
    assert top[0] > 200 and top[2] < 50  # red
    assert bottom[2] > 200 and bottom[0] < 50  # blue


# --- to_rgb -------------------------------------------------------------------------------------------------


def palette_png(transparent: bool) -> bytes:
    image = Image.new("P", (4, 2), 0)
    image.putpalette([10, 20, 30, 200, 100, 50] + [0, 0, 0] * 254)
    image.paste(1, (2, 0, 4, 2))
    return encode(image, "PNG", **({"transparency": 1} if transparent else {}))


def test_to_rgb_palette_without_transparency():
    image = open_image(palette_png(False), DEFAULT_MAX_PIXELS)
    assert image.mode == "P" and "transparency" not in image.info
    rgb = to_rgb(image)
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == (10, 20, 30)
    assert rgb.getpixel((3, 1)) == (200, 100, 50)


def test_to_rgb_palette_with_transparency_is_white():
    image = open_image(palette_png(True), DEFAULT_MAX_PIXELS)
    assert image.mode == "P" and image.info.get("transparency") == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "palette with transparency" warning from Pillow either
        rgb = to_rgb(image)
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == (10, 20, 30)
    assert rgb.getpixel((3, 1)) == WHITE  # index 1 is transparent: composited on white, not (200, 100, 50)


@pytest.mark.parametrize("mode, key", [("RGB", (0, 0, 0)), ("L", 0)])
def test_to_rgb_colour_key_transparency_is_white(mode, key):
    """A PNG tRNS colour key on an RGB or grey image is transparency too: white, like alpha 0."""
    image = Image.new(mode, (4, 1), key)
    image.putpixel((3, 0), (200, 100, 50) if mode == "RGB" else 90)
    decoded = open_image(encode(image, "PNG", transparency=key), DEFAULT_MAX_PIXELS)
    assert decoded.mode == mode and decoded.info.get("transparency") == key
    rgb = to_rgb(decoded)
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == WHITE  # the keyed (transparent) colour, not black
    assert rgb.getpixel((3, 0)) == ((200, 100, 50) if mode == "RGB" else (90, 90, 90))


def test_to_rgb_grayscale():
    image = Image.new("L", (3, 3), 77)
    image.putpixel((0, 0), 0)
    rgb = to_rgb(open_image(encode(image, "PNG"), DEFAULT_MAX_PIXELS))
    assert rgb.mode == "RGB"
    assert rgb.getpixel((1, 1)) == (77, 77, 77)
    assert rgb.getpixel((0, 0)) == BLACK


def test_to_rgb_grayscale_with_alpha():
    image = Image.new("LA", (3, 1), (0, 0))  # black, fully transparent
    image.putpixel((1, 0), (0, 255))  # black, opaque
    image.putpixel((2, 0), (0, 128))  # black, half transparent
    decoded = open_image(encode(image, "PNG"), DEFAULT_MAX_PIXELS)
    assert decoded.mode == "LA"
    rgb = to_rgb(decoded)
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == WHITE
    assert rgb.getpixel((1, 0)) == BLACK
    assert close(rgb.getpixel((2, 0)), (127, 127, 127), 2)


def test_to_rgb_rgba_composites_on_white():
    image = Image.new("RGBA", (3, 1), (0, 255, 0, 0))  # a hidden green that must not leak through
    image.putpixel((1, 0), (255, 0, 0, 128))  # 50% red
    image.putpixel((2, 0), (0, 0, 255, 255))  # opaque blue
    decoded = open_image(encode(image, "PNG"), DEFAULT_MAX_PIXELS)
    assert decoded.mode == "RGBA"
    rgb = to_rgb(decoded)
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == WHITE
    assert close(rgb.getpixel((1, 0)), (255, 128, 128), 2)
    assert rgb.getpixel((2, 0)) == BLUE


def test_to_rgb_cmyk_jpeg():
    data = encode(Image.new("CMYK", (16, 16), (255, 0, 0, 0)), "JPEG", quality=95)  # pure cyan ink
    decoded = open_image(data, DEFAULT_MAX_PIXELS)
    assert decoded.mode == "CMYK"
    rgb = to_rgb(decoded)
    assert rgb.mode == "RGB"
    assert close(rgb.getpixel((8, 8)), (0, 255, 255), 8)
    tensor, _ = prepare(Record("cmyk", data), 8)
    assert tensor.shape == (3, 8, 8)
    assert tensor[0].max() <= 8 and tensor[1].min() >= 247 and tensor[2].min() >= 247


def test_to_rgb_16_bit_png():
    values = np.array([[65535, 32768, 0]], dtype=np.uint16)
    decoded = open_image(encode(Image.fromarray(values), "PNG"), DEFAULT_MAX_PIXELS)
    assert decoded.mode.startswith("I")  # a real 16-bit file, not silently 8-bit
    assert np.asarray(decoded).max() == 65535
    rgb = to_rgb(decoded)
    assert rgb.mode == "RGB"
    assert [rgb.getpixel((x, 0)) for x in range(3)] == [WHITE, (128, 128, 128), BLACK]


def test_to_rgb_bilevel():
    image = Image.new("1", (8, 8), 0)
    image.paste(1, (4, 0, 8, 8))
    decoded = open_image(encode(image, "PNG"), DEFAULT_MAX_PIXELS)
    assert decoded.mode == "1"
    rgb = to_rgb(decoded)
    assert rgb.mode == "RGB"
    assert rgb.getpixel((1, 1)) == BLACK
    assert rgb.getpixel((6, 6)) == WHITE


# --- resize_crop --------------------------------------------------------------------------------------------


def thirds(width: int = 300, height: int = 100) -> Image.Image:
    image = Image.new("RGB", (width, height), BLUE)
    image.paste(RED, (0, 0, width // 3, height))
    image.paste(GREEN, (2 * width // 3, 0, width, height))
    return image


def test_resize_is_antialiased():
    stripes = np.zeros((128, 128, 3), dtype=np.uint8)
    stripes[:, 1::2] = 255  # 1-pixel black/white columns
    out = np.asarray(resize_crop(Image.fromarray(stripes), 32)).astype(np.int32)
    assert out.shape == (32, 32, 3)
    assert abs(out.mean() - 128) <= 20
    assert out.min() >= 108 and out.max() <= 148  # mid-grey everywhere, not aliased black/white stripes


def test_resize_shorter_side_keeps_aspect():
    out = resize_crop(Image.new("RGB", (90, 30), RED), 10)
    assert out.size == (10, 10)
    tall = resize_crop(thirds().transpose(Image.Transpose.TRANSPOSE), 32)  # 100x300: red, blue, green rows
    assert tall.size == (32, 32)
    centre = np.asarray(tall).astype(np.int32)[4:28]
    assert centre[:, :, 2].min() >= 240 and centre[:, :, :2].max() <= 15  # the blue middle third


def test_center_crop_takes_the_middle():
    out = resize_crop(thirds(), 32, crop="center")
    assert out.size == (32, 32)
    pixels = np.asarray(out).astype(np.int32)
    mean = pixels.reshape(-1, 3).mean(axis=0)
    assert mean[2] > 200 and mean[0] < 60 and mean[1] < 60
    assert (pixels[:, :, 2] > pixels[:, :, 0]).all() and (pixels[:, :, 2] > pixels[:, :, 1]).all()
    inner = pixels[:, 4:28]
    assert inner[:, :, 2].min() >= 240 and inner[:, :, :2].max() <= 15


def test_random_crop_is_seeded():
    image = thirds(640, 64)  # 577 possible horizontal positions at size 64
    a1 = np.asarray(resize_crop(image, 64, crop="random", rng=random.Random(1)))
    a2 = np.asarray(resize_crop(image, 64, crop="random", rng=random.Random(1)))
    assert np.array_equal(a1, a2)
    crops = {np.asarray(resize_crop(image, 64, crop="random", rng=random.Random(seed))).tobytes()
             for seed in range(8)}
    assert len(crops) > 1
    with pytest.raises(ValueError):
        resize_crop(image, 64, crop="middle")


def test_flip_half_the_time_and_is_a_mirror():
    asym = Image.new("RGB", (16, 16), BLUE)
    asym.paste(RED, (0, 0, 5, 16))  # red on the left only
    rng = random.Random(1234)
    flipped = 0
    for _ in range(200):
        out = resize_crop(asym, 16, crop="center", flip=True, rng=rng)
        left = out.getpixel((0, 8))
        assert left in (RED, BLUE)
        flipped += left == BLUE
    assert 80 <= flipped <= 120

    wide = thirds(120, 40)
    seen = set()
    for seed in range(20):
        plain = np.asarray(resize_crop(wide, 32, crop="random", rng=random.Random(seed)))
        maybe = np.asarray(resize_crop(wide, 32, crop="random", flip=True, rng=random.Random(seed)))
        if np.array_equal(maybe, plain):
            seen.add("plain")
        else:
            assert np.array_equal(maybe, plain[:, ::-1])  # same crop, mirrored
            seen.add("mirrored")
    assert seen == {"plain", "mirrored"}


def test_exact_size_is_unchanged():
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8))
    for crop in ("center", "random"):
        out = resize_crop(noise, 24, crop=crop, rng=random.Random(3))
        assert out.size == (24, 24)
        assert np.array_equal(np.asarray(out), np.asarray(noise))


# --- prepare ------------------------------------------------------------------------------------------------


def test_prepare_returns_square_uint8_tensor_and_caption():
    tensor, caption = prepare(Record("a.png", encode(thirds(), "PNG"), caption="  three bands \n"), 32)
    assert isinstance(tensor, torch.Tensor)
    assert tensor.dtype == torch.uint8 and tensor.shape == (3, 32, 32)
    assert tensor.is_contiguous()
    assert caption == "three bands"
    assert tensor[2, :, 4:28].min() >= 240 and tensor[0, :, 4:28].max() <= 15  # channel-first: blue centre


def test_prepare_decodes_bytes_caption():
    _, caption = prepare(Record("a", encode(Image.new("RGB", (8, 8), RED), "PNG"), caption="  café ☕\n".encode()), 8)
    assert caption == "café ☕"
    _, caption = prepare(Record("b", encode(Image.new("RGB", (8, 8), RED), "PNG"), caption=None), 8)
    assert caption == ""


def test_prepare_accepts_a_decoded_image():
    tensor, _ = prepare(Record("pil", Image.new("LA", (20, 10), (0, 0))), 10)
    assert tensor.shape == (3, 10, 10) and int(tensor.min()) == 255  # transparent -> white
    assert kind_of(Record("big", Image.new("L", (300, 300))), max_pixels=10_000) == "too many pixels"


def test_bad_caption_and_bad_records():
    png = encode(Image.new("RGB", (8, 8), RED), "PNG")
    with pytest.raises(BadExample) as info:
        prepare(Record("latin1", png, caption="café".encode("latin-1")), 8)
    assert info.value.kind == "caption not UTF-8"
    assert kind_of(Record("err", png, error="tar member unreadable")) == "unreadable"
    assert kind_of(Record("none", None)) == "no image"
    assert kind_of(Record("empty", b"")) == "empty file"
    junk = np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    assert kind_of(Record("junk", junk)) == "not an image"


def test_truncated_png():
    noise = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    data = encode(noise, "PNG")
    assert prepare(Record("whole", data), 16)[0].shape == (3, 16, 16)
    assert kind_of(Record("half", data[: len(data) // 2])) == "truncated image"


def test_too_many_pixels():
    big = encode(Image.new("RGB", (300, 300), RED), "PNG")
    assert kind_of(Record("big", big), max_pixels=10_000) == "too many pixels"
    at_limit = encode(Image.new("RGB", (100, 100), RED), "PNG")
    assert prepare(Record("ok", at_limit), 16, max_pixels=10_000)[0].shape == (3, 16, 16)


def test_decompression_bomb_rejected_from_header(bomb_png):
    assert len(bomb_png) < 100_000
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        header = Image.open(io.BytesIO(bomb_png))
    assert header.mode == "1" and header.size == (10_000, 10_000)
    assert 10_000 * 10_000 > DEFAULT_MAX_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rejected cleanly: no DecompressionBombWarning escapes
        assert kind_of(Record("bomb", bomb_png)) == "too many pixels"


def test_gif_first_frame():
    frames = [Image.new("RGB", (16, 16), RED), Image.new("RGB", (16, 16), BLUE)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2
    tensor, _ = prepare(Record("anim.gif", data), 8)
    assert tensor.shape == (3, 8, 8)
    assert tensor[0].min() >= 250 and tensor[1:].max() <= 5  # red, the first frame


@pytest.mark.parametrize("fmt", ["WEBP", "BMP"])
def test_webp_and_bmp_decode(fmt):
    image = Image.new("RGB", (24, 12), GREEN)
    image.paste(RED, (0, 0, 12, 12))
    data = encode(image, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    assert Image.open(io.BytesIO(data)).format == fmt
    tensor, _ = prepare(Record(f"x.{fmt.lower()}", data), 12)
    assert tensor.shape == (3, 12, 12)
    pixels = tensor.permute(1, 2, 0).numpy()
    assert close(pixels[6, 1], RED, 3) and close(pixels[6, 10], GREEN, 3)  # the centre crop is columns 6..17


def test_jpeg_draft_matches_full_decode():
    y, x = np.mgrid[0:1500, 0:2000].astype(np.float32)
    photo = np.stack([x / 2000 * 255, y / 1500 * 255, 128 + 100 * np.sin(x / 90) * np.cos(y / 70)], axis=-1)
    photo[(x - 1000) ** 2 + (y - 750) ** 2 < 400**2] = (240, 30, 40)
    data = encode(Image.fromarray(np.clip(photo, 0, 255).astype(np.uint8)), "JPEG", quality=90)

    drafted = open_image(data, DEFAULT_MAX_PIXELS, draft_size=64)
    assert drafted.size[0] < 2000 and min(drafted.size) >= 64  # draft really decoded at a reduced scale

    fast, _ = prepare(Record("photo.jpg", data), 64)
    full = Image.open(io.BytesIO(data))
    full.load()
    assert full.size == (2000, 1500)
    slow = np.asarray(resize_crop(full.convert("RGB"), 64)).transpose(2, 0, 1)
    diff = np.abs(fast.numpy().astype(np.int32) - slow.astype(np.int32))
    assert diff.reshape(3, -1).mean(axis=1).max() <= 6


# --- SkipLog ------------------------------------------------------------------------------------------------


def test_skiplog_names_the_first_few_and_counts_all():
    log = SkipLog()
    kinds = ["not an image"] * 3 + ["empty file"] * 2 + ["truncated image"] * 3
    log.good = 2
    with pytest.warns(BadDataWarning) as record:
        for i, kind in enumerate(kinds):
            log.add(f"file{i}", kind, "detail" if i == 0 else "")
    named = [w for w in record if issubclass(w.category, BadDataWarning)]
    assert len(named) == NAMED_SKIPS == len(record)
    assert "file0" in str(named[0].message) and "not an image: detail" in str(named[0].message)
    assert "counted, not named" in str(named[-1].message)
    assert log.skipped == 8
    assert log.counts == {"not an image": 3, "empty file": 2, "truncated image": 3}
    assert len(log.examples) == NAMED_SKIPS and log.examples[0] == ("file0", "not an image: detail")

    summary = log.summary()
    assert "skipped 8 bad example(s) of 10 read" in summary
    assert "3 not an image" in summary and "2 empty file" in summary and "3 truncated image" in summary


def test_skiplog_quiet_and_empty():
    log = SkipLog(warn=False)
    assert log.summary() == ""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i in range(NAMED_SKIPS + 2):
            log.add(f"k{i}", "no image")
    assert log.counts["no image"] == NAMED_SKIPS + 2
    assert "skipped 7 bad example(s)" in log.summary()


def test_skiplog_as_dict_merge_round_trip():
    first = SkipLog(warn=False, good=5)
    for kind in ["empty file", "empty file", "unreadable", "too many pixels"]:
        first.add("k", kind)
    state = first.as_dict()
    assert state["good"] == 5 and state["skipped"] == 4
    assert state["by_kind"] == {"empty file": 2, "unreadable": 1, "too many pixels": 1}

    total = SkipLog(warn=False)
    total.merge(state)
    assert total.counts == first.counts and total.good == 5 and total.skipped == 4
    assert total.as_dict() == state
    total.merge(state)
    assert total.good == 10 and total.skipped == 8
    assert total.counts == {"empty file": 4, "unreadable": 2, "too many pixels": 2}
    assert len(total.examples) == NAMED_SKIPS  # named examples stay capped
    assert "skipped 8 bad example(s) of 18 read" in total.summary()
