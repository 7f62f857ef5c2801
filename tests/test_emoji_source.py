"""The `emoji` source on the real Noto Color Emoji font (CI installs fonts-noto-color-emoji)."""

from __future__ import annotations

from pathlib import Path

import emoji
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from cclddg.data import emoji as emoji_source
from cclddg.data.emoji import DEFAULT_FONT_PATHS, EmojiSource, emoji_caption, find_font
from cclddg.data.records import MapSource
from cclddg.errors import UserError

FONT = Path(DEFAULT_FONT_PATHS[0])
needs_font = pytest.mark.skipif(
    not FONT.is_file(), reason=f"{FONT} missing: apt-get install fonts-noto-color-emoji"
)


@pytest.fixture(scope="module")
def source() -> EmojiSource:
    return EmojiSource(str(FONT), size=64)


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


def _index(source: EmojiSource, caption: str) -> int:
    assert caption in source.captions, f"no emoji captioned {caption!r}"
    return source.captions.index(caption)


@needs_font
def test_count_matches_an_independent_check_of_what_the_font_draws(source):
    font = ImageFont.truetype(str(FONT), 109, layout_engine=ImageFont.Layout.RAQM)
    one_glyph = font.getlength("\U0001f600")
    drawn = []
    for seq, data in emoji.EMOJI_DATA.items():
        if data["status"] != emoji.STATUS["fully_qualified"] or font.getlength(seq) != one_glyph:
            continue
        canvas = Image.new("RGBA", (160, 160))
        ImageDraw.Draw(canvas).text((4, 4), seq, font=font, embedded_color=True)
        if canvas.getchannel("A").getbbox() is not None:
            drawn.append(seq)
    assert 3500 <= len(source) <= 4500
    assert len(source) == len(drawn)
    assert sorted(drawn) == source.sequences
    assert len(source.captions) == len(source.sequences)
    assert isinstance(source, MapSource)
    assert source.describe() == f"emoji ({len(source):,} drawn by NotoColorEmoji.ttf)"


@needs_font
def test_red_apple_and_dog_face_look_right(source):
    record = source.record(_index(source, "red apple"))
    assert record.key == "emoji U+1F34E"
    assert record.caption == "red apple"
    apple = _pixels(record.image)
    assert apple.shape == (64, 64, 3)
    centre = apple[24:40, 24:40].reshape(-1, 3)
    red = (centre[:, 0] > 150) & (centre[:, 1] < 100) & (centre[:, 2] < 100)
    assert red.mean() > 0.6
    dog = _pixels(source.record(_index(source, "dog face")).image)
    assert (dog[20:44, 20:44].min(axis=2) < 240).mean() > 0.5
    for image in (apple, dog):
        for corner in (image[:4, :4], image[:4, -4:], image[-4:, :4], image[-4:, -4:]):
            assert corner.min() >= 250


@needs_font
def test_skin_tone_flag_keycap_and_group_captions(source):
    base = _pixels(source.record(_index(source, "thumbs up")).image)
    toned = source.record(_index(source, "thumbs up, medium skin tone"))
    assert "medium skin tone" in toned.caption
    assert np.abs(_pixels(toned.image) - base).mean() > 5
    assert "kiss, man, man, dark skin tone, light skin tone" in source.captions
    for caption in ("flag of France", "flag of England", "keycap 1"):
        assert caption in source.captions
    france = _pixels(source.record(_index(source, "flag of France")).image)
    assert france[32, 14, 2] > 150 > france[32, 14, 0]  # blue hoist
    assert france[32, 50, 0] > 150 > france[32, 50, 2]  # red fly


@needs_font
def test_every_record_is_well_formed(source):
    assert all(isinstance(c, str) and c.strip() == c and c for c in source.captions)
    for index in range(0, len(source), 97):
        record = source.record(index)
        assert record.image.mode == "RGB" and record.image.size == (64, 64)
        assert record.caption == source.captions[index]
        assert record.error is None
    with pytest.raises(IndexError):
        source.record(len(source))
    with pytest.raises(IndexError):
        source.record(-1)


@needs_font
def test_small_size_works(source):
    small = EmojiSource(str(FONT), size=32)
    image = small.record(_index(small, "red apple")).image
    assert image.mode == "RGB" and image.size == (32, 32)
    assert _pixels(image)[12:20, 12:20, 0].mean() > 150


@needs_font
def test_deterministic_across_sources_and_cache(source):
    emoji_source._drawn.cache_clear()  # enumerate again from scratch, not from the cache
    other = EmojiSource(str(FONT), size=64)
    assert other.sequences == source.sequences
    assert other.captions == source.captions
    for index in (0, 1, len(source) // 2, len(source) - 1):
        assert np.array_equal(_pixels(other.record(index).image), _pixels(source.record(index).image))


def test_size_below_minimum_is_a_user_error():
    with pytest.raises(UserError, match="at least 8"):
        EmojiSource(size=7)


def test_missing_font_is_a_user_error_naming_it():
    with pytest.raises(UserError, match="/nonexistent"):
        find_font("/nonexistent")


def test_no_default_font_says_how_to_install_one(monkeypatch, tmp_path):
    monkeypatch.setattr(emoji_source, "DEFAULT_FONT_PATHS", (str(tmp_path / "none.ttf"),))
    with pytest.raises(UserError, match="apt-get install fonts-noto-color-emoji") as caught:
        find_font()
    assert "--font PATH" in str(caught.value)


def test_non_font_file_is_a_user_error(tmp_path):
    bogus = tmp_path / "not_a_font.ttf"
    bogus.write_text("this is not a font\n")
    assert find_font(str(bogus)) == bogus
    with pytest.raises(UserError, match="not_a_font.ttf"):
        EmojiSource(str(bogus))


def test_captions_from_names():
    assert emoji_caption(":red_apple:", "\U0001f34e") == "red apple"
    assert emoji_caption(":thumbs_up_medium_skin_tone:", "\U0001f44d\U0001f3fd") == "thumbs up, medium skin tone"
    assert (
        emoji_caption(":kiss_man_man_dark_skin_tone_light_skin_tone:", "")
        == "kiss, man, man, dark skin tone, light skin tone"
    )
    assert emoji_caption(":man_dark_skin_tone_bald:", "") == "man bald, dark skin tone"
    assert emoji_caption(":people_holding_hands_medium-light_skin_tone:", "") == (
        "people holding hands, medium-light skin tone"
    )
    assert emoji_caption(":kiss_mark:", "\U0001f48b") == "kiss mark"
    assert emoji_caption(":France:", "\U0001f1eb\U0001f1f7") == "flag of France"
    england = "\U0001f3f4\U000e0067\U000e0062\U000e0065\U000e006e\U000e0067\U000e007f"
    assert emoji_caption(":England:", england) == "flag of England"
    assert emoji_caption(":keycap_1:", "1\ufe0f\u20e3") == "keycap 1"
    assert emoji_caption(":AB_button_(blood_type):", "\U0001f18e") == "AB button (blood type)"


@needs_font
def test_paraphrased_names_are_held_out_emoji_and_score_retrieval():
    """Every paraphrased name is an emoji of the set's fixed held-out part; retrieval by name and by paraphrase
    is scored on those images (an embedder that reads a paraphrase as its name ranks its own image first)."""
    import torch

    from cclddg.data.sources import load_held_out
    from cclddg.evaluation.emoji_paraphrases import EMOJI_PARAPHRASES
    from cclddg.evaluation.retrieval import paraphrase_retrieval

    images, captions = load_held_out("emoji", 16, 1000, 0, workers=0)
    assert set(EMOJI_PARAPHRASES) <= set(captions)
    meaning = {**{c: i for i, c in enumerate(captions)}, **{p: captions.index(c) for c, p in EMOJI_PARAPHRASES.items()}}

    class Reads:  # one axis per held-out image (its index rides in the pixel), a text on the axis it means
        def embed_images(self, x):
            return torch.eye(len(captions))[x[:, 0, 0, 0].long()]

        def embed_texts(self, texts):
            return torch.eye(len(captions))[[meaning[t] for t in texts]]

    indexed = torch.arange(len(captions), dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, 1, 1)
    report = paraphrase_retrieval(Reads(), indexed, captions, EMOJI_PARAPHRASES)
    assert report["n"] == len(EMOJI_PARAPHRASES) and report["images"] == len(captions)
    assert report["names"]["top1"] == 100.0 and report["paraphrases"]["top1"] == 100.0
    assert report["text_only_reference_top1"] == 100.0
