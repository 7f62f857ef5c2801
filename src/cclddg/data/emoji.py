"""The built-in `emoji` data: every emoji a colour emoji font can draw, on white, captioned with its name.

A small, real, captioned image set that needs no download: the font (Noto Color Emoji, Debian package
`fonts-noto-color-emoji`) and the `emoji` package's English names are all it reads. The list of emoji
is what the *font* draws, not what Unicode defines: a sequence the font cannot shape into one glyph
(an unsupported ZWJ or skin-tone combination) would come out as two or three pictures side by side,
and one it does not know at all as the empty notdef glyph, so both are left out.
"""

from __future__ import annotations

import functools
import os
import re
from collections import Counter
from pathlib import Path

import emoji as emoji_data
from PIL import Image, ImageDraw, ImageFont

from cclddg.data.records import Record
from cclddg.errors import UserError

DEFAULT_FONT_PATHS: tuple[str, ...] = (
    "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf",  # Debian, Ubuntu: fonts-noto-color-emoji
    "/usr/share/fonts/noto/NotoColorEmoji.ttf",  # Arch: noto-fonts-emoji
    "/usr/share/fonts/google-noto-emoji/NotoColorEmoji.ttf",  # Fedora (older)
    "/usr/share/fonts/google-noto-color-emoji-fonts/NotoColorEmoji.ttf",  # Fedora
    "/usr/share/fonts/noto-emoji/NotoColorEmoji.ttf",
    "/usr/local/share/fonts/NotoColorEmoji.ttf",
    "~/.local/share/fonts/NotoColorEmoji.ttf",
    "~/.fonts/NotoColorEmoji.ttf",
    "/Library/Fonts/NotoColorEmoji.ttf",  # macOS
    "~/Library/Fonts/NotoColorEmoji.ttf",
)
MIN_SIZE = 8
# Bitmap colour fonts (CBDT) open only at their strike's size: 109 px for Noto Color Emoji. A scalable
# colour font (COLR) opens at any size; 128 gives it a comparable resolution.
FONT_SIZES: tuple[int, ...] = (109, 128)
NOTDEF_PROBE = "\U0010fffd"  # a private-use code point no emoji font maps: it draws the notdef glyph
ADVANCE_TOLERANCE = 0.01  # relative: one glyph's advance vs. the common emoji advance

_TONES = ("light", "medium-light", "medium", "medium-dark", "dark")
_TONE_RE = re.compile(r"_(" + "|".join(re.escape(t) for t in _TONES) + r")_skin_tone(?=_|$)")
# Group emoji whose CLDR names list their members ("kiss: man, man"); the emoji package runs them together.
_GROUP_PREFIXES = ("kiss", "couple_with_heart", "family")
_MEMBERS = frozenset({"man", "woman", "person", "boy", "girl", "adult", "child", "baby"})
_REGIONAL = range(0x1F1E6, 0x1F1FF + 1)
_BLACK_FLAG, _CANCEL_TAG = "\U0001f3f4", "\U000e007f"


def find_font(path: str | None = None) -> Path:
    """The emoji font to draw with: `path` if given, else the first of `DEFAULT_FONT_PATHS` that exists."""
    if path is not None:
        given = Path(path).expanduser()
        if not given.is_file():
            raise UserError(f"emoji font not found: {path}")
        return given
    for candidate in DEFAULT_FONT_PATHS:
        found = Path(os.path.expanduser(candidate))
        if found.is_file():
            return found
    raise UserError(
        "no colour emoji font found: install the Debian package fonts-noto-color-emoji "
        "(apt-get install fonts-noto-color-emoji) or pass --font PATH"
    )


def _is_flag(sequence: str) -> bool:
    """Two regional indicators (a country) or a black flag with tag letters (England, Scotland, Wales)."""
    if len(sequence) == 2 and all(ord(c) in _REGIONAL for c in sequence):
        return True
    return len(sequence) > 2 and sequence[0] == _BLACK_FLAG and sequence[-1] == _CANCEL_TAG


def emoji_caption(name: str, sequence: str) -> str:
    """The caption for one emoji, from its `emoji`-package English name (`:red_apple:` -> "red apple").

    Skin tones move to the end ("thumbs up, medium skin tone"), the members of a group emoji are listed
    ("kiss, man, man, dark skin tone, light skin tone"), flags say so ("flag of France") and the
    capitals of proper nouns stay. Captions are not unique: a few emoji share a name.
    """
    base = name.strip(":")
    tones = _TONE_RE.findall(base)
    base = _TONE_RE.sub("", base)
    if not base:  # a bare tone swatch: keep its own name
        base, tones = name.strip(":"), []
    for prefix in _GROUP_PREFIXES:
        members = base[len(prefix) + 1:].split("_") if base.startswith(prefix + "_") else []
        if members and all(m in _MEMBERS for m in members):
            base = ", ".join([prefix, *members])
            break
    caption = base.replace("_", " ")
    if _is_flag(sequence):
        caption = f"flag of {caption}"
    return ", ".join([caption, *(f"{tone} skin tone" for tone in tones)])


def _open_font(path: Path) -> ImageFont.FreeTypeFont:
    """Open `path` at the first size it allows, with Raqm so ZWJ and skin-tone sequences shape to one glyph."""
    last: Exception | None = None
    for size in FONT_SIZES:
        try:
            return ImageFont.truetype(str(path), size, layout_engine=ImageFont.Layout.RAQM)
        except (OSError, ValueError) as error:  # "invalid pixel size" for a bitmap strike, or not a font
            last = error
    raise UserError(f"cannot use {path} as an emoji font ({last}): pass a colour emoji font such as NotoColorEmoji.ttf")


def _draw(font: ImageFont.FreeTypeFont, sequence: str) -> Image.Image | None:
    """The glyph's own box, in colour, on a transparent canvas; None when it has no area."""
    left, top, right, bottom = font.getbbox(sequence)
    if right <= left or bottom <= top:
        return None
    canvas = Image.new("RGBA", (right - left, bottom - top), (0, 0, 0, 0))
    # Colour glyphs ignore `fill`; black is for a monochrome font (the default ink would be white on white).
    ImageDraw.Draw(canvas).text((-left, -top), sequence, font=font, fill=(0, 0, 0, 255), embedded_color=True)
    return canvas


@functools.lru_cache(maxsize=8)
def _drawn(path: str, mtime_ns: int, file_size: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Sequences the font at `path` draws as one visible glyph, and their captions (cached: ~2 s per font).

    `mtime_ns` and `file_size` are only part of the cache key, so an edited font file is read again.
    """
    font = _open_font(Path(path))
    names = {
        seq: data["en"]
        for seq, data in emoji_data.EMOJI_DATA.items()
        if data.get("status") == emoji_data.STATUS["fully_qualified"] and data.get("en")
    }
    candidates = sorted(names)  # code point order: the same on every run, whatever the package's order
    lengths = {seq: font.getlength(seq) for seq in candidates}
    advance = Counter(lengths.values()).most_common(1)[0][0] if lengths else 0.0
    if advance <= 0:
        raise UserError(f"{path} draws no emoji: pass a colour emoji font such as NotoColorEmoji.ttf")
    notdef = _draw(font, NOTDEF_PROBE)
    notdef_bytes = notdef.tobytes() if notdef is not None else None
    sequences = []
    for seq in candidates:
        if abs(lengths[seq] - advance) > ADVANCE_TOLERANCE * advance:
            continue  # shaped into several glyphs: the font lacks this combination
        glyph = _draw(font, seq)
        if glyph is None or glyph.getchannel("A").getbbox() is None:
            continue  # nothing visible: the notdef glyph of Noto Color Emoji is transparent
        if notdef_bytes is not None and glyph.size == notdef.size and glyph.tobytes() == notdef_bytes:
            continue  # a visible notdef box ("tofu") in some other font
        sequences.append(seq)
    if not sequences:
        raise UserError(f"{path} draws no emoji in colour: pass a colour emoji font such as NotoColorEmoji.ttf")
    return tuple(sequences), tuple(emoji_caption(names[seq], seq) for seq in sequences)


class EmojiSource:
    """Each emoji the font draws, centred on a white square of `size` pixels, captioned with its name.

    The list is built once per font file (cached); images are drawn only when a record is asked for.
    """

    def __init__(self, font: str | None = None, size: int = 64):
        if size < MIN_SIZE:
            raise UserError(f"emoji image size must be at least {MIN_SIZE} pixels, got {size}")
        self.font_path = find_font(font)
        self.size = size
        stat = self.font_path.stat()
        sequences, captions = _drawn(str(self.font_path.resolve()), stat.st_mtime_ns, stat.st_size)
        self.sequences: list[str] = list(sequences)
        self.captions: list[str] = list(captions)
        self._font: ImageFont.FreeTypeFont | None = None

    def __getstate__(self) -> dict:
        """Pickle without the FreeType face (worker processes open their own)."""
        state = self.__dict__.copy()
        state["_font"] = None
        return state

    def __len__(self) -> int:
        return len(self.sequences)

    def record(self, index: int) -> Record:
        if not 0 <= index < len(self.sequences):
            raise IndexError(f"emoji index {index} out of range 0..{len(self.sequences) - 1}")
        sequence = self.sequences[index]
        key = "emoji " + " ".join(f"U+{ord(c):04X}" for c in sequence)
        return Record(key=key, image=self.render(sequence), caption=self.captions[index])

    def render(self, sequence: str) -> Image.Image:
        """`sequence` composited on white, its glyph box centred in a square, resized to `size` (RGB)."""
        if self._font is None:
            self._font = _open_font(self.font_path)
        glyph = _draw(self._font, sequence)
        if glyph is None:  # cannot happen for a listed sequence unless the font file changed under us
            return Image.new("RGB", (self.size, self.size), (255, 255, 255))
        side = max(glyph.size)
        square = Image.new("RGBA", (side, side), (255, 255, 255, 255))
        square.alpha_composite(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
        return square.convert("RGB").resize((self.size, self.size), Image.Resampling.LANCZOS)

    def describe(self) -> str:
        return f"emoji ({len(self.sequences):,} drawn by {self.font_path.name})"
